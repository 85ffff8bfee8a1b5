import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig


def tiny_config(**overrides):
    values = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    values.update(overrides)
    return GPTConfig(**values)


def test_fresh_124m_loss_is_near_uniform():
    """With GPT-2's init the logits are Gaussian with variance n_embd * 0.02**2 (unit-variance
    LayerNorm output times N(0, 0.02) rows), so the expected loss is ln(V) + variance / 2 = 10.978,
    not exactly ln(V) = 10.825; transformers' own fresh GPT-2 gives 10.99."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2"))
    idx = torch.randint(0, 50257, (4, 128))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
    expected = math.log(50257) + 768 * 0.02**2 / 2
    assert abs(loss.item() - expected) < 0.05
    assert abs(loss.item() - math.log(50257)) < 0.2


def test_small_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2, n_embd=64, n_head=4, block_size=32))
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_logits_shape_and_ignored_targets():
    torch.manual_seed(0)
    model = GPT(tiny_config(padded_vocab_size=80)).eval()
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 80) and loss is None
    targets = torch.randint(0, 64, (3, 10))
    targets[:, :5] = -1
    _, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 80), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_too_long_sequence_is_refused():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    model = GPT(config)
    residual = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    other = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(torch.count_nonzero(b.attn.c_attn.bias) == 0 for b in model.transformer.h)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_untied_head_is_a_separate_matrix():
    model = GPT(tiny_config(tie_embeddings=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    tied = GPT(tiny_config())
    assert model.num_params() - tied.num_params() == 64 * 32


def test_param_count_and_flops_of_gpt2():
    model = GPT(GPTConfig.from_preset("gpt2"))
    # 124,439,808 parameters in all, 786,432 of them position embeddings.
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * model.num_params() + 12 * 12 * 12 * 64 * 1024


def test_no_bias_model_has_no_bias_parameters():
    model = GPT(tiny_config(bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_sdpa_and_plain_attention_agree_with_dropout_off():
    torch.manual_seed(0)
    sdpa = GPT(tiny_config()).eval()
    plain = GPT(tiny_config(attention="plain")).eval()
    plain.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    assert torch.allclose(sdpa(idx)[0], plain(idx)[0], atol=1e-5)


def test_bf16_autocast_training_step_runs_and_matches_fp32_roughly():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    _, loss32 = model(idx[:, :-1], idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx[:, :-1])
        no_logits, loss16 = model(idx[:, :-1], idx[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss16.dtype == torch.float32 and no_logits is None
    assert abs(loss16.item() - loss32.item()) < 0.05
    loss16.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())