"""gpt2lab's matrix-vector kernels (`gpt2lab.kernels.matvec`): the linear layers of eager decoding,
against float64 products and F.linear, the rules that route `kernels.linear.linear` (what an
accelerated model's linear layers call) to them, and their fallback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.inference.generate import generate
from gpt2lab.kernels import accelerate, build, matvec
from gpt2lab.kernels.linear import CPULinear, linear
from gpt2lab.model import GPTConfig, Transformer

needs_kernels = pytest.mark.skipif(matvec._library() is None, reason="the matvec kernels do not run here")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def operands(rows: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, weight, bias


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps of a's dtype lie between a and b (same sign, finite)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, n, k", [(1, 2304, 768), (3, 50, 3072), (16, 7, 45), (2, 5, 3), (1, 1, 8)])
def test_products_equal_float64_rounded_once(dtype, rows, n, k):
    x, weight, bias = operands(rows, n, k, dtype)
    with torch.no_grad():
        assert matvec.takes(x, weight, bias)
        y = matvec.linear(x, weight, bias)
    exact = x.double() @ weight.double().T + bias.double()
    assert y.dtype == dtype and y.shape == (rows, n)
    if dtype == torch.float32:
        # float32 sums of k products: within k float32 roundings of the magnitudes summed.
        bound = k * torch.finfo(torch.float32).eps * (x.double().abs() @ weight.double().abs().T + bias.double().abs())
        assert ((y.double() - exact).abs() <= bound).all()
        torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    else:
        # Summed in float32 and rounded once: the exact result rounded, or its neighbour where
        # the float32 sum fell on the other side of a rounding boundary.
        nearest = exact.to(dtype)
        same_sign = torch.sign(y) == torch.sign(nearest)
        assert (ulps_apart(y, nearest)[same_sign] <= 1).all()
        assert ((y.double() - nearest.double()).abs()[~same_sign] <= 2 * torch.finfo(dtype).tiny).all()
        assert (y == nearest).float().mean() >= 0.9  # rounded to nearest, not truncated


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_bias_and_with_leading_dimensions(dtype):
    x, weight, _ = operands(6, 40, 96, dtype)
    x = x.view(2, 3, 96)
    with torch.no_grad():
        y = linear(x, weight)
        expected = matvec.linear(x.reshape(6, 96), weight).view(2, 3, 40)
    assert y.shape == (2, 3, 40) and torch.equal(y, expected)
    torch.testing.assert_close(y.double(), x.double() @ weight.double().T, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_infinity_propagate(dtype):
    x, weight, bias = operands(2, 9, 40, dtype)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    weight[3, 7] = 0.0  # inf * 0 is NaN, as in PyTorch
    with torch.no_grad():
        y = matvec.linear(x, weight, bias)
    assert y[0].isnan().all()
    assert y[1, 3].isnan()
    torch.testing.assert_close(y.isinf(), F.linear(x.double(), weight.double(), bias.double()).isinf())


@needs_kernels
def test_one_thread_and_two_give_the_same_bits():
    x, weight, bias = operands(3, 1001, 768, torch.float32)
    threads = torch.get_num_threads()
    with torch.no_grad():
        try:
            torch.set_num_threads(1)
            one = matvec.linear(x, weight, bias)
            torch.set_num_threads(2)
            two = matvec.linear(x, weight, bias)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernels
def test_linear_takes_the_kernels_only_for_few_rows_without_gradients(monkeypatch):
    calls = []
    kernel = matvec.linear
    monkeypatch.setattr(matvec, "linear", lambda *a: calls.append(a) or kernel(*a))
    x, weight, bias = operands(matvec.MAX_ROWS + 1, 8, 32, torch.float32)
    with torch.no_grad():
        linear(x[:1], weight, bias)
        assert len(calls) == 1
        linear(x, weight, bias)  # too many rows: MKL's GEMM is faster there
        linear(x[:1], weight.t().contiguous().t(), bias)  # not row-major
        linear(x[:1].double(), weight.double(), bias.double())  # float64: not a kernel of theirs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(x[:1], weight, bias)
        assert len(calls) == 1
    y = linear(x[:1], weight.requires_grad_(), bias)  # training wants a graph
    assert len(calls) == 1 and y.requires_grad


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoding_with_the_kernels_gives_the_logits_of_pytorchs_products(dtype, monkeypatch):
    """An accelerated model against the plain one it was made from (nn.Linear, F.linear)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)
    plain = Transformer(config).to(dtype).eval()
    model = accelerate(copy.deepcopy(plain))
    layers = 4 * config.n_layer + 1
    assert sum(type(m) is CPULinear for m in model.modules()) == layers
    assert not any(isinstance(m, CPULinear) for m in plain.modules())
    prompt = torch.randint(0, 300, (1, 9))
    calls = []
    kernel = matvec.linear
    monkeypatch.setattr(matvec, "linear", lambda *a: calls.append(a) or kernel(*a))
    with torch.no_grad():
        kernel_logits = model(prompt[:, :1])[0]
        kernel_tokens = generate(model, prompt, 12, temperature=0.0)
        assert len(calls) >= 12 * layers  # every layer of every single-token step
        seen = len(calls)
        torch_logits = plain(prompt[:, :1])[0]
        torch_tokens = generate(plain, prompt, 12, temperature=0.0)
        assert len(calls) == seen  # the plain model's layers are nn.Linear's
        monkeypatch.setattr(matvec, "MAX_ROWS", 0)  # the accelerated model with the kernels off
        off_tokens = generate(model, prompt, 12, temperature=0.0)
        assert len(calls) == seen
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernel_logits, torch_logits, rtol=tolerance, atol=tolerance)
    assert torch.equal(kernel_tokens, torch_tokens) and torch.equal(off_tokens, torch_tokens)


def test_switched_off_nothing_is_built_and_pytorch_computes(tmp_path):
    code = (
        "import torch; from gpt2lab.kernels import accelerate, matvec; from gpt2lab.kernels.linear import linear\n"
        "x, w = torch.randn(1, 8), torch.randn(4, 8)\n"
        "layer = accelerate(torch.nn.Linear(8, 4, bias=False))\n"
        "layer.weight.data.copy_(w)\n"
        "with torch.no_grad(): y, z = linear(x, w), layer(x)\n"
        "assert matvec._library() is None and not matvec.takes(x, w, None)\n"
        "assert type(layer).__name__ == 'CPULinear'\n"
        "torch.testing.assert_close(y, torch.nn.functional.linear(x, w))\n"
        "torch.testing.assert_close(z, torch.nn.functional.linear(x, w))\n"
    )
    env = {**os.environ, matvec.SWITCH: "0", "GPT2LAB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("*.so*"))


@needs_kernels
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
def test_the_kernels_see_only_plain_cpu_tensors_they_can_read(monkeypatch):
    """Whatever the kernels would misread (a weight elsewhere than in CPU memory, a bias F.linear
    broadcasts, a tensor traced or wrapped by a transform) goes to F.linear and gives its result."""
    calls = []
    kernel = matvec.linear
    monkeypatch.setattr(matvec, "linear", lambda *a: calls.append(a) or kernel(*a))
    x, weight, bias = operands(2, 8, 32, torch.float32)
    with torch.no_grad():
        with torch.device("meta"):  # a default device elsewhere: the result is still the CPU's
            torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias))
        assert len(calls) == 1
        assert not matvec.takes(x, weight.to("meta"), bias)
        assert not matvec.takes(x, weight, bias.to("meta"))
        assert not matvec.takes(x.to_sparse(), weight, bias)
        for broadcast in (bias[:1], bias.expand(2, 8).contiguous()):
            torch.testing.assert_close(linear(x, weight, broadcast), F.linear(x, weight, broadcast))
        traced = torch.jit.trace(lambda x: linear(x, weight, bias), x, check_trace=False)
        torch.testing.assert_close(traced(x + 1), F.linear(x + 1, weight, bias))
        batched = torch.vmap(lambda row: linear(row, weight, bias))(x)
        torch.testing.assert_close(batched, F.linear(x, weight, bias))
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            assert linear(mode.from_tensor(x), mode.from_tensor(weight)).shape == (2, 8)
        with torch.autograd.forward_ad.dual_level():
            tangent = torch.ones_like(x)
            dual = linear(torch.autograd.forward_ad.make_dual(x, tangent), weight)
            torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(dual).tangent, tangent @ weight.T)
    assert len(calls) == 1


@needs_kernels
def test_views_with_strides_and_offsets_give_the_products_of_their_values():
    x, weight, bias = operands(6, 40, 64, torch.bfloat16)
    with torch.no_grad():
        for view in (x[2:5], x[:, 3:35].t().contiguous().t()[:, :32].contiguous().t().t(), x.t()[:8].t()[1:3]):
            width = view.size(-1)
            torch.testing.assert_close(
                matvec.linear(view, weight[:, :width].contiguous(), bias), F.linear(view.float(), weight[:, :width].float(), bias.float()).bfloat16(),
                rtol=1e-2, atol=1e-2,
            )


def test_a_cpu_that_hides_f16c_gets_no_kernels_and_says_which_flag(monkeypatch):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma"}))
    monkeypatch.setattr(build.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert build.why_not_here(matvec.SWITCH) == "this CPU does not report f16c"
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset())  # no /proc/cpuinfo: PyTorch's check stands
    assert build.why_not_here(matvec.SWITCH) in (None, "no C compiler (cc, gcc, or $CC) was found")
