"""The `gpt2lab serve` verb: its manual, its errors, and a real server process."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")

from gpt2lab.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def folder(make_model_folder):
    return make_model_folder("cli", n_layer=1, n_embd=16, block_size=64, vocab_size=50257)


def test_help_is_a_complete_manual(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model", "--served-model-name", "--host", "--port", "--max-concurrency",
        "--max-new-tokens-limit", "--device", "--dtype", "--log-level",
    ):
        assert option in text
    assert "examples:" in text and "/v1/completions" in text and "127.0.0.1" in text


def test_a_taken_port_is_a_clear_error(folder, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(folder), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nothing-here"), "--port", "0"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_the_verb_serves_until_interrupted(folder):
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "serve", "--model", str(folder), "--port", "0",
         "--served-model-name", "mine", "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        match = re.search(r"mine at (http://127\.0\.0\.1:\d+)/", line)
        assert match, line
        url = match.group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    assert json.load(response)["model"] == "mine"
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": "mine", "prompt": "Hi", "max_tokens": 5}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["usage"]["completion_tokens"] == 5
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130  # the shell's code for "ended by Ctrl-C"
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
