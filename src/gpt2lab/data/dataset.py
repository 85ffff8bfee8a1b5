"""A prepared dataset folder: `dataset.json` and its shards, or a folder of shards from llm.c,
modded-nanogpt, build-nanogpt or nanoGPT that has no `dataset.json`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import GPT2_VOCAB_SIZE
from ..errors import UserError
from ..files import digest_problem
from .shards import read_shard, shard_length

DATASET_FILE = "dataset.json"
FORMAT_NAME = "gpt2lab-dataset"
FORMAT_VERSION = 1
# A shard of another tool belongs to a split named as a word of its file name:
# fineweb_val_000000.bin, edufineweb_train_000001.npy, train.bin.
_SPLIT_WORD = re.compile(r"(?:^|[_\-.])(train|val)(?:[_\-.]|$)")


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int
    sha256: str | None = None
    # A chat dataset's loss mask beside the shard: one uint8 per token, 1 where it is trained on.
    mask: Path | None = None
    mask_sha256: str | None = None


class TokenDataset:
    """Shards per split, the tokenizer that made them, and memory-mapped access to their tokens."""

    def __init__(
        self, folder: Path, splits: dict[str, list[Shard]], tokenizer_spec: Any, vocab_size: int, kind: str = "tokens"
    ):
        self.folder = folder
        self.splits = splits
        self.tokenizer_spec = tokenizer_spec
        self.vocab_size = vocab_size
        # "tokens": one stream to learn every token of; "chat": conversations with loss masks.
        self.kind = kind
        self._arrays: dict[Path, np.ndarray] = {}

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"{self.folder} has no {split!r} split (its splits: {known})")
        return self.splits[split]

    def split_tokens(self, split: str) -> int:
        return sum(shard.tokens for shard in self.shards(split))

    def tokens(self, shard: Shard) -> np.ndarray:
        """The shard's tokens, memory-mapped once and kept open."""
        array = self._arrays.get(shard.path)
        if array is None:
            array = self._arrays[shard.path] = read_shard(shard.path)
            if len(array) != shard.tokens:
                raise UserError(
                    f"{shard.path} holds {len(array)} tokens, but {self.folder / DATASET_FILE} records "
                    f"{shard.tokens}; the folder changed after it was prepared: prepare it again"
                )
            self._check_ids(shard, array)
        return array

    def mask(self, shard: Shard) -> np.ndarray:
        """A chat shard's loss mask (uint8, one per token), memory-mapped once and kept open."""
        if shard.mask is None:
            raise UserError(f"{shard.path} has no loss mask: {self.folder} is not a chat dataset")
        array = self._arrays.get(shard.mask)
        if array is None:
            try:
                array = np.load(shard.mask, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:
                raise UserError(f"{shard.mask} is not a readable mask ({error}); prepare the data again") from None
            if array.shape != (shard.tokens,) or array.dtype != np.uint8:
                raise UserError(
                    f"{shard.mask} holds {array.dtype} of shape {array.shape}, not one uint8 for each of the "
                    f"{shard.tokens} tokens of {shard.path.name}; prepare the data again"
                )
            self._arrays[shard.mask] = array
        return array

    def _check_ids(self, shard: Shard, array: np.ndarray) -> None:
        """Refuse ids outside the vocabulary once per shard (one pass over the mapped file), so
        that a damaged shard or one of another tokenizer fails here, not deep in the embedding."""
        high = int(array.max()) if len(array) else 0
        if high >= self.vocab_size:
            raise UserError(
                f"{shard.path} holds token id {high}, outside the vocabulary of {self.vocab_size} tokens that "
                f"{self.folder} records; the shard is damaged or from another tokenizer: check the folder with "
                f"`gpt2lab prepare --verify --out {self.folder}` and prepare it again"
            )

    def verify(self) -> list[str]:
        """Every shard read in full: its recorded sha256 (where dataset.json has one) and its ids.
        Returns one line per problem (empty: the folder is sound)."""
        problems = []
        for shards in self.splits.values():
            for shard in shards:
                damage = digest_problem(shard.path, shard.sha256, DATASET_FILE)
                if damage is None and shard.mask is not None:
                    damage = digest_problem(shard.mask, shard.mask_sha256, DATASET_FILE)
                if damage is not None:
                    problems.append(damage)
                    continue
                try:
                    self.tokens(shard)
                except UserError as error:
                    problems.append(str(error))
        return problems

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={self.split_tokens(name):,}" for name in sorted(self.splits))
        return f"TokenDataset({str(self.folder)!r}, vocab_size={self.vocab_size}, {sizes})"


def read_dataset_json(folder: Path) -> dict[str, Any]:
    path = folder / DATASET_FILE
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a gpt2lab dataset description; prepare the data again")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {meta.get('version')!r}; this gpt2lab reads version {FORMAT_VERSION}"
        )
    return meta


def _from_dataset_json(folder: Path) -> TokenDataset:
    path = folder / DATASET_FILE
    meta = read_dataset_json(folder)
    if not meta.get("complete"):
        raise UserError(
            f"{folder} was not finished (its prepare was interrupted); run the command in {path} again "
            f"to finish it: {meta.get('command', 'gpt2lab prepare ...')}"
        )
    try:
        splits = {
            name: [_shard_entry(folder, entry) for entry in split["shards"]] for name, split in meta["splits"].items()
        }
        tokenizer_spec, vocab_size = meta["tokenizer"], int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path} lacks or misstates an entry ({error!r}); prepare the data again") from None
    for shards in splits.values():
        for shard in shards:
            for listed in (shard.path, shard.mask):
                if listed is not None and not listed.is_file():
                    raise UserError(f"{listed}, listed in {path}, is missing; prepare the data again")
            on_disk = shard_length(shard.path)
            if on_disk != shard.tokens:
                raise UserError(
                    f"{shard.path} holds {on_disk} tokens, but {path} records {shard.tokens}; "
                    "the folder changed after it was prepared: prepare it again"
                )
    return TokenDataset(folder, splits, tokenizer_spec, vocab_size, kind=meta.get("kind", "tokens"))


def _shard_entry(folder: Path, entry: dict[str, Any]) -> Shard:
    mask = entry.get("mask")
    return Shard(
        folder / entry["file"], int(entry["tokens"]), entry.get("sha256"),
        None if mask is None else folder / mask, entry.get("mask_sha256"),
    )


def _from_shard_files(folder: Path) -> TokenDataset:
    if (folder / "meta.pkl").is_file():
        raise UserError(
            f"{folder} looks like a nanoGPT character dataset: its vocabulary is in meta.pkl, which "
            "gpt2lab does not unpickle (a pickle can run code); prepare the text again with "
            "`gpt2lab prepare shakespeare-char --input FILE`"
        )
    splits: dict[str, list[Shard]] = {}
    for path in sorted(folder.iterdir()):
        match = _SPLIT_WORD.search(path.stem)
        if path.is_file() and path.suffix in (".bin", ".npy") and match:
            splits.setdefault(match.group(1), []).append(Shard(path, shard_length(path)))
    if not splits:
        raise UserError(
            f"{folder} has no {DATASET_FILE} and no shards (.bin or .npy files named with 'train' or 'val'); "
            "make one with `gpt2lab prepare`"
        )
    # Shards of other tools carry no tokenizer record; all of them are GPT-2 tokens.
    return TokenDataset(folder, splits, "gpt2", GPT2_VOCAB_SIZE)


def open_dataset(folder: str | Path | TokenDataset) -> TokenDataset:
    """A prepared folder (with `dataset.json`), or a folder of llm.c / build-nanogpt / nanoGPT shards."""
    if isinstance(folder, TokenDataset):
        return folder
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {folder} does not exist; make one with `gpt2lab prepare`")
    if (folder / DATASET_FILE).is_file():
        return _from_dataset_json(folder)
    return _from_shard_files(folder)
