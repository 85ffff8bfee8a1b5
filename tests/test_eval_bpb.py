"""Bits per byte (`eval bpb`, `val_bpb`): equal to a hand computation over the same windows, for a
GPT-2 BPE model (end-of-text left out, characters split over several tokens counted once) and a
character-level one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli import main
from gpt2lab.data.dataset import open_dataset
from gpt2lab.data.prepare import prepare
from gpt2lab.eval.loss import evaluate_loss, token_byte_lengths
from gpt2lab.pretrained import save_pretrained
from gpt2lab.tokenizer import GPT2Tokenizer, tokenizer_from_spec

SEQ = 32
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpb")
    files = []
    for i in range(30):
        path = root / f"doc{i}.txt"
        path.write_text(f"Document {i}: café, naïve — “quoted” 日本語 text number {i}. " * 5, encoding="utf-8")
        files.append(str(path))
    prepare("text", root / "data", inputs=files, val_tokens=2000, **QUIET)
    return root / "data"


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpb-char") / "data"
    prepare("shakespeare-char", folder, **QUIET)
    return folder


def model_for(dataset, padded=None):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=SEQ, vocab_size=dataset.vocab_size,
                       padded_vocab_size=padded)
    return GPT(config).eval()


def by_hand(model, dataset, windows):
    """Summed nats over the targets that stand for text, over ln 2 and their bytes, from the full
    logits of each window of SEQ + 1 tokens, in order."""
    tokenizer = tokenizer_from_spec(dataset.tokenizer_spec)
    tokens = np.concatenate([np.asarray(dataset.tokens(s), dtype=np.int64) for s in dataset.shards("val")])
    rows = torch.from_numpy(np.stack([tokens[i * SEQ: i * SEQ + SEQ + 1] for i in range(windows)]))
    with torch.no_grad():
        logits, _ = model(rows[:, :-1])
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), rows[:, 1:].reshape(-1), reduction="none")
    targets = rows[:, 1:].reshape(-1).tolist()
    nats = sum(loss for loss, t in zip(losses.tolist(), targets) if t != tokenizer.eot_token)
    nbytes = sum(len(tokenizer.token_bytes(t)) for t in targets if t != tokenizer.eot_token)
    return nats / math.log(2) / nbytes, nbytes


def test_bpb_of_a_bpe_model_equals_the_hand_computation(bpe_data):
    dataset = open_dataset(bpe_data)
    model = model_for(dataset, padded=50304)
    windows = (dataset.split_tokens("val") - 1) // SEQ
    result = evaluate_loss(model, dataset, batch_size=5, token_bytes=token_byte_lengths(GPT2Tokenizer(), 50304))
    expected, nbytes = by_hand(model, dataset, windows)
    assert result.bytes == nbytes
    assert result.bpb == pytest.approx(expected, rel=1e-5)
    # End-of-text is in the data, and the text holds characters of several tokens.
    assert result.tokens > nbytes / 4 and result.tokens == windows * SEQ
    assert evaluate_loss(model, dataset, batch_size=5).loss == pytest.approx(result.loss, rel=1e-6)


def test_bpb_of_a_character_model_equals_the_hand_computation(char_data):
    dataset = open_dataset(char_data)
    model = model_for(dataset)
    tokenizer = tokenizer_from_spec(dataset.tokenizer_spec)
    result = evaluate_loss(model, dataset, batch_size=4, batches=3, token_bytes=token_byte_lengths(tokenizer, 65))
    expected, nbytes = by_hand(model, dataset, 12)
    assert (result.bytes, result.tokens) == (nbytes, 12 * SEQ)
    assert result.bpb == pytest.approx(expected, rel=1e-5)


def test_special_tokens_and_padding_rows_stand_for_no_bytes():
    chat = tokenizer_from_spec({"type": "gpt2", "chat": "gpt2lab-chat-v1"})
    lengths = token_byte_lengths(chat, 50304)
    assert lengths[50256] == 0 and lengths[50257:].sum() == 0
    assert lengths[GPT2Tokenizer().encode(" the")[0]] == 4


def test_eval_bpb_command(capsys, bpe_data, tmp_path):
    dataset = open_dataset(bpe_data)
    model = model_for(dataset, padded=50304)
    folder = save_pretrained(model, tmp_path / "model", tokenizer_spec="gpt2")
    assert main(["eval", "bpb", "--model", str(folder), "--data", str(bpe_data), "--max-tokens", "100",
                 "--batch-size", "2", "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected, nbytes = by_hand(model, dataset, 4)  # 100 tokens: two batches of 2 windows of 32
    assert record["tokens"] == 4 * SEQ and record["bytes"] == nbytes
    assert record["bpb"] == pytest.approx(expected, rel=1e-4)
    assert main(["eval", "bpb", "--model", str(folder), "--data", str(bpe_data), "--device", "cpu"]) == 0
    assert "val bpb " in capsys.readouterr().out
