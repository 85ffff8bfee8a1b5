"""The matrix products of gpt2lab's int8 and int4 layers: packed weights, the AVX2 kernels of
`quantized_kernels.c`, and the same arithmetic in PyTorch.

The C kernels are built the first time a quantized layer runs and loaded as `native` says. Where they
cannot run (not Linux on x86-64 with AVX2, no compiler, `GPT2LAB_QUANTIZED_KERNELS=0`), the
PyTorch path computes the same products, ten times slower or more at batch 1 (it unpacks the
weights on every call; still twice as slow at 128 rows, so the kernels take inputs of any size).

Both forms quantize the input per row to int8 (x ~ x_scale * levels, x_scale = max|x| / 127):
- int8: y = (levels @ W_levels.T) * w_scale * x_scale + bias, one weight scale per output row;
- int4: W = scale * level + minimum per group of GROUP inputs (level 0..15, float16 scale and
  minimum), y = x_scale * (levels @ W.T) + bias.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("quantized_kernels.c")
SWITCH = "GPT2LAB_QUANTIZED_KERNELS"
LIBRARY = "libgpt2lab_quantized.so"
ROWS = 4  # output rows per packed block (ROWS in the C source)
GROUP = 32  # inputs per chunk of the packing, and per int4 scale and minimum (CHUNK there)

_pointer, _int64 = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    reason = native.why_not_here(SWITCH)
    if reason is None:
        library, reason = native.load(SOURCE, LIBRARY, native.compiler())
        if library is not None:
            library.gpt2lab_int8_linear.argtypes = [
                _pointer, _int64, _int64, _int64, _pointer, _pointer, _pointer, _int64, _pointer, _int64,
            ]
            library.gpt2lab_int4_linear.argtypes = [_pointer, _int64, _int64, _pointer, _pointer, _int64, _pointer, _int64]
            library.gpt2lab_int8_linear.restype = library.gpt2lab_int4_linear.restype = None
            return library, None
    if os.environ.get(SWITCH) != "0":
        warnings.warn(f"gpt2lab's int8/int4 CPU kernels are not used: {reason}; quantized layers run "
                      "through PyTorch instead, ten times slower or more when decoding", stacklevel=3)
    return None, reason


def kernels_unavailable_reason() -> str | None:
    """None where the C kernels run here, else why not."""
    return _library()[1]


def _padded(k: int) -> int:
    return -(-k // GROUP) * GROUP


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, x_scale) of a (m, k) float32 input, as the C kernels compute them."""
    x_scale = x.abs().amax(1) / 127
    usable = x_scale >= torch.finfo(torch.float32).tiny  # see quantize_row in the C
    inverse = torch.where(usable, 1 / x_scale, torch.zeros_like(x_scale))
    return (x * inverse[:, None]).round(), x_scale


# ---- int8 ----------------------------------------------------------------------------------------


def pack_int8(levels: torch.Tensor) -> torch.Tensor:
    """(n, k) int8 levels in the kernels' layout: blocks of ROWS rows, GROUP inputs at a time."""
    n, k = levels.shape
    padded = torch.nn.functional.pad(levels, (0, _padded(k) - k, 0, -n % ROWS))
    blocks, chunks = padded.size(0) // ROWS, padded.size(1) // GROUP
    return padded.view(blocks, ROWS, chunks, GROUP).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    blocks, chunks = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * ROWS, chunks * GROUP)[:n, :k]


def _kernel_library(x: torch.Tensor, packed: torch.Tensor, k: int) -> ctypes.CDLL | None:
    """The C kernels where they take this call: tensors in CPU memory and at least one row (the
    PyTorch path also serves an eager layer moved to a GPU)."""
    if x.size(-1) != k:  # the C would read and write past the tensors' ends
        raise ValueError(f"a quantized layer of {k} inputs was given {x.size(-1)}")
    return _library()[0] if x.is_cpu and packed.is_cpu and x.numel() else None


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def _in_pytorch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
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
        return _in_pytorch(x, unpack_int8(packed, n, k).float(), bias, weight_scale=scale)
    rows = x.numel() // k
    x, scale, bias = _kernel_input(x), _float32(scale), _float32(bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32, device="cpu")
    library.gpt2lab_int8_linear(x.data_ptr(), rows, k, packed.size(1) * GROUP, packed.data_ptr(), scale.data_ptr(),
                                None if bias is None else bias.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


# ---- int4 ----------------------------------------------------------------------------------------

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


def int4_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """x (..., k) @ W.T + bias for the int4 weights W = dequantize_int4(`packed`)."""
    library = _kernel_library(x, packed, k)
    if library is None:
        return _in_pytorch(x, dequantize_int4(packed, n, k), bias)
    rows = x.numel() // k
    x, bias = _kernel_input(x), _float32(bias)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32, device="cpu")
    library.gpt2lab_int4_linear(x.data_ptr(), rows, k, packed.data_ptr(), None if bias is None else bias.data_ptr(),
                                n, y.data_ptr(), torch.get_num_threads())
    return y
