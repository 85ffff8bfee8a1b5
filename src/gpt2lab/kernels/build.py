"""Building and loading gpt2lab's C kernels: the sources of `csrc/` compiled with the system's C
compiler on first use into one shared library in the gpt2lab cache (`<cache>/kernels/<digest of
the sources, compiler and flags>/`), atomically, and loaded with ctypes. The library links the
OpenMP runtime that PyTorch has already loaded (libgomp in the PyPI wheels), so it shares its
threads.

A damaged library must never reach the loader, where it can kill the process (a bus error, an
illegal instruction): the sha256 of each build is recorded beside it, and a cached library that
does not match is built again before it is loaded. A build is bounded (`BUILD_TIMEOUT_S`, the
compiler's whole process group stopped after it) and announced on a terminal; a build that fails
or times out, a library that does not load or lacks an entry point, all leave the plain PyTorch
path in place with one warning.

Each family of kernels (fused, matvec, quantized) has an off switch of its own (`GPT2LAB_*_KERNELS=0`)
and asks `library(switch)` for the library: the library, or None and why not."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from ..cache import cache_dir
from ..files import file_sha256, write_atomic

SOURCES = ("fused.c", "matvec.c", "quantized.c")
HEADER = "gpt2lab_kernels.h"
LIBRARY = "libgpt2lab_kernels.so"
# No contraction into fused multiply-adds: results stay bit for bit those of the PyTorch paths
# they are tested against with compilers that contract by default (clang).
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# A build takes seconds; a compiler still running after this is stuck.
BUILD_TIMEOUT_S = 120

_pointer, _int64 = ctypes.c_void_p, ctypes.c_int64
# The entry points of gpt2lab_kernels.h: (argument types, result type).
SIGNATURES = {
    "gpt2lab_softmax_cross_entropy": ([_pointer, _int64, _int64, _pointer, _pointer, _int64], None),
    "gpt2lab_gelu_tanh_forward": ([_pointer, _pointer, _int64, _int64], None),
    "gpt2lab_gelu_tanh_backward": ([_pointer, _pointer, _pointer, _int64, _int64], None),
    "gpt2lab_matvec": ([_pointer, _int64, _int64, _pointer, _pointer, _int64, _pointer, _int64, _int64], ctypes.c_int),
    "gpt2lab_int8_linear": (
        [_pointer, _int64, _int64, _int64, _pointer, _pointer, _pointer, _int64, _pointer, _int64], None
    ),
    "gpt2lab_int4_linear": ([_pointer, _int64, _int64, _pointer, _pointer, _int64, _pointer, _int64], None),
}


def source_dir() -> Path:
    return Path(str(resources.files("gpt2lab.kernels") / "csrc"))


def compiler() -> list[str] | None:
    """The C compiler's command ($CC may carry words of its own, as "ccache gcc")."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def why_not_here(switch: str) -> str | None:
    """Why AVX2 kernels cannot run here (None where they can), `switch` being their off switch."""
    if os.environ.get(switch) == "0":
        return f"{switch}=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they are for Linux on x86-64, and this is {sys.platform} on {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    missing = _missing_cpu_flags("avx2", "fma", "f16c")
    if missing:
        return f"this CPU does not report {', '.join(missing)}"
    if compiler() is None:
        return "no C compiler (cc, gcc, or $CC) was found"
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags the kernel reports for this CPU (a virtual machine may hide some of them)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _missing_cpu_flags(*flags: str) -> list[str]:
    """Which of `flags` the CPU lacks; none where /proc/cpuinfo cannot tell (PyTorch's AVX2 check stands)."""
    reported = cpu_flags()
    return [flag for flag in flags if reported and flag not in reported]


def build(command: list[str], *, again: bool = False) -> Path:
    """The shared library, compiled once per sources, compiler and flags, and compiled again where
    the cached file no longer has the sha256 recorded when it was built (`again`: compiled anew
    over the cached one, which stays in place until the new one replaces it)."""
    folder = source_dir()
    text = b"".join((folder / name).read_bytes() for name in (HEADER, *SOURCES))
    digest = hashlib.sha256(text + " ".join([*command, *FLAGS]).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / digest / LIBRARY
    if not again and _intact(library):
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, building = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
    os.close(handle)
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            print(f"gpt2lab: building its C kernels into {library.parent} (once; at most {BUILD_TIMEOUT_S} s)",
                  file=sys.stderr, flush=True)
        _compile([*command, *FLAGS, f"-I{folder}", *(str(folder / name) for name in SOURCES), "-o", building],
                 shlex.join(command))
        built = file_sha256(Path(building))
        os.replace(building, library)  # another process building the same library is harmless
        write_atomic(_digest_file(library), lambda path: path.write_text(built + "\n"))
    finally:
        Path(building).unlink(missing_ok=True)
    return library


def _digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether `library` is the file that was built (a library cached before digests were
    recorded counts as damaged, and is built once more)."""
    try:
        return file_sha256(library) == _digest_file(library).read_text().strip()
    except OSError:
        return False


def _compile(arguments: list[str], name: str) -> None:
    """Run the compiler in a process group of its own, output to a file: at the time limit the whole
    group is stopped, and no process it left behind holds a pipe that would keep this one waiting."""
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(arguments, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} did not finish within {BUILD_TIMEOUT_S} s and was stopped") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if code:
            output.seek(0)
            raise RuntimeError(f"{name} failed: {output.read().decode(errors='replace').strip()[-500:]}")


def _declared(library: ctypes.CDLL) -> ctypes.CDLL:
    for name, (argtypes, restype) in SIGNATURES.items():
        try:
            function = getattr(library, name)
        except AttributeError:
            raise OSError(f"{library._name} has no {name}") from None
        function.argtypes, function.restype = argtypes, restype
    return library


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        command = compiler()
        try:
            return _declared(ctypes.CDLL(str(build(command)))), None
        except OSError:
            # A cached library that no longer loads (a system library changed since it was built)
            # or lacks an entry point is built once more rather than given up on for good;
            # replaced, never removed, so that another process loading it meanwhile finds a file.
            # (The loader hands a process that opened the old file that one again: the rebuilt
            # library serves the next process.)
            return _declared(ctypes.CDLL(str(build(command, again=True)))), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"they could not be built or loaded ({error})"


def library(switch: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why the kernels of `switch` cannot run here)."""
    reason = why_not_here(switch)
    if reason is not None:
        return None, reason
    return _load()


def library_or_none(switch: str, family: str, fallback: str) -> ctypes.CDLL | None:
    """The library for the kernels of `switch`, or None. Only a failed build or load warns, naming
    `family` and what runs instead (`fallback`): elsewhere (another platform, no compiler, the
    switch) PyTorch is simply what runs."""
    if why_not_here(switch) is not None:
        return None
    loaded, reason = library(switch)
    if loaded is None:
        warnings.warn(f"gpt2lab's {family} are not used: {reason}; {fallback}", stacklevel=4)
    return loaded


def forget() -> None:
    """Drop what was loaded and decided, so that the next call builds or loads again (tests)."""
    _load.cache_clear()
    cpu_flags.cache_clear()
