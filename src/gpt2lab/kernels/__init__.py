"""gpt2lab's CPU fast paths, behind one door.

`accelerate(model)` is the one place they are applied: for a model on a CPU it swaps, in place,
- every nn.Linear for `linear.CPULinear` (matrix-vector kernels for eager decoding, oneDNN on AMD
  CPUs with AVX-512, float32 products under bfloat16 autocast without fast bfloat16);
- every tanh nn.GELU for `fused.FusedGELU` (fused float32 forward and backward kernels);
- every CausalSelfAttention for `attention.CPUSelfAttention` (bfloat16 in float32 without fast
  bfloat16, a compiled single-query step written out for inductor);
- int8 and int4 layers for ones whose products run in the quantized kernels;
- the chunked loss's operations for `loss.CPUHeadKernels` (the fused softmax cross-entropy);
and returns it. Parameters, state dict and results (to rounding) stay the model's own. Anywhere
else (a GPU, MPS, meta) it returns the model untouched and imports nothing more.

The C sources (`csrc/`, one library) are built with the system's compiler the first time a kernel
runs (`build`); where they cannot run, each path falls back to PyTorch's operators. Each family has
an off switch: GPT2LAB_FUSED_KERNELS=0, GPT2LAB_MATVEC_KERNELS=0, GPT2LAB_QUANTIZED_KERNELS=0.

Process-wide memory settings for CPU training (`memory`): `tune_cpu_memory()`. Every private
PyTorch API gpt2lab uses sits in `torch_compat`, behind a check, with a public fallback. Nothing
here runs on import.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def accelerate(model: nn.Module) -> nn.Module:
    """`model` with the CPU fast paths swapped in where its weights lie in CPU memory; elsewhere
    `model` as it is. Idempotent; call it again after replacing layers (quantizing)."""
    # A quantized layer's weights are buffers: it has no parameters of its own.
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    if first is None or first.device.type != "cpu":
        return model
    from .overrides import accelerate_on_cpu

    return accelerate_on_cpu(model)


def tune_cpu_memory(reuse_freed: bool = True) -> dict[str, bool]:
    """Huge pages for large CPU tensors and, with `reuse_freed`, freed memory kept for the next
    allocation (see `memory`): for the whole process, so call it before the first tensor is
    allocated. Returns which of the two took effect."""
    from .memory import prefer_huge_pages, reuse_freed_cpu_memory

    return {"huge_pages": prefer_huge_pages(), "reuse_freed": reuse_freed and reuse_freed_cpu_memory()}


def decoding_compile_settings(device: torch.device) -> ContextManager[None]:
    """The settings under which a decoding step compiles on `device` (`compile.py` for a CPU)."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from .compile import cpu_decoding_settings

    return cpu_decoding_settings()


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    from .torch_compat import mark_dynamic as mark

    mark(tensor, dim)


def forget_compiled(function: Any) -> None:
    from .torch_compat import forget_compiled as forget

    forget(function)


def compiler_failure(error: BaseException) -> BaseException | None:
    from .torch_compat import compiler_failure as failure

    return failure(error)


def tensor_version(tensor: torch.Tensor) -> object:
    from .torch_compat import tensor_version as version

    return version(tensor)
