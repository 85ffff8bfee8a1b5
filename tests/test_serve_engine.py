"""The slot KV cache (rows at their own positions) and the batching decode engine, without HTTP."""

import time

import pytest
import torch

from conftest import Collector
from gpt2lab import UserError
from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.serve.engine import Engine, SamplingParams
from gpt2lab.tokenizer import GPT2Tokenizer


@pytest.fixture(scope="module")
def peaked_model(make_model):
    return lambda **overrides: make_model(peaked=True, **{"block_size": 96, "vocab_size": 50257, **overrides})


@pytest.fixture(scope="module")
def model(peaked_model):
    return peaked_model()


def prompts_of(lengths, seed=0, vocab=50257):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def slot_greedy(model, cache, slots, prompts, steps):
    """Greedy decoding of several prompts at once through a KVCache: each prompt read alone
    into its slot, then one (B, 1) forward per step with every row at its own position."""
    tokens = [list(p) for p in prompts]
    with torch.no_grad():
        for slot, row in zip(slots, tokens):
            hidden = model.hidden_states(torch.tensor([row]), kv_cache=cache.rows([slot], [0]))
            row.append(int(model.lm_head(hidden[:, -1]).argmax(-1)))
        for _ in range(steps - 1):
            idx = torch.tensor([[row[-1]] for row in tokens])
            hidden = model.hidden_states(idx, kv_cache=cache.rows(slots, [len(row) - 1 for row in tokens]))
            for row, token in zip(tokens, model.lm_head(hidden[:, -1]).argmax(-1).tolist()):
                row.append(token)
    return tokens


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [5, 1, 3, 0]], ids=["consecutive", "scattered"])
@pytest.mark.parametrize("attention", ["sdpa", "plain"])
def test_rows_at_different_positions_decode_as_if_alone(slots, attention, peaked_model):
    model = peaked_model(attention=attention)
    prompts = prompts_of((3, 17, 8, 1))
    cache = KVCache(model.config, 6, model.config.block_size, device="cpu", dtype=torch.float32)
    batched = slot_greedy(model, cache, slots, prompts, 30)
    for prompt, row in zip(prompts, batched):
        assert row == model.generate([prompt], 30, temperature=0)[0]
    assert len(set(batched[1][17:])) > 5  # the comparison is not vacuous


def test_a_prompt_read_in_chunks_at_different_starts_equals_one_read(model):
    """T > 1 with rows at different starts: the per-row causal mask."""
    a, b = prompts_of((12, 20), seed=1)
    whole = KVCache(model.config, 2, 96, device="cpu", dtype=torch.float32)
    chunked = KVCache(model.config, 2, 96, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = [model.hidden_states(torch.tensor([p]), kv_cache=whole.rows([s], [0]))[0, -4:] for s, p in enumerate((a, b))]
        model.hidden_states(torch.tensor([a[:8]]), kv_cache=chunked.rows([0], [0]))
        model.hidden_states(torch.tensor([b[:16]]), kv_cache=chunked.rows([1], [0]))
        tails = model.hidden_states(torch.tensor([a[8:], b[16:]]), kv_cache=chunked.rows([0, 1], [8, 16]))
    for got, want in zip(tails, full):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_moving_a_slot_keeps_its_sequence(model):
    prompt = prompts_of((9,), seed=2)[0]
    cache = KVCache(model.config, 4, 96, device="cpu", dtype=torch.float32)
    first = slot_greedy(model, cache, [3], [prompt], 10)[0]
    cache.move(3, 0)
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor([[first[-1]]]), kv_cache=cache.rows([0], [len(first) - 1]))
    next_token = int(model.lm_head(hidden[:, -1]).argmax(-1))
    assert first + [next_token] == model.generate([prompt], 11, temperature=0)[0]


def test_slot_rows_refuse_to_pass_the_block_size(model):
    cache = KVCache(model.config, 2, 96, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="block size"):
        model.hidden_states(torch.tensor([[1], [2]]), kv_cache=cache.rows([0, 1], [3, 96]))
    with pytest.raises(ValueError, match="one start per slot"):
        cache.rows([0, 1], [0])


# ---- the engine ------------------------------------------------------------------------------


@pytest.fixture
def run_engine(model):
    engines = []

    def start(max_concurrency=64, tokenizer=None, engine_model=None):
        engine = Engine(engine_model or model, tokenizer or GPT2Tokenizer(), max_concurrency=max_concurrency)
        collector = Collector()
        engine.start(collector)
        engines.append(engine)
        return engine, collector

    yield start
    for engine in engines:
        engine.close()


def wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_queued_and_batched_requests_give_the_tokens_of_generate(model, run_engine):
    engine, collector = run_engine(max_concurrency=3)  # 7 sequences: some wait for a slot
    tok = engine.tokenizer
    prompts = prompts_of((4, 30, 1, 12, 7, 19, 2), seed=3)
    lengths = [25, 10, 40, 5, 33, 20, 14]  # sequences end at different steps and free slots
    sequences = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)]
    for prompt, n, (text, reason) in zip(prompts, lengths, collector.results(sequences)):
        expected = model.generate([prompt], n, temperature=0)[0][len(prompt) :]
        assert text == tok.decode(expected)
        assert reason == "length"
    assert engine.active_count == 0 and engine.queued_count == 0
    assert engine.tokens_generated == sum(lengths)


@pytest.mark.parametrize("draw_threads", [1, 3])
def test_seeded_sampling_gives_the_tokens_of_generate_with_that_seed(model, run_engine, draw_threads):
    """Sequences with different settings decode in one batch; each gets what generate() gives it
    alone with the same seed and settings, whether its noise is drawn on the engine's thread or
    on one of the pool's."""
    engine, collector = run_engine()
    engine._draw_threads = draw_threads
    prompt = prompts_of((6,), seed=4)[0]
    settings = [
        dict(temperature=0.9, top_k=40, top_p=0.95, seed=11),
        dict(temperature=0.9, top_k=40, top_p=0.95, seed=12),
        dict(temperature=0.9, top_k=40, top_p=0.95, seed=13),
        dict(temperature=1.3, top_p=0.8, seed=11),
        dict(temperature=0),
    ]
    sequences = [engine.submit(prompt, SamplingParams(max_tokens=30, **options)) for options in settings]
    results = collector.results(sequences)
    for options, (text, _) in zip(settings, results):
        expected = model.generate([prompt], 30, **options)[0][len(prompt) :]
        assert text == engine.tokenizer.decode(expected)
    assert len({text for text, _ in results}) == len(settings)
    # seed_offset numbers the choices of one prompt: choice j samples with seed + j.
    offset = engine.submit(prompt, SamplingParams(max_tokens=30, **{**settings[0], "seed": 10}), seed_offset=1)
    assert collector.results([offset]) == [results[0]]


def test_unseeded_sampling_keeps_to_top_k(model, run_engine):
    engine, collector = run_engine()
    prompt = prompts_of((5,), seed=7)[0]
    sequences = [engine.submit(prompt, SamplingParams(max_tokens=20, temperature=1.5, top_k=1)) for _ in range(3)]
    expected = engine.tokenizer.decode(model.generate([prompt], 20, temperature=0)[0][len(prompt) :])
    assert collector.results(sequences) == [(expected, "length")] * 3


def test_unseeded_draws_follow_the_probabilities(model):
    engine = Engine(model, GPT2Tokenizer())
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    counts = torch.bincount(engine._draw(probs, [None] * 20000), minlength=5) / 20000
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)


def test_stop_strings_end_the_text_before_them_even_across_tokens(model, run_engine):
    engine, collector = run_engine()
    prompt = prompts_of((5,), seed=5)[0]
    [(free, _)] = collector.results([engine.submit(prompt, SamplingParams(max_tokens=30, temperature=0))])
    cut = len(free) // 2
    stop = free[cut - 2 : cut + 3]  # five characters around the middle, likely across a token boundary
    params = SamplingParams(max_tokens=30, temperature=0, stop=("never-produced", stop))
    sequence = engine.submit(prompt, params)
    [(text, reason)] = collector.results([sequence])
    assert (text, reason) == (free[: free.index(stop)], "stop")
    assert len(sequence.tokens) < 30


def test_end_of_text_stops_and_is_not_in_the_text(model, run_engine):
    prompt = prompts_of((4,), seed=6)[0]
    free = model.generate([prompt], 20, temperature=0)[0][len(prompt) :]

    class EndsAtTheSixthToken(GPT2Tokenizer):
        eot_token = free[5]

    engine, collector = run_engine(tokenizer=EndsAtTheSixthToken())
    sequence = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0))
    [(text, reason)] = collector.results([sequence])
    end = free.index(free[5])
    assert (text, reason) == (engine.tokenizer.decode(free[:end]), "stop")
    assert sequence.tokens == free[: end + 1]


def test_stop_token_ids_end_a_sequence_like_end_of_text(model, run_engine):
    """A chat answer's end of turn: a token of the request's own, kept out of the text."""
    engine, collector = run_engine()
    prompt = prompts_of((4,), seed=8)[0]
    free = model.generate([prompt], 20, temperature=0)[0][len(prompt) :]
    end = free.index(free[6])
    stopped = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(49999, free[6])))
    plain = engine.submit(prompt, SamplingParams(max_tokens=20, temperature=0))
    [(text, reason), (free_text, free_reason)] = collector.results([stopped, plain])
    assert (text, reason) == (engine.tokenizer.decode(free[:end]), "stop")
    assert stopped.tokens == free[: end + 1]
    assert (free_text, free_reason) == (engine.tokenizer.decode(free), "length")  # only its own request stops


def test_cancel_frees_the_slot_at_the_next_step(run_engine, peaked_model):
    long_model = peaked_model(block_size=1024)
    engine, collector = run_engine(engine_model=long_model)
    sequence = engine.submit([1, 2, 3], SamplingParams(max_tokens=1000, temperature=0))
    first = collector.updates.get(timeout=20)
    assert first.sequence is sequence and first.finish_reason is None
    engine.cancel(sequence)
    wait_for(lambda: sequence.finish_reason == "cancelled")
    assert engine.active_count == 0 and engine.sequences_cancelled == 1
    assert len(sequence.tokens) < 1000


def test_zero_max_tokens_finishes_without_decoding(run_engine):
    engine, collector = run_engine()
    assert collector.results([engine.submit([5, 6], SamplingParams(max_tokens=0))]) == [("", "length")]
    assert engine.tokens_generated == 0


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([50257], SamplingParams(), "outside"),
        ([1] * 90, SamplingParams(max_tokens=10), "context of 96"),
        ([1], SamplingParams(temperature=-1.0), "temperature"),
        ([1], SamplingParams(top_k=0), "top_k"),
        ([1], SamplingParams(stop=("",)), "stop strings"),
        ([1], SamplingParams(stop_token_ids=(50257,)), "stop_token_ids"),
        ([1], SamplingParams(stop_token_ids=(True,)), "stop_token_ids"),
    ],
)
def test_bad_submissions_are_refused(model, prompt, params, message):
    engine = Engine(model, GPT2Tokenizer())
    with pytest.raises(UserError, match=message):
        engine.submit(prompt, params)


def test_a_failing_step_ends_the_running_sequences_and_the_engine_goes_on(model, run_engine, monkeypatch):
    engine, collector = run_engine()
    real = engine._decode_step
    monkeypatch.setattr(engine, "_decode_step", lambda updates: (_ for _ in ()).throw(RuntimeError("boom")))
    broken = engine.submit([1, 2], SamplingParams(max_tokens=5, temperature=0))
    wait_for(lambda: broken.finish_reason == "error")
    monkeypatch.setattr(engine, "_decode_step", real)
    [(text, reason)] = collector.results([engine.submit([1, 2], SamplingParams(max_tokens=5, temperature=0))])
    assert reason == "length" and text == engine.tokenizer.decode(model.generate([[1, 2]], 5, temperature=0)[0][2:])
