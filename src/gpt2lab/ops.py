"""Low-level kernels the model is built from.

oneDNN's matmul is about twice as fast as the default BLAS for float32 on some x86 CPUs (AMD's
among them, where MKL takes a slow path), so float32/bfloat16 linear layers on the CPU go through
it. Autocast and torch.compile choose their own kernels, so inside them this is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_matmul_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) with oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul_t(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul_t(grad_2d, weight.t().contiguous()).view(x.shape)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1])
            grad_w = _onednn_matmul_t(grad_2d.t().contiguous(), x_2d.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, routed to oneDNN for float32/bfloat16 CPU tensors outside autocast and compile."""
    if (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        x = x.contiguous()
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return _OneDNNLinear.apply(x, weight, bias)
        return _onednn_matmul_t(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward picks the kernel with `linear`; parameters and state dict as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (*positions.shape, head_dim), in transformers' Llama
    layout (the two halves of a head rotate together), computed in float32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; cos/sin are (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
