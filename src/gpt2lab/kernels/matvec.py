"""Products of a few rows with float32, bfloat16 or float16 weights on a CPU (`csrc/matvec.c`):
the linear layers of eager decoding, where a step reads every weight once and its speed is how fast
the weights stream from memory. MKL's float32 matrix-vector product runs on one thread, PyTorch's
bfloat16 product converts element by element (docs/benchmarks.md has the figures).

Built on first use and loaded as `build` says. Where they cannot run (not Linux on x86-64 with
AVX2, FMA and F16C, no compiler, `GPT2LAB_MATVEC_KERNELS=0`), `takes` says no and `linear.CPULinear`
calls F.linear, which gives the same products to rounding."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import build, torch_compat

SWITCH = "GPT2LAB_MATVEC_KERNELS"
# Each weight row, read once, serves every input row from the L1 cache, so the kernels win while
# the weights' memory traffic dominates: against MKL up to 16 rows in float32, past that no longer
# (docs/benchmarks.md). bfloat16 won at every size on CPUs without native bfloat16, but one limit
# keeps one rule.
MAX_ROWS = 16
TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not fake, functional or other subclasses


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build.library_or_none(
        SWITCH, "matrix-vector CPU kernels", "decoding's linear layers run through PyTorch instead, up to twice as slow"
    )


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernels compute F.linear(x, weight, bias) here: no gradient wanted, outside
    torch.compile, tracing, vmap, forward-mode AD and autocast, plain dense CPU tensors of one
    supported dtype, a row-major weight, a bias of one value per output, at most MAX_ROWS rows.
    Anything else would read memory the kernels cannot (meta, fake or GPU tensors) or record
    nothing in a graph."""
    return (
        not torch.is_grad_enabled()
        and type(x) is torch.Tensor
        and type(weight) in _PLAIN
        and x.dtype in TYPES
        and weight.dtype == x.dtype
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.layout == torch.strided
        and weight.layout == torch.strided
        and weight.dim() == 2
        and weight.is_contiguous()
        and (bias is None or _plain_bias(bias, weight))
        and 0 < x.numel() <= MAX_ROWS * weight.size(1)
        and x.size(-1) == weight.size(1)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and not torch_compat.forward_ad_active()
        and not torch_compat.is_functorch_wrapped(x)
        and _library() is not None
    )


def _plain_bias(bias: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        type(bias) in _PLAIN
        and bias.dtype == weight.dtype
        and bias.device.type == "cpu"
        and bias.layout == torch.strided
        and bias.shape == weight.shape[:1]
        and bias.is_contiguous()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in the kernels, for inputs `takes` accepts: float32 sums, the
    result rounded once to x's dtype."""
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device="cpu")
    failed = _library().gpt2lab_matvec(x.data_ptr(), x.numel() // k, k, weight.data_ptr(),
                                       None if bias is None else bias.data_ptr(), n, y.data_ptr(),
                                       TYPES[x.dtype], torch.get_num_threads())
    if failed:
        raise MemoryError(f"gpt2lab's matrix-vector kernels could not allocate {x.numel() * 4} bytes")
    return y
