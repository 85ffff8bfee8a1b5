"""Quantized weights for CPU inference: int8 and int4 linear layers, for inference only.

Every linear layer (the output head included, untied from the input embedding for it) is replaced;
the embedding lookups, norms and attention keep their float weights. Decoding reads a quarter
(int8) or about a sixth (int4) of the float32 bytes, which is what bounds its speed on a CPU.

- int8: symmetric int8 weights with a scale per output row (levels within +-127).
- int4: 4-bit weights in groups of `INT4_GROUP_SIZE` along the input, each group with its own
  float16 scale and minimum (asymmetric, as ggml's q4_1).
Both quantize the input per row to int8 on the fly, as ggml's kernels do:
- int8: y = (levels @ W_levels.T) * w_scale * x_scale + bias, one weight scale per output row;
- int4: W = scale * level + minimum per group of GROUP inputs (level 0..15, float16 scale and
  minimum), y = x_scale * (levels @ W.T) + bias.

The layers here compute in PyTorch, unpacking the weights on every call; `gpt2lab.kernels.accelerate`
gives them the AVX2 kernels of `kernels/csrc/quantized.c`, which read the packed layouts below as
they lie, and make each one operator of a compiled graph.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .errors import UserError
from .model import Transformer

ROWS = 4  # output rows per packed block (ROWS in kernels/csrc/gpt2lab_kernels.h)
GROUP = 32  # inputs per chunk of the packing, and per int4 scale and minimum (CHUNK there)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, x_scale) of a (m, k) float32 input, as the C kernels compute them."""
    x_scale = x.abs().amax(1) / 127
    usable = x_scale >= torch.finfo(torch.float32).tiny  # see quantize_row in the C
    inverse = torch.where(usable, 1 / x_scale, torch.zeros_like(x_scale))
    return (x * inverse[:, None]).round(), x_scale


def padded_width(k: int) -> int:
    return -(-k // GROUP) * GROUP


# ---- int8 ----------------------------------------------------------------------------------------


def pack_int8(levels: torch.Tensor) -> torch.Tensor:
    """(n, k) int8 levels in the kernels' layout: blocks of ROWS rows, GROUP inputs at a time."""
    n, k = levels.shape
    padded = torch.nn.functional.pad(levels, (0, padded_width(k) - k, 0, -n % ROWS))
    blocks, chunks = padded.size(0) // ROWS, padded.size(1) // GROUP
    return padded.view(blocks, ROWS, chunks, GROUP).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    blocks, chunks = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * ROWS, chunks * GROUP)[:n, :k]


_INT4_LEVEL_BYTES = ROWS * GROUP // 2  # then ROWS float16 scales and ROWS float16 minimums


def pack_int4(levels: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """(n, k) levels 0..15 and (n, k / GROUP) float16 scales and minimums in the kernels' layout:
    per block of ROWS rows and group of GROUP inputs, each row's 16 bytes (input i of the group in
    the low nibble of byte i, input 16 + i in its high nibble), then the scales, then the minimums."""
    n, k = levels.shape
    rows = n + -n % ROWS
    levels = torch.nn.functional.pad(levels.to(torch.uint8), (0, 0, 0, rows - n)).view(rows // ROWS, ROWS, -1, GROUP)
    nibbles = (levels[..., : GROUP // 2] | (levels[..., GROUP // 2 :] << 4)).transpose(1, 2)

    def per_block(values: torch.Tensor) -> torch.Tensor:
        values = torch.nn.functional.pad(values.to(torch.float16), (0, 0, 0, rows - n))
        return values.view(rows // ROWS, ROWS, -1).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([nibbles.flatten(2), per_block(scale), per_block(minimum)], dim=2).contiguous()


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels (n, k), scale and minimum (n, k / GROUP), float16) of pack_int4's layout."""
    blocks, groups = packed.shape[:2]
    nibbles = packed[..., :_INT4_LEVEL_BYTES].reshape(blocks, groups, ROWS, GROUP // 2)
    levels = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).transpose(1, 2).reshape(blocks * ROWS, k)

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return values.contiguous().view(torch.float16).transpose(1, 2).reshape(blocks * ROWS, groups)

    scales = per_row(packed[..., _INT4_LEVEL_BYTES : _INT4_LEVEL_BYTES + 2 * ROWS])
    minimums = per_row(packed[..., _INT4_LEVEL_BYTES + 2 * ROWS :])
    return levels[:n], scales[:n], minimums[:n]


def dequantize_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 (n, k) weights of pack_int4's layout."""
    levels, scale, minimum = unpack_int4(packed, n, k)
    groups = levels.float().view(n, -1, GROUP)
    return (groups * scale.float()[..., None] + minimum.float()[..., None]).view(n, k)


def in_pytorch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' arithmetic in PyTorch: x's int8 levels @ `weight`.T (float32 (n, k)), times
    the weights' per-row scale if any and x's scale, plus the bias."""
    n, k = weight.shape
    levels, x_scale = quantize_rows(x.reshape(-1, k).float())
    y = levels @ weight.t()
    if weight_scale is not None:
        y = y * weight_scale
    y = y * x_scale[:, None]
    return (y if bias is None else y + bias).view(*x.shape[:-1], n)


# ---- the layers ----------------------------------------------------------------------------------


def _float_bias(layer: nn.Linear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float().cpu().contiguous()


class Int8Linear(nn.Module):
    """y = x @ (scale * W).T + b with W int8 levels, one float32 scale per output row, packed for
    the kernels (`pack_int8`)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight = layer.weight.detach().float().cpu()
        scale = (weight.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        levels = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("packed", pack_int8(levels))
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", _float_bias(layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = unpack_int8(self.packed, self.out_features, self.in_features).float()
        return in_pytorch(x, weight, self.bias, weight_scale=self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# Weights per (scale, minimum) pair of the int4 form: ggml's q4 blocks hold 32 as well.
INT4_GROUP_SIZE = GROUP


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W stored as 4-bit levels and a float16 scale and minimum per group of
    INT4_GROUP_SIZE inputs, packed for the kernels (`pack_int4`)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        groups = layer.weight.detach().float().cpu().view(self.out_features, -1, INT4_GROUP_SIZE)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
        minimum = low.to(torch.float16).float()
        # Levels from the float16 scale and minimum the kernel multiplies by, not the exact ones.
        levels = ((groups - minimum[..., None]) / scale[..., None]).round().clamp(0, 15)
        self.register_buffer("packed", pack_int4(levels.view(self.out_features, -1), scale, minimum))
        self.register_buffer("bias", _float_bias(layer))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (out, in) matrix the layer multiplies by (for tests and quality checks)."""
        return dequantize_int4(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_pytorch(x, self.dequantized_weight(), self.bias)

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


def quantize(model: Transformer, precision: str) -> Transformer:
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

