"""Linear layers on a CPU: `CPULinear` (what `accelerate` makes of every nn.Linear) picks per call
- gpt2lab's matrix-vector kernels for the few rows of eager decoding (`matvec`);
- oneDNN on AMD CPUs with AVX-512, where MKL withholds its AVX-512 code (`cpu.onednn_linear`);
- under bfloat16 autocast on a CPU without fast bfloat16, float32 products over bfloat16-rounded
  inputs (`_BFloat16ActivationsLinear`): PyTorch's bfloat16 matmul converts element by element there;
- F.linear for everything else, and always inside torch.compile, which picks its own kernels.
The parameters and state dict are nn.Linear's."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu, matvec, torch_compat


def onednn_matmul_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b.T (+ bias) with oneDNN."""
    return torch_compat.onednn_linear_op()(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_matmul_t(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_matmul_t(grad_2d, weight.t().contiguous()).view(x.shape)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1])
            grad_w = onednn_matmul_t(grad_2d.t().contiguous(), x_2d.t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` goes through oneDNN: CPU tensors of one dtype it supports here,
    outside autocast and compile, on a CPU where it is the faster kernel."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu.fast_bfloat16()))
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and cpu.onednn_linear()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the fastest kernel here for these tensors (the module's docstring)."""
    if matvec.takes(x, weight, bias):
        return matvec.linear(x, weight, bias)
    if uses_onednn(x, weight):
        return onednn_linear(x, weight, bias)
    if emulates_bfloat16_autocast(x, weight):
        with torch.autocast("cpu", enabled=False):
            return _BFloat16ActivationsLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def emulates_bfloat16_autocast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether bfloat16 autocast is on for a float32 layer on a CPU without fast bfloat16, where
    PyTorch's bfloat16 matmul is several times slower than float32's (docs/benchmarks.md)."""
    return (
        x.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not cpu.fast_bfloat16()
    )


class _BFloat16ActivationsLinear(torch.autograd.Function):
    """A linear layer as bfloat16 autocast runs it, but with float32 products: the input is rounded
    to bfloat16 and kept so for backward, and the output is bfloat16, as autocast's are; the
    products take the float32 weight as it is (autocast would round it to bfloat16 too) and
    accumulate in float32, as a bfloat16 GEMM does. For CPUs without fast bfloat16 only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x16 = x.to(torch.bfloat16)
        ctx.save_for_backward(x16, weight)
        ctx.has_bias = bias is not None
        ctx.input_dtype = x.dtype
        return F.linear(x16.float(), weight, bias).to(torch.bfloat16)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x16, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        with torch.autocast("cpu", enabled=False):  # backward() may be called inside autocast
            if ctx.needs_input_grad[0]:
                grad_x = (grad_2d @ weight).view(x16.shape).to(ctx.input_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = grad_2d.t() @ x16.reshape(-1, x16.shape[-1]).float()
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN (CPU tensors of one float dtype), differentiable."""
    x = x.contiguous()
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _OneDNNLinear.apply(x, weight, bias)
    return onednn_matmul_t(x, weight, bias)


class CPULinear(nn.Linear):
    """nn.Linear whose forward picks the kernel with `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
