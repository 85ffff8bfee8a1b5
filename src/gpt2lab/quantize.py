"""Int8 weights for CPU inference through PyTorch's dynamically quantized linear layer.

Every linear layer (the output head included, untied from the input embedding for it) stores
int8 weights with a per-tensor scale and quantizes its input on the fly. Decoding reads a quarter
of the float32 bytes, which is what bounds its speed on a CPU.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .model import GPT

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization.qconfig import default_dynamic_qconfig


def int8_linear(layer: nn.Linear) -> DynamicInt8Linear:
    """An int8 copy of `layer`, quantized as torch.ao's quantize_dynamic does (symmetric
    per-tensor min/max scale), from the weights of any nn.Linear subclass."""
    observer = default_dynamic_qconfig.weight()
    weight = layer.weight.detach().float()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same notice, for quantized tensors
        qweight = torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)
    quantized = DynamicInt8Linear(layer.in_features, layer.out_features, dtype=torch.qint8)
    bias = None if layer.bias is None else layer.bias.detach().float()
    quantized.set_weight_bias(qweight, bias)
    return quantized


def quantize_int8(model: GPT) -> GPT:
    """A copy of `model` (float32, CPU) with int8 linear layers, for inference only."""
    model = copy.deepcopy(model).float().cpu().eval()
    model.untie_head()
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, int8_linear(module))
    return model
