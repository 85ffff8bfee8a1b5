"""Batches of token windows from memory-mapped shards, split across ranks, resumable exactly.

A window is T+1 consecutive tokens of one shard (x = window[:-1], y = window[1:]); window i of a
shard covers tokens [i*T, i*T + T + 1), so consecutive windows share one boundary token and no
window crosses a shard boundary. An epoch is a permutation of every (shard, window) pair of the
split, drawn from the seed and the epoch number, so the order is the same on every rank and in
every run; truncated to a whole number of steps for all ranks, rank r takes every
world_size-th window of it starting at r. A shuffled global order avoids the periodic loss that a
fixed shard order produces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UserError
from .dataset import TokenDataset, open_dataset

STATE_VERSION = 1
# What must agree between a saved state and the loader it is loaded into for the batches to match.
_STATE_SETTINGS = ("split", "batch_size", "seq_len", "world_size", "seed", "shuffle", "random_offset", "windows")


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class TokenLoader:
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
        random_offset: bool = False,
    ):
        self.dataset = open_dataset(data)
        self.split = split
        self.batch_size = _positive("batch_size", batch_size)
        self.seq_len = _positive("seq_len", seq_len)
        self.world_size = _positive("world_size", world_size)
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise UserError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        # Shifting every window of an epoch by a seeded offset in [0, T) lets training see all T
        # alignments of the text over the epochs, as nanoGPT's random offsets do, while an epoch
        # still reads each token once.
        self.random_offset = bool(random_offset) and self.shuffle
        if pin_memory and not torch.cuda.is_available():
            raise UserError("pin_memory=True needs CUDA, which this machine lacks; leave it False")
        # Batches in page-locked memory are what lets `.to(cuda, non_blocking=True)` copy them
        # while the GPU is still busy with the previous step.
        self.pin_memory = pin_memory
        self._shards = self.dataset.shards(split)
        # With random offsets every shard keeps seq_len - 1 spare tokens for the largest shift.
        reserve = self.seq_len - 1 if self.random_offset else 0
        counts = [max(0, (shard.tokens - 1 - reserve) // self.seq_len) for shard in self._shards]
        # Global id of each shard's first window; a shard with no window repeats its successor's id.
        self._first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.total_windows = int(self._first[-1])
        if self.total_windows == 0:
            raise UserError(
                f"the {split!r} split of {self.dataset.folder} has {self.dataset.split_tokens(split):,} tokens "
                f"but no shard with {self.seq_len + 1} of them, the span of one window; use a shorter "
                "sequence length or more data"
            )
        self.steps_per_epoch = self.total_windows // (self.batch_size * self.world_size)
        self.windows_per_epoch = self.steps_per_epoch * self.batch_size
        self._arrays: list[np.ndarray | None] = [None] * len(self._shards)
        self.epoch = 0
        self.step = 0
        self._order: np.ndarray | None = None
        self._offset = 0

    def _epoch_windows(self, epoch: int) -> tuple[np.ndarray, int]:
        """This rank's global window ids for `epoch`, in order (the first `windows_per_epoch` make
        the epoch's batches, the rest is this rank's share of the windows too few for a step), and
        the epoch's token offset of every window."""
        if not self.shuffle:
            return np.arange(self.total_windows)[self.rank :: self.world_size], 0
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.total_windows)
        offset = int(rng.integers(0, self.seq_len)) if self.random_offset else 0
        return order[self.rank :: self.world_size], offset

    def _array(self, index: int) -> np.ndarray:
        array = self._arrays[index]
        if array is None:
            array = self._arrays[index] = self.dataset.tokens(self._shards[index])
        return array

    def _gather(self, window_ids: np.ndarray, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.seq_len + 1
        shard_ids = np.searchsorted(self._first, window_ids, side="right") - 1
        starts = (window_ids - self._first[shard_ids]) * self.seq_len + offset
        windows = np.empty((len(window_ids), span), dtype=np.uint32)  # holds uint16 and uint32 shards' ids
        for row, (shard, start) in enumerate(zip(shard_ids.tolist(), starts.tolist())):
            windows[row] = self._array(shard)[start : start + span]
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each int64 of shape (batch_size, seq_len); epochs roll over without end."""
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the {self.split!r} split of {self.dataset.folder} has {self.total_windows} windows of "
                f"{self.seq_len + 1} tokens, fewer than one step needs (batch_size {self.batch_size} x "
                f"world_size {self.world_size}); use a smaller batch size or sequence length, or more data"
            )
        if self.step >= self.steps_per_epoch:
            self.epoch += 1
            self.step = 0
            self._order = None
        if self._order is None:
            self._order, self._offset = self._epoch_windows(self.epoch)
        batch = self._order[self.step * self.batch_size : (self.step + 1) * self.batch_size]
        self.step += 1
        return self._gather(batch, self._offset)

    def reset(self) -> None:
        """Back to the first batch of the first epoch."""
        self.epoch = 0
        self.step = 0
        self._order = None

    def iter_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """From the start of the first epoch, this rank's windows once each: the full batches,
        then one smaller batch of the windows too few for a step, if any (or the first `max_batches`).

        Over all ranks that is every non-overlapping window of the split, as an evaluation over
        the whole split needs (with shuffle=False, in order). Ranks may differ by one batch.
        """
        self.reset()
        full = self.steps_per_epoch if max_batches is None else min(max_batches, self.steps_per_epoch)
        for _ in range(full):
            yield self.next_batch()
        if max_batches is None or max_batches > self.steps_per_epoch:
            order, offset = self._epoch_windows(0)
            rest = order[self.windows_per_epoch :]
            if len(rest):
                yield self._gather(rest, offset)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values; the same on every rank, so any rank's copy resumes all of them."""
        state = {name: getattr(self, name) for name in _STATE_SETTINGS if name != "windows"}
        state.update(version=STATE_VERSION, windows=self.total_windows, epoch=self.epoch, step=self.step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserError(f"not a loader state of version {STATE_VERSION}: {state!r}")
        current = self.state_dict()
        differing = [name for name in _STATE_SETTINGS if name != "world_size" and state.get(name) != current[name]]
        if differing:
            details = ", ".join(f"{name} {state.get(name)!r} (now {current[name]!r})" for name in differing)
            raise UserError(
                f"the saved data loader state does not fit this loader: saved with {details}; resume with "
                "the same data, split, batch size, sequence length, seed and shuffle to see the same batches"
            )
        epoch, step, saved_world = state.get("epoch"), state.get("step"), state.get("world_size")
        if not all(isinstance(v, int) for v in (epoch, step, saved_world)) or epoch < 0 or step < 0 or saved_world < 1:
            raise UserError(f"the saved data loader state has an invalid position: epoch {epoch!r}, step {step!r}")
        if saved_world != self.world_size:
            # Every rank's batches together are a prefix of the epoch's order, so a position moves
            # to another world size when it falls on a whole step there.
            consumed = step * self.batch_size * saved_world
            if consumed % (self.batch_size * self.world_size):
                raise UserError(
                    f"the saved data loader position ({consumed} windows into epoch {epoch}, on {saved_world} "
                    f"ranks) is not a whole step on {self.world_size} ranks; resume on a world size that "
                    "divides it, or from another checkpoint"
                )
            step = consumed // (self.batch_size * self.world_size)
        if not step <= self.steps_per_epoch:
            raise UserError(f"the saved data loader state has an invalid position: epoch {epoch!r}, step {step!r}")
        self.epoch, self.step, self._order = epoch, step, None

    def __repr__(self) -> str:
        return (
            f"TokenLoader({str(self.dataset.folder)!r}, split={self.split!r}, batch_size={self.batch_size}, "
            f"seq_len={self.seq_len}, rank={self.rank}, world_size={self.world_size}, epoch={self.epoch}, "
            f"step={self.step}/{self.steps_per_epoch})"
        )
