"""Building and loading gpt2lab's C kernels (`quantized_kernels.c`, `fused_kernels.c`,
`matvec_kernels.c`): compiled with the system's C compiler on first use into the gpt2lab cache
(`<cache>/kernels/<digest of source, compiler and flags>/`), atomically, and loaded with ctypes.
They link the OpenMP runtime that PyTorch has already loaded (libgomp in the PyPI wheels), so they
share its threads."""

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
from pathlib import Path

import torch

from .cache import cache_dir

# No contraction into fused multiply-adds: results stay bit for bit those of the PyTorch paths
# they are tested against with compilers that contract by default (clang).
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
BUILD_TIMEOUT_S = 300


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
def _cpu_flags() -> frozenset[str]:
    """The flags the kernel reports for this CPU (a virtual machine may hide some of them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _missing_cpu_flags(*flags: str) -> list[str]:
    """Which of `flags` the CPU lacks; none where /proc/cpuinfo cannot tell (PyTorch's AVX2 check stands)."""
    reported = _cpu_flags()
    return [flag for flag in flags if reported and flag not in reported]


def build(source: Path, name: str, command: list[str], *, again: bool = False) -> Path:
    """The shared library `name` built from `source`, compiled once per source, compiler and flags
    (`again`: compiled anew over the cached one, which stays in place until the new one replaces it)."""
    digest = hashlib.sha256(source.read_bytes() + " ".join([*command, *FLAGS]).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / digest / name
    if library.exists() and not again:
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, building = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run([*command, *FLAGS, str(source), "-o", building], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed: {result.stderr.strip()[-500:]}")
        os.replace(building, library)  # another process building the same library is harmless
    finally:
        Path(building).unlink(missing_ok=True)
    return library


def load(source: Path, name: str, command: list[str]) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why it could not be built or loaded)."""
    try:
        library = build(source, name, command)
        try:
            return ctypes.CDLL(str(library)), None
        except OSError:
            # A cached library that no longer loads (a damaged file, a system library changed
            # since) is built once more rather than given up on for good; replaced, never removed,
            # so that another process loading it meanwhile finds a file.
            return ctypes.CDLL(str(build(source, name, command, again=True))), None
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"they could not be built or loaded ({error})"
