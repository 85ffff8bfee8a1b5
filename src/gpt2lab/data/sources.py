"""Where text comes from (Tiny Shakespeare, FineWeb-EDU, the user's files, any hub dataset) and
how it becomes tokens (GPT-2's BPE, or a trained one) on every core."""

from __future__ import annotations

import codecs
import collections
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..cache import download
from ..errors import UserError
from ..jsontext import parse_json
from ..tokenizer import GPT2Tokenizer, Tokenizer
from .shards import token_dtype

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The copy that ships with gpt2lab (package data, gzip-compressed; the sha256 is the text's).
SHAKESPEARE_PACKAGED = resources.files(__package__) / "corpora" / "tinyshakespeare.txt.gz"
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
# Approximate GPT-2 token counts of the samples, for the progress bar's ETA.
FINEWEB_EDU_SAMPLES = {"10BT": 10_000_000_000, "100BT": 100_000_000_000, "350BT": 350_000_000_000}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Text longer than this is cut into pieces so that one long document still keeps every core busy.
PIECE_CHARS = 1 << 20
# About this much text goes to a worker at a time: enough to hide the cost of the hand-over.
TASK_CHARS = 1 << 20
_GLOB_CHARS = re.compile(r"[*?\[]")
# GPT-2's pre-tokenizer always ends a piece at a lone newline between two non-space characters,
# and looks no further than the next character, so cutting there leaves the tokens unchanged.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


# How bytes that are not UTF-8 are read: refused ("strict", naming the file and offset), or each
# bad sequence replaced by U+FFFD ("replace").
UTF8_ERRORS = ("strict", "replace")
REPLACE_FLAG = "--replace-invalid-utf8"


def _not_utf8(where: str, byte: int, offset: int) -> UserError:
    return UserError(
        f"{where} is not UTF-8 text: byte 0x{byte:02x} at offset {offset} cannot be decoded; "
        f"convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or pass {REPLACE_FLAG} to read each "
        "bad byte as U+FFFD"
    )


def read_text_file(path: Path, errors: str = "strict") -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"input file {path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read input file {path}: {error.strerror}") from None
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as error:
        raise _not_utf8(str(path), data[error.start], error.start) from None


def packaged_shakespeare() -> str:
    """The Tiny Shakespeare that ships with gpt2lab, checked against its sha256."""
    copy = f"the copy of Tiny Shakespeare that ships with gpt2lab ({SHAKESPEARE_PACKAGED})"
    way_around = "reinstall gpt2lab, or pass --download to fetch Tiny Shakespeare, or --input FILE with a copy of your own"
    try:
        data = gzip.decompress(SHAKESPEARE_PACKAGED.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{copy} is missing; {way_around}") from None
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{copy} is damaged (it does not decompress: {error}); {way_around}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"{copy} is damaged (its text has sha256 {digest}, expected {SHAKESPEARE_SHA256}); {way_around}")
    return data.decode("utf-8")


def download_shakespeare() -> Path:
    """Tiny Shakespeare from its public address, in the gpt2lab cache (downloaded once, checked
    against its sha256): what `gpt2lab prepare shakespeare --download` prepares. From Python:
    `prepare("shakespeare", out, input_file=download_shakespeare())`."""
    return download(
        SHAKESPEARE_URL,
        "tinyshakespeare.txt",
        SHAKESPEARE_SHA256,
        hint="download it elsewhere and pass it with --input FILE, or leave out --download to use the copy that ships with gpt2lab",
    )


def shakespeare_text(input_file: str | Path | None) -> str:
    """The text of `input_file`, or without one the copy that ships with gpt2lab."""
    if input_file is None:
        return packaged_shakespeare()
    path = Path(input_file)
    text = read_text_file(path)
    if not text:
        raise UserError(f"{path} is empty; Tiny Shakespeare is about 1.1 MB of text")
    return text


# ---- documents ---------------------------------------------------------------------------------


def expand_inputs(
    patterns: Iterable[str], suffixes: tuple[str, ...] = LOCAL_SUFFIXES, log: Callable[[str], Any] | None = None,
) -> list[Path]:
    """Files named or matched by glob patterns, in the order given (each glob's matches sorted),
    each file once: a file named twice (`a.jsonl a.jsonl`, overlapping globs) would be read twice
    and land in both splits. `log` hears which were dropped."""
    paths = _matching_files(patterns)
    for path in paths:
        if path.suffix not in suffixes:
            raise UserError(f"{path}: unknown kind of file; give {', '.join(suffixes)} files")
    unique: dict[Path, Path] = {}
    repeated = []
    for path in paths:
        if path.resolve() in unique:
            repeated.append(str(path))
        else:
            unique[path.resolve()] = path
    if repeated and log is not None:
        log(f"note: each file is read once; named again and skipped: {', '.join(repeated)}")
    return list(unique.values())


def _matching_files(patterns: Iterable[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"no file matches {pattern!r}")
            paths.extend(matches)
        elif Path(pattern).is_file():
            paths.append(Path(pattern))
        elif Path(pattern).is_dir():
            raise UserError(f"input {pattern} is a folder; name its files, or a glob such as {Path(pattern) / '*'}")
        elif Path(pattern).exists():
            raise UserError(f"input {pattern} is not a regular file (a device or a pipe); name a file")
        else:
            raise UserError(f"input file {pattern} does not exist")
    return paths


def looks_like_hub_name(argument: str) -> bool:
    return (
        not Path(argument).exists()
        and not _GLOB_CHARS.search(argument)
        and Path(argument).suffix not in LOCAL_SUFFIXES
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", argument) is not None
    )


def _jsonl_documents(path: Path, field: str, errors: str = "strict") -> Iterator[str]:
    offset = 0
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            start, offset = offset, offset + len(line)
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line, start = line[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)  # no part of the text
            if not line.strip():
                continue
            try:
                record = parse_json(line.decode("utf-8", errors))
            except UnicodeDecodeError as error:
                raise _not_utf8(f"{path} line {number}", line[error.start], start + error.start) from None
            except json.JSONDecodeError as error:
                raise UserError(f"{path} line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is not a JSON object; each line needs a {field!r} field")
            if field not in record:
                raise UserError(
                    f"{path} line {number} has no field {field!r} (it has: {', '.join(map(repr, record)) or 'none'}); "
                    "name the text field with --field"
                )
            yield _checked_text(record[field], f"{path} line {number}, field {field!r}")


def _checked_text(value: Any, where: str, errors: str = "strict") -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8", errors)
        except UnicodeDecodeError as error:
            raise UserError(
                f"{where} holds bytes that are not UTF-8 text (byte 0x{value[error.start]:02x} at offset "
                f"{error.start} of the value); pass {REPLACE_FLAG} to read each bad byte as U+FFFD"
            ) from None
    if not isinstance(value, str):
        raise UserError(f"{where} holds {type(value).__name__}, not text; name a text column")
    return value


def _parquet_documents(path: Path, column: str, errors: str = "strict") -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise UserError(f"{path} is not a readable parquet file ({error})") from None
    names = table.schema_arrow.names
    if column not in names:
        raise UserError(
            f"{path} has no column {column!r} (its columns: {', '.join(names)}); name the text column with --column"
        )
    row = 0
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _checked_text(value, f"{path} row {row}, column {column!r}", errors)
            row += 1


def local_documents(
    paths: list[Path], *, field: str = "text", column: str = "text", errors: str = "strict"
) -> Iterator[str]:
    """Documents of the user's files: a whole .txt file, a .jsonl line's `field`, a parquet `column`;
    `errors` (UTF8_ERRORS) says what becomes of bytes that are not UTF-8."""
    if errors not in UTF8_ERRORS:
        raise UserError(f"unknown way {errors!r} of reading bytes that are not UTF-8; use one of {', '.join(UTF8_ERRORS)}")
    for path in paths:
        if path.suffix == ".txt":
            yield read_text_file(path, errors)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, field, errors)
        else:
            yield from _parquet_documents(path, column, errors)


def open_hub_dataset(
    path: str, *, name: str | None, data_files: list[str] | None, split: str, streaming: bool, instead: str,
    cache_dir: str | None = None,
) -> tuple[Any, str]:
    """(`datasets.load_dataset(...)`, how messages name it), or a UserError naming the dataset,
    the config and split, and `instead`, the way around the hub. `cache_dir`: where `datasets`
    keeps what it downloads and converts (default its own cache)."""
    import datasets

    where = path if data_files is None else ", ".join(data_files)
    try:
        return datasets.load_dataset(path, name=name, data_files=data_files, split=split, streaming=streaming,
                                     cache_dir=cache_dir), where
    except Exception as error:  # network, hub and builder errors have no common base class
        raise UserError(
            f"cannot open the dataset {where}{f' (config {name!r})' if name else ''}, split {split!r}: "
            f"{type(error).__name__}: {error}; check the name, config and split, and your connection "
            f"(or {instead})"
        ) from None


def hub_documents(
    path: str,
    *,
    name: str | None = None,
    data_files: list[str] | None = None,
    split: str = "train",
    column: str = "text",
    streaming: bool = True,
    errors: str = "strict",
) -> Iterator[str]:
    """Documents of a `datasets` dataset: a hub name, or a builder such as "parquet" with local files.

    The hub datasets and local stand-ins of the same schema go through this one call.
    """
    dataset, where = open_hub_dataset(
        path, name=name, data_files=data_files, split=split, streaming=streaming, instead="use local files"
    )
    columns = dataset.column_names
    if columns is not None:
        if column not in columns:
            raise UserError(
                f"the dataset {where} has no column {column!r} (its columns: {', '.join(columns)}); "
                "name the text column with --column"
            )
        dataset = dataset.select_columns([column])
    row = 0
    for batch in dataset.iter(batch_size=1000):
        if column not in batch:
            raise UserError(
                f"the dataset {where} has no column {column!r} (its columns: {', '.join(batch)}); "
                "name the text column with --column"
            )
        for value in batch[column]:
            yield _checked_text(value, f"{where} row {row}, column {column!r}", errors)
            row += 1


def fineweb_edu_documents(sample: str, *, data_files: list[str] | None = None, streaming: bool = True) -> Iterator[str]:
    """FineWeb-EDU's `sample-{sample}`, or local parquet files of its schema (a `text` column)."""
    if data_files:
        return hub_documents("parquet", data_files=data_files, split="train", streaming=streaming)
    return hub_documents(FINEWEB_EDU, name=f"sample-{sample}", split="train", streaming=streaming)


# ---- tokenizing ------------------------------------------------------------------------------


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of about `max_chars` whose GPT-2 tokens concatenate to the text's."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        cut = _SAFE_CUT.search(text, start + max_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def text_units(documents: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(piece, starts_document) for every non-empty document, long ones cut into pieces."""
    for document in documents:
        if document:
            for index, piece in enumerate(split_text(document)):
                yield piece, index == 0


# The tokenizer of this process's encoding tasks: the pool's workers get it when they start.
_worker_tokenizer: Tokenizer | None = None


def _encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids as a numpy array (no Python int per token): through tiktoken wherever the
    tokenizer has it (GPT-2's BPE, a trained BPE verified to match), else `tokenizers`' batch."""
    if getattr(tokenizer, "encoder", "tiktoken") == "tiktoken":
        encoding = tokenizer.encoding
        return [encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]
    return [np.asarray(ids, dtype=np.uint32) for ids in tokenizer.encode_batch(texts)]


def encode_units(units: list[tuple[str, bool]], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of the units (end-of-text before each document) and the token count of each unit,
    in the shards' type for the vocabulary (`shards.token_dtype`). `tokenizer`: this process's
    (a pool worker's), else GPT-2's BPE.

    Text that spells `<|endoftext|>` is ordinary text here, as in `encode_ordinary`.
    """
    tokenizer = tokenizer or _worker_tokenizer or GPT2Tokenizer()
    dtype = token_dtype(tokenizer.vocab_size)
    end_of_text = np.array([tokenizer.eot_token], dtype=np.uint32)
    parts = []
    lengths = np.empty(len(units), dtype=np.int64)
    for index, tokens in enumerate(_encode_texts(tokenizer, [text for text, _ in units])):
        starts_document = units[index][1]
        if starts_document:
            parts.append(end_of_text)
        parts.append(tokens)
        lengths[index] = len(tokens) + starts_document
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype), lengths


def _tasks(units: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    task: list[tuple[str, bool]] = []
    chars = 0
    for unit in units:
        task.append(unit)
        chars += len(unit[0])
        if chars >= TASK_CHARS:
            yield task
            task, chars = [], 0
    if task:
        yield task


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ParallelEncoder:
    """`encode_units` over consecutive tasks of a stream of units, in order, on `workers` processes.

    Make it before opening a dataset: forking is cheap and safe only while no other thread runs.
    At most two tasks per process are in flight, so memory stays bounded however fast the
    documents arrive. A tokenizer that encodes through `tokenizers` needs no processes: its batch
    encoder runs on every core itself (and stops using threads in a forked process).
    """

    def __init__(self, workers: int, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or GPT2Tokenizer()
        in_process = getattr(self.tokenizer, "encoder", "tiktoken") != "tiktoken"
        self.workers = 1 if in_process else max(1, workers)
        self._pool = None
        if self.workers > 1:
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            # Ctrl-C is the parent's to handle: it stops the pool, the workers need not report it.
            self._pool = multiprocessing.get_context(method).Pool(
                self.workers, initializer=_start_worker, initargs=(self.tokenizer,)
            )

    def __enter__(self) -> ParallelEncoder:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def encode(self, units: Iterable[tuple[str, bool]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._pool is None:
            for task in _tasks(units):
                yield encode_units(task, self.tokenizer)
            return
        pending: collections.deque = collections.deque()
        for task in _tasks(units):
            pending.append(self._pool.apply_async(encode_units, (task,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
