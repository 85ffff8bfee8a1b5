"""Bad settings and inputs of `sample`, `train`, `bench` and the model resolver: each is one line
naming the problem and the fix, exit status 2, no traceback, and nothing allocated or written first."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import gpt2lab.pretrained as pretrained
from gpt2lab import GPT, UserError, load_model
from gpt2lab.cli import main
from gpt2lab.config import GPTConfig
from gpt2lab.data.prepare import prepare
from gpt2lab.pretrained import save_pretrained
from gpt2lab.train.config import resolve_config

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def model_dir(make_model_folder):
    return make_model_folder("bad-settings", **TINY)


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    model = GPT(GPTConfig(**TINY))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, :5] = float("nan")
    return save_pretrained(model, tmp_path_factory.mktemp("nan") / "model")


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = root / "input.txt"
    text.write_text("".join(chr(ord("a") + (i * 7) % 26) for i in range(40_000)))
    folder = root / "chars"
    prepare("shakespeare-char", folder, input_file=text, progress=False, log=lambda m: None)
    return folder


# ---- sample ----------------------------------------------------------------------------------------


def test_sample_max_new_tokens_beyond_memory_is_refused_before_any_output(capsys, model_dir):
    code, out, err = run_cli(
        capsys, "sample", "--model", model_dir, "--device", "cpu", "--max-new-tokens", 10**12, "--prompt", "Hi"
    )
    assert_one_line_error(code, err, "max_new_tokens=1000000000000", "ask for fewer new tokens", "TB")
    assert out == ""


def test_generate_refuses_buffers_beyond_memory_for_python_callers(make_model):
    model = make_model()
    with pytest.raises(UserError, match="max_new_tokens=1000000000000"):
        model.generate([[1, 2]], 10**12)
    with pytest.raises(UserError, match="max_new_tokens"):
        model.generate_stream([[1, 2]], 10**12)  # refused on the call, not on the first token


def test_sample_prompt_file_naming_a_folder(capsys, model_dir, tmp_path):
    code, out, err = run_cli(capsys, "sample", "--model", model_dir, "--prompt-file", tmp_path)
    assert_one_line_error(code, err, f"--prompt-file {tmp_path} is a folder")
    assert out == ""


def test_sample_from_a_model_with_nan_weights(capsys, nan_model_dir):
    code, out, err = run_cli(capsys, "sample", "--model", nan_model_dir, "--device", "cpu", "--max-new-tokens", 5)
    assert_one_line_error(code, err, "NaN or infinite", "5 of 1,024 in transformer.h.0.mlp.c_fc.weight", "earlier checkpoint")
    assert out == ""


def test_convert_refuses_a_model_with_nan_weights(capsys, nan_model_dir, tmp_path):
    code, out, err = run_cli(capsys, "convert", nan_model_dir, "--out", tmp_path / "export")
    assert_one_line_error(code, err, "NaN or infinite", "5 of 1,024 in transformer.h.0.mlp.c_fc.weight", "earlier checkpoint")
    assert out == "" and not (tmp_path / "export").exists()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_refuses_nan_predictions_instead_of_sampling_garbage(nan_model_dir, temperature):
    model = load_model(nan_model_dir)
    with pytest.raises(UserError, match="NaN or infinite at new token 1"):
        model.generate([[1, 2, 3]], 4, temperature=temperature)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_sample_seed_beyond_64_bits(capsys, model_dir, seed):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(model_dir), "--seed", str(seed)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: {seed} does not fit in 64 bits; give a seed from 0 to {2**64 - 1}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("seed", [2**64 - 1, -1])
def test_sample_seeds_at_the_64_bit_edges_still_work(capsys, model_dir, seed):
    code, out, err = run_cli(
        capsys, "sample", "--model", model_dir, "--device", "cpu", "--max-new-tokens", 3, "--seed", seed, "--prompt", "A"
    )
    assert code == 0, err
    assert out.startswith("A")


# ---- bench -----------------------------------------------------------------------------------------


def test_bench_json_into_a_missing_folder_is_refused_before_the_benchmark(capsys, tmp_path, monkeypatch):
    def no_benchmark(args):
        raise AssertionError("the benchmark ran before --json was checked")

    monkeypatch.setattr("gpt2lab.cli.bench.run_ladder", no_benchmark)
    target = tmp_path / "no-such-folder" / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--json", target)
    assert_one_line_error(code, err, f"the folder {target.parent} does not exist", "create it")
    assert out == "" and not target.parent.exists()
    code, out, err = run_cli(capsys, "bench", "--json", tmp_path)
    assert_one_line_error(code, err, f"--json {tmp_path} is a folder")


def test_bench_json_is_written_whole(capsys, tmp_path, monkeypatch):
    rows = [{"rung": "fp32 baseline", "step_ms": 1.0, "tokens_per_s": 2.0, "mfu": None, "first_loss": 3.0,
             "last_loss": 2.5}]
    monkeypatch.setattr("gpt2lab.cli.bench.run_ladder", lambda args: rows)
    target = tmp_path / "bench.json"
    code, _, err = run_cli(capsys, "bench", "--json", target)
    assert code == 0, err
    import json

    assert json.loads(target.read_text()) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_bench_stops_when_told_and_says_which_rungs_finished(tmp_path, how):
    """Ctrl-C or SIGTERM stop the ladder: the cut rung is no row, no rung after it runs, exit non-zero."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "bench", "--device", "cpu", "--micro-batch", "1", "--seq-len", "16",
         "--steps", "100000", "--warmup", "0", "--rungs", "1", "2", "--set", "model.n_layer=1",
         "--set", "model.n_head=2", "--set", "model.n_embd=32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        deadline = time.time() + 120
        while not any(p.stat().st_size for p in tmp_path.glob("*/rung0/metrics.jsonl")):  # rung 1 is stepping
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.05)
        process.send_signal(how)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + how, err
    assert "fp32 baseline |" not in out and "TF32" not in out  # only the table's header
    assert f"{how.name} during rung 'fp32 baseline': stopped. Rungs finished: none" in err
    assert "Traceback" not in err


# ---- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=inf", "optim.lr=nan", "optim.min_lr=nan", "optim.grad_clip=inf", "optim.weight_decay=inf",
        "optim.eps=inf", "optim.muon_weight_decay=inf", "system.peak_flops=inf", "schedule.decay_fraction=nan",
        "model.layer_norm_epsilon=inf", "model.dropout=nan",
    ],
)
def test_every_float_setting_must_be_finite(override):
    key, _, value = override.partition("=")
    with pytest.raises(UserError, match=rf"^{key} must be a finite number, got {value}; give a finite value$"):
        resolve_config("shakespeare-char-cpu", overrides=[override]).validate()


def test_a_model_config_from_python_must_be_finite_too():
    with pytest.raises(UserError, match="model.layer_norm_epsilon must be a finite number"):
        GPTConfig(layer_norm_epsilon=float("inf"))


def test_train_with_an_infinite_learning_rate_exits_2(capsys, char_data, tmp_path):
    code, _, err = run_cli(
        capsys, "train", "--preset", "shakespeare-char-cpu", "--set", f"data.path={char_data}",
        "--set", "optim.lr=inf", "--out", tmp_path / "run",
    )
    assert_one_line_error(code, err, "optim.lr must be a finite number, got inf")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_seed_beyond_64_bits_exits_2(capsys, char_data, tmp_path):
    code, _, err = run_cli(
        capsys, "train", "--preset", "shakespeare-char-cpu", "--set", f"data.path={char_data}",
        "--set", f"system.seed={2**64}", "--out", tmp_path / "run",
    )
    assert_one_line_error(code, err, "system.seed (18446744073709551616) does not fit in 64 bits")


def test_a_block_size_beyond_memory_is_refused_before_allocating(capsys, char_data, tmp_path):
    code, _, err = run_cli(
        capsys, "train", "--preset", "shakespeare-char-cpu", "--set", f"data.path={char_data}",
        "--set", "model.block_size=1e9", "--set", "max_steps=1", "--out", tmp_path / "run",
    )
    assert_one_line_error(
        code, err, "its largest tensor, transformer.wpe.weight, is 1000000000 x 128", "more than the",
        "check model.block_size",
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- the model resolver ----------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(repo_id):
        raise AssertionError(f"{repo_id} was sent to the hub")

    monkeypatch.setattr(pretrained, "_download_from_hub", refuse)


def test_a_mistyped_folder_whose_parent_exists_is_no_such_folder(tmp_path, monkeypatch, no_hub, model_dir):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "my-run").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_model("runs/my-rnu")  # owner/name in form: before this, a hub download
    message = str(info.value)
    assert "no such folder (runs has no 'my-rnu'; did you mean runs/my-run?)" in message
    assert "hub" not in message.replace("hub name", "")


@pytest.mark.parametrize("name", ["./gpt2-weigths", "data/runs/x", "~/no-such-gpt2lab-folder", "weights/"])
def test_names_that_look_like_paths_are_no_such_folder(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        load_model(name)


def test_hub_ids_whose_owner_is_no_folder_still_go_to_the_hub(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(pretrained, "_download_from_hub", lambda repo_id: asked.append(repo_id) or tmp_path)
    monkeypatch.chdir(tmp_path)
    pretrained.resolve_model_path("openai-community/gpt2")
    assert asked == ["openai-community/gpt2"]


@pytest.mark.parametrize("verb", [["sample"], ["serve", "--port", "0"], ["eval", "loss", "--data"]])
def test_every_verb_reports_no_such_folder(capsys, tmp_path, monkeypatch, no_hub, verb, char_data):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    if verb[-1] == "--data":
        verb = [*verb, char_data]
    code, _, err = run_cli(capsys, *verb, "--model", "runs/my-rnu")
    assert_one_line_error(code, err, "no such folder (runs has no 'my-rnu')")
