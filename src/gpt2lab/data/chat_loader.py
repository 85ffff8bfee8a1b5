"""Batches of packed conversations with their loss masks, split across ranks, resumable exactly.

A row holds T+1 tokens: whole conversations placed one after another in the epoch's order (a
conversation that does not fit in what is left of a row starts the next row), then padding.
x = row[:-1]; y = row[1:] where the mask says the token is trained on (the assistant's
content and its end-of-turn), -1 elsewhere, so padding, prompts and the step from one
conversation into the next never count. Attention stays inside each conversation
(`attn_mask`, block-diagonal and causal) and positions restart at 0 with each one, so a packed
conversation computes exactly what it would alone in a row.

A conversation longer than T+1 tokens is cut before the last turn that starts within them (at
least one answer kept), or dropped when its first answer does not fit; both are counted.
Epochs reorder the conversations from the seed and the epoch number, the same on every rank;
rank r takes rows r, r + world_size, ... of a whole number of steps for all ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..chat.template import ChatTemplate
from ..inference import masks
from ..errors import UserError
from .dataset import TokenDataset, open_dataset
from .loader import _positive

STATE_VERSION = 1
_STATE_SETTINGS = ("kind", "split", "batch_size", "seq_len", "world_size", "seed", "shuffle", "conversations")
ChatBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _role_tokens(dataset: TokenDataset) -> tuple[np.ndarray, int]:
    """The role tokens (where turns start) and the start token (where conversations start)."""
    template = ChatTemplate.from_spec(dataset.tokenizer_spec)
    return np.array(sorted(template.role_tokens.values()), dtype=np.int64), template.start_token


class ChatLoader:
    kind = "chat"

    def __init__(
        self,
        data: str | Path | TokenDataset,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = True,
        pin_memory: bool = False,
    ):
        self.dataset = open_dataset(data)
        if self.dataset.kind != "chat":
            raise UserError(
                f"{self.dataset.folder} holds a token stream, not conversations with loss masks; "
                "make a chat dataset with `gpt2lab prepare chat FILE.jsonl --out DIR`"
            )
        self.split = split
        self.batch_size = _positive("batch_size", batch_size)
        self.seq_len = _positive("seq_len", seq_len)
        self.world_size = _positive("world_size", world_size)
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise UserError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")
        self.rank, self.seed, self.shuffle = int(rank), int(seed), bool(shuffle)
        if pin_memory and not torch.cuda.is_available():
            raise UserError("pin_memory=True needs CUDA, which this machine lacks; leave it False")
        self.pin_memory = pin_memory
        self._index_conversations()
        if not len(self.lengths):
            raise UserError(
                f"no conversation of the {split!r} split of {self.dataset.folder} has an answer within "
                f"{self.seq_len + 1} tokens; raise batch.seq_len"
            )
        self.epoch, self.step = 0, 0
        self._set_epoch(0)
        # Rows of the first epoch: what an evaluation (in order, shuffle=False) goes through.
        self.total_windows = self._rows_in_epoch
        self.windows_per_epoch = self.steps_per_epoch * self.batch_size

    def _index_conversations(self) -> None:
        """Where each conversation starts, in which shard, and how much of it a row takes."""
        roles, start_token = _role_tokens(self.dataset)
        span = self.seq_len + 1
        shard_ids, starts, lengths = [], [], []
        self.truncated = self.dropped = 0
        for index, shard in enumerate(self.dataset.shards(self.split)):
            tokens = self.dataset.tokens(shard)
            begins = np.flatnonzero(tokens == start_token)
            ends = np.append(begins[1:], len(tokens))
            for begin, end in zip(begins.tolist(), ends.tolist()):
                length = end - begin
                if length > span:
                    length = self._cut(tokens[begin:end], self.dataset.mask(shard)[begin:end], roles, span)
                    if length == 0:
                        self.dropped += 1
                        continue
                    self.truncated += 1
                shard_ids.append(index)
                starts.append(begin)
                lengths.append(length)
        self.shard_ids = np.array(shard_ids, dtype=np.int64)
        self.starts = np.array(starts, dtype=np.int64)
        self.lengths = np.array(lengths, dtype=np.int64)

    @staticmethod
    def _cut(tokens: np.ndarray, mask: np.ndarray, roles: np.ndarray, span: int) -> int:
        """The length of the longest prefix of whole turns within `span` tokens that holds an
        answer; 0 when there is none."""
        turn_starts = np.flatnonzero(np.isin(tokens[: span + 1], roles))
        for cut in turn_starts[::-1].tolist():
            if cut <= span and mask[:cut].any():
                return cut
        return 0

    def _set_epoch(self, epoch: int) -> None:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        span = self.seq_len + 1
        bounds, filled = [0], 0
        for position, length in enumerate(self.lengths[order].tolist()):
            if filled + length > span:
                bounds.append(position)
                filled = 0
            filled += length
        bounds.append(len(order))
        self._order, self._bounds = order, np.array(bounds)
        self._rows_in_epoch = len(bounds) - 1
        self.steps_per_epoch = self._rows_in_epoch // (self.batch_size * self.world_size)
        self._epoch_of_rows = epoch

    def _rank_rows(self) -> np.ndarray:
        return np.arange(self._rows_in_epoch)[self.rank :: self.world_size]

    def _gather(self, rows: np.ndarray) -> ChatBatch:
        span, count = self.seq_len + 1, len(rows)
        tokens = np.zeros((count, span), dtype=np.int64)
        mask = np.zeros((count, span), dtype=bool)
        positions = np.zeros((count, span), dtype=np.int64)
        documents = np.full((count, span), -1, dtype=np.int64)
        for row, index in enumerate(rows.tolist()):
            filled = 0
            for number, conversation in enumerate(self._order[self._bounds[index] : self._bounds[index + 1]].tolist()):
                shard = self.dataset.shards(self.split)[self.shard_ids[conversation]]
                begin, length = self.starts[conversation], self.lengths[conversation]
                end = filled + length
                tokens[row, filled:end] = self.dataset.tokens(shard)[begin : begin + length]
                mask[row, filled:end] = self.dataset.mask(shard)[begin : begin + length]
                positions[row, filled:end] = np.arange(length)
                documents[row, filled:end] = number
                filled = end
            positions[row, filled:] = np.arange(span - filled)
        x = torch.from_numpy(tokens[:, :-1])
        y = torch.from_numpy(np.where(mask[:, 1:], tokens[:, 1:], -1))
        position_ids = torch.from_numpy(positions[:, :-1])
        document = torch.from_numpy(documents[:, :-1])
        attn_mask = masks.packed(document)
        batch = (x, y, position_ids, attn_mask)
        if self.pin_memory:
            batch = tuple(t.pin_memory() for t in batch)
        return batch

    def next_batch(self) -> ChatBatch:
        """(x, y, position_ids, attn_mask): x, y and positions (B, T) int64, y -1 off the mask;
        attn_mask (B, 1, T, T) bool, True where attention is allowed. Epochs roll over."""
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the {self.split!r} split of {self.dataset.folder} packs into {self._rows_in_epoch} rows of "
                f"{self.seq_len + 1} tokens, fewer than one step needs (batch_size {self.batch_size} x world_size "
                f"{self.world_size}); use a smaller batch size or more conversations"
            )
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._epoch_of_rows != self.epoch:
            self._set_epoch(self.epoch)
        rows = self._rank_rows()[self.step * self.batch_size : (self.step + 1) * self.batch_size]
        self.step += 1
        return self._gather(rows)

    def reset(self) -> None:
        self.epoch, self.step = 0, 0

    def iter_batches(self, max_batches: int | None = None) -> Iterator[ChatBatch]:
        """From the start of the first epoch, this rank's rows once each: the full batches, then
        the rows too few for a full batch, if any (or the first `max_batches`)."""
        self.reset()
        if self._epoch_of_rows != 0:
            self._set_epoch(0)
        rows = self._rank_rows()
        limit = len(rows) if max_batches is None else max_batches * self.batch_size
        for start in range(0, min(limit, len(rows)), self.batch_size):
            yield self._gather(rows[start : start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in _STATE_SETTINGS if name != "conversations"}
        state.update(version=STATE_VERSION, conversations=len(self.lengths), epoch=self.epoch, step=self.step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise UserError(f"not a chat loader state of version {STATE_VERSION}: {state!r}")
        current = self.state_dict()
        differing = [name for name in _STATE_SETTINGS if name != "world_size" and state.get(name) != current[name]]
        if differing:
            details = ", ".join(f"{name} {state.get(name)!r} (now {current[name]!r})" for name in differing)
            raise UserError(
                f"the saved data loader state does not fit this loader: saved with {details}; resume with the "
                "same data, split, batch size, sequence length, seed and shuffle to see the same batches"
            )
        epoch, step, saved_world = state.get("epoch"), state.get("step"), state.get("world_size")
        if not all(isinstance(v, int) for v in (epoch, step, saved_world)) or min(epoch, step) < 0 or saved_world < 1:
            raise UserError(f"the saved data loader state has an invalid position: epoch {epoch!r}, step {step!r}")
        if saved_world != self.world_size:
            consumed = step * self.batch_size * saved_world
            if consumed % (self.batch_size * self.world_size):
                raise UserError(
                    f"the saved data loader position ({consumed} rows into epoch {epoch}, on {saved_world} ranks) "
                    f"is not a whole step on {self.world_size} ranks; resume on a world size that divides it"
                )
            step = consumed // (self.batch_size * self.world_size)
        self.epoch, self.step = epoch, step
        self._set_epoch(epoch)

    def __repr__(self) -> str:
        return (
            f"ChatLoader({str(self.dataset.folder)!r}, split={self.split!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, conversations={len(self.lengths)}, epoch={self.epoch}, "
            f"step={self.step}/{self.steps_per_epoch})"
        )
