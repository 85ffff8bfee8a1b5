"""Quantized weights for CPU inference: int8 and int4 linear layers whose products run in
gpt2lab's AVX2 kernels (`quantized_kernels`), each one operator of a compiled graph
(`generate(..., compile=True)`).

Every linear layer (the output head included, untied from the input embedding for it) is replaced;
the embedding lookups, norms and attention keep their float weights. Decoding reads a quarter
(int8) or about a sixth (int4) of the float32 bytes, which is what bounds its speed on a CPU.

- int8: symmetric int8 weights with a scale per output row (levels within +-127).
- int4: 4-bit weights in groups of `INT4_GROUP_SIZE` along the input, each group with its own
  float16 scale and minimum (asymmetric, as ggml's q4_1).
Both quantize the input per row to int8 on the fly, as ggml's kernels do.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import quantized_kernels as kernels
from .errors import UserError
from .model import GPT

# Defined through torch.library's low-level API: torch.library.custom_op's Python wrapper costs
# about 40 us a call, more than the kernel of a 768x768 layer at batch 1. A compiled graph cannot
# trace a ctypes call; it calls these operators instead, which eager layers skip. CPU only, as
# quantized models are.
_LIBRARY = torch.library.Library("gpt2lab", "FRAGMENT")
_LIBRARY.define("int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int n, int k) -> Tensor")
_LIBRARY.define("int4_linear(Tensor x, Tensor packed, Tensor? bias, int n, int k) -> Tensor")
_LIBRARY.impl("int8_linear", kernels.int8_linear, "CPU")
_LIBRARY.impl("int4_linear", kernels.int4_linear, "CPU")


def _int8_output(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, n: int, k: int):
    return x.new_empty(*x.shape[:-1], n, dtype=torch.float32)


def _int4_output(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int):
    return x.new_empty(*x.shape[:-1], n, dtype=torch.float32)


torch.library.register_fake("gpt2lab::int8_linear", _int8_output, lib=_LIBRARY)
torch.library.register_fake("gpt2lab::int4_linear", _int4_output, lib=_LIBRARY)


def _float_bias(layer: nn.Linear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float().cpu().contiguous()


class Int8Linear(nn.Module):
    """y = x @ (scale * W).T + b with W int8 levels, one float32 scale per output row, packed for
    the kernels (`quantized_kernels.pack_int8`)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight = layer.weight.detach().float().cpu()
        scale = (weight.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        levels = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("packed", kernels.pack_int8(levels))
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", _float_bias(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        operator = torch.ops.gpt2lab.int8_linear if torch.compiler.is_compiling() else kernels.int8_linear
        return operator(x, self.packed, self.scale, self.bias, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# Weights per (scale, minimum) pair of the int4 form: ggml's q4 blocks hold 32 as well.
INT4_GROUP_SIZE = kernels.GROUP


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W stored as 4-bit levels and a float16 scale and minimum per group of
    INT4_GROUP_SIZE inputs, packed for the kernels (`quantized_kernels.pack_int4`)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        groups = layer.weight.detach().float().cpu().view(self.out_features, -1, INT4_GROUP_SIZE)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
        minimum = low.to(torch.float16).float()
        # Levels from the float16 scale and minimum the kernel multiplies by, not the exact ones.
        levels = ((groups - minimum[..., None]) / scale[..., None]).round().clamp(0, 15)
        self.register_buffer("packed", kernels.pack_int4(levels.view(self.out_features, -1), scale, minimum))
        self.register_buffer("bias", _float_bias(layer))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (out, in) matrix the layer multiplies by (for tests and quality checks)."""
        return kernels.dequantize_int4(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        operator = torch.ops.gpt2lab.int4_linear if torch.compiler.is_compiling() else kernels.int4_linear
        return operator(x, self.packed, self.bias, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={INT4_GROUP_SIZE}"


def int4_linear(layer: nn.Linear) -> Int4Linear:
    if layer.in_features % INT4_GROUP_SIZE:
        raise UserError(
            f"--dtype int4 quantizes inputs in groups of {INT4_GROUP_SIZE}, and a layer of this model takes "
            f"{layer.in_features}; use --dtype int8 for this model"
        )
    largest = layer.weight.detach().abs().max().item()
    if not largest < torch.finfo(torch.float16).max:
        raise UserError(
            f"--dtype int4 keeps each group's scale and minimum in float16, and this model has a weight of "
            f"{largest:g}, beyond float16's range; use --dtype int8"
        )
    return Int4Linear(layer)


QUANTIZERS = {"int8": Int8Linear, "int4": int4_linear}


def quantize(model: GPT, precision: str) -> GPT:
    """A copy of `model` (float32, CPU) whose linear layers are `precision` ("int8" or "int4"),
    for inference only; the original is left as it is."""
    make_layer = QUANTIZERS[precision]
    model = copy.deepcopy(model).float().cpu().eval()
    model.untie_head()
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make_layer(module))
    return model

