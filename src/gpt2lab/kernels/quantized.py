"""The int8 and int4 layers' products in the AVX2 kernels of `csrc/quantized.c`, which read the
packed layouts of `gpt2lab.quantize` as they lie; `CPUInt8Linear` and `CPUInt4Linear` are the
layers `accelerate` gives a quantized model, each one operator of a compiled graph.

Where the kernels cannot run (not Linux on x86-64 with AVX2, no compiler,
`GPT2LAB_QUANTIZED_KERNELS=0`), the layers compute the same products in PyTorch, ten times slower
or more at batch 1 (they unpack the weights on every call; still twice as slow at 128 rows, so the
kernels take inputs of any size).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

from ..quantize import GROUP, Int4Linear, Int8Linear, dequantize_int4, in_pytorch, unpack_int8
from . import build

SWITCH = "GPT2LAB_QUANTIZED_KERNELS"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    library, reason = build.library(SWITCH)
    if library is None and os.environ.get(SWITCH) != "0":
        warnings.warn(f"gpt2lab's int8/int4 CPU kernels are not used: {reason}; quantized layers run "
                      "through PyTorch instead, ten times slower or more when decoding", stacklevel=3)
    return library, reason


def kernels_unavailable_reason() -> str | None:
    """None where the C kernels run here, else why not."""
    return _library()[1]


def _kernel_library(x: torch.Tensor, packed: torch.Tensor, k: int) -> ctypes.CDLL | None:
    """The C kernels where they take this call: tensors in CPU memory and at least one row (the
    PyTorch path also serves an eager layer moved to a GPU)."""
    if x.size(-1) != k:  # the C would read and write past the tensors' ends
        raise ValueError(f"a quantized layer of {k} inputs was given {x.size(-1)}")
    return _library()[0] if x.is_cpu and packed.is_cpu and x.numel() else None


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def _float32(t: torch.Tensor | None) -> torch.Tensor | None:
    # The layer's float buffers follow the module's .to(dtype); the C reads float32.
    return t if t is None or t.dtype == torch.float32 else t.float().contiguous()


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                n: int, k: int) -> torch.Tensor:
    """x (..., k) @ W.T + bias for the int8 weights W = `scale` * unpack_int8(`packed`)."""
    # Lean on purpose: at batch 1 this wrapper's every tensor operation costs as much as a tenth
    # of a 768 x 768 layer's kernel.
    library = _kernel_library(x, packed, k)
    if library is None:
        return in_pytorch(x, unpack_int8(packed, n, k).float(), bias, weight_scale=scale)
    rows = x.numel() // k
    x, scale, bias = _kernel_input(x), _float32(scale), _float32(bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32, device="cpu")
    library.gpt2lab_int8_linear(x.data_ptr(), rows, k, packed.size(1) * GROUP, packed.data_ptr(), scale.data_ptr(),
                                None if bias is None else bias.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


def int4_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """x (..., k) @ W.T + bias for the int4 weights W = dequantize_int4(`packed`)."""
    library = _kernel_library(x, packed, k)
    if library is None:
        return in_pytorch(x, dequantize_int4(packed, n, k), bias)
    rows = x.numel() // k
    x, bias = _kernel_input(x), _float32(bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32, device="cpu")
    library.gpt2lab_int4_linear(x.data_ptr(), rows, k, packed.data_ptr(), None if bias is None else bias.data_ptr(),
                                n, y.data_ptr(), torch.get_num_threads())
    return y


# Defined through torch.library's low-level API: torch.library.custom_op's Python wrapper costs
# about as much a call as the kernel of a 768x768 layer at batch 1. A compiled graph cannot trace
# a ctypes call; it calls these operators instead, which eager layers skip. CPU only, as quantized
# models are.
_LIBRARY = torch.library.Library("gpt2lab", "FRAGMENT")
_LIBRARY.define("int8_linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int n, int k) -> Tensor")
_LIBRARY.define("int4_linear(Tensor x, Tensor packed, Tensor? bias, int n, int k) -> Tensor")
_LIBRARY.impl("int8_linear", int8_linear, "CPU")
_LIBRARY.impl("int4_linear", int4_linear, "CPU")


def _int8_output(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, n: int, k: int):
    return x.new_empty(*x.shape[:-1], n, dtype=torch.float32)


def _int4_output(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int):
    return x.new_empty(*x.shape[:-1], n, dtype=torch.float32)


torch.library.register_fake("gpt2lab::int8_linear", _int8_output, lib=_LIBRARY)
torch.library.register_fake("gpt2lab::int4_linear", _int4_output, lib=_LIBRARY)


class CPUInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        operator = torch.ops.gpt2lab.int8_linear if torch.compiler.is_compiling() else int8_linear
        return operator(x, self.packed, self.scale, self.bias, self.out_features, self.in_features)


class CPUInt4Linear(Int4Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        operator = torch.ops.gpt2lab.int4_linear if torch.compiler.is_compiling() else int4_linear
        return operator(x, self.packed, self.bias, self.out_features, self.in_features)
