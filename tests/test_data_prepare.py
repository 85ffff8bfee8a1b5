"""`gpt2lab prepare`: Tiny Shakespeare, FineWeb-EDU (on a local parquet file, through the same
`datasets` call), the user's files, resuming, and the messages for bad input."""

import fnmatch
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab import UserError, load_tokenizer
from gpt2lab.cli import main
from gpt2lab.data import open_dataset, prepare_dataset, read_shard
from gpt2lab.cli import prepare as prepare_cli
from gpt2lab.data import prepare as prepare_module
from gpt2lab.data import shards as shards_module
from gpt2lab.data import sources
from gpt2lab.tokenizer import GPT2_EOT_TOKEN, gpt2_encoding

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT = sources.packaged_shakespeare()  # Tiny Shakespeare, as it ships with gpt2lab


def split_tokens(folder: Path, split: str) -> np.ndarray:
    dataset = open_dataset(folder)
    return np.concatenate([read_shard(shard.path) for shard in dataset.shards(split)]).astype(np.int64)


def stream_of(documents) -> np.ndarray:
    """What prepare should make of the documents: end-of-text, then each one's GPT-2 tokens."""
    encoding = gpt2_encoding()
    tokens = []
    for document in documents:
        if document:
            tokens += [GPT2_EOT_TOKEN] + encoding.encode_ordinary(document)
    return np.array(tokens, dtype=np.int64)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the `datasets` library's lock and cache files out of the user's cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def documents():
    """Web-page-like documents: one longer than a worker's piece (all of Shakespeare), one empty."""
    paragraphs = TEXT.split("\n\n")
    rng = np.random.default_rng(0)
    docs = ["\n\n".join(rng.choice(paragraphs, size=int(rng.integers(1, 12)))) for _ in range(400)]
    docs.insert(150, TEXT)
    docs.insert(10, "")
    docs.insert(20, "A page that spells <|endoftext|> is still plain text.")
    return docs


@pytest.fixture
def parquet_file(tmp_path, documents):
    path = tmp_path / "fineweb-edu-sample.parquet"
    # FineWeb-EDU's schema: text plus metadata columns.
    table = pa.table({"text": documents, "id": [f"<urn:{i}>" for i in range(len(documents))], "score": [3.1] * len(documents)})
    pq.write_table(table, path, row_group_size=64)
    return path


# ---- Tiny Shakespeare ------------------------------------------------------------------------


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty gpt2lab cache, and a Tiny Shakespeare address where nothing answers (a closed port)."""
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    return tmp_path / "cache"


def test_packaged_copy_is_tiny_shakespeare():
    packed = sources.SHAKESPEARE_PACKAGED.read_bytes()
    text = gzip.decompress(packed)
    assert len(text) == 1_115_394 and len(packed) < 500_000
    assert hashlib.sha256(text).hexdigest() == sources.SHAKESPEARE_SHA256 == SHAKESPEARE_SHA256
    assert sources.packaged_shakespeare() == text.decode("utf-8") == TEXT


def test_packaged_copy_is_package_data():
    """Declared in pyproject.toml, so that a wheel (a non-editable install) carries it too."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["gpt2lab.data"]
    assert any(fnmatch.fnmatch("corpora/tinyshakespeare.txt.gz", pattern) for pattern in patterns)
    assert Path(str(sources.SHAKESPEARE_PACKAGED)).parent.name == "corpora"


def _damaged(tmp_path, kind):
    path = tmp_path / "tinyshakespeare.txt.gz"
    packed = sources.SHAKESPEARE_PACKAGED.read_bytes()
    if kind == "changed text":
        path.write_bytes(gzip.compress(TEXT.replace("ROMEO", "ROMEX", 1).encode("utf-8"), mtime=0))
    elif kind == "cut short":
        path.write_bytes(packed[: len(packed) // 2])
    elif kind == "not gzip":
        path.write_bytes(TEXT[:1000].encode("utf-8"))
    elif kind == "flipped byte":
        path.write_bytes(packed[:1000] + bytes([packed[1000] ^ 0xFF]) + packed[1001:])
    return path


@pytest.mark.parametrize(
    "kind, problem",
    [("changed text", r"is damaged \(its text has sha256 [0-9a-f]{64}, expected 86c4e6aa"),
     ("cut short", "is damaged .it does not decompress"),
     ("not gzip", "is damaged .it does not decompress"),
     ("flipped byte", "is damaged .it does not decompress"),
     ("missing", "is missing")],
)
def test_damaged_packaged_copy_is_refused(tmp_path, monkeypatch, capsys, offline, kind, problem):
    monkeypatch.setattr(sources, "SHAKESPEARE_PACKAGED", _damaged(tmp_path, kind))
    with pytest.raises(UserError, match=f"copy of Tiny Shakespeare that ships with gpt2lab .*{problem}") as error:
        prepare_dataset("shakespeare-char", tmp_path / "out", progress=False)
    assert "reinstall gpt2lab, or pass --download" in str(error.value) and "--input FILE" in str(error.value)
    assert not (tmp_path / "out").exists()
    assert main(["prepare", "shakespeare", "--out", str(tmp_path / "out"), "-q"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("gpt2lab prepare: error: the copy of Tiny Shakespeare") and message.count("\n") == 1


def test_shakespeare_gpt2_tokens_from_the_packaged_copy_offline(tmp_path, offline):
    out = tmp_path / "shakespeare"
    assert main(["prepare", "shakespeare", "--out", str(out), "-q"]) == 0
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    assert len(train) + len(val) == 338_025
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train_000000.bin", "val_000000.bin"]
    tokenizer = load_tokenizer(out)
    cut = int(len(TEXT) * 0.9)
    assert tokenizer.decode(train) == TEXT[:cut] and tokenizer.decode(val) == TEXT[cut:]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["complete"] is True
    assert meta["splits"]["val"]["tokens"] == len(val)
    assert meta["command"] == f"gpt2lab prepare shakespeare --out {out}"
    assert not offline.exists()  # nothing downloaded, nothing cached


def test_shakespeare_char_from_the_packaged_copy_offline(tmp_path, offline, capsys):
    out = tmp_path / "char"
    assert main(["prepare", "shakespeare-char", "--out", str(out)]) == 0
    assert capsys.readouterr().err.strip().endswith(
        "train 1,003,854 tokens in 1 shard, val 111,540 tokens in 1 shard; vocabulary of 65 (shakespeare-char)"
    )
    dataset = open_dataset(out)
    assert dataset.split_tokens("train") == 1_003_854 and dataset.split_tokens("val") == 111_540
    assert dataset.vocab_size == 65
    assert dataset.tokenizer_spec == {"type": "char", "chars": "".join(sorted(set(TEXT)))}
    assert load_tokenizer(out).decode(split_tokens(out, "val")) == TEXT[1_003_854:]
    assert not offline.exists()


def test_shakespeare_input_takes_the_users_copy(tmp_path, offline):
    mine = tmp_path / "mine.txt"
    mine.write_text(TEXT[:10_000], encoding="utf-8")
    out = tmp_path / "char"
    assert main(["prepare", "shakespeare-char", "--input", str(mine), "--out", str(out), "-q"]) == 0
    dataset = open_dataset(out)
    assert dataset.split_tokens("train") == 9_000 and dataset.split_tokens("val") == 1_000
    assert load_tokenizer(out).decode(split_tokens(out, "val")) == TEXT[9_000:10_000]
    assert json.loads((out / "dataset.json").read_text())["command"] == (
        f"gpt2lab prepare shakespeare-char --out {out} --input {mine}"
    )


def test_shakespeare_small_shards(tmp_path):
    notes = []
    prepare_dataset("shakespeare", tmp_path, shard_tokens=100_000, progress=False, log=notes.append)
    dataset = open_dataset(tmp_path)
    assert [s.tokens for s in dataset.shards("train")] == [100_000, 100_000, 100_000, 1_966]
    assert [s.path.name for s in dataset.shards("val")] == ["val_000000.bin"]
    # A 1,966-token tail is too short for llm.c's loader: the summary says so, for train only.
    summary = notes[-1].splitlines()
    assert len(summary) == 2 and summary[1].startswith("note: the last train shard holds only 1,966 tokens")
    assert "--shard-tokens" in summary[1]


def test_whole_splits_in_one_shard_each_get_no_note(tmp_path):
    notes = []
    prepare_dataset("shakespeare", tmp_path, progress=False, log=notes.append)
    assert len(open_dataset(tmp_path).shards("train")) == 1
    assert len(notes[-1].splitlines()) == 1 and "note:" not in notes[-1]


def test_shakespeare_download_goes_into_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served.txt"
    served.write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", served.as_uri())
    # A damaged packaged copy does not matter: --download never reads it.
    monkeypatch.setattr(sources, "SHAKESPEARE_PACKAGED", tmp_path / "absent.txt.gz")
    assert main(["prepare", "shakespeare-char", "--download", "--out", str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "cache" / "tinyshakespeare.txt").read_bytes() == served.read_bytes()
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["command"] == f"gpt2lab prepare shakespeare-char --out {tmp_path / 'out'} --download"
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    # From the cache, no address needed.
    assert main(["prepare", "shakespeare", "--download", "--out", str(tmp_path / "out2"), "-q"]) == 0
    assert open_dataset(tmp_path / "out2").split_tokens("val") == 36_059


def test_shakespeare_download_offline_says_how_to_do_without(tmp_path, offline, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "shakespeare-char", "--download", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    # The reason between the parentheses is the operating system's ("Connection refused").
    assert message.startswith(
        "gpt2lab prepare: error: cannot download tinyshakespeare.txt from http://127.0.0.1:9/input.txt ("
    ), message
    assert message.endswith(
        f") into {offline}; download it elsewhere and pass it with --input FILE, "
        "or leave out --download to use the copy that ships with gpt2lab\n"
    ), message
    assert message.count("\n") == 1
    assert not out.exists() and list(offline.iterdir()) == []


def test_shakespeare_download_with_wrong_content_says_use_input(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not shakespeare")
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", wrong.as_uri())
    with pytest.raises(UserError, match="sha256.*--input FILE"):
        sources.download_shakespeare()
    assert main(["prepare", "shakespeare", "--download", "--out", str(tmp_path / "out")]) == 2
    assert list((tmp_path / "cache").iterdir()) == []


def test_shakespeare_input_and_download_together_are_refused(tmp_path, offline, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text(TEXT[:1000], encoding="utf-8")
    assert main(["prepare", "shakespeare", "--input", str(mine), "--download", "--out", str(tmp_path / "o")]) == 2
    assert "--input and --download both say where Tiny Shakespeare comes from; give one" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"\xff\xfe", "not UTF-8 text: byte 0xff at offset 0")])
def test_bad_shakespeare_input_is_refused(tmp_path, content, message):
    (tmp_path / "input.txt").write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_dataset("shakespeare-char", tmp_path / "out", input_file=tmp_path / "input.txt", progress=False)


# ---- FineWeb-EDU -----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_fineweb_edu_on_local_parquet_matches_direct_tokenization(tmp_path, parquet_file, documents, workers):
    out = tmp_path / "edu"
    code = main(
        ["prepare", "fineweb-edu", "--data-files", str(parquet_file), "--out", str(out),
         "--shard-tokens", "150k", "--workers", str(workers), "-q"]
    )
    assert code == 0
    expected = stream_of(documents)
    dataset = open_dataset(out)
    # No --max-tokens: the first shard is the validation split, as in build-nanogpt.
    assert [s.path.name for s in dataset.shards("val")] == ["val_000000.bin"]
    assert dataset.split_tokens("val") == 150_000
    assert [s.tokens for s in dataset.shards("train")][:-1] == [150_000] * (len(dataset.shards("train")) - 1)
    assert np.array_equal(np.concatenate([split_tokens(out, "val"), split_tokens(out, "train")]), expected)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == len(expected)
    assert "progress" not in meta and meta["complete"] is True


def test_fineweb_edu_max_tokens_takes_a_sample(tmp_path, parquet_file, documents):
    meta = prepare_dataset("fineweb-edu", tmp_path / "d", data_files=[str(parquet_file)], max_tokens=200_000,
                   shard_tokens=50_000, workers=2, progress=False)
    assert meta["splits"]["val"]["tokens"] == 20_000 and meta["splits"]["train"]["tokens"] == 180_000
    whole = np.concatenate([split_tokens(tmp_path / "d", "val"), split_tokens(tmp_path / "d", "train")])
    assert np.array_equal(whole, stream_of(documents)[:200_000])


def test_fineweb_edu_hub_call(tmp_path, parquet_file, monkeypatch):
    """Without --data-files, the same call goes to the hub dataset; here it is answered locally."""
    import datasets

    calls = []
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return real_load_dataset("parquet", data_files=[str(parquet_file)], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    prepare_dataset("fineweb-edu", tmp_path / "a", sample="100BT", max_tokens=30_000, workers=1, progress=False)
    assert main(["prepare", "fineweb-edu", "--out", str(tmp_path / "b"), "--max-tokens", "30k", "--download", "-q"]) == 0
    assert calls == [
        ("HuggingFaceFW/fineweb-edu", {"name": "sample-100BT", "data_files": None, "split": "train", "streaming": True,
                                       "cache_dir": None}),
        ("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "data_files": None, "split": "train", "streaming": False,
                                       "cache_dir": None}),
    ]
    meta = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert meta["command"] == f"gpt2lab prepare fineweb-edu --out {tmp_path / 'b'} --download --max-tokens 30000"


def test_missing_column_through_datasets_is_named(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": ["a b c"]}), path)
    with pytest.raises(UserError, match="no column 'text' \\(its columns: content\\).*--column"):
        prepare_dataset("fineweb-edu", tmp_path / "out", data_files=[str(path)], workers=1, progress=False)


# ---- resuming --------------------------------------------------------------------------------


def interrupt_at_shard(monkeypatch, number):
    """Make the `number`th shard write stop half-way, as Ctrl-C would."""
    real = shards_module.write_atomic
    calls = {"shards": 0}

    def write_atomic(path, write):
        if path.suffix == ".bin":
            calls["shards"] += 1
            if calls["shards"] == number:
                def half(temp):
                    write(temp)
                    with open(temp, "r+b") as handle:
                        handle.truncate(2000)
                    raise KeyboardInterrupt

                return real(path, half)
        return real(path, write)

    monkeypatch.setattr(shards_module, "write_atomic", write_atomic)
    return calls


def test_interrupted_prepare_resumes_to_the_same_result(tmp_path, parquet_file, monkeypatch):
    options = dict(data_files=[str(parquet_file)], shard_tokens=40_000, val_tokens=30_000, workers=2, progress=False)
    prepare_dataset("fineweb-edu", tmp_path / "clean", **options)
    clean = json.loads((tmp_path / "clean" / "dataset.json").read_text())

    out = tmp_path / "interrupted"
    interrupt_at_shard(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("fineweb-edu", out, **options)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train_000000.bin", "train_000001.bin", "val_000000.bin"]
    with pytest.raises(UserError, match="was not finished.*run the command"):
        open_dataset(out)

    written = []
    real_write_shard = prepare_module.write_shard
    monkeypatch.setattr(prepare_module, "write_shard", lambda path, tokens, *dtype: written.append(path.name) or real_write_shard(path, tokens, *dtype))
    messages = []
    prepare_dataset("fineweb-edu", out, log=messages.append, **options)
    assert written[0] == "train_000002.bin" and len(written) == len(clean["splits"]["train"]["shards"]) - 2
    assert messages[0].startswith("resuming after 110,000 tokens in 3 shards")
    resumed = json.loads((out / "dataset.json").read_text())
    assert resumed["splits"] == clean["splits"]  # same shards, sizes and checksums
    for shard in clean["splits"]["train"]["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "clean" / shard["file"]).read_bytes()


def test_finished_folder_is_left_alone_and_a_different_recipe_refused(tmp_path, parquet_file):
    options = dict(data_files=[str(parquet_file)], shard_tokens=100_000, workers=1, progress=False)
    out = tmp_path / "d"
    prepare_dataset("fineweb-edu", out, **options)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    prepare_dataset("fineweb-edu", out, log=messages.append, **options)
    assert "already prepared" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    with pytest.raises(UserError, match="already holds a dataset made differently.*another --out"):
        prepare_dataset("fineweb-edu", out, **{**options, "shard_tokens": 90_000})


def test_leftover_temporary_files_are_removed(tmp_path, parquet_file):
    out = tmp_path / "d"
    out.mkdir()
    out.joinpath(".train_000003.bin.x1y2z3").write_bytes(b"half")
    out.joinpath(".dataset.json.abc").write_text("{")
    prepare_dataset("fineweb-edu", out, data_files=[str(parquet_file)], shard_tokens=200_000, workers=1, progress=False)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- the user's files ------------------------------------------------------------------------


def test_text_files_of_every_kind(tmp_path, documents):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text(documents[3])
    (tmp_path / "books" / "a.txt").write_text(documents[1])
    with open(tmp_path / "notes.jsonl", "w") as out:
        for doc in documents[20:40]:
            out.write(json.dumps({"id": 1, "body": doc}) + "\n\n")
    pq.write_table(pa.table({"content": documents[40:60]}), tmp_path / "pages.parquet")
    out = tmp_path / "out"
    code = main(
        ["prepare", "text", str(tmp_path / "books" / "*.txt"), str(tmp_path / "notes.jsonl"), str(tmp_path / "pages.parquet"),
         "--field", "body", "--column", "content", "--out", str(out), "-q"]
    )
    assert code == 0
    expected = stream_of([documents[1], documents[3], *documents[20:60]])
    val, train = split_tokens(out, "val"), split_tokens(out, "train")
    assert len(val) == len(expected) // 10  # a tenth held out
    assert np.array_equal(np.concatenate([val, train]), expected)


def test_own_text_by_characters(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1")  # no final newline: one is added
    (tmp_path / "b.txt").write_text("class Über:\n    pass\n")
    out = tmp_path / "code-char"
    code = main(["prepare", "text", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--char", "--val-tokens", "9",
                 "--out", str(out)])
    assert code == 0
    assert "vocabulary of 22 (text, one token per character)" in capsys.readouterr().err
    text = "def f(x):\n    return x + 1\nclass Über:\n    pass\n"
    dataset = open_dataset(out)
    assert dataset.tokenizer_spec == {"type": "char", "chars": "".join(sorted(set(text)))}
    assert dataset.vocab_size == 22
    tokenizer = load_tokenizer(out)
    assert tokenizer.decode(split_tokens(out, "train")) == text[:-9]
    assert tokenizer.decode(split_tokens(out, "val")) == text[-9:]
    assert "--char" in json.loads((out / "dataset.json").read_text())["command"]
    # A preset for characters trains on it with the data's vocabulary.
    from gpt2lab.train.config import resolve_config

    assert resolve_config("shakespeare-char-cpu", overrides=[f"data.path={out}"]).model.vocab_size == 22
    with pytest.raises(UserError, match="use it with the text source"):
        prepare_dataset("shakespeare", tmp_path / "x", char=True)


@pytest.mark.parametrize(
    "name, content, options, message",
    [
        ("empty.txt", b"", {}, "no text in .*empty.txt"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), {}, "latin1.txt is not UTF-8 text: byte 0xe9 at offset 3"),
        ("a.jsonl", b'{"text": "ok"}\n{"txt": "x"}\n', {}, "a.jsonl line 2 has no field 'text' \\(it has: 'txt'\\).*--field"),
        ("a.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', {}, "a.jsonl line 2 is not UTF-8"),
        ("a.jsonl", b'{"text": "ok"\n', {}, "a.jsonl line 1 is not valid JSON"),
        ("a.jsonl", b'{"text": 5}\n', {}, "field 'text' holds int, not text"),
        ("a.parquet", None, {"column": "body"}, "a.parquet has no column 'body' \\(its columns: text\\).*--column"),
        ("a.csv", b"x", {}, "a.csv: unknown kind of file"),
    ],
)
def test_bad_text_input_gets_a_clear_message(tmp_path, name, content, options, message):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"text": ["hello"]}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_dataset("text", tmp_path / "out", inputs=[str(path)], workers=1, progress=False, **options)
    assert not list(tmp_path.glob("out/*.bin"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = main(["prepare", "text", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"gpt2lab prepare: error: no file matches '{tmp_path / 'nothing*.txt'}'"
    assert main(["prepare", "fineweb-edu", "--input", str(tmp_path / "shakespeare.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--input does not apply to the fineweb-edu source" in capsys.readouterr().err
    assert main(["prepare", "shakespeare", "--max-tokens", "10k", "--out", str(tmp_path / "o")]) == 2
    assert "--max-tokens does not apply to the shakespeare source" in capsys.readouterr().err


def test_hub_dataset_names_are_told_from_files(tmp_path):
    assert sources.looks_like_hub_name("lucadiliello/bookcorpusopen")
    assert sources.looks_like_hub_name("wikitext")
    assert not sources.looks_like_hub_name("books/*.txt")
    assert not sources.looks_like_hub_name("missing.jsonl")
    assert not sources.looks_like_hub_name(str(tmp_path))


def test_help_is_a_manual():
    parser = main.__globals__["build_parser"]()
    text = parser._subparsers._group_actions[0].choices["prepare"].format_help()
    for word in ["shakespeare-char", "fineweb-edu", "--input", "--data-files", "--sample", "--field", "--column",
                 "--split", "--config", "--download", "--shard-tokens", "--val-tokens", "--max-tokens",
                 "--workers", "examples:", "20240520"]:
        assert word in text
    words = " ".join(text.split())
    assert "Tiny Shakespeare (1.1 MB, public domain) ships with gpt2lab: by default" in words
    assert "--download fetches it once from karpathy/char-rnn" in words
    assert "fetch Tiny Shakespeare from its public address into the gpt2lab cache instead of using the copy" in words


@pytest.mark.parametrize("text, value", [("100M", 100_000_000), ("10k", 10_000), ("1e8", 100_000_000), ("250_000", 250_000)])
def test_token_counts_take_suffixes(text, value):
    assert prepare_cli._token_count(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "lots", "1.5k5"])
def test_bad_token_counts_are_refused(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        prepare_cli._token_count(text)


# ---- cutting long documents --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([*"ab 1'.\n\t\u00e9\u3000\r\x1c", "'s", " \n", "\n\n", "ab\ncd", "\u2028"]), max_size=120).map("".join),
    max_chars=st.integers(1, 40),
)
def test_cut_pieces_tokenize_like_the_whole(text, max_chars):
    pieces = sources.split_text(text, max_chars)
    encoding = gpt2_encoding()
    assert "".join(pieces) == text
    assert sum((encoding.encode_ordinary(p) for p in pieces), []) == encoding.encode_ordinary(text)


def test_long_text_is_cut_near_the_size_asked():
    pieces = sources.split_text(TEXT, 50_000)
    assert len(pieces) == 23 and all(50_000 <= len(p) < 50_200 for p in pieces[:-1])
