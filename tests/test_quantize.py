"""Int8 and int4 weights: the packed layouts, the C kernels (the layers `accelerate` gives a
quantized model, `kernels.quantized.CPUInt8Linear` and `CPUInt4Linear`) against the same arithmetic
in PyTorch (`quantize.Int8Linear` and `Int4Linear`, and the kernels' own fallback), quantized models
against float32, and the kernels' build and its fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from gpt2lab import GPT, GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.kernels import accelerate, build
from gpt2lab.kernels import quantized as kernels
from gpt2lab.kernels.quantized import CPUInt4Linear, CPUInt8Linear
from gpt2lab.quantize import (
    INT4_GROUP_SIZE, Int4Linear, Int8Linear, pack_int4, pack_int8, quantize, unpack_int4, unpack_int8,
)

needs_kernels = pytest.mark.skipif(
    kernels.kernels_unavailable_reason() is not None, reason="gpt2lab's C kernels do not run here"
)


def pytorch_path(monkeypatch):
    """Quantized layers computed in PyTorch, as where the C kernels cannot run."""
    monkeypatch.setattr(kernels, "_library", lambda: (None, "switched off by the test"))


def reference_int8(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The int8 product spelled out: integer levels of x (one scale per row) times the weights'."""
    rows = x.reshape(-1, layer.in_features)
    x_scale = rows.abs().amax(1) / 127
    x_levels = (rows * (1 / x_scale)[:, None]).round()  # by the reciprocal, as the kernels
    w_levels = unpack_int8(layer.packed, layer.out_features, layer.in_features).float()
    y = (x_levels @ w_levels.t()) * layer.scale * x_scale[:, None]
    return (y if layer.bias is None else y + layer.bias).view(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("out_features, in_features", [(10, 48), (100, 64), (37, 768)])
def test_packing_round_trips_for_widths_that_are_not_whole_blocks(out_features, in_features):
    levels = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    packed = pack_int8(levels)
    assert packed.shape == (-(-out_features // 4), -(-in_features // 32), 4, 32)
    assert torch.equal(unpack_int8(packed, out_features, in_features), levels)
    if in_features % 32 == 0:
        groups = in_features // 32
        nibbles = torch.randint(0, 16, (out_features, in_features))
        scale, minimum = torch.rand(out_features, groups), torch.randn(out_features, groups)
        packed4 = pack_int4(nibbles, scale, minimum)
        assert packed4.shape == (-(-out_features // 4), groups, 80) and packed4.dtype == torch.uint8
        got_levels, got_scale, got_minimum = unpack_int4(packed4, out_features, in_features)
        assert torch.equal(got_levels.long(), nibbles)
        assert torch.equal(got_scale, scale.half()) and torch.equal(got_minimum, minimum.half())


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features, in_features", [(10, 48), (100, 64), (2304, 768), (768, 3072)])
def test_int8_kernel_equals_the_integer_arithmetic_exactly(out_features, in_features, bias):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    quantized = CPUInt8Linear(layer)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 1, in_features)
        with torch.no_grad():
            got, exact = quantized(x), layer(x)
        assert got.shape == (rows, 1, out_features) and got.dtype == torch.float32
        assert torch.equal(got, reference_int8(quantized, x))
        assert 0 < (got - exact).abs().max() < 0.02 * exact.abs().max()


@needs_kernels
@pytest.mark.parametrize("out_features, in_features", [(10, 64), (37, 768), (100, 64), (2304, 768), (768, 3072)])
def test_int4_kernel_equals_pytorch_on_the_same_weights(monkeypatch, out_features, in_features):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    quantized, plain = CPUInt4Linear(layer), Int4Linear(layer)
    x = torch.randn(3, 5, in_features)
    with torch.no_grad():
        strided = torch.randn(in_features, 3).t()
        for rows in (x[:1, :1], x[:1, :3], x[:, :5].reshape(1, 15, in_features), strided):
            got = quantized(rows)
            with monkeypatch.context() as patch:
                pytorch_path(patch)
                want = quantized(rows)
            assert torch.equal(plain(rows), want)  # the layer quantize() makes, before accelerate
            # The same products, summed in another order.
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernels
def test_int8_kernel_takes_strided_inputs_and_refuses_a_wrong_width():
    torch.manual_seed(0)
    quantized = CPUInt8Linear(nn.Linear(96, 40))
    strided = torch.randn(96, 3).t()
    assert not strided.is_contiguous()
    with torch.no_grad():
        assert torch.equal(quantized(strided), reference_int8(quantized, strided.contiguous()))
        for wrong in (torch.randn(1, 192), torch.randn(2, 48)):  # as many numbers as rows of 96
            with pytest.raises(ValueError, match="of 96 inputs was given"):
                quantized(wrong)


def test_rows_of_zeros_or_of_tiny_values_give_the_bias(monkeypatch):
    layer = nn.Linear(64, 8)
    x = torch.zeros(3, 64)
    x[1, 0] = 1e-40  # a subnormal scale, whose reciprocal would overflow
    for quantized in (CPUInt8Linear(layer), CPUInt4Linear(layer), Int8Linear(layer), Int4Linear(layer)):
        with torch.no_grad():
            for patch_path in (False, True):
                with monkeypatch.context() as patch:
                    if patch_path:
                        pytorch_path(patch)
                    got = quantized(x)
                assert torch.equal(got, layer.bias.detach().expand(3, 8)), (type(quantized), patch_path)


def test_int8_pytorch_path_takes_the_same_arithmetic(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    x = torch.randn(20, 96)
    with torch.no_grad():
        plain = Int8Linear(layer)  # computes in PyTorch until accelerated
        assert torch.equal(plain(x), reference_int8(plain, x))
        pytorch_path(monkeypatch)
        quantized = CPUInt8Linear(layer)
        assert torch.equal(quantized(x), reference_int8(quantized, x))


@needs_kernels
def test_kernels_give_the_same_numbers_on_one_thread_and_on_several():
    torch.manual_seed(0)
    layer = nn.Linear(256, 1000)
    x = torch.randn(2, 256)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append((CPUInt8Linear(layer)(x), CPUInt4Linear(layer)(x)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_int4_weights_stay_within_half_a_step_of_the_originals():
    torch.manual_seed(0)
    layer = nn.Linear(64, 100)
    weight = layer.weight.detach()
    dequantized = Int4Linear(layer).dequantized_weight()
    assert dequantized.shape == weight.shape
    groups = weight.view(100, -1, INT4_GROUP_SIZE)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (dequantized - weight).abs().view(100, -1, INT4_GROUP_SIZE).amax(-1)
    # Half a step of rounding, plus the float16 rounding of the minimum.
    assert (error <= 0.5 * step + 1e-3 * groups.abs().amax(-1)).all()
    assert error.max() > 0  # 4 bits cannot hold these weights exactly


@pytest.mark.parametrize(
    "precision, cls, cpu_cls, tolerance",
    [("int8", Int8Linear, CPUInt8Linear, 0.05), ("int4", Int4Linear, CPUInt4Linear, 0.3)],
)
def test_quantized_model_predicts_close_to_float32_and_leaves_the_original_alone(precision, cls, cpu_cls, tolerance):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100, padded_vocab_size=128)).eval()
    before = {name: p.clone() for name, p in model.named_parameters()}
    quantized = quantize(model, precision)
    assert sum(type(m) is cls for m in quantized.modules()) == 2 * 4 + 1  # four per block and the head
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        in_pytorch, exact = quantized(ids)[0], model(ids)[0]
        assert accelerate(quantized) is quantized  # in place: the kernels' layers
        assert sum(type(m) is cpu_cls for m in quantized.modules()) == 2 * 4 + 1
        ours = quantized(ids)[0]
        assert torch.isfinite(quantized(ids, ids)[1])
    assert 0 < (ours - exact).abs().max() < tolerance
    assert 0 < (in_pytorch - exact).abs().max() < tolerance
    torch.testing.assert_close(ours, in_pytorch, rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight is model.transformer.wte.weight  # the original stays tied
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_accelerate_gives_lone_quantized_layers_the_kernels_and_leaves_meta_ones_alone():
    layer = nn.Linear(64, 8)
    layers = nn.ModuleList([Int8Linear(layer), Int4Linear(layer)])  # buffers, no parameters
    accelerate(layers)
    assert [type(m) for m in layers] == [CPUInt8Linear, CPUInt4Linear]
    meta = Int8Linear(layer).to("meta")
    assert type(accelerate(meta)) is Int8Linear


def test_int4_refuses_a_width_that_is_not_whole_groups():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=48, block_size=8, vocab_size=50, padded_vocab_size=50))
    with pytest.raises(UserError, match="groups of 32.*48.*--dtype int8"):
        quantize(model, "int4")


@needs_kernels
def test_the_kernels_are_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    library = build.build(build.compiler())
    assert library.is_relative_to(tmp_path / "kernels") and library.stat().st_size > 0
    assert library.name == build.LIBRARY
    built = library.stat().st_mtime_ns
    assert build.build(build.compiler()) == library and library.stat().st_mtime_ns == built
    # The library and its sha256, no partial file left.
    assert sorted(p.name for p in library.parent.iterdir()) == [library.name, library.name + ".sha256"]


def test_a_failed_build_warns_once_and_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(build, "why_not_here", lambda switch: None)
    build.forget()  # the library this process has loaded already, if any
    kernels._library.cache_clear()
    try:
        layer = CPUInt8Linear(nn.Linear(64, 8))
        x = torch.randn(1, 64)
        with pytest.warns(UserWarning, match="kernels are not used: they could not be built.*false failed"):
            with torch.no_grad():
                got = layer(x)
        assert torch.equal(got, reference_int8(layer, x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(x)  # the reason is kept: no second warning, no second build
        assert kernels.kernels_unavailable_reason().startswith("they could not be built")
        assert not list((tmp_path / "kernels").rglob("*.so*"))
    finally:
        build.forget()
        kernels._library.cache_clear()


def test_the_switch_turns_the_kernels_off_without_a_warning(monkeypatch):
    monkeypatch.setenv(kernels.SWITCH, "0")
    kernels._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.kernels_unavailable_reason() == f"{kernels.SWITCH}=0"
            layer = CPUInt8Linear(nn.Linear(64, 8))
            x = torch.randn(1, 64)
            assert torch.equal(layer(x), reference_int8(layer, x))
    finally:
        kernels._library.cache_clear()


def test_compiled_graphs_reach_the_layers_through_operators():
    torch.manual_seed(0)
    layer = nn.Linear(64, 24)
    x = torch.randn(2, 64)
    for quantized, operator in ((CPUInt8Linear(layer), "gpt2lab.int8_linear"),
                                (CPUInt4Linear(layer), "gpt2lab.int4_linear")):
        seen = set()

        def backend(graph_module, example_inputs):
            seen.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
            return graph_module.forward

        compiled = torch.compile(quantized, backend=backend, fullgraph=True)
        with torch.no_grad():
            assert torch.equal(compiled(x), quantized(x))
        assert any(operator in target for target in seen), seen


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_gives_nan_on_both_paths_not_a_finite_guess(monkeypatch, bad):
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    x = torch.randn(2, 64)
    x[0, 5] = bad
    for quantized in (CPUInt8Linear(layer), CPUInt4Linear(layer)):
        with torch.no_grad():
            got = quantized(x)
            with monkeypatch.context() as patch:
                pytorch_path(patch)
                want = quantized(x)
        assert got[0].isnan().all() and want[0].isnan().all()
        assert torch.isfinite(got[1]).all() and torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_layers_cast_to_another_dtype_still_multiply_in_float32():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    x = torch.randn(1, 64)
    for quantized in (CPUInt8Linear(layer), CPUInt4Linear(layer), Int8Linear(layer), Int4Linear(layer)):
        with torch.no_grad():
            want = quantized(x)
            quantized.to(torch.bfloat16)  # casts the float buffers (scale, bias), not the packed levels
            got = quantized(x.bfloat16())
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=0.02 * want.abs().max().item())


def test_int4_refuses_weights_beyond_float16s_range():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=8, vocab_size=50, padded_vocab_size=50))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5
    with pytest.raises(UserError, match="float16's range; use --dtype int8"):
        quantize(model, "int4")
