"""`gpt2lab prepare`: text into a dataset folder of llm.c shards described by `dataset.json`.

Document sources (FineWeb-EDU, the user's files, hub datasets) become one token stream: an
end-of-text token, then each document's tokens. The first `val_tokens` of the stream are the
validation split, the rest the training split, each cut into shards of `shard_tokens`.
After each shard, `dataset.json` records how far the stream got, so an interrupted run
continues from the last complete shard; it says `"complete": true` only at the end.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import itertools
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import UserError
from ..files import write_atomic
from ..tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer
from ..version import __version__
from . import sources
from .dataset import DATASET_FILE, FORMAT_NAME, FORMAT_VERSION, read_dataset_json
from .shards import TOKEN_DTYPE, read_shard, shard_length, token_dtype, write_shard

SOURCES = ("shakespeare-char", "shakespeare", "fineweb-edu", "text")
DEFAULT_SHARD_TOKENS = 100_000_000
# A `text` source holds out a tenth of its tokens for validation, at most this many.
TEXT_VAL_CAP = 10_000_000
SHAKESPEARE_TRAIN_FRACTION = 0.9
# The stream waiting for its cut into splits (see _StreamWriter).
PENDING_PREFIX = "pending_"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _new_meta(source: str, recipe: dict, tokenizer: Tokenizer, command: str) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": False,
        "source": source,
        "tokenizer": tokenizer.spec(),
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": {"train": {"tokens": 0, "shards": []}, "val": {"tokens": 0, "shards": []}},
        "command": command,
        "recipe": recipe,
        "gpt2lab_version": __version__,
        "created": _timestamp(),
    }


def _save_meta(folder: Path, meta: dict[str, Any]) -> None:
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    write_atomic(folder / DATASET_FILE, lambda temp: temp.write_text(text, encoding="utf-8"))


def shard_dtype(meta: dict[str, Any]) -> np.dtype:
    """The token type of a dataset's shards (uint16 where dataset.json predates the entry)."""
    return np.dtype(meta.get("token_dtype", TOKEN_DTYPE.name))


def _add_shard(folder: Path, meta: dict[str, Any], split: str, tokens: np.ndarray) -> None:
    entry = meta["splits"][split]
    name = shard_name(split, len(entry["shards"]))
    digest = write_shard(folder / name, tokens, shard_dtype(meta))
    entry["shards"].append({"file": name, "tokens": int(len(tokens)), "sha256": digest})
    entry["tokens"] += int(len(tokens))


def _start(folder: Path, recipe: dict) -> dict[str, Any] | None:
    """The folder's unfinished or finished record of this same recipe, if any; clears debris."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {folder}: {error.strerror}") from None
    # Temporary files of an interrupted write: never complete, never listed.
    for debris in itertools.chain(
        folder.glob(".*_??????.bin.*"), folder.glob(".*_??????.mask.npy.*"), folder.glob(f".{DATASET_FILE}.*")
    ):
        debris.unlink(missing_ok=True)
    if not (folder / DATASET_FILE).is_file():
        # dataset.json is written before the first shard, so anything here is someone else's.
        others = sorted(path.name for path in folder.iterdir())
        if others:
            raise UserError(
                f"{folder} is not empty and holds no {DATASET_FILE} ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): gpt2lab did not write it, and preparing there could "
                "replace those files; choose a new or empty --out folder"
            )
        return None
    meta = read_dataset_json(folder)
    if meta.get("recipe") != recipe:
        raise UserError(
            f"{folder} already holds a dataset made differently (by `{meta.get('command', '?')}`); "
            "choose another --out folder, or delete this one to replace it"
        )
    for split in meta["splits"].values():
        for shard in split["shards"]:
            path = folder / shard["file"]
            if not path.is_file() or shard_length(path) != shard["tokens"]:
                raise UserError(f"{path}, listed in {folder / DATASET_FILE}, is missing or changed; delete {folder} and prepare again")
    return meta


# llm.c's loader needs every shard to hold a whole step of every process plus one token; its
# GPT-2 (124M) recipe on 8 GPUs reads 8 x 64 x 1024 tokens a step.
LLMC_STEP_TOKENS = 8 * 64 * 1024 + 1


def _summary(folder: Path, meta: dict[str, Any]) -> str:
    parts = [
        f"{name} {split['tokens']:,} tokens in {len(split['shards'])} shard{'s' * (len(split['shards']) != 1)}"
        for name, split in meta["splits"].items()
    ]
    kind = meta["source"]
    if isinstance(meta["tokenizer"], dict) and meta["tokenizer"].get("type") == "char" and not kind.endswith("-char"):
        kind += ", one token per character"
    if isinstance(meta["tokenizer"], dict) and meta["tokenizer"].get("type") == "bpe":
        kind += f", a trained BPE in {meta.get('token_dtype', 'uint16')} shards"
    lines = [f"{folder}: {', '.join(parts)}; vocabulary of {meta['vocab_size']:,} ({kind})"]
    for name, split in meta["splits"].items():
        shards = split["shards"]
        if len(shards) > 1 and shards[-1]["tokens"] < min(LLMC_STEP_TOKENS, shards[0]["tokens"]):
            lines.append(
                f"note: the last {name} shard holds only {shards[-1]['tokens']:,} tokens; llm.c's loader needs "
                "processes x B x T + 1 tokens in every shard (524,289 for its 8-GPU GPT-2 run), so choose a "
                "--shard-tokens that leaves a larger tail for llm.c (gpt2lab reads across shards and needs none)"
            )
    return "\n".join(lines)


# ---- Tiny Shakespeare ------------------------------------------------------------------------


def _prepare_shakespeare(
    folder: Path, source: str, input_file, shard_tokens: int, command: str, log, tokenizer: Tokenizer
) -> dict:
    text = sources.shakespeare_text(input_file)
    recipe = {"source": source, **_tokenizer_recipe(tokenizer)}
    if source == "shakespeare-char":
        tokenizer = CharTokenizer.from_text(text)
    return _prepare_whole_text(folder, source, text, recipe, tokenizer, shard_tokens, None, command, log)


def _prepare_characters(
    folder: Path, documents: _Documents, shard_tokens: int, val_tokens: int | None, max_tokens: int | None,
    command: str, log,
) -> dict:
    """`prepare text --char`: the documents as one text (each ending in a newline), one token
    per character of it; the whole text is read first, since the vocabulary is its characters."""
    text = "".join(doc if doc.endswith("\n") else doc + "\n" for doc in documents.read())
    if max_tokens is not None:
        text = text[:max_tokens]
    if not text:
        raise UserError(f"{documents.description} holds no text")
    recipe = {**documents.recipe, "char": True, "val_tokens": val_tokens, "max_tokens": max_tokens}
    return _prepare_whole_text(
        folder, "text", text, recipe, CharTokenizer.from_text(text), shard_tokens, val_tokens, command, log
    )


def _prepare_whole_text(
    folder: Path, source: str, text: str, recipe: dict, tokenizer: Tokenizer, shard_tokens: int,
    val_chars: int | None, command: str, log,
) -> dict:
    """One text held in memory, tokenized by `tokenizer`: its last `val_chars` characters
    validate (None: nanoGPT's split, the first 90% train and the rest validate)."""
    recipe = {**recipe, "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "shard_tokens": shard_tokens}
    meta = _start(folder, recipe)
    if meta is not None and meta["complete"]:
        log(f"{folder} is already prepared; nothing to do")
        return meta
    meta = _new_meta(source, recipe, tokenizer, command)
    _save_meta(folder, meta)
    cut = int(len(text) * SHAKESPEARE_TRAIN_FRACTION) if val_chars is None else max(len(text) - val_chars, 0)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        tokens = np.array(tokenizer.encode(part), dtype=np.int64)  # written narrower by _add_shard
        for start in range(0, max(len(tokens), 1), shard_tokens):
            _add_shard(folder, meta, split, tokens[start : start + shard_tokens])
    meta["complete"] = True
    _save_meta(folder, meta)
    return meta


# ---- document streams ------------------------------------------------------------------------


class _StreamWriter:
    """Cuts the token stream into shards and records, after each, where the stream stands.

    Positions are global token offsets in the stream; the stream's units (documents or pieces of
    long ones) are numbered from 0, so a position maps back to (unit, offset within the unit).

    Until the validation size is known (a `text` source without --val-tokens learns it at the
    end, or at 10 x TEXT_VAL_CAP tokens) the stream goes to disk as pending files of
    `shard_tokens`, listed in the progress record; once it is known they are read back
    (memory-mapped) and cut into the real shards. So memory holds at most a shard, and a kill
    loses at most the shard being written.
    """

    def __init__(self, folder: Path, meta: dict, shard_tokens: int, val_tokens: int | None, max_tokens: int | None):
        self.folder, self.meta = folder, meta
        self.shard_tokens, self.max_tokens = shard_tokens, max_tokens
        progress = meta.setdefault(
            "progress", {"tokens": 0, "unit": 0, "offset": 0, "val_tokens": val_tokens, "pending": []}
        )
        self.pending: list[dict] = progress.setdefault("pending", [])
        self.val_tokens: int | None = progress["val_tokens"]
        # Stream offsets: the first token not yet in a shard, the first not yet on disk (in a
        # shard or a pending file), and the one after the last token received.
        self.written = sum(split["tokens"] for split in meta["splits"].values())
        self.stored = self.end = progress["tokens"]
        self.buffer: collections.deque[np.ndarray] = collections.deque()
        # (stream offset of a task's first unit, its unit number, cumulative token counts of its units)
        self.units: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()
        listed = {entry["file"] for entry in self.pending}
        for orphan in folder.glob(f"{PENDING_PREFIX}*.bin"):
            if orphan.name not in listed:  # consumed, but a kill came before its deletion
                orphan.unlink()
        if self.val_tokens is not None:
            self._settle()

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.end >= self.max_tokens

    def add(self, tokens: np.ndarray, lengths: np.ndarray, first_unit: int, skip: int = 0) -> int:
        """Take one encoded task (its first `skip` tokens already on disk); return tokens taken."""
        self.units.append((self.end - skip, first_unit, np.cumsum(lengths)))
        tokens = tokens[skip:]
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens - self.end]
        self.buffer.append(tokens)
        self.end += len(tokens)
        if self.val_tokens is None and self.end >= 10 * TEXT_VAL_CAP:
            self.val_tokens = TEXT_VAL_CAP
            self._settle()
        if self.val_tokens is None:
            while self.end - self.stored >= self.shard_tokens:
                self._write_pending()
        while self.val_tokens is not None and self.end >= self._shard_end():
            self._write(self._shard_end())
        return len(tokens)

    def finish(self) -> None:
        if self.val_tokens is None:
            self.val_tokens = min(TEXT_VAL_CAP, self.end // 10)
            self._settle()
        while self.written < self.end:
            self._write(min(self._shard_end(), self.end))

    def _settle(self) -> None:
        """Put the pending files' tokens (from the first not in a shard) in front of the buffer."""
        arrays = []
        for entry in self.pending:
            path = self.folder / entry["file"]
            if not path.is_file() or shard_length(path) != entry["tokens"]:
                raise UserError(f"{path}, listed in {self.folder / DATASET_FILE}, is missing or changed; delete {self.folder} and prepare again")
            arrays.append(read_shard(path)[max(0, self.written - entry["start"]) :])
        self.buffer.extendleft(reversed(arrays))

    def _shard_end(self) -> int:
        if self.written < self.val_tokens:
            return min(self.written + self.shard_tokens, self.val_tokens)
        return self.written + self.shard_tokens

    def _take(self, count: int) -> np.ndarray:
        parts = []
        while count:
            head = self.buffer[0]
            if len(head) <= count:
                parts.append(self.buffer.popleft())
                count -= len(head)
            else:
                parts.append(head[:count])
                self.buffer[0] = head[count:]
                count = 0
        return np.concatenate(parts) if parts else np.zeros(0, dtype=shard_dtype(self.meta))

    def _position(self, offset: int) -> tuple[int, int]:
        """(unit, tokens of it already used) at stream `offset`."""
        while len(self.units) > 1 and self.units[1][0] <= offset:
            self.units.popleft()
        start, first_unit, cumulative = self.units[0]
        index = int(np.searchsorted(cumulative, offset - start, side="right"))
        return first_unit + index, offset - start - (int(cumulative[index - 1]) if index else 0)

    def _record(self, stored: int) -> None:
        """Note in dataset.json that the stream is on disk up to `stored`."""
        if stored > self.stored:
            self.stored = stored
            unit, offset = self._position(stored)
            self.meta["progress"].update(tokens=stored, unit=unit, offset=offset)
        self.meta["progress"]["val_tokens"] = self.val_tokens
        _save_meta(self.folder, self.meta)

    def _write_pending(self) -> None:
        # Pending files start at multiples of shard_tokens: no shard is cut before them.
        name = f"{PENDING_PREFIX}{self.stored // self.shard_tokens:06d}.bin"
        write_shard(self.folder / name, self._take(self.shard_tokens), shard_dtype(self.meta))
        self.pending.append({"file": name, "start": self.stored, "tokens": self.shard_tokens})
        self._record(self.stored + self.shard_tokens)

    def _write(self, stop: int) -> None:
        split = "val" if self.written < self.val_tokens else "train"
        _add_shard(self.folder, self.meta, split, self._take(stop - self.written))
        self.written = stop
        consumed = [entry for entry in self.pending if entry["start"] + entry["tokens"] <= stop]
        self.pending[:] = [entry for entry in self.pending if entry not in consumed]
        self._record(stop)
        for entry in consumed:  # after dataset.json no longer lists them
            (self.folder / entry["file"]).unlink(missing_ok=True)


def _prepare_documents(
    folder: Path,
    source: str,
    recipe: dict,
    documents: Callable[[], Iterable[str]],
    description: str,
    *,
    shard_tokens: int,
    val_tokens: int | None,
    max_tokens: int | None,
    expected_tokens: int | None,
    workers: int,
    tokenizer: Tokenizer,
    command: str,
    progress: bool,
    log,
) -> dict:
    from tqdm import tqdm

    meta = _start(folder, recipe)
    if meta is not None and meta["complete"]:
        log(f"{folder} is already prepared; nothing to do")
        return meta
    if meta is None:
        meta = _new_meta(source, recipe, tokenizer, command)
        _save_meta(folder, meta)
    writer = _StreamWriter(folder, meta, shard_tokens, val_tokens, max_tokens)
    resume = meta["progress"]
    if resume["tokens"]:
        files = sum(len(s["shards"]) for s in meta["splits"].values()) + len(resume.get("pending", []))
        log(f"resuming after {resume['tokens']:,} tokens in {files} shards")
    total = min(filter(None, (max_tokens, expected_tokens)), default=None)
    with sources.ParallelEncoder(workers, tokenizer) as encoder, tqdm(
        total=total, initial=resume["tokens"], unit="tok", unit_scale=True, disable=None if progress else True
    ) as bar:
        units: Iterator = itertools.islice(sources.text_units(documents()), resume["unit"], None)
        next_unit, skip = resume["unit"], resume["offset"]
        for tokens, lengths in encoder.encode(units):
            bar.update(writer.add(tokens, lengths, next_unit, skip))
            next_unit, skip = next_unit + len(lengths), 0
            if writer.full:
                break
    if writer.end == 0:
        raise UserError(f"no text in {description}: it is empty, or every document in it is")
    writer.finish()
    del meta["progress"]
    meta["complete"] = True
    _save_meta(folder, meta)
    return meta


# ---- entry point -------------------------------------------------------------------------------


def _local_files_recipe(paths: list[Path]) -> list[list]:
    return [[str(path), path.stat().st_size] for path in paths]


def _describe(paths: list[Path]) -> str:
    names = ", ".join(map(str, paths[:3]))
    return names + (f" and {len(paths) - 3} more files" if len(paths) > 3 else "")


def prepare(
    source: str,
    out: str | Path,
    *,
    inputs: list[str] | None = None,
    input_file: str | Path | None = None,
    sample: str = "10BT",
    data_files: list[str] | None = None,
    split: str = "train",
    config: str | None = None,
    field: str = "text",
    column: str = "text",
    streaming: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    char: bool = False,
    tokenizer: str | Path | Tokenizer | None = None,
    invalid_utf8: str = "strict",
    command: str | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = lambda message: print(message, file=sys.stderr),
) -> dict[str, Any]:
    """Prepare `source` into the folder `out`; return its `dataset.json` contents.

    The options are those of `gpt2lab prepare` (see its --help); `tokenizer` is GPT-2's BPE by
    default, or a BPE tokenizer or a folder `load_tokenizer` reads (one of `gpt2lab tokenizer
    train`). Re-running the same command on the same folder finishes an interrupted run, or
    does nothing if the folder is complete.
    """
    _check_options(
        source, inputs=inputs, input_file=input_file, data_files=data_files,
        shard_tokens=shard_tokens, val_tokens=val_tokens, max_tokens=max_tokens, replace=invalid_utf8 != "strict",
    )
    _check_tokenizer_options(source, char, tokenizer is not None)
    text_tokenizer = document_tokenizer(tokenizer)
    folder = Path(out)
    command = command or f"gpt2lab prepare {source} --out {shlex.quote(str(folder))}"
    if source in ("shakespeare", "shakespeare-char"):
        meta = _prepare_shakespeare(folder, source, input_file, shard_tokens, command, log, text_tokenizer)
        log(_summary(folder, meta))
        return meta

    if source == "fineweb-edu":
        documents = _fineweb_edu_documents(sample, data_files, streaming)
        if val_tokens is None:
            # build-nanogpt's layout: the first shard is the validation split.
            val_tokens = shard_tokens if max_tokens is None else min(shard_tokens, max(1, max_tokens // 10))
    else:
        documents = text_documents(
            inputs, config=config, split=split, field=field, column=column, streaming=streaming, log=log,
            invalid_utf8=invalid_utf8,
        )
        if char:
            meta = _prepare_characters(folder, documents, shard_tokens, val_tokens, max_tokens, command, log)
            log(_summary(folder, meta))
            return meta
    recipe = {
        **documents.recipe, **_tokenizer_recipe(text_tokenizer),
        "shard_tokens": shard_tokens, "val_tokens": val_tokens, "max_tokens": max_tokens,
    }
    meta = _prepare_documents(
        folder, source, recipe, documents.read, documents.description,
        shard_tokens=shard_tokens, val_tokens=val_tokens, max_tokens=max_tokens,
        expected_tokens=documents.expected_tokens, workers=workers or sources.default_workers(),
        tokenizer=text_tokenizer, command=command, progress=progress, log=log,
    )
    log(_summary(folder, meta))
    return meta


def _check_tokenizer_options(source: str, char: bool, tokenizer_given: bool) -> None:
    if char and source != "text":
        raise UserError(
            f"--char tokenizes your own text by characters: use it with the text source "
            f"(Tiny Shakespeare by characters is the shakespeare-char source), not with {source}"
        )
    if tokenizer_given and (char or source == "shakespeare-char"):
        raise UserError("--tokenizer names a BPE; a dataset of characters (--char, shakespeare-char) has none: drop one")


def _check_options(
    source: str,
    *,
    inputs: list[str] | None,
    input_file: str | Path | None,
    data_files: list[str] | None,
    shard_tokens: int,
    val_tokens: int | None,
    max_tokens: int | None,
    replace: bool = False,
) -> None:
    """Refuse an unknown source, a count that is not a positive integer, and an option that
    the source does not take."""
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    for name, value in (("shard_tokens", shard_tokens), ("val_tokens", val_tokens), ("max_tokens", max_tokens)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    misplaced = [
        option
        for option, value, sources_taking_it in (
            ("input files", inputs, ("text",)),
            ("--input", input_file, ("shakespeare", "shakespeare-char")),
            ("--data-files", data_files, ("fineweb-edu",)),
            ("--val-tokens", val_tokens, ("fineweb-edu", "text")),
            ("--max-tokens", max_tokens, ("fineweb-edu", "text")),
            ("--replace-invalid-utf8", replace, ("text",)),
        )
        if value and source not in sources_taking_it
    ]
    if misplaced:
        raise UserError(
            f"{misplaced[0]} does not apply to the {source} source: input files go with text, "
            "--input with shakespeare and shakespeare-char, --data-files with fineweb-edu, and "
            "--val-tokens and --max-tokens with fineweb-edu and text (Tiny Shakespeare is split 90/10), "
            "--replace-invalid-utf8 with text"
        )


@dataclass(frozen=True)
class _Documents:
    """Where a document stream comes from, as the recipe records it, and how to read it."""

    recipe: dict[str, Any]
    description: str  # for messages
    read: Callable[[], Iterable[str]]
    expected_tokens: int | None = None  # for the progress bar


def _fineweb_edu_documents(sample: str, data_files: list[str] | None, streaming: bool) -> _Documents:
    if sample not in sources.FINEWEB_EDU_SAMPLES:
        raise UserError(
            f"unknown FineWeb-EDU sample {sample!r}; choose one of {', '.join(sources.FINEWEB_EDU_SAMPLES)}"
        )
    files = sources.expand_inputs(data_files, suffixes=(".parquet",)) if data_files else None
    recipe = {
        "source": "fineweb-edu",
        "dataset": sources.FINEWEB_EDU if files is None else "parquet",
        "sample": sample,
        "inputs": None if files is None else _local_files_recipe(files),
    }
    if files is None:
        return _Documents(
            recipe, f"{sources.FINEWEB_EDU} sample-{sample}",
            lambda: sources.fineweb_edu_documents(sample, data_files=None, streaming=streaming),
            expected_tokens=sources.FINEWEB_EDU_SAMPLES[sample],
        )
    file_names = [str(path) for path in files]
    return _Documents(
        recipe, _describe(files),
        lambda: sources.fineweb_edu_documents(sample, data_files=file_names, streaming=streaming),
    )


def text_documents(
    inputs: list[str] | None, *, config: str | None = None, split: str = "train", field: str = "text",
    column: str = "text", streaming: bool = True, log: Callable[[str], Any] | None = None,
    invalid_utf8: str = "strict",
) -> _Documents:
    """The documents of the `text` source (files, globs or one hub dataset name), as `prepare`
    and `gpt2lab tokenizer train` read them."""
    if not inputs:
        raise UserError("the text source needs input files, globs, or a hub dataset name")
    # Only a choice to replace is recorded, so recipes of folders made before the choice existed match.
    errors = {"invalid_utf8": invalid_utf8} if invalid_utf8 != "strict" else {}
    if len(inputs) == 1 and sources.looks_like_hub_name(inputs[0]):
        name = inputs[0]
        return _Documents(
            {"source": "text", "dataset": name, "config": config, "split": split, "column": column, **errors},
            f"the dataset {name}",
            lambda: sources.hub_documents(
                name, name=config, split=split, column=column, streaming=streaming, errors=invalid_utf8
            ),
        )
    paths = sources.expand_inputs(inputs, log=log)
    return _Documents(
        {"source": "text", "inputs": _local_files_recipe(paths), "field": field, "column": column, **errors},
        _describe(paths),
        lambda: sources.local_documents(paths, field=field, column=column, errors=invalid_utf8),
    )


def document_tokenizer(tokenizer: str | Path | Tokenizer | None) -> Tokenizer:
    """The BPE a token stream is prepared with (GPT-2's for None), without a chat format."""
    if tokenizer is None:
        return GPT2Tokenizer()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        raise UserError(
            f"--tokenizer names {tokenizer.describe()}; a dataset of characters is made with --char "
            "(or the shakespeare-char source), --tokenizer takes GPT-2's BPE or a trained one"
        )
    return tokenizer.with_chat(None)


def _tokenizer_recipe(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the recipe records of the tokenizer: nothing for GPT-2's (as before trained ones
    existed), a trained BPE's sha256, so that a folder is never continued with another."""
    return {"tokenizer": tokenizer.digest} if isinstance(tokenizer, BPETokenizer) else {}

