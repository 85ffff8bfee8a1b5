"""Mean loss and perplexity of a model over a split of a prepared dataset."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from ..data.chat_loader import ChatLoader
from ..data.dataset import TokenDataset, open_dataset
from ..data.loader import TokenLoader
from ..errors import UserError
from ..runtime import autocast


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean cross-entropy per token, in nats
    tokens: int  # tokens predicted, over all ranks
    batches: int  # batches on this rank

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def evaluate_loss(
    model,
    data: str | Path | TokenDataset,
    *,
    split: str = "val",
    batches: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> LossResult:
    """The loss over the first `batches` batches of non-overlapping windows of `split`, in order
    (None: every window, as the training's final evaluation does). `seq_len` defaults to the
    model's block size. Ranks take every world_size-th window; sums are all-reduced when
    torch.distributed is initialized."""
    dataset = open_dataset(data)
    config = model.config
    if dataset.vocab_size > config.vocab_size:
        raise UserError(
            f"the data in {dataset.folder} has a vocabulary of {dataset.vocab_size} tokens, more than the "
            f"model's {config.vocab_size}; evaluate on data prepared with the model's tokenizer"
        )
    seq_len = seq_len or config.block_size
    if seq_len > config.block_size:
        raise UserError(f"sequence length {seq_len} exceeds the model's block size {config.block_size}; lower it")
    device = next(model.parameters()).device
    # A chat dataset is scored on the assistant's tokens only, conversations packed as in training.
    loader_class = ChatLoader if dataset.kind == "chat" else TokenLoader
    loader = loader_class(
        dataset, split=split, batch_size=batch_size, seq_len=seq_len, rank=rank, world_size=world_size,
        shuffle=False, pin_memory=device.type == "cuda",
    )
    return loss_over_batches(model, loader, batches=batches, autocast_dtype=autocast_dtype, progress=progress)


def _batch_count(loader: TokenLoader | ChatLoader, rank: int, batches: int | None) -> int:
    """How many batches `loader.iter_batches(batches)` yields on `rank`: the full batches, then
    one of the windows left over, if any."""
    leftover = len(range(rank, loader.total_windows, loader.world_size)) > loader.windows_per_epoch
    available = loader.steps_per_epoch + leftover
    return available if batches is None else min(batches, available)


@torch.no_grad()
def loss_over_batches(
    model,
    loader: TokenLoader | ChatLoader,
    *,
    batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> LossResult:
    """The loss over the first `batches` of `loader.iter_batches` (None: all of them), one batch
    in memory at a time; sums are all-reduced when torch.distributed is initialized."""
    if batches is not None and batches <= 0:
        raise UserError(f"batches must be positive (or None for the whole split), got {batches}")
    device = next(model.parameters()).device
    dtype = autocast_dtype or torch.float32
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    expected = _batch_count(loader, loader.rank, batches)
    # A sharded model (FSDP) gathers its weights collectively in every forward pass, so a rank
    # with fewer batches makes uncounted passes until it has made as many as rank 0, which has
    # the most.
    idle_passes = 0
    if isinstance(model, FSDPModule) and torch.distributed.is_available() and torch.distributed.is_initialized():
        idle_passes = _batch_count(loader, 0, batches) - expected
    was_training = model.training
    model.eval()
    bar = tqdm(total=expected, unit="batch", desc=f"loss on {loader.split}",
               disable=None if progress and loader.rank == 0 else True, leave=False)
    try:
        for batch in loader.iter_batches(batches):
            batch = [t.to(device, non_blocking=loader.pin_memory) for t in batch]
            # A chat batch's targets are -1 off the mask: the loss is the mean over the others.
            counted = (batch[1] != -1).sum()
            with autocast(device, dtype):
                _, loss = model(*batch)
            total += loss.double() * counted
            tokens += counted
            count += 1
            bar.update(1)
        for _ in range(idle_passes):
            with autocast(device, dtype):
                model(torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        bar.close()
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(tokens)
    n = int(tokens.item())
    return LossResult(loss=total.item() / max(n, 1), tokens=n, batches=count)
