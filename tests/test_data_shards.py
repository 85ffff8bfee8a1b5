"""Shard files: llm.c's .bin (both ways), build-nanogpt's .npy, nanoGPT's headerless .bin, and the
dataset folders made of them."""

import json

import numpy as np
import pytest

from gpt2lab import UserError
from gpt2lab.data import open_dataset, read_shard, shard_length, write_shard


def llmc_bytes(tokens, *, magic=20240520, version=1, count=None) -> bytes:
    """A shard laid out by hand as llm.c's tinyshakespeare.py / fineweb.py write it."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def test_llmc_layout_reads_back_identical(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, 5000, dtype=np.uint16)
    path = tmp_path / "fineweb_train_000001.bin"
    path.write_bytes(llmc_bytes(tokens))
    assert shard_length(path) == 5000
    assert np.array_equal(read_shard(path), tokens)


def test_write_shard_writes_llmc_layout_and_its_sha256(tmp_path):
    import hashlib

    tokens = [50256, 0, 1, 65535, 31373]
    digest = write_shard(tmp_path / "train_000000.bin", tokens)
    data = (tmp_path / "train_000000.bin").read_bytes()
    assert data == llmc_bytes(tokens)
    assert digest == hashlib.sha256(data).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]


def test_empty_shard_round_trips(tmp_path):
    write_shard(tmp_path / "val_000000.bin", np.zeros(0, dtype=np.uint16))
    assert len(read_shard(tmp_path / "val_000000.bin")) == 0


@pytest.mark.parametrize("bad", [65536, -1])
def test_write_refuses_tokens_beyond_uint16_naming_the_file(tmp_path, bad):
    with pytest.raises(UserError, match=rf"train_000000\.bin.*{bad}"):
        write_shard(tmp_path / "train_000000.bin", np.array([1, bad, 2], dtype=np.int64))
    assert list(tmp_path.iterdir()) == []


def test_npy_shards_read(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_val_000000.npy", tokens)
    read = read_shard(tmp_path / "edufineweb_val_000000.npy")
    assert read.dtype == np.uint16 and np.array_equal(read, tokens)
    np.save(tmp_path / "wide.npy", tokens.astype(np.int32))
    assert np.array_equal(read_shard(tmp_path / "wide.npy"), tokens)


def test_npy_with_token_beyond_uint16_is_refused(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", np.array([5, 70000], dtype=np.int32))
    with pytest.raises(UserError, match=r"edufineweb_train_000001\.npy.*70000"):
        read_shard(tmp_path / "edufineweb_train_000001.npy")


def test_headerless_nanogpt_bin_reads(tmp_path):
    tokens = np.arange(0, 60000, 7, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    assert np.array_equal(read_shard(tmp_path / "train.bin"), tokens)
    (tmp_path / "val.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UserError, match=r"val\.bin.*odd number of bytes"):
        read_shard(tmp_path / "val.bin")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a_train_000000.bin", llmc_bytes([1, 2, 3], magic=20240521), "magic number"),
        ("a_train_000000.bin", llmc_bytes([1, 2, 3], count=4), "truncated"),
        ("a_train_000000.bin", llmc_bytes([1, 2, 3])[:-1], "truncated"),
        ("a_train_000000.bin", llmc_bytes([1, 2, 3])[:500], "truncated"),
        ("a_train_000000.bin", llmc_bytes([1, 2, 3], count=2), "disagrees with the file size"),
        ("a_train_000000.bin", llmc_bytes([1, 2, 3], version=2), "version 2"),
        ("a_train_000000.npy", b"not numpy", "not a readable .npy"),
        ("a_train_000000.txt", b"text", "unknown shard type"),
    ],
)
def test_damaged_shards_are_refused_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_shard(path)
    assert str(path) in str(error.value)


def test_folder_of_other_tools_shards_opens_by_split(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(300))
    np.save(tmp_path / "fineweb_train_000002.npy", np.arange(200, dtype=np.uint16))
    (tmp_path / "README.md").write_text("not a shard")
    dataset = open_dataset(tmp_path)
    assert [s.path.name for s in dataset.shards("train")] == ["fineweb_train_000001.bin", "fineweb_train_000002.npy"]
    assert dataset.split_tokens("train") == 500 and dataset.split_tokens("val") == 100
    assert dataset.tokenizer_spec == "gpt2" and dataset.vocab_size == 50257
    with pytest.raises(UserError, match="no 'test' split"):
        dataset.shards("test")


def test_nanogpt_folder_opens_and_char_pickles_are_refused(tmp_path):
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert open_dataset(tmp_path).split_tokens("val") == 20
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(UserError, match="meta.pkl"):
        open_dataset(tmp_path)


def test_folder_without_shards_or_missing_is_refused(tmp_path):
    with pytest.raises(UserError, match="no dataset.json and no shards"):
        open_dataset(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")


def _described_folder(tmp_path, **changes):
    digest = write_shard(tmp_path / "train_000000.bin", np.arange(10))
    meta = {
        "format": "gpt2lab-dataset",
        "version": 1,
        "complete": True,
        "tokenizer": {"type": "char", "chars": "abcdefghij"},
        "vocab_size": 10,
        "splits": {"train": {"tokens": 10, "shards": [{"file": "train_000000.bin", "tokens": 10, "sha256": digest}]}},
        "command": "gpt2lab prepare text x.txt --out here",
    }
    meta.update(changes)
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return tmp_path


def test_dataset_json_gives_tokenizer_and_counts(tmp_path):
    dataset = open_dataset(_described_folder(tmp_path))
    assert dataset.vocab_size == 10 and dataset.tokenizer_spec == {"type": "char", "chars": "abcdefghij"}
    assert np.array_equal(dataset.tokens(dataset.shards("train")[0]), np.arange(10))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"complete": False}, "was not finished.*gpt2lab prepare text x.txt --out here"),
        ({"splits": {"train": {"tokens": 11, "shards": [{"file": "train_000000.bin", "tokens": 11}]}}}, "holds 10 tokens"),
        ({"splits": {"train": {"tokens": 5, "shards": [{"file": "gone.bin", "tokens": 5}]}}}, "gone.bin.*missing"),
        ({"version": 9}, "format version 9"),
        ({"splits": None}, "lacks or misstates"),
    ],
)
def test_inconsistent_dataset_json_is_refused(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        open_dataset(_described_folder(tmp_path, **changes))
