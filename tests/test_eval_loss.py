"""`eval loss`: mean loss and perplexity over a prepared split, against a direct computation."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig, UserError
from gpt2lab.cli import main
from gpt2lab.data.dataset import open_dataset
from gpt2lab.data.prepare import prepare
from gpt2lab.eval.loss import evaluate_loss
from gpt2lab.pretrained import save_pretrained

SEQ = 32


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def char_model(char_data, tmp_path_factory):
    torch.manual_seed(0)
    dataset = open_dataset(char_data)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=SEQ, vocab_size=dataset.vocab_size, bias=False))
    folder = tmp_path_factory.mktemp("char-model")
    save_pretrained(model, folder, tokenizer_spec=dataset.tokenizer_spec)
    return model.eval(), folder


def direct_loss(model, data, windows=None):
    """Cross-entropy over the split's non-overlapping windows of SEQ + 1 tokens, in order."""
    dataset = open_dataset(data)
    rows = []
    for shard in dataset.shards("val"):
        tokens = np.asarray(dataset.tokens(shard), dtype=np.int64)
        rows += [tokens[i * SEQ: i * SEQ + SEQ + 1] for i in range((len(tokens) - 1) // SEQ)]
    rows = torch.from_numpy(np.stack(rows[:windows]))
    with torch.no_grad():
        logits, _ = model(rows[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), rows[:, 1:].reshape(-1))
    return loss.item(), rows[:, 1:].numel()


def test_loss_over_the_whole_split_equals_the_direct_computation(char_data, char_model):
    model, _ = char_model
    result = evaluate_loss(model, char_data, batch_size=7)
    expected, tokens = direct_loss(model, char_data)
    assert result.tokens == tokens
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_first_batches_only(char_data, char_model):
    model, _ = char_model
    result = evaluate_loss(model, char_data, batches=3, batch_size=5)
    expected, tokens = direct_loss(model, char_data, windows=15)
    assert (result.batches, result.tokens) == (3, 15 * SEQ)
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_bad_settings_are_refused(char_data, char_model):
    model, _ = char_model
    with pytest.raises(UserError, match="exceeds the model's block size"):
        evaluate_loss(model, char_data, seq_len=SEQ + 1)
    with pytest.raises(UserError, match="no 'test' split"):
        evaluate_loss(model, char_data, split="test")
    small = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=SEQ, vocab_size=10))
    with pytest.raises(UserError, match="vocabulary of 65 tokens, more than the model's 10"):
        evaluate_loss(small, char_data)


def test_cli_json_and_tokenizer_mismatch(char_data, char_model, tmp_path, capsys):
    model, folder = char_model
    code = main(["eval", "loss", "--model", str(folder), "--data", str(char_data), "--batches", "4", "--json",
                 "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = evaluate_loss(model, char_data, batches=4)
    assert printed["loss"] == pytest.approx(expected.loss) and printed["tokens"] == expected.tokens
    assert printed["perplexity"] == pytest.approx(math.exp(expected.loss))

    assert main(["eval", "loss", "--model", str(folder), "--data", str(char_data), "--batches", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"val loss {evaluate_loss(model, char_data, batches=2).loss:.4f}")

    bpe = tmp_path / "bpe"
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=SEQ)).save_pretrained(bpe)
    assert main(["eval", "loss", "--model", str(bpe), "--data", str(char_data)]) == 2
    assert "different tokenizer" in capsys.readouterr().err
