"""The head's loss, chunk by chunk: the mean cross-entropy of softcap(hidden @ weight.T) without the
(B, T, vocab) logits, which are 1.6 GiB in float32 at B=8, T=1024 (and held several times).

Each chunk's gradients are computed while its logits are at hand, so backward only scales them.
The products and the softmax of a chunk go through a `HeadKernels`: PyTorch's operators here;
`gpt2lab.kernels.accelerate` gives a model on a CPU kernels of its own (`Transformer.head_kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits held at once: 2**25 float32 values (128 MiB), 640 rows of GPT-2's padded vocabulary.
CHUNK_ELEMENTS = 2**25
# At most this many chunks: torch.compile unrolls the loop, and 100 chunks of B=64, T=1024 would
# cost minutes of compiling; there the chunks grow instead (2048 rows, still 1/32 of the logits).
MAX_CHUNKS = 32


class HeadKernels:
    """The operations of the chunked loss, in PyTorch. A subclass may replace any of them with
    kernels that compute the same values (to rounding)."""

    def matmul_dtype(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        """The dtype of the head's products: autocast's where it is on, as a linear layer's."""
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return torch.promote_types(hidden.dtype, weight.dtype)

    def prepare(self, weight: torch.Tensor, need_h: bool) -> object:
        """Whatever `grad_hidden` wants of the weight, made once per loss (nothing here)."""
        return None

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight)

    def softmax_cross_entropy_(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Each row's loss, with `logits` turned in place into the loss's gradient; None where
        there is no such kernel, and the loss computes both through log_softmax."""
        return None

    def grad_hidden(self, grad: torch.Tensor, weight: torch.Tensor, prepared: object) -> torch.Tensor:
        return grad @ weight

    def add_weight_gradient(
        self, grad_w: torch.Tensor | None, grad: torch.Tensor, h: torch.Tensor, acc: torch.dtype
    ) -> torch.Tensor:
        """grad_w + grad.T @ h, in place where the dtypes allow (no (vocab, n_embd) temporary); the
        first chunk's (grad_w None) is the product alone, in `acc`: a zeroed start would cost a pass
        over the whole matrix."""
        if grad_w is not None and grad.dtype == grad_w.dtype:
            return grad_w.addmm_(grad.t(), h)
        product = grad.t() @ h
        return product.to(acc) if grad_w is None else grad_w.add_(product)


PYTORCH = HeadKernels()


def chunk_rows(vocab: int, rows_in_all: int) -> int:
    """Rows per chunk: as few chunks as CHUNK_ELEMENTS and MAX_CHUNKS allow, of even size (rounded
    up to 16 rows within the cap where the last chunk keeps at least half). Even chunks run faster
    than a full one and a remainder (docs/benchmarks.md)."""
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


def _chunk_loss_and_gradient(kernels: HeadKernels, logits: torch.Tensor, targets: torch.Tensor, want_grad: bool):
    """(each row's loss, the gradient of the loss with respect to the logits or None)."""
    nll = kernels.softmax_cross_entropy_(logits, targets) if not torch.compiler.is_compiling() else None
    if nll is not None:
        return nll, logits
    # One log-softmax pass gives the loss and, exponentiated in place, the softmax.
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    if not want_grad:
        return nll, None
    grad = log_probs.exp_()
    grad.scatter_add_(1, targets[:, None], torch.full_like(nll[:, None], -1.0))
    return nll, grad


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(hidden @ weight.T) over the rows whose target is not -1,
    computed a chunk of rows at a time. The gradients a chunk owes (hidden's with need_h, the
    weight's with need_w) are computed while its logits are at hand, so that backward only scales
    them by the incoming gradient: no step holds more than one chunk's logits, and the head's
    matmuls are not recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, softcap, need_h, need_w, kernels):
        h = hidden.reshape(-1, hidden.size(-1)).to(dtype)  # (rows, n_embd)
        w = weight.to(dtype)
        t = targets.reshape(-1)
        valid = t != -1
        picked = t.clamp(min=0)
        acc = torch.promote_types(dtype, torch.float32)
        # F.cross_entropy's mean over the counted targets (NaN when there are none, as there).
        scale = 1.0 / valid.sum().to(acc)
        total = torch.zeros((), dtype=acc, device=h.device)
        # In the hidden states' own shape, so that backward can hand it on without a view.
        grad_h = torch.empty(hidden.shape, dtype=acc, device=h.device) if need_h else None
        grad_h_rows = grad_h.view(h.shape) if need_h else None
        grad_w = None
        prepared = kernels.prepare(w, need_h)
        rows = chunk_rows(w.size(0), h.size(0))
        for start in range(0, h.size(0), rows):
            part = slice(start, start + rows)
            logits = kernels.logits(h[part], w).to(acc)  # (rows, vocab)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
                # The gradient's kernel overwrites the logits, which soft-capping needs after.
                nll, grad = _chunk_loss_and_gradient(PYTORCH, logits, picked[part], need_h or need_w)
                if grad is not None:
                    grad *= 1 - (logits / softcap).square()
            else:
                nll, grad = _chunk_loss_and_gradient(kernels, logits, picked[part], need_h or need_w)
            total += torch.where(valid[part], nll, 0).sum()
            if need_h or need_w:
                grad = grad.to(dtype)
                # Each row's weight in the mean (0 for ignored targets) scales the (rows, n_embd)
                # factors rather than the (rows, vocab) gradient: a pass over the chunk saved.
                row_scale = (valid[part].to(acc) * scale)[:, None]
                if need_h:
                    grad_h_rows[part] = kernels.grad_hidden(grad, w, prepared) * row_scale
                if need_w:
                    grad_w = kernels.add_weight_gradient(grad_w, grad, (h[part] * row_scale).to(dtype), acc)
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
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
    kernels: HeadKernels = PYTORCH,
) -> torch.Tensor:
    """F.cross_entropy(softcap(hidden @ weight.T).float(), targets, ignore_index=-1) without the
    full logits: hidden (..., n_embd), weight (rows, n_embd), targets (...) of row indices or -1.
    The matmuls run in `kernels.matmul_dtype` (autocast's where it is on), the softmax in float32;
    every row of the weight takes part, as in the loss over the full logits."""
    device = hidden.device.type
    dtype = kernels.matmul_dtype(hidden, weight)
    grad_mode = torch.is_grad_enabled()
    need_h, need_w = grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad
    # The dtypes are chosen above; inside, autocast would only keep other kernels from the matmuls.
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, float(softcap), need_h, need_w, kernels)
