"""The CPU fast paths of `gpt2lab.kernels` that are not C kernels (those have tests of their own):
oneDNN's linear layer, bfloat16 autocast computed in float32 on CPUs without fast bfloat16, CPU
attention, and `accelerate` itself: what it swaps, that results stay the plain model's, and that
it leaves a model elsewhere untouched."""

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.kernels import accelerate, attention, cpu, linear, torch_compat


@pytest.mark.skipif(torch_compat.onednn_linear_op() is None, reason="this PyTorch has no oneDNN linear")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_torch_forward_and_backward(bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad_out = torch.randn(3, 5, 40)
    ours = linear.onednn_linear(x, weight, b)
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
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g).to(input_dtype).requires_grad_()
    weight = torch.randn(40, 24, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g, requires_grad=True)
    grad_out = torch.randn(3, 5, 40, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear.linear(x, weight, bias)
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
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: True)
    x, weight = torch.randn(4, 24), torch.randn(40, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear.linear(x, weight), F.linear(x, weight))


def test_compiled_bfloat16_autocast_linear_matches_eager_where_the_cpu_lacks_fast_bfloat16(monkeypatch):
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(6, 24, generator=g), torch.randn(40, 24, generator=g, requires_grad=True)

    def forward(x, weight):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear.linear(x, weight)

    eager = forward(x, weight)
    eager.float().square().sum().backward()
    eager_grad, weight.grad = weight.grad, None
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)(x, weight)
    compiled.float().square().sum().backward()
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)
    assert torch.equal(weight.grad, eager_grad)


def test_bfloat16_attention_runs_in_float32_where_the_cpu_lacks_fast_bfloat16(monkeypatch):
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    y = attention.cpu_attention(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and bool(q.grad.abs().sum() > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not cast the float32 inputs back
        assert torch.equal(attention.cpu_attention(q, k, v, is_causal=True), expected)


def test_compiled_single_query_bfloat16_attention_equals_float32_sdpa(monkeypatch):
    # A compiled decoding step on such a CPU writes the attention out in float32
    # (layers.plain_attention): one query over masked cached keys, as the step reads them.
    monkeypatch.setattr(cpu, "fast_bfloat16", lambda: False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 4, 9, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = (torch.arange(9)[None, :] < torch.tensor([[6], [9]]))[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    compiled = torch.compile(attention.cpu_attention, backend="aot_eager", fullgraph=True)
    y = compiled(q, k, v, mask)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0, rtol=2**-8)  # within bfloat16's rounding
    k[0, :, 6:] = 1e4  # keys past a row's mask must not count
    torch.testing.assert_close(compiled(q, k, v, mask).float(), expected, atol=0, rtol=2**-8)


def test_compiled_single_query_float32_attention_is_written_out_and_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(2))
    mask = (torch.arange(9)[None, :] < torch.tensor([[6], [9]]))[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(attention.cpu_attention, backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
    assert "scaled_dot_product_attention" not in graphs[0].code and "softmax" in graphs[0].code
    k[0, :, 6:] = 1e4  # keys past a row's mask must not count
    torch.testing.assert_close(compiled(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)


def tiny_model(**overrides):
    torch.manual_seed(0)
    values = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    values.update(overrides)
    return GPT(GPTConfig(**values))


def test_accelerate_swaps_the_cpu_layers_in_place_and_keeps_the_state_dict():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = [id(p) for p in model.parameters()]
    assert accelerate(model) is model
    block = model.transformer.h[0]
    assert type(block.attn.c_attn) is linear.CPULinear and type(model.lm_head) is linear.CPULinear
    assert type(block.mlp.gelu).__name__ == "FusedGELU" and type(block.attn) is attention.CPUSelfAttention
    assert type(model.head_kernels).__name__ == "CPUHeadKernels"
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert [id(p) for p in model.parameters()] == parameters
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert accelerate(model) is model and type(model.lm_head) is linear.CPULinear  # idempotent


@pytest.mark.parametrize("options", [{}, {"activation": "swiglu", "position": "rope", "norm": "rmsnorm", "bias": False}])
def test_an_accelerated_model_computes_what_the_plain_one_does(options):
    plain, fast = tiny_model(**options), accelerate(tiny_model(**options))
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fast(idx)[0], plain(idx)[0], atol=1e-5, rtol=1e-5)
    losses = [m(idx[:, :-1], idx[:, 1:])[1] for m in (plain, fast)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    prompt = [[1, 2, 3]]
    assert fast.generate(prompt, 6, temperature=0) == plain.generate(prompt, 6, temperature=0)


def test_accelerate_leaves_a_model_elsewhere_alone():
    with torch.device("meta"):
        model = tiny_model()
    assert accelerate(model) is model
    assert not [m for m in model.modules() if type(m).__module__.startswith("gpt2lab.kernels")]
    assert type(model.head_kernels).__name__ == "HeadKernels"


def test_quantized_layers_get_their_kernels_from_accelerate():
    from gpt2lab.quantize import Int8Linear, quantize

    model = quantize(tiny_model(), "int8")
    assert type(model.lm_head) is Int8Linear
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    before = model(idx)[0]
    accelerate(model)
    assert type(model.lm_head).__name__ == "CPUInt8Linear"
    torch.testing.assert_close(model(idx)[0], before, atol=1e-4, rtol=1e-4)


# The trainer builds and places its model for a device that is not the CPU (meta stands in for a
# GPU, which this suite may not have), then that very model takes a training step (on the CPU's
# memory, as meta tensors hold no values), with every import of gpt2lab.kernels refused: the fast
# paths are never on a GPU's path, not even imported.
NEVER_THE_KERNELS = """
import sys
class RefuseKernels:
    def find_spec(self, name, path=None, target=None):
        if name == "gpt2lab.kernels" or name.startswith("gpt2lab.kernels."):
            raise ImportError(f"{name} imported on the way to a GPU training step")
        return None
sys.meta_path.insert(0, RefuseKernels())
import torch
from gpt2lab.train.config import resolve_config
from gpt2lab.train.distributed import DistInfo
from gpt2lab.train.trainer import build_model, place_on_ranks
config = resolve_config("gpt2-124m", overrides=["model.n_layer=2", "model.n_embd=64", "model.n_head=2",
                                                "model.block_size=32"])
group = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("meta"))
model, config = build_model(config, group, 50257)
place_on_ranks(model, config.system, group)
model.to_empty(device="cpu")
model.apply(model._init_weights)
idx = torch.randint(0, 50257, (2, 32))
_, loss = model(idx, idx)
loss.backward()
with torch.autocast("cpu", dtype=torch.bfloat16):
    model(idx, idx)[1].backward()
print(sorted(m for m in sys.modules if m.startswith("gpt2lab.kernels")), type(model.lm_head).__name__)
"""


def test_a_training_step_off_the_cpu_never_enters_the_kernels():
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", NEVER_THE_KERNELS], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "Linear"]
