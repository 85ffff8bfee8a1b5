"""gpt2lab's fused float32 CPU kernels (`gpt2lab.kernels.fused`): the tanh GELU and its gradient,
and the softmax cross-entropy of a chunk of logits, against PyTorch's operators, the GELU module that
`accelerate` gives a model, and their fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.kernels import accelerate, build, fused

needs_kernels = pytest.mark.skipif(not fused.available(torch.zeros(1)), reason="the fused kernels do not run here")


def awkward_values(n: int) -> torch.Tensor:
    """Normal values at several scales, the tails of the GELU, zero and tiny values, n of them."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(n // 2, generator=g), 8 * torch.randn(n - n // 2, generator=g)])
    special = torch.tensor([0.0, 1e-30, -1e-30, 1e-3, -20.0, 20.0, -200.0, 200.0])[:n]
    x[: len(special)] = special
    return x


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 1000), (7, 13), (5,)], ids=["whole-vectors", "ragged", "short"])
def test_gelu_and_its_gradient_equal_pytorchs_to_float32_rounding(shape):
    x = awkward_values(torch.Size(shape).numel()).view(shape)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exact = x.double().requires_grad_()
    F.gelu(exact, approximate="tanh").backward(grad_y.double())
    y = fused.gelu_tanh_forward(x)
    grad_x = fused.gelu_tanh_backward(x, grad_y)
    eps = torch.finfo(torch.float32).eps
    # Within two float32 roundings of the exact value, as PyTorch's own operators are.
    assert ((y.double() - F.gelu(x.double(), approximate="tanh")).abs() <= 2 * eps * x.double().abs().clamp(min=1e-6)).all()
    assert ((grad_x.double() - exact.grad).abs() <= 4 * eps * (grad_y.double().abs() + 1e-30) * 1.2).all()
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=3e-7)


@needs_kernels
def test_gelu_far_out_gives_what_pytorch_gives_not_an_overflow():
    x = torch.tensor([1e12, 1e13, 1e15, 1e19, 1e30, 3e38, -1e12, -1e13, -1e30, -3e38, 30.0, -30.0, 9.0, -9.0, 5.0, -5.0])
    grad_y = torch.ones_like(x)
    want = F.gelu(x.double(), approximate="tanh")
    eps = torch.finfo(torch.float32).eps
    assert ((fused.gelu_tanh_forward(x).double() - want).abs() <= 2 * eps * x.double().abs()).all()
    exact = x.double().requires_grad_()
    F.gelu(exact, approximate="tanh").backward(grad_y.double())
    torch.testing.assert_close(fused.gelu_tanh_backward(x, grad_y).double(), exact.grad, atol=1e-20, rtol=1e-6)
    infinite = torch.tensor([float("inf"), float("-inf")] * 4)
    assert fused.gelu_tanh_forward(infinite)[0] == float("inf")
    assert torch.isnan(fused.gelu_tanh_forward(infinite)[1])  # -inf * 0, as in PyTorch


@needs_kernels
def test_the_wrappers_refuse_what_the_c_cannot_read():
    for bad in (torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="float32 CPU tensors"):
            fused.gelu_tanh_forward(bad)
        with pytest.raises(ValueError, match="float32 CPU tensors"):
            fused.gelu_tanh_backward(torch.zeros(8), bad)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        fused.softmax_cross_entropy_(torch.zeros(2, 8, dtype=torch.float64), torch.tensor([0, 1]))


@needs_kernels
def test_gelu_of_nan_is_nan_and_the_output_is_the_same_on_one_thread():
    x = awkward_values(64)
    x[9] = float("nan")
    y = fused.gelu_tanh_forward(x)
    assert torch.isnan(y[9]) and torch.isfinite(y[torch.arange(64) != 9]).all()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.testing.assert_close(fused.gelu_tanh_forward(x), y, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_the_model_gelu_takes_the_kernels_differentiably_and_non_contiguous_inputs(make_model):
    model = make_model()
    assert type(model.transformer.h[0].mlp.gelu) is torch.nn.GELU  # plain until accelerated
    gelu = accelerate(model).transformer.h[0].mlp.gelu
    assert isinstance(gelu, fused.FusedGELU) and gelu.approximate == "tanh"
    x = awkward_values(6 * 40).view(6, 40).t().requires_grad_()  # a transposed view
    reference = x.detach().clone().requires_grad_()
    gelu(x).square().sum().backward()
    F.gelu(reference, approximate="tanh").square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-5, rtol=1e-5)
    assert "gpt2lab_gelu_tanh" in gelu(x).grad_fn.name()
    assert "gpt2lab_gelu_tanh" in fused.gelu(x).grad_fn.name()


def test_accelerate_gives_only_the_tanh_gelu_the_kernels():
    exact = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    accelerate(exact)
    assert type(exact[1]) is torch.nn.GELU  # the erf GELU is not the kernels'


@needs_kernels
def test_the_gelu_operator_is_registered_for_tracing_and_autograd():
    x = awkward_values(48).view(6, 8).requires_grad_()
    torch.library.opcheck(fused.gelu_tanh, (x,), test_utils=("test_schema", "test_autograd_registration",
                                                             "test_faketensor", "test_aot_dispatch_dynamic"))


def softmax_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    grad = log_probs.exp()
    grad[torch.arange(len(targets)), targets] -= 1
    return -log_probs.gather(1, targets[:, None])[:, 0], grad


@needs_kernels
@pytest.mark.parametrize("classes", [50304, 101], ids=["gpt2-rows", "ragged"])
def test_softmax_cross_entropy_gives_the_loss_and_turns_the_logits_into_the_gradient(classes):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(9, classes, generator=g)
    logits[3, 5:40] = float("-inf")  # impossible classes: probability 0
    targets = torch.randint(0, classes, (9,), generator=g)
    targets[3] = 0
    want_loss, want_grad = softmax_reference(logits, targets)
    loss = fused.softmax_cross_entropy_(logits, targets)
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(logits.double(), want_grad, atol=2e-7, rtol=1e-5)
    assert (logits[3, 5:40] == 0).all()


@needs_kernels
def test_softmax_cross_entropy_rows_of_nan_or_infinity_give_nan_as_log_softmax_does():
    logits = torch.randn(4, 37)
    logits[1, 3] = float("nan")
    logits[2, 30] = float("inf")
    logits[3] = float("-inf")
    targets = torch.tensor([0, 1, 2, 3])
    expected = -torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    loss = fused.softmax_cross_entropy_(logits, targets)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all() and torch.isnan(expected[1:]).all()
    assert torch.isnan(logits[1:]).all()


@needs_kernels
def test_softmax_cross_entropy_refuses_targets_outside_the_classes_before_touching_memory():
    logits = torch.randn(2, 10)
    before = logits.clone()
    for bad in ([0, 10], [-1, 3]):
        with pytest.raises(IndexError, match="outside the 10 classes"):
            fused.softmax_cross_entropy_(logits, torch.tensor(bad))
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="contiguous"):
        fused.softmax_cross_entropy_(logits.t(), torch.tensor([0] * 10))


def test_a_platform_without_the_kernels_is_silent(monkeypatch):
    monkeypatch.setattr(build, "why_not_here", lambda switch: "this CPU has no AVX2")
    fused._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not fused.available(torch.zeros(3))
    finally:
        fused._library.cache_clear()


def test_the_switch_turns_the_kernels_off_silently_and_pytorch_computes_instead(monkeypatch):
    monkeypatch.setenv(fused.SWITCH, "0")
    fused._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = awkward_values(100)
            assert not fused.available(x)
            assert torch.equal(fused.gelu(x), F.gelu(x, approximate="tanh"))
    finally:
        fused._library.cache_clear()


def test_a_failed_build_warns_once_and_training_goes_on_in_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(build, "why_not_here", lambda switch: None)
    build.forget()  # the library this process has loaded already, if any
    fused._library.cache_clear()
    try:
        x = awkward_values(100)
        with pytest.warns(UserWarning, match="fused CPU kernels are not used: they could not be built.*false failed"):
            assert not fused.available(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fused.gelu(x), F.gelu(x, approximate="tanh"))  # no second warning
            assert torch.equal(fused.FusedGELU(approximate="tanh")(x), F.gelu(x, approximate="tanh"))
        assert not list(tmp_path.rglob("*.so*"))
    finally:
        build.forget()
        fused._library.cache_clear()


def graph_targets(compile_and_run) -> set[str]:
    """The operators of the FX graphs that torch.compile hands its backend while `compile_and_run(backend)` runs."""
    seen = set()

    def backend(graph_module, example_inputs):
        seen.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    compile_and_run(backend)
    return seen


@needs_kernels
def test_a_compiled_training_step_calls_the_gelu_kernels_and_decoding_leaves_them_to_inductor():
    x = awkward_values(64).requires_grad_()
    reference = x.detach().clone().requires_grad_()

    def training(backend):
        torch.compile(fused.gelu, backend=backend, fullgraph=True)(x).square().sum().backward()

    assert any("gpt2lab.gelu_tanh" in target for target in graph_targets(training))
    F.gelu(reference, approximate="tanh").square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(fused.gelu, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), F.gelu(x, approximate="tanh"))

        def decoding(backend):
            torch.compile(fused.gelu, backend=backend, fullgraph=True)(x.detach() + 1)

        assert not any("gpt2lab" in target for target in graph_targets(decoding))
    assert torch.equal(fused.gelu(x.detach().double()), F.gelu(x.detach().double(), approximate="tanh"))


@needs_kernels
def test_a_cached_library_that_no_longer_loads_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    cached = build.build(build.compiler())
    assert cached.name == build.LIBRARY
    cached.write_bytes(b"damaged")
    build.forget()
    try:
        library, reason = build._load()
        assert reason is None and library.gpt2lab_gelu_tanh_forward and library.gpt2lab_matvec
        assert cached.read_bytes().startswith(b"\x7fELF")
    finally:
        build.forget()


@needs_kernels
def test_an_accelerated_training_step_takes_the_kernels_and_equals_the_plain_models(make_model, monkeypatch):
    calls = {"gelu": 0, "softmax": 0}
    gelu_kernel, softmax_kernel = fused.gelu_tanh_forward, fused.softmax_cross_entropy_

    def counted(name, kernel):
        def call(*args):
            calls[name] += 1
            return kernel(*args)
        return call

    monkeypatch.setattr(fused, "gelu_tanh_forward", counted("gelu", gelu_kernel))
    monkeypatch.setattr(fused, "softmax_cross_entropy_", counted("softmax", softmax_kernel))
    idx = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(accelerated: bool):
        model = make_model(seed=3, peaked=True).train()
        if accelerated:
            model = accelerate(model)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(accelerated=False)
    assert calls == {"gelu": 0, "softmax": 0}  # a model built with GPT(config) is plain
    fast_loss, fast_grads = loss_and_grads(accelerated=True)
    assert calls["gelu"] == 2 and calls["softmax"] >= 1  # each block's GELU, the head's loss
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_kernels
@pytest.mark.slow
def test_a_compiled_float32_training_step_equals_the_eager_one(make_model):
    def loss_and_grads(compiled: bool):
        model = accelerate(make_model(seed=3, peaked=True).train())
        assert isinstance(model.transformer.h[0].mlp.gelu, fused.FusedGELU)
        forward = torch.compile(model) if compiled else model  # inductor, the GELU operator inside
        idx = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(0))
        _, loss = forward(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(compiled=False)
    compiled_loss, compiled_grads = loss_and_grads(compiled=True)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@needs_kernels
def test_a_graph_compiled_with_the_kernels_computes_in_pytorch_once_they_are_switched_off(monkeypatch):
    x = awkward_values(64).requires_grad_()
    compiled = torch.compile(fused.gelu, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    monkeypatch.setenv(fused.SWITCH, "0")
    fused._library.cache_clear()
    try:
        x.grad = None
        y = compiled(x)  # the graph still calls the operator: it must not need the library
        y.square().sum().backward()
        reference = x.detach().clone().requires_grad_()
        expected = F.gelu(reference, approximate="tanh")
        expected.square().sum().backward()
        assert torch.equal(y, expected) and torch.equal(x.grad, reference.grad)
    finally:
        fused._library.cache_clear()
