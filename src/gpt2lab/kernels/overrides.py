"""What `accelerate` swaps on a CPU: each module class for its CPU subclass, in place (the
parameters, buffers and state dict stay those of the module), and the loss's operations."""

from __future__ import annotations

import torch.nn as nn

from ..model import Transformer, CausalSelfAttention
from ..quantize import Int4Linear, Int8Linear
from . import cpu, fused
from .attention import CPUSelfAttention
from .fused import FusedGELU
from .linear import CPULinear
from .loss import HEAD_KERNELS
from .quantized import CPUInt4Linear, CPUInt8Linear

SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: CPULinear,
    nn.GELU: FusedGELU,
    CausalSelfAttention: CPUSelfAttention,
    Int8Linear: CPUInt8Linear,
    Int4Linear: CPUInt4Linear,
}


def _takes(module: nn.Module) -> bool:
    return not isinstance(module, nn.GELU) or module.approximate == "tanh"


def accelerate_on_cpu(model: nn.Module) -> nn.Module:
    cpu.for_compile()
    fused_in_use = False
    for module in model.modules():
        cpu_class = SWAPS.get(type(module))
        if cpu_class is not None and _takes(module):
            module.__class__ = cpu_class
        if isinstance(module, Transformer):
            module.head_kernels = HEAD_KERNELS
        fused_in_use |= isinstance(module, (FusedGELU, Transformer))
    if fused_in_use:
        fused.for_compile()  # builds the library, if need be, before a graph that calls it compiles
    return model
