"""Issue 35, groups 1, 2, 3 and 6: one request poisoning a batch, checkpoints without checksums,
a `gpt2lab.json` that lies, and a damaged kernel cache. Each test failed before its fix."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from gpt2lab.cli import main
from gpt2lab.generate import generate
from gpt2lab.pretrained import save_pretrained
from gpt2lab.sampling import sample_next_token
from gpt2lab.serve.engine import Engine, SamplingParams
from gpt2lab.tokenizer import GPT2Tokenizer

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=32)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- 1. one request poisons the batch -------------------------------------------------------------

# Settings that round to 0 in float32: they made the probabilities NaN.
VANISHING = [dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=0.8, top_p=1e-50)]


def padded_model(make_model):
    """A model of 50304 ids on GPT-2's 50257 whose padded ids always win: the final norm sends
    every position to one vector, which the untied head's rows 50257.. follow."""
    model = make_model(peaked=True, vocab_size=50304, tie_embeddings=False, **TINY)
    with torch.no_grad():
        direction = torch.randn(TINY["n_embd"])
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[50257:] = 10 * direction
    return model


@pytest.mark.parametrize("options", VANISHING, ids=["t=1e-45", "t=5e-324", "top_p=1e-50"])
@pytest.mark.parametrize("seed", [None, 5])
def test_vanishing_temperature_or_top_p_samples_greedily(make_model, options, seed):
    model = make_model(peaked=True, **TINY)
    greedy = generate(model, [[1, 2, 3]], 12, temperature=0)
    assert generate(model, [[1, 2, 3]], 12, seed=seed, **options) == greedy


def test_sampling_never_draws_an_id_beyond_the_tokenizers_vocabulary(make_model):
    logits = torch.zeros(4, 50304)
    logits[:, 50257:] = 50.0
    for temperature in (0, 1.0):
        assert (sample_next_token(logits, temperature=temperature, vocab_size=50257) < 50257).all()
    model = padded_model(make_model)
    free = generate(model, [[1, 2]], 8, temperature=0)[0][2:]
    assert min(free) >= 50257  # the model left alone prefers ids no GPT-2 token decodes to
    for options in (dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=1.0)):
        assert max(generate(model, [[1, 2]], 8, vocab_size=50257, **options)[0]) < 50257


class Collector:
    def __init__(self):
        self.updates = queue.Queue()

    def __call__(self, updates):
        for update in updates:
            self.updates.put(update)

    def results(self, sequences, timeout=60):
        texts, reasons, deadline = {s: "" for s in sequences}, {}, time.monotonic() + timeout
        while len(reasons) < len(sequences):
            update = self.updates.get(timeout=max(0.01, deadline - time.monotonic()))
            if update.sequence in texts:
                texts[update.sequence] += update.text
                if update.finish_reason:
                    reasons[update.sequence] = update.finish_reason
        return [(texts[s], reasons[s]) for s in sequences]


@pytest.fixture
def engine_of():
    engines = []

    def start(model):
        engine = Engine(model, GPT2Tokenizer())
        collector = Collector()
        engine.start(collector)
        engines.append(engine)
        return engine, collector

    yield start
    for engine in engines:
        engine.close()


@pytest.mark.parametrize("seed", [None, 7])
def test_a_vanishing_temperature_in_the_batch_spoils_no_one(make_model, engine_of, seed):
    model = make_model(peaked=True, **TINY)
    engine, collector = engine_of(model)
    expected = GPT2Tokenizer().decode(generate(model, [[1, 2]], 10, temperature=0)[0][2:])
    requests = [SamplingParams(max_tokens=10, seed=seed, **options) for options in VANISHING]
    requests.append(SamplingParams(max_tokens=10, temperature=0))
    sequences = [engine.submit([1, 2], params) for params in requests]
    assert collector.results(sequences) == [(expected, "length")] * len(requests)


def test_the_server_never_draws_a_padded_id(make_model, engine_of):
    engine, collector = engine_of(padded_model(make_model))
    sequences = [engine.submit([1, 2], SamplingParams(max_tokens=6, temperature=t)) for t in (0, 1.0, 1.0)]
    assert [reason for _, reason in collector.results(sequences)] == ["length"] * 3


def test_one_failing_sequence_ends_alone(make_model, engine_of):
    model = make_model(peaked=True, **TINY)
    engine, collector = engine_of(model)
    expected = GPT2Tokenizer().decode(generate(model, [[1, 2]], 10, temperature=0)[0][2:])
    healthy = engine.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))
    doomed = engine.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))

    def broken(token):
        raise RuntimeError("this sequence's decoder broke")

    doomed.decoder.push = broken
    (text, reason), (_, doomed_reason) = collector.results([healthy, doomed])
    assert (text, reason) == (expected, "length")
    assert doomed_reason == "error"
    assert engine.active_count == 0


@pytest.mark.parametrize("options", [["--temperature", "1e-45"], ["--temperature", "5e-324"], ["--top-p", "1e-50"]])
def test_sample_with_vanishing_settings_is_greedy(capsys, make_model, tmp_path, options):
    folder = save_pretrained(make_model(peaked=True, vocab_size=50257, **TINY), tmp_path / "m")
    common = ["sample", "--model", folder, "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", 8]
    code, greedy, err = run_cli(capsys, *common, "--temperature", "0")
    assert code == 0, err
    code, out, err = run_cli(capsys, *common, *options)
    assert code == 0 and "Traceback" not in err, err
    assert out == greedy


def test_sample_of_a_padded_model_stays_in_the_tokenizers_vocabulary(capsys, make_model, tmp_path):
    folder = save_pretrained(padded_model(make_model), tmp_path / "m", tokenizer_spec="gpt2")
    code, out, err = run_cli(capsys, "sample", "--model", folder, "--device", "cpu", "--prompt", "Hi",
                             "--max-new-tokens", 8, "--seed", 1)
    assert code == 0 and "Traceback" not in err, err

