"""Low-level kernels the model is built from.

MKL picks its float32 kernels by the CPU's vendor and gives AMD's no AVX-512 code, so on an AMD
CPU with AVX-512 oneDNN's matmul is about twice as fast and float32/bfloat16 linear layers go
through oneDNN. Elsewhere MKL is as fast or faster (a float32 linear layer's forward and backward
took 1.3x longer through oneDNN on an Intel Xeon with AMX, 1.2-1.3x on an AVX2-only AMD EPYC),
so they stay F.linear. Autocast and torch.compile choose their own kernels, so inside them this
is plain F.linear, except bfloat16 autocast on a CPU without fast bfloat16, whose products run in
float32 (`_BFloat16ActivationsLinear`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_kernels, matvec_kernels


def _cpu_is_amd_with_avx512() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: no such file
        return False
    return "AuthenticAMD" in cpuinfo and "avx512f" in cpuinfo.split()


ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Whether `linear` routes CPU layers to oneDNN here.
ONEDNN_LINEAR = ONEDNN_AVAILABLE and _cpu_is_amd_with_avx512()
# Whether this CPU computes in bfloat16 quickly (AVX-512 or newer). Without it (an AVX2-only EPYC,
# say) oneDNN has no bfloat16 matmul (it raises "could not create a primitive descriptor"), so
# bfloat16 stays with PyTorch's own kernels, and attention converts element by element
# (`scaled_dot_product_attention`).
_CPU_FAST_BF16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and bool(
    torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if ONEDNN_AVAILABLE and _CPU_FAST_BF16 else (torch.float32,)


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


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` goes through oneDNN: CPU tensors of one dtype it supports here,
    outside autocast and compile, on a CPU where it is the faster kernel."""
    return (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in ONEDNN_DTYPES
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, routed to gpt2lab's matrix-vector kernels for the few rows of eager decoding
    (`matvec_kernels.takes`), to oneDNN where `_uses_onednn` says so, and to float32 products where
    bfloat16 autocast would run on a CPU without fast bfloat16 (`_emulates_bfloat16_autocast`)."""
    if matvec_kernels.takes(x, weight, bias):
        return matvec_kernels.linear(x, weight, bias)
    if _uses_onednn(x, weight):
        return onednn_linear(x, weight, bias)
    if _emulates_bfloat16_autocast(x, weight):
        with torch.autocast("cpu", enabled=False):
            return _BFloat16ActivationsLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _emulates_bfloat16_autocast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether bfloat16 autocast is on for a float32 layer on a CPU without fast bfloat16. There
    PyTorch's bfloat16 matmul converts element by element: a (1024, 768) x (768, 3072) product took
    250 ms against 40 ms in float32 (AVX2-only EPYC), and 44 s against 0.36 s at 8192 rows."""
    return (
        not _CPU_FAST_BF16
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
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
    return _onednn_matmul_t(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward picks the kernel with `linear`; parameters and state dict as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), in gpt2lab's fused kernels for float32 on a CPU: an
    operator of their own when training (compiled too), the bare kernel when decoding eagerly;
    compiled decoding leaves it to inductor, which fuses it with its neighbours."""
    if not fused_kernels.available(x):
        return F.gelu(x, approximate="tanh")
    if torch.is_grad_enabled() and x.requires_grad:
        return fused_kernels.gelu_tanh(x)
    if torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    return fused_kernels.gelu_tanh_forward(x)  # no autograd node to build


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention, except on a CPU:
    - a compiled decoding step (one query) is written out, in float32, for inductor to fuse into its
      own kernels: SDPA is an external kernel to it, and needs float32 copies of bfloat16 keys and
      values where the CPU has no fast bfloat16 (compiled decoding, 2-core AVX2 EPYC: bfloat16 67.1
      against 63.7 tokens/s, medians of 9; float32 with SDPA's kernel replaced, the attention of 12
      layers over 256 cached keys about 0.7 ms a token shorter);
    - bfloat16 is computed in float32 where the CPU has no fast bfloat16 (the result in bfloat16
      again): there one query over 256 cached keys took 290 us in bfloat16 against 54 us in float32."""
    slow_bfloat16 = q.dtype == torch.bfloat16 and q.device.type == "cpu" and not _CPU_FAST_BF16
    if (
        q.device.type == "cpu" and (q.dtype == torch.float32 or slow_bfloat16)
        and q.size(-2) == 1 and not dropout_p and not is_causal and torch.compiler.is_compiling()
    ):
        return plain_attention(q.float(), k.float(), v.float(), attn_mask, False, 0.0).to(q.dtype)
    if slow_bfloat16:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def plain_attention(q, k, v, attn_mask, is_causal, dropout_p):
    """Reference attention written out step by step (used by tests, the `plain` setting, and a
    compiled decoding step on a CPU)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    if is_causal:
        Tq, Tk = q.size(-2), k.size(-2)
        attn_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return weights @ v


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


# ---- the head and the loss, chunk by chunk -------------------------------------------------------

# Logits held at once by the loss: 2**25 float32 values (128 MiB), 640 rows of GPT-2's padded
# vocabulary, where the full logits of B=8, T=1024 are 1.6 GiB in float32 and held several times.
CHUNK_ELEMENTS = 2**25
# At most this many chunks: torch.compile unrolls the loop, and 100 chunks of B=64, T=1024 would
# cost minutes of compiling; there the chunks grow instead (2048 rows, still 1/32 of the logits).
MAX_CHUNKS = 32


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """x.T as `linear` takes a weight: oneDNN on the CPU wants it contiguous, cuBLAS does not."""
    return x.t().contiguous() if x.device.type == "cpu" else x.t()


def _chunk_rows(vocab: int, rows_in_all: int) -> int:
    """Rows per chunk: as few chunks as CHUNK_ELEMENTS and MAX_CHUNKS allow, of even size (rounded
    up to 16 rows within the cap where the last chunk keeps at least half). Even chunks run faster
    than a full one and a remainder: the 124M head's products at 1,024 rows, forward and backward,
    took 1,401 ms as two chunks of 512 against 1,465 as 640 and 384 (2-core AVX2 EPYC, medians of 5)."""
    cap = max(1, CHUNK_ELEMENTS // vocab)
    if cap > 64:
        cap -= cap % 64  # whole tiles of the matmul
    cap = max(cap, -(-rows_in_all // MAX_CHUNKS))
    chunks = max(1, -(-rows_in_all // cap))
    even = -(-rows_in_all // chunks)
    tiled = min(cap, -(-even // 16) * 16)
    # Rounding up must not leave a last chunk of a few rows (3,841 rows of a 128k vocabulary:
    # fifteen of 256 and one of 1).
    last = rows_in_all - tiled * (chunks - 1)
    return max(1, tiled if last >= tiled // 2 else even)


def _add_weight_gradient(
    grad_w: torch.Tensor | None, grad: torch.Tensor, h: torch.Tensor, acc: torch.dtype
) -> torch.Tensor:
    """grad_w + grad.T @ h, in place where the dtypes allow (no (vocab, n_embd) temporary); the
    first chunk's (grad_w None) is the product alone, in `acc`: a zeroed (vocab, n_embd) start would
    cost a pass over the whole matrix."""
    onednn = _uses_onednn(grad, h)
    if grad_w is not None and grad.dtype == grad_w.dtype and not onednn:
        return grad_w.addmm_(grad.t(), h)
    product = onednn_linear(grad.t(), _transposed(h)) if onednn else grad.t() @ h
    return product.to(acc) if grad_w is None else grad_w.add_(product)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(hidden @ weight.T) over the rows whose target is not -1,
    computed a chunk of rows at a time. The gradients a chunk owes (hidden's with need_h, the
    weight's with need_w) are computed while its logits are at hand, so that backward only scales
    them by the incoming gradient: no step holds more than one chunk's logits, and the head's
    matmuls are not recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, softcap, need_h, need_w):
        h = hidden.reshape(-1, hidden.size(-1)).to(dtype)
        w = weight.to(dtype)
        t = targets.reshape(-1)
        valid = t != -1
        picked = t.clamp(min=0)[:, None]
        acc = torch.promote_types(dtype, torch.float32)
        # F.cross_entropy's mean over the counted targets (NaN when there are none, as there).
        scale = 1.0 / valid.sum().to(acc)
        total = torch.zeros((), dtype=acc, device=h.device)
        # In the hidden states' own shape, so that backward can hand it on without a view.
        grad_h = torch.empty(hidden.shape, dtype=acc, device=h.device) if need_h else None
        grad_h_rows = grad_h.view(h.shape) if need_h else None
        grad_w = None
        # oneDNN takes the weight of grad @ w transposed and contiguous; BLAS reads w as it is.
        w_t = _transposed(w) if need_h and _uses_onednn(h, w) else None
        rows = _chunk_rows(w.size(0), h.size(0))
        for start in range(0, h.size(0), rows):
            part = slice(start, start + rows)
            logits = linear(h[part], w).to(acc)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            # The kernel turns the logits into the gradient in place; soft-capping needs them after,
            # and a compiled graph gets inductor's fusion instead (in-place C it cannot trace).
            if not softcap and not torch.compiler.is_compiling() and fused_kernels.available(logits):
                nll = fused_kernels.softmax_cross_entropy_(logits, picked[part, 0])
                grad = logits
            else:
                # One log-softmax pass gives the loss and, exponentiated in place, the softmax.
                log_probs = torch.log_softmax(logits, dim=-1)
                nll = -log_probs.gather(1, picked[part])[:, 0]
                if need_h or need_w:
                    grad = log_probs.exp_()
                    grad.scatter_add_(1, picked[part], torch.full_like(nll[:, None], -1.0))
            total += torch.where(valid[part], nll, 0).sum()
            if need_h or need_w:
                if softcap:
                    grad *= 1 - (logits / softcap).square()
                grad = grad.to(dtype)
                # Each row's weight in the mean (0 for ignored targets) scales the (rows, n_embd)
                # factors rather than the (rows, vocab) gradient: a pass over the chunk saved.
                row_scale = (valid[part].to(acc) * scale)[:, None]
                if need_h:
                    grad_h_rows[part] = (onednn_linear(grad, w_t) if w_t is not None else grad @ w) * row_scale
                if need_w:
                    grad_w = _add_weight_gradient(grad_w, grad, (h[part] * row_scale).to(dtype), acc)
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(w.shape, dtype=acc, device=h.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.input_types = (hidden.dtype, weight.dtype)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_types
        # The loss itself differentiated (no accumulation, no scaler) scales by exactly 1: the
        # gradients go on as computed, a pass over the (vocab, n_embd) one and its copy saved.
        # They go on as the saved tensors themselves, never views of them, so that autograd sees
        # the graph's reference and copies them before adding into them while a kept graph holds them.
        eager_cpu = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
        if not (eager_cpu and grad_loss.item() == 1.0):
            grad_h = None if grad_h is None else grad_h * grad_loss
            grad_w = None if grad_w is None else grad_w * grad_loss
        grad_hidden = None if grad_h is None else grad_h.to(hidden_dtype)
        grad_weight = None if grad_w is None else grad_w.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0
) -> torch.Tensor:
    """F.cross_entropy(softcap(hidden @ weight.T).float(), targets, ignore_index=-1) without the
    full logits: hidden (..., n_embd), weight (rows, n_embd), targets (...) of row indices or -1.
    The matmuls run in autocast's dtype where it is on (as a linear layer's would), the softmax in
    float32; every row of the weight takes part, as in the loss over the full logits. Where the
    CPU has no fast bfloat16, bfloat16 autocast leaves the matmuls in float32: no activation of the
    head outlives its chunk, so bfloat16 would save no memory there, only time lost."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and not _emulates_bfloat16_autocast(hidden, weight):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_mode = torch.is_grad_enabled()
    need_h, need_w = grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad
    # The dtypes are chosen above; inside, autocast would only keep oneDNN from the matmuls.
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, float(softcap), need_h, need_w)
