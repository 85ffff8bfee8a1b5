"""Running untrusted Python (a model's HumanEval completion) away from gpt2lab and the machine.

Each program runs in a child process, never in the gpt2lab process: a fresh interpreter
(`python -I -B`) started through `sandbox_child.py`, in a session of its own, with an empty
temporary working folder, an environment of its own (no variable of gpt2lab's process reaches
it) and standard input from /dev/null. Before the program's first line the child sets hard
limits (CPU seconds, address space, file size, open files; processes where the user is not
root) and, where the kernel allows, Landlock (reads only beneath the system's and Python's
folders, writes only beneath the working folder) and a seccomp filter (no new processes or
programs, no signals to other processes, no sockets, no administrator's system calls), and
drops root's capabilities. gpt2lab waits for it with a wall-clock limit, then kills whatever is
left of its process group. Where bubblewrap (`bwrap`) is installed and works, the child also
starts in namespaces of its own: no network at all, a process tree that dies as a whole, and a
file system view that holds the system's and Python's folders read-only and nothing else.

A program passes when it exits with status 0 after its last line, which the child reports with
a marker of the run; an exception, `sys.exit`, `os._exit` before the end, a signal or a limit
reached is a failure. docs/sandbox.md says what each guard stops and what it does not.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

LAUNCHER = Path(__file__).with_name("sandbox_child.py")
ISOLATIONS = ("auto", "bwrap", "process")
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/dev/null",
                     "/dev/urandom", "/dev/zero")
OUTPUT_TAIL = 4096
# How long the killing of a group left behind may take before gpt2lab gives up on it.
KILL_TRIES = 200


@dataclass(frozen=True)
class Limits:
    """What one program may use. `processes` is how many processes a user other than root may
    add (RLIMIT_NPROC counts the whole user's); where the seccomp filter applies, none."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 512 * 2**20
    file_bytes: int = 16 * 2**20
    open_files: int = 64
    processes: int = 16


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout", or "killed by signal N"
    returncode: int | None
    stdout: str = ""  # the last OUTPUT_TAIL characters
    stderr: str = ""
    guards: dict = field(default_factory=dict)  # what took effect: isolation, limits, landlock, seccomp, ...


def _module_paths() -> list[str]:
    """Folders the child needs on its path for the Landlock and seccomp bindings."""
    paths = []
    for name in ("pyseccomp", "landlock"):
        spec = find_spec(name)
        if spec is not None and spec.origin:
            origin = Path(spec.origin)
            paths.append(str(origin.parent.parent if origin.name == "__init__.py" else origin.parent))
    return sorted(set(paths))


def _read_paths() -> list[str]:
    """What the program may read: the system's libraries and programs, and Python's own folders."""
    paths = set(SYSTEM_READ_PATHS) | {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {value for key, value in sysconfig.get_paths().items() if key != "include"}
    paths.add(str(Path(os.path.realpath(sys.executable)).parent))
    paths.update(_module_paths())
    return sorted(p for p in paths if os.path.exists(p))


def _user_processes() -> int:
    """Threads of this user now (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in Path(entry.path, "status").read_text().splitlines() if ":" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _settings(work: Path, limits: Limits, marker: str, status_fd: int) -> dict:
    user_processes = None if os.getuid() == 0 or not Path("/proc").is_dir() else _user_processes() + limits.processes
    return {
        "limits": {"cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes,
                   "file_bytes": limits.file_bytes, "open_files": limits.open_files, "user_processes": user_processes},
        "read": _read_paths(), "work": str(work), "marker": marker, "status_fd": status_fd,
        "module_paths": _module_paths(),
    }


def _bwrap_prefix(work: Path) -> list[str]:
    """bubblewrap's command up to the program: every namespace of its own (no network), the
    system's and Python's folders read-only, a fresh /proc, /dev and /tmp, the working folder."""
    # bubblewrap mounts in the order given: the fresh /tmp first, so that folders beneath it
    # (a virtual environment in /tmp, the working folder) are bound over it, not hidden by it.
    command = ["bwrap", "--unshare-all", "--die-with-parent", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in _read_paths() + [str(LAUNCHER)]:
        if not path.startswith("/dev/"):
            command += ["--ro-bind", path, path]
    command += ["--bind", str(work), str(work), "--chdir", str(work), "--"]
    return command


@lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """Whether bubblewrap is installed and can make its namespaces here (a container may forbid them)."""
    if shutil.which("bwrap") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="gpt2lab-sandbox-") as folder:
        try:
            probe = subprocess.run(_bwrap_prefix(Path(folder)) + [sys.executable, "-I", "-c", "pass"],
                                   capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return probe.returncode == 0


def chosen_isolation(isolation: str = "auto") -> str:
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "auto":
        return "bwrap" if bwrap_works() else "process"
    return isolation


def _environment(work: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until `pid` has ended, leaving it unreaped (so that its number, its process group's,
    cannot be given to another process meanwhile); False at the deadline."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):
        handle = None
    try:
        while True:
            left = deadline - time.monotonic()
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            if left <= 0:
                return False
            if handle is not None:
                select.select([handle], [], [], left)
            else:
                time.sleep(min(left, 0.01))
    finally:
        if handle is not None:
            os.close(handle)


def _group_members(group: int, leader: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != leader:
            try:
                # Fields after the command name, which may hold spaces and parentheses.
                after = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            # A zombie has ended already; its parent's reaping is not ours to wait for.
            if len(after) > 2 and int(after[2]) == group and after[0] != "Z":
                members.append(int(entry.name))
    return members


def _kill_group(leader: int) -> None:
    """SIGKILL to the process group of `leader` (ended or not, unreaped) until none of its other
    members is left: a program that forked (where it could) leaves nothing running."""
    for _ in range(KILL_TRIES):
        try:
            os.killpg(leader, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not Path("/proc").is_dir() or not _group_members(leader, leader):
            return
        time.sleep(0.005)


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
        return handle.read().decode("utf-8", errors="replace")


def _outcome(returncode: int | None, timed_out: bool, private: Path, marker: str) -> Outcome:
    lines = (private / "status").read_text(errors="replace").splitlines()
    guards = {}
    if lines:
        try:
            guards = json.loads(lines[0]).get("guards", {})
        except (json.JSONDecodeError, AttributeError):
            guards = {}
    finished = bool(lines) and lines[-1] == marker
    if timed_out:
        status = "timeout"
    elif returncode is not None and (returncode > 128 or returncode < 0):
        status = f"killed by signal {returncode - 128 if returncode > 0 else -returncode}"
    else:
        status = "passed" if returncode == 0 and finished else "failed"
    return Outcome(status == "passed", status, returncode, _tail(private / "stdout"), _tail(private / "stderr"), guards)


def run_python(source: str, limits: Limits = Limits(), isolation: str = "auto") -> Outcome:
    """Run `source` as a Python program in the sandbox and say how it ended."""
    isolation = chosen_isolation(isolation)
    root = Path(tempfile.mkdtemp(prefix="gpt2lab-sandbox-"))
    try:
        work, private = root / "work", root / "private"
        work.mkdir()
        private.mkdir(mode=0o700)
        (private / "program.py").write_text(source, encoding="utf-8")
        marker = secrets.token_hex(16)
        with open(private / "program.py", "rb") as stdin, open(private / "stdout", "wb") as stdout, \
                open(private / "stderr", "wb") as stderr, open(private / "status", "wb") as status:
            settings = _settings(work, limits, marker, status.fileno())
            command = [sys.executable, "-I", "-B", str(LAUNCHER), json.dumps(settings)]
            if isolation == "bwrap":
                command = _bwrap_prefix(work) + command
            process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, cwd=work,
                                       env=_environment(work), pass_fds=(status.fileno(),), start_new_session=True)
            ended = _wait_unreaped(process.pid, time.monotonic() + limits.wall_seconds)
            _kill_group(process.pid)
            returncode = process.wait()
        outcome = _outcome(None if not ended else returncode, not ended, private, marker)
        outcome.guards["isolation"] = isolation
        return outcome
    finally:
        _remove(root)


def _remove(root: Path) -> None:
    """Delete a run's folders, whatever modes the program left on what it made there."""

    def writable_again(function, path, _error):
        for folder in (Path(path).parent, Path(path)):
            try:
                os.chmod(folder, 0o700)
            except OSError:
                pass
        try:
            function(path)
        except OSError:
            pass

    shutil.rmtree(root, onerror=writable_again)


def run_many(sources: Sequence[str], limits: Limits = Limits(), isolation: str = "auto",
             workers: int | None = None) -> list[Outcome]:
    """`run_python` of each source, `workers` at a time (default: the CPUs this process may use)."""
    isolation = chosen_isolation(isolation)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda source: run_python(source, limits, isolation), sources))
