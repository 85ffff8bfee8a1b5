"""Muon (MomentUm Orthogonalized by Newton-Schulz, Keller Jordan 2024) for the hidden matrices,
AdamW for everything else (embeddings, the head, norm gains, biases), in one optimizer.

Muon keeps a momentum buffer per matrix and steps along its orthogonalized form: the nearest
matrix whose singular values are all about 1, found with five Newton-Schulz iterations. Every
direction of the update then moves the weights by the same amount, whatever the gradient's
spectrum. A fused matrix (q, k and v in one `c_attn`, SwiGLU's gate and value in one `c_fc`) is
orthogonalized block by block (`row_blocks`), as the separate matrices it stands for.

Under FSDP2 a matrix is a DTensor sharded by rows: its update is gathered, orthogonalized whole
(every rank computes the same, deterministically) and each rank keeps its own rows. Under DDP the
gradients are already averaged, so every rank takes the same step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# The quintic iteration's coefficients from the Muon write-up: they push every singular value
# into roughly [0.7, 1.2] in five steps, which is as good as exactly 1 for the update's purpose.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrices: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for each matrix = U S V^T of a (..., rows, cols)
    stack: one batched iteration for many matrices of a shape costs little more than one.

    On a GPU the iteration runs in bfloat16, which it tolerates and which runs its matmuls fastest.
    On a CPU it runs in float32: the hidden matrices of a CPU-sized model are small, float32 is as
    fast there, and bf16 matmuls of that size were many times slower than float32 on a loaded
    2-core machine (threads waiting on each other), against no gain on a quiet one.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrices.to(torch.bfloat16 if matrices.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side: X X^T is then the smaller product
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(matrices.dtype)


def muon_updates(updates: list[torch.Tensor], row_blocks: list[list[int] | None], steps: int) -> list[torch.Tensor]:
    """The orthogonalized step of each matrix, each block of its rows on its own, scaled by
    sqrt(max(1, rows / columns)) so that tall and wide blocks move by comparable amounts. Blocks
    of one shape go through Newton-Schulz together: on a CPU model's small matrices the cost is
    in the number of matmul calls, not their size."""
    blocks = [list(u.split(rb, dim=0)) if rb else [u] for u, rb in zip(updates, row_blocks)]
    by_shape: dict[tuple, list[tuple[int, int]]] = {}
    for i, pieces in enumerate(blocks):
        for j, piece in enumerate(pieces):
            by_shape.setdefault((piece.shape, piece.dtype, piece.device), []).append((i, j))
    for (shape, _, _), where in by_shape.items():
        stacked = orthogonalize(torch.stack([blocks[i][j] for i, j in where]), steps)
        scale = math.sqrt(max(1.0, shape[0] / shape[1]))
        for (i, j), result in zip(where, stacked.unbind(0)):
            blocks[i][j] = result * scale
    return [torch.cat(pieces) if len(pieces) > 1 else pieces[0] for pieces in blocks]


class Muon(torch.optim.Optimizer):
    """Groups with ``muon=True`` (2-D matrices) take Muon steps; the others AdamW steps.

    Muon groups: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``ns_steps`` and optionally
    ``row_blocks``. AdamW groups: ``lr``, ``betas``, ``eps``, ``weight_decay``.
    """

    def __init__(self, groups: Iterable[dict[str, Any]]):
        defaults = dict(muon=False, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                        row_blocks=None, betas=(0.9, 0.95), eps=1e-8)
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon = [(p, g) for g in self.param_groups if g["muon"] for p in g["params"] if p.grad is not None]
        for steps in sorted({g["ns_steps"] for _, g in muon}):
            self._muon_steps([(p, g) for p, g in muon if g["ns_steps"] == steps], steps)
        for group in self.param_groups:
            if not group["muon"]:
                for param in group["params"]:
                    if param.grad is not None:
                        self._adamw_step(param, group)
        return loss

    def _momentum_update(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """The (Nesterov) momentum step of one matrix, whole: an FSDP2 shard is gathered."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        buffer = state["momentum_buffer"]
        buffer.lerp_(param.grad, 1 - group["momentum"])
        update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
        return update.full_tensor() if isinstance(update, DTensor) else update

    def _muon_steps(self, members: list[tuple[torch.Tensor, dict[str, Any]]], steps: int) -> None:
        updates = [self._momentum_update(param, group) for param, group in members]
        orthogonal = muon_updates(updates, [group["row_blocks"] for _, group in members], steps)
        for (param, group), update in zip(members, orthogonal):
            if isinstance(param, DTensor):
                # Every rank holds the same whole update: each keeps its own shard, no message sent.
                update = distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)
            param.mul_(1 - group["lr"] * group["weight_decay"])
            param.add_(update, alpha=-group["lr"])

    def _adamw_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        grad = param.grad
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
