"""Device and precision choices shared by every command."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise UserError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPUs that support it, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for `dtype` on `device`'s type (a string, as torch.autocast wants);
    a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# mallopt's parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Before 2.39, glibc's memalign put the small remainders it splits off an aligned block into the
# tcache, where they keep the block from merging with its neighbours once freed (glibc bug 30723).
# PyTorch allocates every CPU tensor 64-byte aligned, so with mmap off a loop that frees and
# allocates the same large tensor takes a new block each time: measured on glibc 2.36, a 256 MiB
# tensor made and freed twelve times ended up holding seven to nine blocks (up to 2.3 GiB). With
# mmap on, as by default, such blocks are unmapped and the bug does not arise.
_GLIBC_MEMALIGN_MERGES = (2, 39)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the glibc this process runs on; None elsewhere."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def reuse_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees for its next allocations: no mmap for
    large blocks, no trimming of the heap. A training step frees and allocates the same large
    tensors (activations, logits, gradients, autocast's weight copies) every step; by default each
    block over 32 MiB is mmapped afresh and its pages faulted in and zeroed by the kernel again,
    about a fifth of a 124M bf16 step on a 2-core CPU with AMX (docs/benchmarks.md). The cost: the
    resident set stays at its peak. Applies to the whole process; True where it took effect
    (Linux with glibc 2.39 or later), False elsewhere, where nothing changes: older glibc would
    leak blocks of aligned tensors (see _GLIBC_MEMALIGN_MERGES)."""
    version = glibc_version()
    if platform.system() != "Linux" or version is None or version < _GLIBC_MEMALIGN_MERGES:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold turns trimming off (mallopt(3)).
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: a GPU's free memory, else the machine's available
    RAM (None where this system does not say)."""
    if device.type == "cuda":
        # Blocks PyTorch's caching allocator holds but does not use are free to it too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def check_fits(nbytes: int, device: torch.device, what: str, fix: str) -> None:
    """A UserError before an allocation of `nbytes` that cannot succeed on `device` (instead of
    the allocator's traceback, or the machine swapping itself to a halt)."""
    free = free_memory_bytes(device)
    if free is not None and nbytes > free:
        raise UserError(
            f"{what} needs {format_bytes(nbytes)}, more than the {format_bytes(free)} of memory free on "
            f"{device.type}; {fix}"
        )
