"""Token shards on disk: llm.c's `.bin` (read and written), build-nanogpt's `.npy` and nanoGPT's
headerless `train.bin`/`val.bin` (read).

llm.c's layout: a header of 256 little-endian int32 (magic 20240520, version 1, token count,
the rest zero), then the tokens as little-endian uint16. llm.c, modded-nanogpt and gpt2lab
read and write the same files. A vocabulary too large for uint16 takes llm.c's layout for
Llama 3's tokens: magic 20240801, version 7, uint32 tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import write_atomic

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN = 65535
# llm.c's layout of wider ids: (magic, version) -> token type, one per width.
WIDE_MAGIC, WIDE_VERSION = 20240801, 7
WIDE_TOKEN_DTYPE = np.dtype("<u4")
LAYOUTS = {(MAGIC, VERSION): TOKEN_DTYPE, (WIDE_MAGIC, WIDE_VERSION): WIDE_TOKEN_DTYPE}
# nanoGPT writes its splits under these names, with no header.
HEADERLESS_NAMES = ("train.bin", "val.bin")


def token_dtype(vocab_size: int) -> np.dtype:
    """The shards' token type for a vocabulary: uint16 while its ids fit, else uint32."""
    if vocab_size <= MAX_TOKEN + 1:
        return TOKEN_DTYPE
    if vocab_size <= 2**32:
        return WIDE_TOKEN_DTYPE
    raise UserError(f"a vocabulary of {vocab_size:,} ids does not fit the shards' uint32 tokens (at most 2**32)")


def shard_header(num_tokens: int, dtype: np.dtype = TOKEN_DTYPE) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    (magic, version), = (layout for layout, width in LAYOUTS.items() if width == dtype)
    header[:3] = (magic, version, num_tokens)
    return header


def check_token_range(tokens: np.ndarray, path: Path, dtype: np.dtype = TOKEN_DTYPE) -> None:
    if tokens.dtype.kind == "u" and tokens.dtype.itemsize <= dtype.itemsize:
        return
    if tokens.dtype.kind not in "ui":
        raise UserError(f"{path}: tokens must be integers, got {tokens.dtype}")
    if tokens.size:
        low, high, top = int(tokens.min()), int(tokens.max()), int(np.iinfo(dtype).max)
        if low < 0 or high > top:
            raise UserError(
                f"{path}: token id {low if low < 0 else high} does not fit the shard format's {dtype.name} "
                f"(0..{top}); a vocabulary this large needs another format"
            )


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype = TOKEN_DTYPE) -> str:
    """Write `tokens` as an llm.c shard of `dtype` tokens (uint16, or uint32 for a vocabulary
    past 65,536 ids: `token_dtype`), atomically; return the file's sha256."""
    path = Path(path)
    tokens = np.asarray(tokens)
    dtype = np.dtype(dtype).newbyteorder("<")
    if tokens.ndim != 1:
        raise UserError(f"{path}: a shard holds a flat sequence of tokens, got shape {tokens.shape}")
    check_token_range(tokens, path, dtype)
    payload = np.ascontiguousarray(tokens, dtype=dtype)
    header = shard_header(len(payload), dtype)
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(payload).cast("B"))

    def write(temp: Path) -> None:
        with open(temp, "wb") as out:
            out.write(header.tobytes())
            out.write(memoryview(payload).cast("B"))

    write_atomic(path, write)
    return digest.hexdigest()


def _llmc_layout(path: Path, header: np.ndarray) -> np.dtype:
    dtype = LAYOUTS.get((int(header[0]), int(header[1])))
    if dtype is None:
        raise UserError(
            f"{path} is an llm.c shard of version {header[1]}; only version {VERSION} (uint16 tokens, magic {MAGIC}) "
            f"and version {WIDE_VERSION} (uint32 tokens, magic {WIDE_MAGIC}) are supported"
        )
    return dtype


def _llmc_count(path: Path, header: np.ndarray, size: int) -> int:
    width = _llmc_layout(path, header).itemsize
    count = int(header[2])
    expected = HEADER_BYTES + count * width
    if count < 0 or size < expected:
        raise UserError(
            f"{path} is truncated: its header promises {count} tokens ({expected} bytes) but the file "
            f"has {size} bytes; prepare the data again"
        )
    if size > expected:
        raise UserError(
            f"{path}: the header's token count ({count}) disagrees with the file size ({size} bytes, "
            f"room for {(size - HEADER_BYTES) // width} tokens); the file is damaged, "
            "prepare the data again"
        )
    return count


def shard_format(path: Path) -> str:
    """'llmc', 'npy' or 'headerless', from the name and the first bytes."""
    if path.suffix == ".npy":
        return "npy"
    if path.suffix != ".bin":
        raise UserError(f"{path}: unknown shard type; expected a .bin (llm.c or nanoGPT) or .npy file")
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
    except OSError as error:
        raise UserError(f"cannot read shard {path}: {error.strerror}") from None
    if len(start) == 4 and int(np.frombuffer(start, "<i4")[0]) in (MAGIC, WIDE_MAGIC):
        return "llmc"
    if path.name in HEADERLESS_NAMES:
        return "headerless"
    raise UserError(
        f"{path} does not start with llm.c's magic number {MAGIC}: it is not an llm.c shard, or it is "
        f"damaged (a headerless nanoGPT file must be named {' or '.join(HEADERLESS_NAMES)})"
    )


def _llmc_header(path: Path) -> np.ndarray:
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if len(header) < HEADER_INTS:
        raise UserError(f"{path} is truncated: shorter than llm.c's {HEADER_BYTES}-byte header")
    return header


def shard_length(path: str | Path) -> int:
    """Number of tokens in a shard, checked against the file size, without reading the tokens."""
    path = Path(path)
    kind = shard_format(path)
    size = path.stat().st_size
    if kind == "llmc":
        return _llmc_count(path, _llmc_header(path), size)
    if kind == "headerless":
        if size % TOKEN_DTYPE.itemsize:
            raise UserError(f"{path} has an odd number of bytes ({size}): not a file of uint16 tokens")
        return size // TOKEN_DTYPE.itemsize
    return len(_load_npy(path))


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{path} is not a readable .npy token file ({error}); prepare the data again") from None
    if array.ndim != 1 or array.dtype.kind not in "ui":
        raise UserError(f"{path}: expected a flat array of integer tokens, got {array.dtype} of shape {array.shape}")
    return array


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard, memory-mapped where the file holds uint16 or uint32 (a plain ndarray view)."""
    path = Path(path)
    kind = shard_format(path)
    if kind == "npy":
        array = _load_npy(path)
        if array.dtype != TOKEN_DTYPE:
            # Other integer widths are checked once and narrowed, so every shard reads the same way.
            check_token_range(array, path)
            array = np.asarray(array, dtype=TOKEN_DTYPE)
        return array.view(np.ndarray)
    count = shard_length(path)
    dtype = _llmc_layout(path, _llmc_header(path)) if kind == "llmc" else TOKEN_DTYPE
    if count == 0:
        return np.zeros(0, dtype=dtype)
    offset = HEADER_BYTES if kind == "llmc" else 0
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).view(np.ndarray)
