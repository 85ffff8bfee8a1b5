"""Quantized weights for CPU inference: int8 through PyTorch's dynamically quantized linear layer,
int4 through its group-wise weight-only kernel (the one torchao's int4 CPU layout calls). Both
compile (`generate(..., compile=True)`): the int8 kernel as one opaque operator of the graph.

Every linear layer (the output head included, untied from the input embedding for it) is replaced;
the embedding lookups, norms and attention keep their float weights. Decoding reads a quarter
(int8) or an eighth (int4) of the float32 bytes, which is what bounds its speed on a CPU.

- int8: int8 weights with a per-tensor scale; the input is quantized on the fly.
- int4: 4-bit weights in groups of `INT4_GROUP_SIZE` along the input, each group with its own
  scale and minimum (asymmetric, as ggml's q4_1); the matmul runs in bfloat16.
"""

from __future__ import annotations

import copy
import itertools
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .model import GPT

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization.qconfig import default_dynamic_qconfig


# Int8Linear.layer_key -> the layer: the compiled graph names a layer by a number, since its packed
# weights (a TorchScript object) cannot be an operator's argument.
_INT8_LAYERS: dict[int, weakref.ref] = {}
_int8_keys = itertools.count()

# Defined through torch.library's low-level API: torch.library.custom_op's Python wrapper costs
# about 40 us a call, more than the kernel of a 768x768 layer at batch 1.
_LIBRARY = torch.library.Library("gpt2lab", "FRAGMENT")
_LIBRARY.define("int8_linear(Tensor x, int layer_key, int out_features) -> Tensor")


def _int8_linear_kernel(x: torch.Tensor, layer_key: int, out_features: int) -> torch.Tensor:
    return _INT8_LAYERS[layer_key]().eager_forward(x)


def _int8_linear_shape(x: torch.Tensor, layer_key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)  # fbgemm's output


_LIBRARY.impl("int8_linear", _int8_linear_kernel, "CPU")
torch.library.register_fake("gpt2lab::int8_linear", _int8_linear_shape, lib=_LIBRARY)


class Int8Linear(DynamicInt8Linear):
    """torch.ao's dynamically quantized linear layer (int8 weights with a per-tensor scale, the
    input quantized on the fly by fbgemm), which a compiled graph calls as the operator
    `gpt2lab::int8_linear`: torch.compile cannot trace its packed weights and would otherwise
    break the graph at every layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register()

    def _register(self) -> None:
        self.layer_key = next(_int8_keys)
        _INT8_LAYERS[self.layer_key] = weakref.ref(self)
        weakref.finalize(self, _INT8_LAYERS.pop, self.layer_key, None)

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy) is a layer of its own: under the original's key, a compiled graph
        # of the copy would multiply by the original's weights.
        super().__setstate__(state)
        self._register()

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        # As torch.ao's forward, without its per-call checks (a tenth of a small layer's time).
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.gpt2lab.int8_linear(x, self.layer_key, self.out_features)
        return self.eager_forward(x)


def int8_linear(layer: nn.Linear) -> Int8Linear:
    """An int8 copy of `layer`, quantized as torch.ao's quantize_dynamic does (symmetric
    per-tensor min/max scale), from the weights of any nn.Linear subclass."""
    observer = default_dynamic_qconfig.weight()
    weight = layer.weight.detach().float()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same notice, for quantized tensors
        qweight = torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)
    quantized = Int8Linear(layer.in_features, layer.out_features, dtype=torch.qint8)
    bias = None if layer.bias is None else layer.bias.detach().float()
    quantized.set_weight_bias(qweight, bias)
    return quantized


# Weights per (scale, minimum) pair of the int4 form: ggml's q4 blocks hold 32 as well.
INT4_GROUP_SIZE = 32
# The int4 kernel packs output rows in tiles of 16.
_INT4_ROW_TILE = 16
INT4_AVAILABLE = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


class Int4Linear(nn.Module):
    """y = x @ dequantized(W).T + b with W stored as 4-bit integers, a bfloat16 scale and minimum
    per group of INT4_GROUP_SIZE inputs, in the layout of PyTorch's int4 CPU kernel."""

    def __init__(self, layer: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, group_size
        weight = layer.weight.detach().float().cpu()
        weight = F.pad(weight, (0, 0, 0, -self.out_features % _INT4_ROW_TILE))
        rows = weight.size(0)
        groups = weight.view(rows, -1, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny)
        levels = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(rows, -1)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(levels, 1))
        # The kernel dequantizes (level - 8) * scale + zero: zero is the group's value at level 8.
        zero = low + 8 * scale
        pairs = torch.stack([scale.view(rows, -1).t(), zero.view(rows, -1).t()], dim=-1)
        self.register_buffer("scales_and_zeros", pairs.contiguous().to(torch.bfloat16))
        bias = None if layer.bias is None else layer.bias.detach().float().cpu()
        self.register_buffer("bias", bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (out, in) matrix the layer multiplies by (for tests and quality checks)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        product = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros)
        return product[:, : self.out_features].t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        if y.size(1) != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def int4_linear(layer: nn.Linear) -> Int4Linear:
    if not INT4_AVAILABLE:
        raise UserError(f"--dtype int4 needs PyTorch's int4 CPU kernel, which torch {torch.__version__} lacks; "
                        "use --dtype int8")
    if layer.in_features % INT4_GROUP_SIZE:
        raise UserError(
            f"--dtype int4 quantizes inputs in groups of {INT4_GROUP_SIZE}, and a layer of this model takes "
            f"{layer.in_features}; use --dtype int8 for this model"
        )
    return Int4Linear(layer)


QUANTIZERS = {"int8": int8_linear, "int4": int4_linear}


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

