"""Mean loss and perplexity of a model over a split of a prepared dataset, and bits per byte.

Bits per byte (as nanochat's `loss_eval.evaluate_bpb`): the summed loss of the target tokens, in
nats, divided by ln 2 and by the number of bytes those tokens stand for (each token's own bytes,
so a character split over two tokens counts once). Special tokens (end-of-text, a chat format's
role tokens) stand for no text: they are left out of both sums. Unlike the loss per token, it does
not depend on the tokenizer, so models with different vocabularies compare on it."""

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
from ..tokenizer import Tokenizer
from . import ranks


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean cross-entropy per token, in nats
    tokens: int  # tokens predicted, over all ranks
    batches: int  # batches on this rank
    bytes: int = 0  # bytes of text the targets stand for, over all ranks (measured with token_bytes)
    bpb: float | None = None  # bits per byte; None when not measured

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def token_byte_lengths(tokenizer: Tokenizer, rows: int) -> torch.Tensor:
    """(rows,) int64: how many bytes of text each id stands for; 0 for the special tokens and for
    the ids past the tokenizer's vocabulary (padding rows), which bits per byte leaves out."""
    special = {tokenizer.eot_token, *getattr(tokenizer, "special_names", {})}
    lengths = torch.zeros(rows, dtype=torch.int64)
    for token in range(min(rows, tokenizer.vocab_size)):
        if token not in special:
            lengths[token] = len(tokenizer.token_bytes(token))
    return lengths


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
    token_bytes: torch.Tensor | None = None,
) -> LossResult:
    """The loss over the first `batches` batches of non-overlapping windows of `split`, in order
    (None: every window, as the training's final evaluation does). `seq_len` defaults to the
    model's block size. Ranks take every world_size-th window; sums are all-reduced when
    torch.distributed is initialized. With `token_bytes` (`token_byte_lengths`), bits per byte too."""
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
    return loss_over_batches(model, loader, batches=batches, autocast_dtype=autocast_dtype, progress=progress,
                             token_bytes=token_bytes)


def _batch_count(loader: TokenLoader | ChatLoader, rank: int, batches: int | None) -> int:
    """How many batches `loader.iter_batches(batches)` yields on `rank`: the full batches, then
    one of the windows left over, if any."""
    leftover = len(range(rank, loader.total_windows, loader.world_size)) > loader.windows_per_epoch
    available = loader.steps_per_epoch + leftover
    return available if batches is None else min(batches, available)


def _loss_and_special_nats(model, batch: list[torch.Tensor], token_bytes: torch.Tensor, device: torch.device,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over the targets that are not -1, the summed loss of those that stand for no
    bytes, the bytes of the rest), from one forward pass: the special targets are few, so their
    loss is computed again on their rows alone rather than the whole loss twice."""
    x, y, *rest = batch
    position_ids, attn_mask = (rest + [None, None])[:2]
    with autocast(device, dtype):
        hidden = model.hidden_states(x, position_ids=position_ids, attn_mask=attn_mask)
        loss = model.loss(hidden, y)
    real = y != -1
    lengths = torch.where(real, token_bytes[y.clamp(min=0)], 0)
    special = real & (lengths == 0)
    special_nats = torch.zeros((), dtype=torch.float64, device=device)
    if special.any():
        with autocast(device, dtype):
            special_nats = model.loss(hidden[special], y[special]).double() * special.sum()
    return loss, special_nats, lengths.sum()


@torch.no_grad()
def loss_over_batches(
    model,
    loader: TokenLoader | ChatLoader,
    *,
    batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    token_bytes: torch.Tensor | None = None,
) -> LossResult:
    """The loss over the first `batches` of `loader.iter_batches` (None: all of them), one batch
    in memory at a time; sums are all-reduced when torch.distributed is initialized. With
    `token_bytes` (`token_byte_lengths`: bytes per id), bits per byte too."""
    if batches is not None and batches <= 0:
        raise UserError(f"batches must be positive (or None for the whole split), got {batches}")
    device = next(model.parameters()).device
    dtype = autocast_dtype or torch.float32
    # [summed loss, summed loss of the special targets, bytes], and the targets counted.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
    count = 0
    expected = _batch_count(loader, loader.rank, batches)
    distributed = ranks.distributed()
    # A sharded model (FSDP) gathers its weights collectively in every forward pass, so a rank
    # with fewer batches makes uncounted passes until it has made as many as rank 0, which has
    # the most.
    sharded = isinstance(model, FSDPModule)
    idle_passes = _batch_count(loader, 0, batches) - expected if sharded and distributed else 0
    was_training = model.training
    model.eval()
    # FSDP2 gathers the root's own weights in its forward, which the bytes' path does not call.
    if sharded and token_bytes is not None:
        model.unshard()
    bar = tqdm(total=expected, unit="batch", desc=f"loss on {loader.split}",
               disable=None if progress and loader.rank == 0 else True, leave=False)
    try:
        for batch in loader.iter_batches(batches):
            batch = [t.to(device, non_blocking=loader.pin_memory) for t in batch]
            # A chat batch's targets are -1 off the mask: the loss is the mean over the others.
            counted = (batch[1] != -1).sum()
            if token_bytes is None:
                with autocast(device, dtype):
                    _, loss = model(*batch)
            else:
                loss, special_nats, nbytes = _loss_and_special_nats(model, batch, token_bytes, device, dtype)
                sums[1] += special_nats
                sums[2] += nbytes
            sums[0] += loss.double() * counted
            tokens += counted
            count += 1
            bar.update(1)
        if sharded and token_bytes is not None:
            model.reshard()
        for _ in range(idle_passes):
            with autocast(device, dtype):
                model(torch.zeros((1, 1), dtype=torch.long, device=device))
    finally:
        bar.close()
        model.train(was_training)
    if distributed:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(tokens)
    n = int(tokens.item())
    total, special, nbytes = sums.tolist()
    bpb = None if token_bytes is None else ((total - special) / (math.log(2) * nbytes) if nbytes else math.inf)
    return LossResult(loss=total / max(n, 1), tokens=n, batches=count, bytes=int(nbytes), bpb=bpb)
