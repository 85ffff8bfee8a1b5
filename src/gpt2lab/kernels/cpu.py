"""What this CPU and this PyTorch offer, asked once when first needed (never at import)."""

from __future__ import annotations

import functools

import torch

from . import build, torch_compat

# The answers a compiled graph reads (torch.compile would break its graph on the asking itself):
# filled by `accelerate` through `for_compile`; until then the safe answer.
_FOR_COMPILE = {"fast_bfloat16": False}


@functools.cache
def amd_with_avx512() -> bool:
    """MKL picks its float32 kernels by the CPU's vendor and gives AMD's no AVX-512 code, so there
    oneDNN's matmul is the faster one (docs/benchmarks.md); elsewhere MKL is as fast or faster."""
    try:
        with open("/proc/cpuinfo", errors="replace") as handle:
            vendor_is_amd = "AuthenticAMD" in handle.read()
    except OSError:  # not Linux: no such file
        return False
    return vendor_is_amd and "avx512f" in build.cpu_flags()


@functools.cache
def _fast_bfloat16() -> bool:
    return torch_compat.onednn_has_fast_bfloat16()


def fast_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 quickly (AVX-512 BF16 or AMX). Without it (an
    AVX2-only CPU, say) oneDNN has no bfloat16 matmul and PyTorch's converts element by element."""
    if torch.compiler.is_compiling():
        return _FOR_COMPILE["fast_bfloat16"]
    return _fast_bfloat16()


@functools.cache
def onednn_linear() -> bool:
    """Whether float32 linear layers go through oneDNN here (asked outside torch.compile only)."""
    return torch_compat.onednn_linear_op() is not None and amd_with_avx512()


def for_compile() -> None:
    _FOR_COMPILE["fast_bfloat16"] = _fast_bfloat16()
