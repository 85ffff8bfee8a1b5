"""The KV cache: keys and values of every layer, one slot per sequence, each at its own length.

One class serves both users. `generate` gives every row of its batch a slot and moves them
together (`cache.rows(range(B), [start] * B)`); the server's engine gives each request a slot
and decodes requests of different lengths in one forward. The model sees only a rows view
(`CacheRows`, or `StepRows` for a compiled single-token step): attention calls `update`, and
`positions` / `key_mask` give the defaults for the new tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import masks
from ..config import GPTConfig


class KVCache:
    """Keys and values of up to `num_slots` sequences of up to `max_len` tokens.

    The cache does not track lengths: each forward names its rows with `rows(slots, starts)`.
    """

    def __init__(self, config: GPTConfig, num_slots: int, max_len: int, *, device, dtype):
        shape = (num_slots, config.kv_heads, max_len, config.head_dim)
        # Zeros, not empty: a row shorter than the longest still multiplies the masked keys and
        # values past its end, and a NaN in uninitialised memory would survive the mask (0 * NaN).
        # One tensor per layer, not views of one: a compiled step takes them as inputs and writes
        # into them in place, which it cannot do cheaply to inputs that share memory.
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.num_slots = num_slots

    def rows(self, slots: Sequence[int], starts: Sequence[int]) -> CacheRows:
        """The view a forward of a (len(slots), T) batch writes to: row b's T new keys go to slot
        `slots[b]` at positions `starts[b]`.. and its queries see that slot's keys up to there."""
        return CacheRows(self, list(slots), list(starts))

    def all_rows(self, start: int) -> CacheRows:
        """Every slot, all at `start`: the batch of one `generate` call."""
        return CacheRows(self, list(range(self.num_slots)), [start] * self.num_slots)

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (to keep the live sequences in the first slots)."""
        for layer in self.keys + self.values:
            layer[dst] = layer[src]

    def copy_slots_from(self, other: KVCache, count: int) -> None:
        """Copy the first `count` slots of `other` (a smaller cache of the same model) into this one."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:count, :, : theirs.size(2)] = theirs[:count]

    def step_rows(self, position: torch.Tensor, pads: torch.Tensor) -> StepRows:
        """The view of a one-token step of every slot at cache position `position`; see StepRows."""
        return StepRows(self, position, pads)


class CacheRows:
    """Rows of a KVCache taking part in one forward; see `KVCache.rows`."""

    def __init__(self, cache: KVCache, slots: list[int], starts: list[int]):
        if len(slots) != len(starts) or not slots:
            raise ValueError(f"need one start per slot, got {len(slots)} slots and {len(starts)} starts")
        self.cache = cache
        self.slots = slots
        self.starts = starts
        self.uniform_start = min(starts) == max(starts)
        first = slots[0]
        # Live sequences kept in consecutive slots are read as a view instead of gathered.
        self.slot_range = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        self._slot_index: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    def end(self, T: int) -> int:
        """Keys in the longest row once T new tokens are in."""
        return max(self.starts) + T

    def positions(self, T: int, device) -> torch.Tensor:
        """(B, T) position of each new token."""
        if self._positions is None or self._positions.size(1) != T:
            starts = torch.tensor(self.starts, device=device)
            self._positions = starts[:, None] + torch.arange(T, device=device)
        return self._positions

    def key_mask(self, T: int, device) -> torch.Tensor | None:
        """(B, 1, T, keys) True where a query may attend; None where causal attention over the
        last T keys is exact (every row at the same start, and one query or nothing cached)."""
        if self.uniform_start and (T == 1 or self.starts[0] == 0):
            return None
        return masks.up_to(self.positions(T, device), self.end(T))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, H, T, D); return each row's keys/values so far,
        (B, H, keys, D), padded to the longest row."""
        T = k.size(2)
        end = self.end(T)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.uniform_start and self.slot_range is not None:
            start = self.starts[0]
            keys[self.slot_range, :, start : start + T] = k
            values[self.slot_range, :, start : start + T] = v
            return keys[self.slot_range, :, :end], values[self.slot_range, :, :end]
        if self._slot_index is None:
            self._slot_index = torch.tensor(self.slots, device=k.device)
        rows = self._slot_index[:, None]
        positions = self.positions(T, k.device)
        # Advanced indices on dims 0 and 2 put the (B, T) index dims first: values are (B, T, H, D).
        keys[rows, :, positions] = k.transpose(1, 2)
        values[rows, :, positions] = v.transpose(1, 2)
        if self.slot_range is not None:
            return keys[self.slot_range, :, :end], values[self.slot_range, :, :end]
        return keys[self._slot_index, :, :end], values[self._slot_index, :, :end]


class StepRows:
    """Every slot of a KVCache taking one new token at the same cache position, for a step whose
    shapes do not change from token to token (so that one compiled graph serves them all).

    `position` is a 1-element tensor, not an int: a compiled graph would otherwise be specialised
    to each value. Row b's tokens start at cache position `pads[b]` (left padding); its queries see
    the keys from there up to `position`. Attention reads all the cache's keys, masked past the
    position: the price of static shapes, kept small by sizing the cache to the generation. The
    cache's length is read from its tensors, so that a graph compiled with that length dynamic
    (`generate.compiled_step`) serves caches of any length.
    """

    def __init__(self, cache: KVCache, position: torch.Tensor, pads: torch.Tensor):
        self.cache = cache
        self.position = position
        self.pads = pads

    def end(self, T: int) -> int:
        return self.cache.keys[0].size(2)

    def positions(self, T: int, device) -> torch.Tensor:
        return (self.position - self.pads)[:, None]

    def key_mask(self, T: int, device) -> torch.Tensor:
        return masks.within_window(self.position, self.pads, self.end(1))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        return keys, values
