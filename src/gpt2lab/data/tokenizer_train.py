"""Your own tokenizer: a byte-level BPE learned from a corpus with the `tokenizers` library
(`gpt2lab tokenizer train`), and bytes per token of tokenizers on texts (`gpt2lab tokenizer eval`).

A tokenizer folder holds what transformers reads (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`: AutoTokenizer gives the ids gpt2lab gives) and, written last,
gpt2lab's record `gpt2lab-tokenizer.json`: the tokenizer itself (the record every dataset and
model folder made with it carries), what it was trained on, which engine encodes it and the
check that chose it, and the sha256 of tokenizer.json.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..chat.template import jinja_chat_template
from ..errors import UserError
from ..files import file_sha256, write_atomic
from ..tokenizer import (
    END_OF_TEXT,
    PATTERNS,
    RESERVED_TOKENS,
    TOKENIZER_FORMAT,
    TOKENIZER_RECORD,
    BPETokenizer,
    GPT2Tokenizer,
    Tokenizer,
    bpe_pre_tokenizer,
    load_tokenizer,
)
from ..version import __version__
from . import sources
from .prepare import SHAKESPEARE_TRAIN_FRACTION, text_documents

DEFAULT_PATTERN = "gpt4"
# Ids are stored as uint32 at the widest (shards.token_dtype).
MAX_VOCAB_SIZE = 2**32
# tiktoken encodes a trained BPE for `prepare` where it gives the ids of `tokenizers` (which
# transformers uses) on this much of the training text, its first characters.
CHECK_CHARS = 4 << 20
# About this much text goes to `tokenizers` at a time: a batch it spreads over its threads.
BATCH_CHARS = 1 << 20


def check_special_tokens(special: Iterable[str], pattern: str) -> tuple[str, ...]:
    """RESERVED_TOKENS and the user's `special` tokens after them, refused where one repeats another
    or could also be learned as an ordinary token (a single piece of the pre-tokenizer: it would
    then have two ids)."""
    if pattern not in PATTERNS:
        raise UserError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    tokens = list(RESERVED_TOKENS)
    pre_tokenizer = bpe_pre_tokenizer(pattern)
    for token in special:
        if not token or token in tokens:
            reason = "is empty" if not token else "is reserved already" if token in RESERVED_TOKENS else "is named twice"
            raise UserError(f"--special {token!r} {reason}; the reserved tokens are {', '.join(RESERVED_TOKENS)}")
        if len(pre_tokenizer.pre_tokenize_str(token)) < 2:
            raise UserError(
                f"--special {token!r} is one piece of the {pattern} pre-tokenizer, so the BPE could also learn it as "
                f"ordinary text; name it as the reserved ones are, e.g. <|{token.strip('<|>')}|>"
            )
        tokens.append(token)
    return tuple(tokens)


def check_vocab_size(vocab_size: Any, special_count: int) -> int:
    smallest = 256 + special_count
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not smallest <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size!r} is out of range: a byte-level BPE holds the 256 bytes and its "
            f"{special_count} special tokens, so at least {smallest}, and its ids must fit uint32 (at most 2**32)"
        )
    return vocab_size


def _output_folder(out: Path, force: bool) -> Path:
    """`out`, once it is sure that writing there loses nothing of the user's: a new or empty
    folder, or with `force` one that holds a tokenizer gpt2lab wrote."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder to write the tokenizer into")
    if out.is_dir() and any(out.iterdir()):
        if not (out / TOKENIZER_RECORD).is_file():
            raise UserError(
                f"--out {out} is not empty and holds no {TOKENIZER_RECORD}: gpt2lab did not write it, and training "
                "there could replace those files; choose a new or empty folder"
            )
        if not force:
            raise UserError(f"--out {out} already holds a tokenizer; choose another folder, or add --force to replace it")
    return out


@dataclass
class _TrainingText:
    """The text stream the trainer reads: batches of pieces (whole documents, long ones cut where
    the pre-tokenizer cuts anyway), at most `max_chars` characters, counted as they pass, with
    the first CHECK_CHARS characters kept for the encoder check."""

    documents: Iterable[str]
    max_chars: int | None
    bar: Any
    log: Callable[[str], Any]
    chars: int = 0
    bytes: int = 0
    documents_read: int = 0
    sample: list[str] = dataclass_field(default_factory=list)

    def __iter__(self) -> Iterator[list[str]]:
        batch: list[str] = []
        size = 0
        for piece, starts_document in sources.text_units(self.documents):
            if self.max_chars is not None:
                piece = piece[: self.max_chars - self.chars]
                if not piece:
                    break
            self._count(piece, starts_document)
            batch.append(piece)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch
        self.bar.close()
        if self.chars:
            self.log(f"read {self.bytes / 1e6:,.1f} MB in {self.documents_read:,} documents; learning the merges")

    def _count(self, piece: str, starts_document: bool) -> None:
        if self.chars < CHECK_CHARS:
            self.sample.append(piece[: CHECK_CHARS - self.chars])
        size = len(piece.encode("utf-8"))
        self.chars += len(piece)
        self.bytes += size
        self.documents_read += starts_document
        self.bar.update(size)


def learn_merges(
    documents: Iterable[str], merges_wanted: int, pattern: str, *, max_chars: int | None = None,
    progress: bool = True, log: Callable[[str], Any] = lambda message: None,
) -> tuple[list[tuple[str, str]], _TrainingText]:
    """Up to `merges_wanted` new tokens learned from `documents` by `tokenizers`' BPE trainer (all
    256 bytes in the alphabet), as merges in the order learned; and the text stream's counts."""
    from tokenizers import Tokenizer as Learner, models, pre_tokenizers, trainers
    from tqdm import tqdm

    learner = Learner(models.BPE())
    learner.pre_tokenizer = bpe_pre_tokenizer(pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges_wanted, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bar = tqdm(unit="B", unit_scale=True, desc="reading", disable=None if progress else True, leave=False)
    text = _TrainingText(documents, max_chars, bar, log)
    learner.train_from_iterator(text, trainer)
    merges = json.loads(learner.to_str())["model"]["merges"]
    # tokenizers before 0.20 writes a merge as one string "left right", later ones as a pair.
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges], text


def choose_encoder(tokenizer: BPETokenizer, sample: Sequence[str]) -> str:
    """"tiktoken" where tiktoken's encoding of the trained merges gives the ids of `tokenizers`
    on `sample` (their merge rules differ where a token can be joined in two ways), else
    "tokenizers"."""
    fast = tokenizer.encoding.encode_ordinary_batch(list(sample))
    reference = BPETokenizer(tokenizer.merges, pattern=tokenizer.pattern, special=tokenizer.special, encoder="tokenizers")
    return "tiktoken" if fast == reference.encode_batch(sample) else "tokenizers"


def train_tokenizer(
    inputs: list[str],
    out: str | Path,
    *,
    vocab_size: int,
    pattern: str = DEFAULT_PATTERN,
    special: Sequence[str] = (),
    max_chars: int | None = None,
    config: str | None = None,
    split: str = "train",
    field: str = "text",
    column: str = "text",
    streaming: bool = True,
    invalid_utf8: str = "strict",
    force: bool = False,
    command: str | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = lambda message: print(message, file=sys.stderr),
) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens on `inputs` (files, globs or one hub dataset,
    read as `prepare text` reads them) and write its folder `out`; return the tokenizer. Options
    as `gpt2lab tokenizer train --help` describes them. Nothing is written before training ends."""
    tokens = check_special_tokens(special, pattern)
    check_vocab_size(vocab_size, len(tokens))
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
        raise UserError(f"--max-chars must be a positive number of characters, got {max_chars!r}")
    folder = _output_folder(Path(out), force)
    documents = text_documents(
        inputs, config=config, split=split, field=field, column=column, streaming=streaming, log=log,
        invalid_utf8=invalid_utf8,
    )
    merges, text = learn_merges(
        documents.read(), vocab_size - len(tokens) - 256, pattern, max_chars=max_chars, progress=progress, log=log
    )
    if text.chars == 0:
        raise UserError(f"no text in {documents.description}: it is empty, or every document in it is")
    tokenizer = BPETokenizer(merges, pattern=pattern, special=tokens)
    if tokenizer.vocab_size < vocab_size:
        raise UserError(
            f"{documents.description} ({text.chars:,} characters) holds too few distinct pairs for {vocab_size:,} "
            f"tokens: training stopped at {tokenizer.vocab_size:,}; give more text or a --vocab-size of at most "
            f"{tokenizer.vocab_size:,}"
        )
    encoder = choose_encoder(tokenizer, text.sample)
    tokenizer = BPETokenizer(merges, pattern=pattern, special=tokens, encoder=encoder)
    trained_on = {
        **documents.recipe, "max_chars": max_chars, "documents": text.documents_read, "chars": text.chars,
        "bytes": text.bytes,
    }
    check = {"encoder": encoder, "checked_chars": min(text.chars, CHECK_CHARS)}
    command = command or shlex.join(["gpt2lab", "tokenizer", "train", *inputs, "--vocab-size", str(vocab_size),
                                     "--out", str(folder)])
    write_tokenizer_folder(folder, tokenizer, {"trained_on": trained_on, "encoder_check": check, "command": command})
    log(
        f"{folder}: {tokenizer.describe()}, trained on {text.bytes / 1e6:,.1f} MB; prepare encodes it with {encoder}"
        + ("" if encoder == "tiktoken" else " (tiktoken's ids differed on the training text)")
    )
    return tokenizer


def transformers_tokenizer_files(
    tokenizer: BPETokenizer, model_max_length: int | None = None
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """(the `tokenizers.Tokenizer` for tokenizer.json, tokenizer_config.json, special_tokens_map.json)
    of a trained BPE, as transformers' own `save_pretrained` writes them; with a chat format, its
    Jinja template and the end of turn as eos (where `pipeline`, vLLM and lm-eval stop)."""
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if tokenizer.chat:
        special["eos_token"] = "<|end|>"
        config["chat_template"] = jinja_chat_template(tokenizer.chat)
    config.update(special)
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return tokenizer.to_tokenizers(), config, special


def write_transformers_tokenizer(directory: Path, tokenizer: BPETokenizer, model_max_length: int | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of `tokenizer` in `directory`."""
    files, config, special = transformers_tokenizer_files(tokenizer, model_max_length)
    write_atomic(directory / "tokenizer.json", lambda path: files.save(str(path)))
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
        write_atomic(directory / name, lambda path: path.write_text(text, encoding="utf-8"))


def write_tokenizer_folder(folder: Path, tokenizer: BPETokenizer, facts: dict[str, Any]) -> None:
    """The tokenizer folder: transformers' files, then gpt2lab's record with their digests (a
    folder whose record is missing was not finished)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {folder}: {error.strerror}") from None
    (folder / TOKENIZER_RECORD).unlink(missing_ok=True)  # a replaced tokenizer's, stale from here on
    write_transformers_tokenizer(folder, tokenizer)
    record = {
        "format": TOKENIZER_FORMAT,
        "tokenizer": tokenizer.spec(),
        **facts,
        "gpt2lab_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": {"tokenizer.json": file_sha256(folder / "tokenizer.json")},
    }
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    write_atomic(folder / TOKENIZER_RECORD, lambda path: path.write_text(text, encoding="utf-8"))


# ---- bytes per token ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCounts:
    """One text's UTF-8 bytes and each tokenizer's token count (end-of-text tokens not counted)."""

    name: str
    bytes: int
    tokens: list[int]

    def bytes_per_token(self) -> list[float]:
        return [self.bytes / count if count else float("nan") for count in self.tokens]


def _encode_lengths(tokenizer: Tokenizer, texts: list[str]) -> int:
    if isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        return sum(map(len, tokenizer.encode_batch(texts)))
    return sum(len(tokenizer.encode(text)) for text in texts)


def count_tokens(name: str, documents: Iterable[str], tokenizers: Sequence[Tokenizer]) -> TextCounts:
    """The bytes of `documents` and how many tokens each of `tokenizers` makes of them."""
    total_bytes, tokens = 0, [0] * len(tokenizers)
    batch: list[str] = []
    size = 0
    for piece, _ in sources.text_units(documents):
        batch.append(piece)
        size += len(piece)
        total_bytes += len(piece.encode("utf-8"))
        if size >= BATCH_CHARS:
            tokens = [count + _encode_lengths(t, batch) for count, t in zip(tokens, tokenizers)]
            batch, size = [], 0
    if batch:
        tokens = [count + _encode_lengths(t, batch) for count, t in zip(tokens, tokenizers)]
    if total_bytes == 0:
        raise UserError(f"{name} holds no text; give files with text to measure")
    return TextCounts(name, total_bytes, tokens)


def compare_tokenizers(
    folders: Sequence[str | Path], data: Sequence[str] | None = None, *, field: str = "text", column: str = "text",
    invalid_utf8: str = "strict",
) -> tuple[list[str], list[TextCounts]]:
    """(tokenizer names: GPT-2's then `folders`, one TextCounts per text): each file of `data` (as
    `prepare text` reads it; default: the last 10% of the Tiny Shakespeare that ships with gpt2lab,
    which a tokenizer trained on its first 90% has not seen)."""
    tokenizers = [GPT2Tokenizer(), *(load_tokenizer(folder) for folder in folders)]
    names = ["gpt2", *(Path(folder).name or str(folder) for folder in folders)]
    if not data:
        text = sources.packaged_shakespeare()
        held_out = text[int(len(text) * SHAKESPEARE_TRAIN_FRACTION):]
        return names, [count_tokens("Tiny Shakespeare, last 10%", [held_out], tokenizers)]
    rows = []
    for path in sources.expand_inputs(data):
        documents = sources.local_documents([path], field=field, column=column, errors=invalid_utf8)
        rows.append(count_tokens(str(path), documents, tokenizers))
    return names, rows
