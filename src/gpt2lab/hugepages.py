"""Large CPU tensors in transparent huge pages, switched on when gpt2lab is imported.

PyTorch's CPU allocator asks the kernel for huge pages (2 MiB-aligned blocks with
madvise(MADV_HUGEPAGE)) for every allocation of 2 MiB or more when the environment variable
THP_MEM_ALLOC_ENABLE is 1. It reads the variable once, at its first CPU allocation, so the choice
has to be made before PyTorch allocates anything: hence at import, and only as a default that a
set variable overrides (THP_MEM_ALLOC_ENABLE=0 keeps PyTorch's 4 KiB pages).

Why: a training step allocates its large tensors afresh every step (the head's gradient, logits,
activations), and each fresh block over glibc's mmap threshold is faulted in by the kernel a page at
a time. A (50304, 768) float32 tensor, the head's gradient, took 75 ms to allocate and zero in
4 KiB pages and 15 ms in 2 MiB ones on a 2-core AMD EPYC (docs/benchmarks.md).
"""

from __future__ import annotations

import os
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
