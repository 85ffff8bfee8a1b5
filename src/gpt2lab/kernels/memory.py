"""The process's CPU memory settings for training: large tensors in transparent huge pages
(`prefer_huge_pages`) and freed memory kept for the next allocation (`reuse_freed_cpu_memory`).
Both change the whole process, so a library never applies them on import: the CLI's verbs do
(`gpt2lab.cli`), and a Python program that wants them calls `gpt2lab.kernels.tune_cpu_memory()`
first thing, before it allocates a tensor.

Huge pages: PyTorch's CPU allocator asks the kernel for huge pages (2 MiB-aligned blocks with
madvise(MADV_HUGEPAGE)) for every allocation of 2 MiB or more when the environment variable
THP_MEM_ALLOC_ENABLE is 1. It reads the variable once, at its first CPU allocation, so the choice
has to be made before PyTorch allocates anything, and only as a default that a set variable
overrides (THP_MEM_ALLOC_ENABLE=0 keeps PyTorch's 4 KiB pages). A training step allocates its large
tensors afresh every step (the head's gradient, logits, activations), and each fresh block over
glibc's mmap threshold is faulted in by the kernel a page at a time; in 2 MiB pages that costs a
fraction (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

THP_SWITCH = "THP_MEM_ALLOC_ENABLE"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_offers_huge_pages() -> bool:
    """Whether this kernel gives huge pages to memory that asks for them: Linux with transparent
    huge pages in mode `always` or `madvise` (the selected one is in brackets)."""
    try:
        mode = THP_MODE_FILE.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def prefer_huge_pages() -> bool:
    """Set THP_MEM_ALLOC_ENABLE=1 unless it is set already or the kernel has no huge pages to give
    (where PyTorch would warn that madvise failed). True where it is now 1. It takes effect only if
    PyTorch has not allocated a CPU tensor yet in this process; child processes inherit it."""
    if THP_SWITCH not in os.environ and sys.platform.startswith("linux") and kernel_offers_huge_pages():
        os.environ[THP_SWITCH] = "1"
    return os.environ.get(THP_SWITCH) == "1"


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
    a large share of a step's time on a CPU (docs/benchmarks.md). The cost: the
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
