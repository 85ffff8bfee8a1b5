"""The chunked loss's operations on a CPU (`gpt2lab.loss.HeadKernels`): the head's products
through `linear` (oneDNN where it is faster), float32 products where bfloat16 autocast would run
on a CPU without fast bfloat16 (no activation of the head outlives its chunk, so bfloat16 saves no
memory there, only time lost), and the fused softmax cross-entropy kernel."""

from __future__ import annotations

import torch

from ..loss import HeadKernels
from . import fused
from .linear import emulates_bfloat16_autocast, linear, onednn_linear, uses_onednn


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """x.T as oneDNN takes a weight: contiguous."""
    return x.t().contiguous()


class CPUHeadKernels(HeadKernels):
    def matmul_dtype(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        if hidden.device.type == "cpu" and emulates_bfloat16_autocast(hidden, weight):
            return torch.promote_types(hidden.dtype, weight.dtype)
        return super().matmul_dtype(hidden, weight)

    def prepare(self, weight: torch.Tensor, need_h: bool) -> torch.Tensor | None:
        # oneDNN takes the weight of grad @ w transposed and contiguous; BLAS reads w as it is.
        return _transposed(weight) if need_h and uses_onednn(weight, weight) else None

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear(h, weight)

    def softmax_cross_entropy_(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        return fused.softmax_cross_entropy_(logits, targets) if fused.available(logits) else None

    def grad_hidden(self, grad: torch.Tensor, weight: torch.Tensor, prepared: torch.Tensor | None) -> torch.Tensor:
        return onednn_linear(grad, prepared) if prepared is not None else grad @ weight

    def add_weight_gradient(
        self, grad_w: torch.Tensor | None, grad: torch.Tensor, h: torch.Tensor, acc: torch.dtype
    ) -> torch.Tensor:
        if not uses_onednn(grad, h):
            return super().add_weight_gradient(grad_w, grad, h, acc)
        product = onednn_linear(grad.t(), _transposed(h))
        return product.to(acc) if grad_w is None else grad_w.add_(product)


HEAD_KERNELS = CPUHeadKernels()
