"""HumanEval completions that attack the evaluator or the machine come back as failed examples, each
within its limits, with the evaluator, a bystander process and the files around unharmed; both
with bubblewrap (where it is installed and works) and without it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpt2lab import sandbox
from gpt2lab.chat.tasks import Example
from gpt2lab.eval.chatcore import judge

LIMITS = sandbox.Limits(wall_seconds=5, cpu_seconds=4)
PROMPT = 'def attack():\n    """Return True if the attack worked."""\n'
TESTS = "\n\ndef check(candidate):\n    assert candidate() is True\n\ncheck(attack)\n"
ISOLATIONS = ["process", pytest.param("bwrap", marks=pytest.mark.skipif(
    not sandbox.bwrap_works(), reason="bubblewrap is not installed or cannot make namespaces here"))]


class Listener:
    """A TCP server on 127.0.0.1 that records whether anyone connected."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.server.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                connection, _ = self.server.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.server.close()


def attacks(outside: Path, secret_file: Path, bystander: int, port: int) -> dict[str, str]:
    """Each attack as the body of `attack()`: True when it got through."""
    return {
        "loops forever": "    while True:\n        pass\n",
        "allocates 50 GB": "    block = bytearray(50 * 2**30)\n    return len(block) > 0\n",
        "forks without end": "    import os\n    while True:\n        os.fork()\n",
        "writes outside its folder": f"    open({str(outside)!r}, 'w').write('x')\n    return True\n",
        "reads ~/.ssh": (
            "    import os\n"
            f"    for path in (os.path.expanduser('~/.ssh/id_rsa'), {str(secret_file)!r}):\n"
            "        try:\n"
            "            if 'SECRET-KEY' in open(path).read():\n"
            "                return True\n"
            "        except OSError:\n"
            "            pass\n"
            "    return False\n"
        ),
        "reads the environment": (
            "    import os\n"
            "    if os.environ.get('GPT2LAB_TEST_SECRET') == 's3cr3t':\n"
            "        return True\n"
            f"    for pid in ('self', os.getppid(), {os.getpid()}):\n"
            "        try:\n"
            "            if b's3cr3t' in open(f'/proc/{pid}/environ', 'rb').read():\n"
            "                return True\n"
            "        except OSError:\n"
            "            pass\n"
            "    return False\n"
        ),
        "opens a socket to 127.0.0.1": (
            "    import socket\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
            "    return True\n"
        ),
        "kills its parent and a bystander": (
            "    import os, signal\n"
            f"    os.kill({bystander}, signal.SIGKILL)\n"
            "    os.kill(os.getppid(), signal.SIGKILL)\n"
            "    return True\n"
        ),
    }


def leftover_children() -> list[str]:
    """Processes still running the sandbox's child script."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                command = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if b"sandbox_child.py" in command:
                found.append(entry.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the attacks and the checks read Linux's /proc")
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_attacks_fail_and_harm_nothing(tmp_path, monkeypatch, isolation):
    guards = sandbox.run_python("print('probe')", LIMITS, isolation).guards
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    secret_file = home / ".ssh" / "id_rsa"
    secret_file.write_text("SECRET-KEY\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GPT2LAB_TEST_SECRET", "s3cr3t")
    outside = tmp_path / "outside.txt"
    bystander = subprocess.Popen(["sleep", "60"])
    listener = Listener()
    try:
        cases = attacks(outside, secret_file, bystander.pid, listener.port)
        if not guards.get("seccomp") and os.getuid() == 0:
            # Root ignores RLIMIT_NPROC: without the filter nothing would bound the forks.
            cases.pop("forks without end")
        cases["honest"] = "    return True\n"
        examples = [Example("humaneval", name, name, PROMPT, "", tests=TESTS) for name in cases]
        rights, seen = judge(examples, list(cases.values()), isolation, LIMITS)
        assert dict(zip(cases, rights)) == {name: name == "honest" for name in cases}
        assert seen["isolation"] == isolation
        assert not outside.exists()
        assert listener.connections == 0
        assert bystander.poll() is None  # still alive, as is this process
        assert leftover_children() == []
    finally:
        listener.close()
        bystander.kill()
        bystander.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="Landlock and seccomp are Linux's")
def test_the_guards_this_machine_allows_take_effect():
    outcome = sandbox.run_python("import os\nprint(sorted(os.environ), os.getcwd())", LIMITS, "process")
    assert outcome.passed and outcome.status == "passed"
    names, folder = outcome.stdout.rsplit("] ", 1)
    assert names + "]" == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert "gpt2lab-sandbox-" in folder and folder.strip().endswith("/work")
    assert outcome.guards["limits"] == ["cpu_seconds", "memory_bytes", "file_bytes", "open_files"] + (
        [] if os.getuid() == 0 else ["user_processes"])
    # A program that leaves early is no pass, even with status 0.
    early = sandbox.run_python("import os\nos._exit(0)\n", LIMITS, "process")
    assert (early.passed, early.status, early.returncode) == (False, "failed", 0)
    assert not sandbox.run_python("import sys\nsys.exit(0)\n", LIMITS, "process").passed


@pytest.mark.skipif(not sandbox.bwrap_works(), reason="bubblewrap is not installed or cannot make namespaces here")
def test_bubblewrap_sees_read_paths_beneath_tmp(tmp_path, monkeypatch):
    """A virtual environment in /tmp must stay visible under bubblewrap's fresh /tmp."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "note.txt").write_text("seen")
    real_paths = sandbox._read_paths()
    monkeypatch.setattr(sandbox, "_read_paths", lambda: real_paths + [str(shelf)])
    result = sandbox.run_python(f"assert open({str(shelf / 'note.txt')!r}).read() == 'seen'", LIMITS, "bwrap")
    assert result.passed, result
