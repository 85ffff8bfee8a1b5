import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.ops import ONEDNN_AVAILABLE, onednn_linear


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


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this PyTorch has no oneDNN linear")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_torch_forward_and_backward(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad_out = torch.randn(3, 5, 40)
    ours = onednn_linear(x, weight, b)
    ours.backward(grad_out)
    grads = [x.grad.clone(), weight.grad.clone()] + ([b.grad.clone()] if bias else [])
    for t in [x, weight] + ([b] if bias else []):
        t.grad = None
    reference = F.linear(x, weight, b)
    reference.backward(grad_out)
    expected = [x.grad, weight.grad] + ([b.grad] if bias else [])
    assert torch.allclose(ours, reference, atol=1e-4)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_autocast_linear_runs_in_float32_where_the_cpu_lacks_fast_bfloat16(monkeypatch, input_dtype):
    # As autocast: the input rounded to bfloat16, the output bfloat16; but the products in
    # float32 with the float32 weight, and the weight's and bias's gradients in float32.
    from gpt2lab import ops

    monkeypatch.setattr(ops, "_CPU_FAST_BF16", False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g).to(input_dtype).requires_grad_()
    weight = torch.randn(40, 24, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g, requires_grad=True)
    grad_out = torch.randn(3, 5, 40, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, weight, bias)
        native = F.linear(x, weight, bias)
    x16 = x.detach().to(torch.bfloat16).float()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x16, weight.detach(), bias.detach()).to(torch.bfloat16))
    torch.testing.assert_close(y.float(), native.float(), atol=0.05, rtol=2**-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward inside autocast: the same products
        y.backward(grad_out)
    g32 = grad_out.float().view(-1, 40)
    assert x.grad.dtype == input_dtype and weight.grad.dtype == torch.float32
    assert torch.equal(x.grad, (g32 @ weight.detach()).view(3, 5, 24).to(input_dtype))
    assert torch.equal(weight.grad, g32.t() @ x16.view(-1, 24))
    assert torch.equal(bias.grad, g32.sum(0))


def test_bfloat16_autocast_linear_is_autocasts_own_where_the_cpu_has_fast_bfloat16(monkeypatch):
    from gpt2lab import ops

    monkeypatch.setattr(ops, "_CPU_FAST_BF16", True)
    x, weight = torch.randn(4, 24), torch.randn(40, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ops.linear(x, weight), F.linear(x, weight))


def test_compiled_bfloat16_autocast_linear_matches_eager_where_the_cpu_lacks_fast_bfloat16(monkeypatch):
    from gpt2lab import ops

    monkeypatch.setattr(ops, "_CPU_FAST_BF16", False)
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 24, generator=g), torch.randn(40, 24, generator=g, requires_grad=True)

    def forward(x, weight):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.linear(x, weight)

    eager = forward(x, weight)
    eager.float().square().sum().backward()
    eager_grad, weight.grad = weight.grad, None
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)(x, weight)
    compiled.float().square().sum().backward()
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)
    assert torch.equal(weight.grad, eager_grad)


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


def test_bfloat16_attention_runs_in_float32_where_the_cpu_lacks_fast_bfloat16(monkeypatch):
    from gpt2lab import ops

    monkeypatch.setattr(ops, "_CPU_FAST_BF16", False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    y = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and bool(q.grad.abs().sum() > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not cast the float32 inputs back
        assert torch.equal(ops.scaled_dot_product_attention(q, k, v, is_causal=True), expected)


def test_compiled_single_query_bfloat16_attention_equals_float32_sdpa(monkeypatch):
    # A compiled decoding step on such a CPU writes the attention out in float32
    # (ops.plain_attention): one query over masked cached keys, as the step reads them.
    from gpt2lab import ops

    monkeypatch.setattr(ops, "_CPU_FAST_BF16", False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 4, 9, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = (torch.arange(9)[None, :] < torch.tensor([[6], [9]]))[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    compiled = torch.compile(ops.scaled_dot_product_attention, backend="aot_eager", fullgraph=True)
    y = compiled(q, k, v, mask)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0, rtol=2**-8)  # within bfloat16's rounding
    k[0, :, 6:] = 1e4  # keys past a row's mask must not count
    torch.testing.assert_close(compiled(q, k, v, mask).float(), expected, atol=0, rtol=2**-8)


def test_compiled_single_query_float32_attention_is_written_out_and_equals_sdpa():
    from gpt2lab import ops

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(2))
    mask = (torch.arange(9)[None, :] < torch.tensor([[6], [9]]))[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(ops.scaled_dot_product_attention, backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
    assert "scaled_dot_product_attention" not in graphs[0].code and "softmax" in graphs[0].code
    k[0, :, 6:] = 1e4  # keys past a row's mask must not count
    torch.testing.assert_close(compiled(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
