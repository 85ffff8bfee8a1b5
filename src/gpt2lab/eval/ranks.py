"""Scoring shared among the ranks of a torchrun job: each rank scores its share of the examples
with the same model, and the counts are summed."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.distributed.fsdp import FSDPModule

from ..runtime import autocast


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def passes_short(batches: int, device: torch.device) -> int:
    """How many more forward passes the busiest rank makes than this one's `batches`: a sharded
    model (FSDP) gathers each block's weights collectively, so every rank must make as many."""
    if not distributed():
        return 0
    most = torch.tensor([batches], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item()) - batches


def idle_passes(model, passes: int, device: torch.device, dtype: torch.dtype) -> None:
    """Forward passes of one token whose results nobody reads (see `passes_short`)."""
    for _ in range(passes):
        with autocast(device, dtype):
            model.hidden_states(torch.zeros((1, 1), dtype=torch.long, device=device))


def summed_counts(counts: list[int], device: torch.device) -> list[int]:
    """`counts` summed over the ranks (as they are, alone)."""
    if not distributed():
        return counts
    total = torch.tensor(counts, dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


@contextlib.contextmanager
def scoring(model) -> Iterator[None]:
    """The model in eval mode, its training mode back after. Scoring calls `hidden_states` and
    `logits`, not the forward in which FSDP2 gathers the root's own weights (embeddings, final
    norm): a sharded model gathers them here, and the blocks gather theirs as usual."""
    was_training = model.training
    model.eval()
    sharded = isinstance(model, FSDPModule)
    if sharded:
        model.unshard()
    try:
        yield
    finally:
        if sharded:
            model.reshard()
        model.train(was_training)
