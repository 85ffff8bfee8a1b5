"""The chunked head + loss (`loss.linear_cross_entropy`, `GPT.loss`) against the loss over the full
logits that the model computed before it, in PyTorch and with the CPU kernels (`accelerate`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2lab import GPT, GPTConfig
from gpt2lab import loss as chunked
from gpt2lab.kernels import accelerate, cpu
from gpt2lab.kernels.loss import HEAD_KERNELS
from gpt2lab.quantize import quantize


def tiny(**overrides):
    values = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, padded_vocab_size=128)
    values.update(overrides)
    return GPTConfig(**values)


def full_logits_loss(model, idx, targets):
    """The model's loss before chunking: cross-entropy over every row of the head, in float32."""
    logits = model._head(model.hidden_states(idx))
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def loss_and_grads(model, loss_fn, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, idx, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def chunked_loss(model, idx, targets):
    return model(idx, targets)[1]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows of a 128-row head: several chunks and a ragged last one."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * 128)


@pytest.mark.parametrize("options", [
    {},
    {"logit_softcap": 2.0},
    {"tie_embeddings": False},
    {"tie_embeddings": False, "logit_softcap": 1.5, "padded_vocab_size": None},
], ids=["tied", "softcap", "untied", "untied-softcap-unpadded"])
@pytest.mark.parametrize("fast", [False, True], ids=["pytorch", "cpu-kernels"])
def test_loss_and_gradients_match_the_full_logits_loss(small_chunks, options, fast):
    torch.manual_seed(0)
    model = GPT(tiny(**options))
    if fast:
        accelerate(model)
    idx = torch.randint(0, 100, (3, 11))
    targets = torch.randint(0, 100, (3, 11))
    targets[0, :4] = -1
    targets[2, 7] = -1
    want_loss, want = loss_and_grads(model, full_logits_loss, idx, targets)
    got_loss, got = loss_and_grads(model, chunked_loss, idx, targets)
    assert abs(got_loss.item() - want_loss.item()) < 1e-5
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name
    assert got["lm_head.weight" if "lm_head.weight" in got else "transformer.wte.weight"].abs().sum() > 0
    assert all(grad.layout == torch.strided for grad in got.values())  # the optimizers take no sparse one


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_three_backward_passes_through_a_kept_graph_into_leaves_triple_the_gradients(small_chunks, scale):
    # Both gradients go into leaves here, so autograd accumulates into them in place.
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    weight = torch.randn(128, 32, requires_grad=True)
    targets = torch.randint(0, 100, (2, 9))
    loss = chunked.linear_cross_entropy(hidden, weight, targets, kernels=HEAD_KERNELS) * scale
    once = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(hidden.grad, 3 * once[0])
    torch.testing.assert_close(weight.grad, 3 * once[1])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_backward_twice_through_a_kept_graph_doubles_the_gradients(small_chunks, scale):
    # At scale 1 the loss hands its saved gradients on as they are; autograd must not let the
    # tied embedding's rows be added into them in place while the graph still holds them.
    torch.manual_seed(0)
    model = accelerate(GPT(tiny()))
    idx, targets = torch.randint(0, 100, (2, 11)), torch.randint(0, 100, (2, 11))
    _, once = loss_and_grads(model, lambda m, i, t: chunked_loss(m, i, t) * scale, idx, targets)
    model.zero_grad(set_to_none=True)
    loss = chunked_loss(model, idx, targets) * scale
    loss.backward(retain_graph=True)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], atol=1e-6, rtol=1e-5, msg=name)


def test_float64_matches_and_ignored_targets_carry_no_gradient(small_chunks):
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(128, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 100, (2, 9))
    targets[1] = -1
    loss = chunked.linear_cross_entropy(hidden, weight, targets, softcap=3.0, kernels=HEAD_KERNELS)
    loss.backward()
    reference_h = hidden.detach().clone().requires_grad_()
    reference_w = weight.detach().clone().requires_grad_()
    logits = 3.0 * torch.tanh((reference_h @ reference_w.T) / 3.0)
    expected = F.cross_entropy(logits.view(-1, 128), targets.view(-1), ignore_index=-1)
    expected.backward()
    assert loss.dtype == torch.float64 and abs(loss.item() - expected.item()) < 1e-10
    assert torch.allclose(hidden.grad, reference_h.grad, atol=1e-12)
    assert torch.allclose(weight.grad, reference_w.grad, atol=1e-12)
    assert hidden.grad[1].abs().max() == 0


def test_no_counted_target_gives_nan_as_cross_entropy_does():
    model = accelerate(GPT(tiny()))
    loss = model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))[1]
    assert torch.isnan(loss)


def test_bf16_autocast_matches_the_full_logits_loss_to_bf16_precision(small_chunks):
    torch.manual_seed(0)
    model = accelerate(GPT(tiny(logit_softcap=4.0)))
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = loss_and_grads(model, full_logits_loss, idx, targets)
        got_loss, got = loss_and_grads(model, chunked_loss, idx, targets)
    assert got_loss.dtype == torch.float32 and abs(got_loss.item() - want_loss.item()) < 2e-3
    for name in want:
        assert got[name].dtype == torch.float32
        scale = want[name].abs().max().item() + 1e-6
        assert (got[name] - want[name]).abs().max().item() < 0.02 * scale, name


def test_bf16_autocast_keeps_the_loss_in_float32_where_the_cpu_lacks_fast_bfloat16(small_chunks, monkeypatch):
    # There bfloat16 products cost time and the chunked head saves no memory by them.
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: False)
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    weight = torch.randn(128, 32, requires_grad=True)
    targets = torch.randint(0, 100, (2, 9))
    want = chunked.linear_cross_entropy(hidden, weight, targets, kernels=HEAD_KERNELS)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked.linear_cross_entropy(hidden, weight, targets, kernels=HEAD_KERNELS)
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, (hidden, weight)), want_grads):
        assert torch.equal(g, w)
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(chunked.linear_cross_entropy(hidden, weight, targets, kernels=HEAD_KERNELS), want)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_training_step_never_holds_the_full_logits(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 512)
    model = accelerate(GPT(tiny(n_embd=16, vocab_size=500, padded_vocab_size=512)))
    idx, targets = torch.randint(0, 500, (4, 16)), torch.randint(0, 500, (4, 16))
    with LargestTensor() as seen:
        model(idx, targets)[1].backward()
    full = 4 * 16 * 512
    assert seen.largest == 512 * 16  # the largest now: the head's weight and its gradient
    with LargestTensor() as before:
        full_logits_loss(model, idx, targets).backward()
    assert before.largest == full  # the check sees the full logits where they are built


def test_no_grad_loss_matches_and_quantized_models_still_give_a_loss():
    torch.manual_seed(0)
    model = accelerate(GPT(tiny())).eval()
    idx, targets = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        loss = model(idx, targets)[1]
        assert abs(loss.item() - full_logits_loss(model, idx, targets).item()) < 1e-5
        for precision in ("int8", "int4"):
            quantized = quantize(model, precision)
            assert abs(quantized(idx, targets)[1].item() - loss.item()) < 0.05, precision


def test_a_frozen_head_gets_no_gradient_and_the_rest_the_same(small_chunks):
    """Fine-tuning with the head frozen (LoRA): the weight's gradient is neither computed nor
    returned, and hidden's is unchanged."""
    torch.manual_seed(0)
    model = accelerate(GPT(tiny(tie_embeddings=False)))
    idx, targets = torch.randint(0, 100, (2, 12)), torch.randint(0, 100, (2, 12))
    _, want = loss_and_grads(model, full_logits_loss, idx, targets)
    model.lm_head.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(idx, targets)[1].backward()
    assert model.lm_head.weight.grad is None
    for name, param in model.named_parameters():
        if name != "lm_head.weight":
            assert torch.allclose(param.grad, want[name], atol=1e-5, rtol=1e-4), name


def test_chunks_hold_a_bounded_number_of_logits_are_even_and_are_never_more_than_max_chunks():
    assert chunked.chunk_rows(50304, 8 * 1024) == 640  # 13 chunks of B=8, T=1024
    assert chunked.chunk_rows(50304, 4 * 256) == 512  # two even chunks, not 640 and 384
    assert chunked.chunk_rows(50304, 4 * 1024) == 592  # seven, the last 544 rows
    assert chunked.chunk_rows(50304, 64 * 1024) == 2048  # B=64: 32 chunks, not 103
    assert chunked.chunk_rows(65, 12 * 64) >= 12 * 64  # a character vocabulary: one chunk
    assert chunked.chunk_rows(10**9, 5) == 1
    assert chunked.chunk_rows(50304, 0) == 1
    assert chunked.chunk_rows(128256, 3841) == 241  # sixteen of 241 or fewer, not fifteen of 256 and one of 1
    for vocab, cap in ((50304, 640), (128256, 256)):
        for rows in range(1, 5000, 7):
            chunk = chunked.chunk_rows(vocab, rows)
            chunks = -(-rows // chunk)
            assert chunk <= cap and chunks == -(-rows // cap)
            assert rows - chunk * (chunks - 1) >= min(chunk // 2, rows)  # the last chunk keeps half


def test_many_rows_split_into_max_chunks_give_the_same_loss(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(chunked, "MAX_CHUNKS", 4)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,))
    expected = F.cross_entropy(hidden @ weight.T, targets)
    assert abs(chunked.linear_cross_entropy(hidden, weight, targets, kernels=HEAD_KERNELS).item() - expected.item()) < 1e-12
