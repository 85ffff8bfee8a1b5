"""gpt2lab's fused float32 CPU kernels for training (`csrc/fused.c`): the tanh GELU and its
gradient, and the softmax cross-entropy of a chunk of logits, turned in place into its gradient.
They take a training step's non-matmul time where PyTorch's operators spend the most
(docs/benchmarks.md).

Built on first use and loaded as `build` says. Where they cannot run (not Linux on x86-64 with
AVX2, no compiler, `GPT2LAB_FUSED_KERNELS=0`), `available` says no and the callers use PyTorch's
operators, which give the same results to float32 rounding."""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from . import build

SWITCH = "GPT2LAB_FUSED_KERNELS"


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build.library_or_none(
        SWITCH, "fused CPU kernels", "GELU and the loss of a float32 training step run through PyTorch instead, "
        "a few percent slower",
    )


# Whether the kernels run, as a compiled graph reads it (torch.compile would break its graph on
# the build code): set by `accelerate` through `for_compile`; until then PyTorch's operators.
_BUILT_FOR_COMPILE = [False]


def _built() -> bool:
    if torch.compiler.is_compiling():
        return _BUILT_FOR_COMPILE[0]
    return _library() is not None


def for_compile() -> None:
    _BUILT_FOR_COMPILE[0] = _library() is not None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: float32 in CPU memory, on a machine where the
    kernels run."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _built()


def _check(*tensors: torch.Tensor) -> None:
    """The C reads and writes float32 in CPU memory: anything else would run past the buffers."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"the fused kernels take float32 CPU tensors, not {t.dtype} on {t.device}")


def gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") of a float32 CPU tensor (`available`)."""
    _check(x)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _library().gpt2lab_gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


def gelu_tanh_backward(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The gradient of x through the tanh GELU, given the output's."""
    _check(x, grad_y)
    x, grad_y = x.contiguous(), grad_y.contiguous()
    if grad_y.shape != x.shape:
        raise ValueError(f"gradient of shape {tuple(grad_y.shape)} for an input of shape {tuple(x.shape)}")
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    _library().gpt2lab_gelu_tanh_backward(x.data_ptr(), grad_y.data_ptr(), grad_x.data_ptr(), x.numel(),
                                          torch.get_num_threads())
    return grad_x


# The GELU of a training step as an operator of its own, differentiable once (double backward and
# forward-mode derivatives need F.gelu: GPT2LAB_FUSED_KERNELS=0), so that torch.compile calls the
# kernels rather than fusing PyTorch's tanh, which is slower here (docs/benchmarks.md).
@torch.library.custom_op("gpt2lab::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") of a float32 CPU tensor (`available`), with its gradient.
    PyTorch computes it where the kernels are gone since the graph calling it was compiled
    (`GPT2LAB_FUSED_KERNELS=0` and the library's cache cleared, as tests do)."""
    if _library() is None:
        return F.gelu(x, approximate="tanh").contiguous()
    return gelu_tanh_forward(x)


@torch.library.custom_op("gpt2lab::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_backward_op(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    if _library() is None:
        return torch.ops.aten.gelu_backward(grad_y, x, approximate="tanh").contiguous()
    return gelu_tanh_backward(x, grad_y)


@gelu_tanh.register_fake
@_gelu_tanh_backward_op.register_fake
def _shaped_like_the_input(x: torch.Tensor, *grad_y: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _keep_the_input(ctx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _gelu_tanh_gradient(ctx, grad_y: torch.Tensor) -> torch.Tensor:
    return _gelu_tanh_backward_op(ctx.saved_tensors[0], grad_y)


gelu_tanh.register_autograd(_gelu_tanh_gradient, setup_context=_keep_the_input)


def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy loss against its target (logsumexp(row) - row[target]), with
    `logits` (rows, classes), contiguous float32, replaced by the loss's gradient: softmax(row)
    minus the target's one-hot. Rows with NaN or +inf give NaN. targets: int64 in [0, classes)."""
    _check(logits)
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError("the logits must be one contiguous (rows, classes) matrix")
    rows, classes = logits.shape
    targets = targets.to(torch.int64).contiguous()
    if targets.shape != (rows,):
        raise ValueError(f"{targets.numel()} targets for {rows} rows")
    if rows and not (0 <= int(targets.min()) and int(targets.max()) < classes):
        raise IndexError(f"a target lies outside the {classes} classes (0 to {classes - 1})")
    loss = torch.empty(rows, dtype=torch.float32)
    _library().gpt2lab_softmax_cross_entropy(logits.data_ptr(), rows, classes, targets.data_ptr(), loss.data_ptr(),
                                             torch.get_num_threads())
    return loss


def gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), in the kernels for float32 on a CPU: their operator when
    training (compiled too), the bare kernel when decoding eagerly; compiled decoding leaves it to
    inductor, which fuses it with its neighbours."""
    if not available(x):
        return F.gelu(x, approximate="tanh")
    if torch.is_grad_enabled() and x.requires_grad:
        return gelu_tanh(x)
    if torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    return gelu_tanh_forward(x)  # no autograd node to build


class FusedGELU(torch.nn.GELU):
    """nn.GELU(approximate="tanh") computed by `gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)
