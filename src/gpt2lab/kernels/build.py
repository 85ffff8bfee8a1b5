"""Building and loading gpt2lab's C kernels: the sources of `csrc/` compiled with the system's C
compiler on first use into one shared library in the gpt2lab cache (`<cache>/kernels/<digest of
the sources, compiler and flags>/`), atomically, and loaded with ctypes. The library links the
OpenMP runtime that PyTorch has already loaded (libgomp in the PyPI wheels), so it shares its
threads.

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
import subprocess
import sys
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from ..cache import cache_dir

SOURCES = ("fused.c", "matvec.c", "quantized.c")
HEADER = "gpt2lab_kernels.h"
LIBRARY = "libgpt2lab_kernels.so"
# No contraction into fused multiply-adds: results stay bit for bit those of the PyTorch paths
# they are tested against with compilers that contract by default (clang).
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
BUILD_TIMEOUT_S = 300

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
    """The shared library, compiled once per sources, compiler and flags (`again`: compiled anew
    over the cached one, which stays in place until the new one replaces it)."""
    folder = source_dir()
    text = b"".join((folder / name).read_bytes() for name in (HEADER, *SOURCES))
    digest = hashlib.sha256(text + " ".join([*command, *FLAGS]).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / digest / LIBRARY
    if library.exists() and not again:
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, building = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
    os.close(handle)
    try:
        sources = [str(folder / name) for name in SOURCES]
        result = subprocess.run([*command, *FLAGS, f"-I{folder}", *sources, "-o", building], capture_output=True,
                                text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()[-500:]}")
        os.replace(building, library)  # another process building the same library is harmless
    finally:
        Path(building).unlink(missing_ok=True)
    return library


def _declared(library: ctypes.CDLL) -> ctypes.CDLL:
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        command = compiler()
        try:
            return _declared(ctypes.CDLL(str(build(command)))), None
        except OSError:
            # A cached library that no longer loads (a damaged file, a system library changed
            # since) is built once more rather than given up on for good; replaced, never removed,
            # so that another process loading it meanwhile finds a file.
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
