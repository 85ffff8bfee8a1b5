import pytest
import torch
import torch.nn.functional as F

from gpt2lab import UserError
from gpt2lab.inference.sampling import filter_logits


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(n_head=4, n_embd=64, block_size=64, vocab_size=97, padded_vocab_size=128, peaked=True)


def reference_greedy(model, prompt, steps):
    """Generation without a cache, cropping the context as nanoGPT does."""
    idx = prompt.clone()
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.block_size :])
        next_token = logits[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_token], dim=1)
    return idx


def test_greedy_with_cache_equals_without_for_300_tokens_past_the_block(model):
    prompt = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 300, temperature=0)
    uncached = model.generate(prompt, 300, temperature=0, use_cache=False)
    assert cached.shape == (2, 310)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference_greedy(model, prompt, 300))
    assert len(set(cached[0, 10:].tolist())) > 5  # the check is not vacuous


def test_prompt_longer_than_block_keeps_its_last_block(model):
    prompt = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, 20, temperature=0)
    assert torch.equal(out, reference_greedy(model, prompt, 20))


def test_seeded_sampling_repeats_and_seeds_differ(model):
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(3))
    a = model.generate(prompt, 40, temperature=1.0, seed=7)
    b = model.generate(prompt, 40, temperature=1.0, seed=7)
    c = model.generate(prompt, 40, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_padded_vocabulary_ids_are_never_produced(model):
    with torch.no_grad():
        model.lm_head.weight[97:] = 100.0  # make the padded rows the most likely by far
    try:
        prompt = torch.randint(0, 97, (4, 3))
        for out in (model.generate(prompt, 30, temperature=0), model.generate(prompt, 30, seed=0)):
            assert int(out.max()) < 97
    finally:
        with torch.no_grad():
            model.lm_head.weight[97:] = 0.0


def test_rows_stop_at_end_of_text(model):
    prompt = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(4))
    free = model.generate(prompt, 30, temperature=0)[0, 4:].tolist()
    eos = free[5]  # the sixth greedy token becomes end-of-text
    stopped = model.generate([prompt[0].tolist()], 30, temperature=0, eos_token_id=eos)[0]
    assert stopped == prompt[0].tolist() + free[: free.index(eos) + 1]
    as_tensor = model.generate(prompt, 30, temperature=0, eos_token_id=eos)
    steps = free.index(eos) + 1
    assert as_tensor.shape == (1, 4 + steps)


def test_batch_of_different_length_prompts_equals_one_at_a_time(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 11, 7)]
    batched = model.generate(prompts, 80, temperature=0)  # 11 + 80 > 64: the window slides too
    for prompt, row in zip(prompts, batched):
        alone = model.generate([prompt], 80, temperature=0)[0]
        assert row == alone


def test_stream_yields_the_same_tokens_as_generate(model):
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    streamed = torch.stack(list(model.generate_stream(prompt, 25, seed=3)), dim=1)
    assert torch.equal(torch.cat([prompt, streamed], 1), model.generate(prompt, 25, seed=3))


def test_empty_prompt_starts_from_end_of_text(model):
    out = model.generate([[]], 5, temperature=0, eos_token_id=96)
    assert out[0][0] == 96
    with pytest.raises(UserError, match="empty"):
        model.generate([[]], 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_options_are_refused(model, kwargs, message):
    options = dict(max_new_tokens=5)
    options.update(kwargs)
    with pytest.raises(UserError, match=message):
        list(model.generate_stream([[1, 2]], **options))


@pytest.mark.parametrize("bad", [[1, 97], [-1, 3], [1, 1000]])
def test_token_ids_outside_the_vocabulary_are_refused(model, bad):
    with pytest.raises(UserError, match="outside the vocabulary"):
        model.generate([bad], 3)


def test_training_mode_is_restored(model):
    model.train()
    model.generate([[1, 2]], 3)
    assert model.training
    model.eval()


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    def kept(p):
        return torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, False, True, False]
    assert kept(0.8) == [True, False, True, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, False, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_sampling_with_top_k_draws_only_kept_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]]).repeat(500, 1)
    from gpt2lab.inference.sampling import sample_next_token

    draws = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    draws = sample_next_token(logits, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1, 2, 3, 4}
    probs = F.softmax(logits[0], -1)
    assert abs((draws == 1).float().mean().item() - F.softmax(logits[0] / 5, -1)[1].item()) < 0.07
    assert probs.sum().item() == pytest.approx(1.0)


def test_seeds_2_to_the_32_apart_draw_differently_and_small_seeds_stay_as_they_were(make_model):
    """A CPU generator keeps 32 bits of its seed; every bit of a 64-bit seed must count."""
    import torch

    from gpt2lab.inference.sampling import generator_seed

    model = make_model()
    draws = {seed: model.generate([[1, 2, 3]], 12, temperature=1.0, seed=seed)[0] for seed in (5, 2**32 + 5, 2**40 + 5, -5)}
    assert len({tuple(d) for d in draws.values()}) == 4
    assert generator_seed(5) == 5 and 0 <= generator_seed(2**64 - 1) < 2**64 and generator_seed(-5) != generator_seed(5)
    expected = model.generate([[1, 2, 3]], 12, temperature=1.0, generator=torch.Generator().manual_seed(5))[0]
    assert draws[5] == expected
