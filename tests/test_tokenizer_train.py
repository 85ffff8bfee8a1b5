"""`gpt2lab tokenizer train|eval` and a trained BPE everywhere: prepare, the loader, training,
sampling, serving, chat and the export to transformers; the bad inputs of each."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2lab
from chat_tasks import split_tasks, write_jsonl
from gpt2lab import UserError
from gpt2lab.chat.template import ChatTemplate
from gpt2lab.cli import main
from gpt2lab.data import TokenLoader, open_dataset, read_shard, write_shard
from gpt2lab.data.prepare import prepare
from gpt2lab.data.shards import HEADER_INTS, token_dtype
from gpt2lab.data.sources import packaged_shakespeare
from gpt2lab.data.tokenizer_train import choose_encoder, compare_tokenizers, train_tokenizer
from gpt2lab.files import file_sha256
from gpt2lab.tokenizer import (
    RESERVED_TOKENS, TOKENIZER_RECORD, BPETokenizer, GPT2Tokenizer, byte_symbols, load_tokenizer, tokenizer_from_spec,
)

QUIET = dict(progress=False, log=lambda message: None)
TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "batch.micro_batch=4",
    "batch.seq_len=32", "eval.interval=0", "eval.batches=2", "eval.sample_interval=0", "log.interval=0",
    "log.progress_bar=false", "checkpoint.interval=0", "system.device=cpu", "max_steps=3",
]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> tuple[Path, str]:
    """(a file of the first 90% of Tiny Shakespeare, the last 10%: the held-out text)."""
    text = packaged_shakespeare()
    cut = int(len(text) * 0.9)
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-90.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path, text[cut:]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, shakespeare) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "shakespeare-4096"
    train_tokenizer([str(shakespeare[0])], folder, vocab_size=4096, **QUIET)
    return folder


@pytest.fixture(scope="module")
def bpe(bpe_folder) -> BPETokenizer:
    return gpt2lab.load_tokenizer(bpe_folder)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, shakespeare) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "shakespeare-300"
    train_tokenizer([str(shakespeare[0])], folder, vocab_size=300, pattern="gpt2", **QUIET)
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the tokenizer -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips_exactly_and_both_engines_agree(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert b"".join(bpe.token_bytes(token) for token in ids) == text.encode("utf-8")
    tokenizers_engine = BPETokenizer(bpe.merges, pattern=bpe.pattern, special=bpe.special, encoder="tokenizers")
    assert tokenizers_engine.encode(text) == ids


def test_held_out_bytes_per_token_is_at_least_nine_tenths_of_gpt2s(bpe_folder, bpe, shakespeare):
    held_out = shakespeare[1]
    size = len(held_out.encode("utf-8"))
    ours, gpt2 = size / len(bpe.encode(held_out)), size / len(GPT2Tokenizer().encode(held_out))
    assert ours >= 0.9 * gpt2
    # `tokenizer eval` without --data measures the same held-out text.
    names, (row,) = compare_tokenizers([bpe_folder])
    assert names == ["gpt2", bpe_folder.name] and row.bytes == size
    assert row.bytes_per_token() == [pytest.approx(gpt2), pytest.approx(ours)]


def test_transformers_gives_the_ids_gpt2lab_gives(bpe_folder, bpe, shakespeare):
    transformers = pytest.importorskip("transformers")
    held_out = shakespeare[1]
    auto = transformers.AutoTokenizer.from_pretrained(bpe_folder)
    ids = bpe.encode(held_out)
    assert auto(held_out)["input_ids"] == ids
    assert auto.decode(ids) == held_out
    assert auto.convert_tokens_to_ids(list(RESERVED_TOKENS)) == [0, 1, 2, 3, 4]


def test_the_folder_records_the_tokenizer_and_its_ids(bpe_folder, bpe):
    record = json.loads((bpe_folder / TOKENIZER_RECORD).read_text())
    assert sorted(path.name for path in bpe_folder.iterdir()) == sorted(
        [TOKENIZER_RECORD, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    )
    assert record["tokenizer"] == bpe.spec() and tokenizer_from_spec(record["tokenizer"]).encode("Hello") == bpe.encode("Hello")
    assert record["sha256"] == {"tokenizer.json": file_sha256(bpe_folder / "tokenizer.json")}
    assert record["encoder_check"] == {"encoder": "tiktoken", "checked_chars": record["trained_on"]["chars"]}
    assert record["trained_on"]["bytes"] == len(packaged_shakespeare()[: int(len(packaged_shakespeare()) * 0.9)].encode())
    assert bpe.vocab_size == 4096 and bpe.eot_token == 0 and bpe.special == RESERVED_TOKENS
    assert [bpe.token_bytes(5 + byte) for byte in (0, 65, 255)] == [b"\x00", b"A", b"\xff"]
    assert [bpe.decode([token]) for token in range(5)] == list(RESERVED_TOKENS)
    assert bpe.control_tokens == (0, 1, 2, 3, 4)
    # Text that spells a special token is text.
    assert min(bpe.encode("<|endoftext|><|user|>hi<|end|>")) >= 5


def test_training_reads_files_as_prepare_text_does(tmp_path, shakespeare):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = shakespeare[1].split("\n\n")
    pq.write_table(pa.table({"body": lines}), tmp_path / "docs.parquet")
    from_parquet = train_tokenizer([str(tmp_path / "docs.parquet")], tmp_path / "p", vocab_size=280, column="body",
                                   max_chars=20_000, pattern="gpt2", **QUIET)
    record = json.loads((tmp_path / "p" / TOKENIZER_RECORD).read_text())["trained_on"]
    assert record["column"] == "body" and record["chars"] == 20_000 and record["max_chars"] == 20_000
    assert record["documents"] == next(i for i, n in enumerate(np.cumsum([len(x) for x in lines])) if n >= 20_000) + 1
    assert from_parquet.decode(from_parquet.encode(shakespeare[1])) == shakespeare[1]


def test_the_chat_template_writes_the_reserved_ids(bpe):
    template = ChatTemplate(bpe)
    ids, mask = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}])
    answer = bpe.encode("Hello")
    assert ids == [0, 1, *bpe.encode("Be brief."), 4, 2, *bpe.encode("Hi"), 4, 3, *answer, 4]
    assert mask == [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)
    assert template.spec() == {**bpe.spec(), "chat": "gpt2lab-chat-v1"} and template.vocab_needed == 4096


def test_bits_per_byte_counts_each_tokens_bytes_and_no_special_token(bpe):
    from gpt2lab.eval.loss import token_byte_lengths

    lengths = token_byte_lengths(bpe, 4160).tolist()  # padded rows past the vocabulary count nothing
    assert lengths[:5] == [0] * 5 and lengths[4096:] == [0] * 64
    assert lengths[5:4096] == [len(bpe.token_bytes(token)) for token in range(5, 4096)]


def merges_joining_two_ways() -> list[tuple[str, str]]:
    """b+c, then a+b, then ab+c: tiktoken joins a+bc into abc, which no merge of `tokenizers` does."""
    return [("b", "c"), ("a", "b"), ("ab", "c")]


def test_tiktoken_encodes_only_where_it_gives_the_ids_of_tokenizers(tmp_path):
    fast = BPETokenizer(merges_joining_two_ways())
    exact = BPETokenizer(merges_joining_two_ways(), encoder="tokenizers")
    assert fast.encode("abc") != exact.encode("abc") == exact.to_tokenizers().encode("abc").ids
    assert choose_encoder(fast, ["abc"]) == "tokenizers" and choose_encoder(fast, ["ab c"]) == "tiktoken"
    # prepare encodes with the engine the tokenizer records.
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc abc", "cab"]))
    prepare("text", tmp_path / "data", inputs=[str(tmp_path / "docs.jsonl")], tokenizer=exact, val_tokens=1, **QUIET)
    dataset = open_dataset(tmp_path / "data")
    stream = np.concatenate([dataset.tokens(shard) for split in ("val", "train") for shard in dataset.shards(split)])
    assert stream.tolist() == [0, *exact.encode("abc abc"), 0, *exact.encode("cab")]


# ---- prepare and the loader ----------------------------------------------------------------------


def test_prepare_text_with_a_trained_bpe_and_its_record(capsys, tmp_path, small_folder):
    small = load_tokenizer(small_folder)
    documents = ["To be, or not to be", "that is the question: 🤔", "Whether 'tis nobler in the mind"]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    out = tmp_path / "data"
    code, _, err = run_cli(capsys, "prepare", "text", source, "--tokenizer", small_folder, "--out", out,
                           "--val-tokens", "5", "--workers", "2", "-q")
    assert code == 0, err
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["tokenizer"] == small.spec() and meta["vocab_size"] == 300 and meta["token_dtype"] == "uint16"
    assert meta["recipe"]["tokenizer"] == small.digest and f"--tokenizer {small_folder}" in meta["command"]
    dataset = open_dataset(out)
    stream = np.concatenate([dataset.tokens(shard) for split in ("val", "train") for shard in dataset.shards(split)])
    assert stream.tolist() == [token for doc in documents for token in [0, *small.encode(doc)]]
    assert load_tokenizer(out).spec() == small.spec()
    # The same folder with another tokenizer is another dataset.
    code, _, err = run_cli(capsys, "prepare", "text", source, "--out", out, "--val-tokens", "5", "-q")
    assert code == 2 and "already holds a dataset made differently" in err


def all_pairs_bpe() -> BPETokenizer:
    """A BPE of 5 + 256 + 65,536 ids: every two bytes a token, so its ids pass uint16's range;
    in descending byte order, so the two bytes 0 0 are the last id."""
    symbols = byte_symbols()[1][::-1]
    return BPETokenizer([(a, b) for a in symbols for b in symbols], pattern="gpt2")


def test_a_vocabulary_past_uint16_gets_uint32_shards_that_the_loader_reads(tmp_path):
    assert [token_dtype(n).name for n in (300, 65536, 65537, 2**32)] == ["uint16", "uint16", "uint32", "uint32"]
    with pytest.raises(UserError, match="does not fit"):
        token_dtype(2**32 + 1)
    wide = all_pairs_bpe()
    assert wide.vocab_size == 65797
    text = "The quick brown fox\x00\x00 jumps over the lazy dog. " * 40
    (tmp_path / "docs.txt").write_text(text, encoding="utf-8")
    prepare("text", tmp_path / "data", inputs=[str(tmp_path / "docs.txt")], tokenizer=wide, val_tokens=40, **QUIET)
    meta = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert meta["token_dtype"] == "uint32" and meta["vocab_size"] == 65797
    shard = tmp_path / "data" / meta["splits"]["train"]["shards"][0]["file"]
    assert np.fromfile(shard, dtype="<i4", count=3).tolist()[:2] == [20240801, 7]  # llm.c's uint32 layout
    expected = [0, *wide.encode(text)]
    assert max(expected) == 65796 and read_shard(shard).tolist() == expected[40:]
    x, y = next(TokenLoader(tmp_path / "data", batch_size=2, seq_len=16, shuffle=False).iter_batches())
    assert x[0].tolist() == expected[40:56] and y[0].tolist() == expected[41:57]


def test_write_shard_refuses_ids_past_its_type(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.array([70000, 1]), np.uint32)
    assert read_shard(tmp_path / "train_000000.bin").tolist() == [70000, 1]
    assert len(np.fromfile(tmp_path / "train_000000.bin", dtype="<i4")) == HEADER_INTS + 2
    with pytest.raises(UserError, match="does not fit the shard format's uint16"):
        write_shard(tmp_path / "val_000000.bin", np.array([70000]))


def test_a_bpe_models_vocabulary_comes_from_its_data_padded(tmp_path, small_folder):
    from gpt2lab.train.config import resolve_config

    prepare("shakespeare", tmp_path / "data", tokenizer=small_folder, **QUIET)
    notes = []
    config = resolve_config("shakespeare-char-cpu", overrides=[f"data.path={tmp_path / 'data'}"], notes=notes)
    assert (config.model.vocab_size, config.model.padded_vocab_size) == (300, 320)
    assert notes == [f"model.vocab_size=300, the vocabulary of the data in {tmp_path / 'data'} (not 65), padded to 320 rows"]


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, message", [("260", "at least 261"), (str(2**32 + 1), "at most 2\\*\\*32")])
def test_vocabulary_sizes_out_of_range_are_refused(capsys, tmp_path, shakespeare, size, message):
    code, _, err = run_cli(capsys, "tokenizer", "train", shakespeare[0], "--vocab-size", size, "--out", tmp_path / "t")
    assert code == 2 and "--vocab-size" in err and re.search(message, err)
    assert not (tmp_path / "t").exists()


def test_empty_input_and_too_little_text_are_refused_and_write_nothing(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(capsys, "tokenizer", "train", tmp_path / "empty.txt", "--vocab-size", "300", "--out", tmp_path / "t")
    assert code == 2 and "no text in" in err and not (tmp_path / "t").exists()
    (tmp_path / "short.txt").write_text("to be or not to be")
    code, _, err = run_cli(capsys, "tokenizer", "train", tmp_path / "short.txt", "--vocab-size", "4096", "--out", tmp_path / "t")
    assert code == 2 and "too few distinct pairs for 4,096 tokens" in err and not (tmp_path / "t").exists()


def test_text_that_is_not_utf8_is_named_or_replaced(capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait ".encode("latin-1") * 20)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, _, err = run_cli(capsys, "tokenizer", "train", tmp_path / "latin1.txt", "--vocab-size", "262", "--out", tmp_path / "t")
    assert code == 2 and f"{tmp_path / 'latin1.txt'} is not UTF-8 text: byte 0xe9 at offset 3" in err
    assert "--replace-invalid-utf8" in err and not (tmp_path / "t").exists()
    code, _, err = run_cli(capsys, "tokenizer", "train", tmp_path / "bad.jsonl", "--vocab-size", "262", "--out", tmp_path / "t")
    assert code == 2 and f"{tmp_path / 'bad.jsonl'} line 2 is not UTF-8 text: byte 0xe9 at offset 30" in err
    code, _, err = run_cli(capsys, "tokenizer", "train", tmp_path / "latin1.txt", "--vocab-size", "262", "--out",
                           tmp_path / "t", "--replace-invalid-utf8", "-q")
    assert code == 0, err
    record = json.loads((tmp_path / "t" / TOKENIZER_RECORD).read_text())
    assert record["trained_on"]["invalid_utf8"] == "replace"
    assert record["trained_on"]["bytes"] == len(("caf\ufffd au lait " * 20).encode())  # U+FFFD is 3 bytes
    code, _, err = run_cli(capsys, "prepare", "text", tmp_path / "latin1.txt", "--out", tmp_path / "d", "-q")
    assert code == 2 and "offset 3" in err
    assert run_cli(capsys, "prepare", "text", tmp_path / "latin1.txt", "--out", tmp_path / "d2",
                   "--replace-invalid-utf8", "--tokenizer", tmp_path / "t", "-q")[0] == 0


def test_an_out_folder_gpt2lab_did_not_write_is_left_alone(capsys, tmp_path, shakespeare, small_folder):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = ["tokenizer", "train", shakespeare[0], "--vocab-size", "270", "-q", "--max-chars", "100k"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "mine", "--force")
    assert code == 2 and "gpt2lab did not write it" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    before = (small_folder / "tokenizer.json").read_bytes()
    code, _, err = run_cli(capsys, *args, "--out", small_folder)
    assert code == 2 and "add --force" in err and (small_folder / "tokenizer.json").read_bytes() == before
    replaced = tmp_path / "replaced"
    assert run_cli(capsys, *args, "--out", replaced)[0] == 0
    assert run_cli(capsys, *args[:4], "300", *args[5:], "--out", replaced, "--force")[0] == 0
    assert load_tokenizer(replaced).vocab_size == 300


@pytest.mark.parametrize("special, message", [
    ("hello", "one piece of the gpt4 pre-tokenizer"), ("<|user|>", "is reserved already"), ("", "is empty"),
])
def test_bad_special_tokens_are_refused(capsys, tmp_path, shakespeare, special, message):
    code, _, err = run_cli(capsys, "tokenizer", "train", shakespeare[0], "--vocab-size", "300", "--special", special,
                           "--out", tmp_path / "t")
    assert code == 2 and message in err and not (tmp_path / "t").exists()


def test_extra_special_tokens_follow_the_reserved_ones(tmp_path, shakespeare):
    tokenizer = train_tokenizer([str(shakespeare[0])], tmp_path / "t", vocab_size=300, special=["<|fim|>"],
                                max_chars=100_000, **QUIET)
    assert tokenizer.special == (*RESERVED_TOKENS, "<|fim|>") and tokenizer.token_bytes(6) == b"\x00"
    assert tokenizer.encode("<|fim|>") != [5] and tokenizer.decode([5]) == "<|fim|>"


def damage(folder: Path, how: str) -> None:
    record = folder / TOKENIZER_RECORD
    if how == "record not JSON":
        record.write_text("{")
    elif how == "tokenizer.json edited":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace('"<|end|>"', '"<|stop|>"'))
    elif how == "no record":
        record.unlink()
    elif how == "newer format":
        record.write_text(json.dumps({**json.loads(record.read_text()), "format": 2}))
    elif how == "merges damaged":
        meta = json.loads(record.read_text())
        meta["tokenizer"]["merges"] = "qqq zzz\n" + meta["tokenizer"]["merges"]
        record.write_text(json.dumps(meta))


@pytest.mark.parametrize("how, message", [
    ("record not JSON", "is not valid JSON"), ("tokenizer.json edited", "changed after gpt2lab wrote it"),
    ("no record", "holds a tokenizer.json but no gpt2lab-tokenizer.json"), ("newer format", "format 1"),
    ("merges damaged", "the tokenizer record is damaged"),
])
def test_a_tokenizer_folder_gpt2lab_cannot_read_is_refused(capsys, tmp_path, small_folder, shakespeare, how, message):
    folder = tmp_path / "tok"
    shutil.copytree(small_folder, folder)
    damage(folder, how)
    code, _, err = run_cli(capsys, "prepare", "text", shakespeare[0], "--tokenizer", folder, "--out", tmp_path / "d", "-q")
    assert code == 2 and message in err and not (tmp_path / "d").exists()


def test_data_of_one_tokenizer_and_a_model_of_another_are_refused(capsys, tmp_path, small_folder, make_model_folder):
    from gpt2lab.train.config import resolve_config
    from gpt2lab.train.trainer import Trainer

    small = load_tokenizer(small_folder)
    model = make_model_folder("bpe-model", tokenizer_spec=small.spec(), vocab_size=320)
    prepare("shakespeare", tmp_path / "gpt2-data", **QUIET)
    config = resolve_config("shakespeare-char-cpu", overrides=[f"data.path={tmp_path / 'gpt2-data'}",
                                                                f"init_from={model}", *TINY])
    with pytest.raises(UserError, match="tokenized with GPT-2's BPE, but .* trained with a trained BPE of 300 tokens"):
        Trainer(config, tmp_path / "run", echo=lambda line: None)
    code, _, err = run_cli(capsys, "eval", "loss", "--model", model, "--data", tmp_path / "gpt2-data", "--device", "cpu")
    assert code == 2 and "tokenized with a different tokenizer than the model's" in err


def test_tokenizer_eval_reports_bytes_per_token_against_gpt2(capsys, tmp_path, bpe_folder, small_folder, bpe):
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York."
    (tmp_path / "a.txt").write_text(text)
    code, out, _ = run_cli(capsys, "tokenizer", "eval", bpe_folder, small_folder, "--data", tmp_path / "a.txt", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["tokenizers"] == ["gpt2", "shakespeare-4096", "shakespeare-300"]
    (row,) = result["texts"]
    assert row["bytes"] == len(text.encode()) and row["tokens"]["shakespeare-4096"] == len(bpe.encode(text))
    assert row["bytes_per_token"]["gpt2"] == pytest.approx(len(text.encode()) / len(GPT2Tokenizer().encode(text)))
    code, out, _ = run_cli(capsys, "tokenizer", "eval", bpe_folder)
    assert code == 0 and "Tiny Shakespeare, last 10%" in out and "(1.00x)" in out


# ---- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_of_a_trained_bpe_trains_samples_serves_chats_and_exports(capsys, tmp_path, bpe_folder, bpe, shakespeare):
    transformers = pytest.importorskip("transformers")
    data, run = tmp_path / "data", tmp_path / "run"
    assert run_cli(capsys, "prepare", "shakespeare", "--tokenizer", bpe_folder, "--out", data, "-q")[0] == 0
    code, _, err = run_cli(capsys, "train", "--preset", "shakespeare-char-cpu", "--set", f"data.path={data}",
                           *[flag for setting in TINY for flag in ("--set", setting)], "--out", run)
    assert code == 0, err
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    record = json.loads((checkpoint / "gpt2lab.json").read_text())
    assert record["tokenizer"] == bpe.spec() and record["model"]["vocab_size"] == 4096
    code, out, _ = run_cli(capsys, "sample", "--model", run, "--prompt", "ROMEO:", "--max-new-tokens", "8",
                           "--device", "cpu", "--seed", "1")
    assert code == 0 and out.startswith("ROMEO:")
    _serve_one_completion(run, bpe)
    export = tmp_path / "export"
    assert run_cli(capsys, "convert", run, "--out", export)[0] == 0
    held_out = shakespeare[1][:3000]
    ids = bpe.encode(held_out)
    assert transformers.AutoTokenizer.from_pretrained(export)(held_out)["input_ids"] == ids
    _assert_same_logits(transformers.AutoModelForCausalLM.from_pretrained(export), run, ids[:32])
    _sft_and_chat(capsys, tmp_path, run, bpe_folder, bpe, transformers)


def _serve_one_completion(run: Path, bpe: BPETokenizer) -> None:
    import http.client

    from gpt2lab.pretrained import load_model
    from gpt2lab.serve import Engine, create_app
    from gpt2lab.serve.app import serve_in_thread

    engine = Engine(load_model(run), bpe)
    with serve_in_thread(create_app(engine, bpe, model_name="bpe")) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}),
                     {"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
    assert answer["usage"]["prompt_tokens"] == len(bpe.encode("ROMEO:")) and answer["usage"]["completion_tokens"] >= 1


def _assert_same_logits(hf_model, run: Path, ids: list[int]) -> None:
    import torch

    from gpt2lab.pretrained import load_model

    ours = load_model(run).eval()
    with torch.no_grad():
        expected = ours(torch.tensor([ids]))[0][0, :, :4096]
        actual = hf_model.eval()(torch.tensor([ids])).logits[0]
    assert torch.allclose(actual, expected, atol=1e-4)


def _sft_and_chat(capsys, tmp_path: Path, run: Path, bpe_folder: Path, bpe: BPETokenizer, transformers) -> None:
    conversations, _ = split_tasks(60, 2, seed=3)
    chat_file = write_jsonl(tmp_path / "chat.jsonl", conversations)
    chat_data, sft = tmp_path / "chat-data", tmp_path / "sft"
    code, _, err = run_cli(capsys, "prepare", "chat", chat_file, "--tokenizer", bpe_folder, "--out", chat_data, "-q")
    assert code == 0, err
    template = ChatTemplate(bpe)
    dataset = open_dataset(chat_data)
    assert dataset.tokenizer_spec == {**bpe.spec(), "chat": "gpt2lab-chat-v1"}
    # Every 20th conversation validates; the rest are the training split, role tokens at ids 1-4.
    expected = [t for i, c in enumerate(conversations) if i % 20 != 19 for t in template.render(c)[0]]
    assert np.concatenate([dataset.tokens(shard) for shard in dataset.shards("train")]).tolist() == expected
    assert {1, 2, 3, 4} <= set(expected)
    settings = [f"data.path={chat_data}", f"init_from={run}", *TINY[:-1], "max_steps=2", "batch.total_tokens=0",
                "eval.interval=0"]
    code, _, err = run_cli(capsys, "train", "--preset", "sft", *[f for s in settings for f in ("--set", s)], "--out", sft)
    assert code == 0, err
    code, out, err = run_cli(capsys, "chat", "--model", sft, "--prompt", "Repeat after me: red blue",
                             "--max-new-tokens", "4", "--device", "cpu")
    assert code == 0, err
    export = tmp_path / "sft-export"
    assert run_cli(capsys, "convert", sft, "--out", export)[0] == 0
    messages = [{"role": "user", "content": "Repeat after me: red blue"}]
    auto = transformers.AutoTokenizer.from_pretrained(export)
    hf_ids = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == template.render_prompt(messages)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [4, 0]
