"""Int8 weights: the layers torch.ao's quantize_dynamic would make, from gpt2lab's own Linear."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from gpt2lab import GPT, GPTConfig
from gpt2lab.quantize import DynamicInt8Linear, quantize


def reference_int8(model: GPT) -> GPT:
    """torch.ao's quantize_dynamic on a copy whose layers are plain nn.Linear (it matches exact
    classes), with the head untied as quantize unties it."""
    plain = copy.deepcopy(model).float().eval()
    plain.untie_head()
    for name, module in list(plain.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            replacement = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            replacement.load_state_dict(module.state_dict())
            setattr(plain.get_submodule(parent), child, replacement)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(plain, {nn.Linear}, dtype=torch.qint8)


def test_int8_model_equals_torch_quantize_dynamic_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100, padded_vocab_size=128)).eval()
    before = {name: p.clone() for name, p in model.named_parameters()}
    quantized = quantize(model, "int8")
    linears = [m for m in quantized.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(linears) == 2 * 4 + 1  # four per block and the head
    assert not any(type(m) is nn.Linear or isinstance(m, nn.Linear) for m in quantized.modules())
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, reference, exact = quantized(ids)[0], reference_int8(model)(ids)[0], model(ids)[0]
    assert torch.equal(ours, reference)
    assert 0 < (ours - exact).abs().max() < 0.05
    assert model.lm_head.weight is model.transformer.wte.weight  # the original stays tied
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_int4_layers_multiply_by_their_dequantized_weights_and_stay_within_half_a_step():
    from gpt2lab.quantize import INT4_GROUP_SIZE, Int4Linear

    torch.manual_seed(0)
    layer = nn.Linear(64, 100)  # 100 rows: not a whole tile of 16, so the kernel's padding is cut
    quantized = Int4Linear(layer)
    weight = layer.weight.detach()
    dequantized = quantized.dequantized_weight()
    assert dequantized.shape == weight.shape
    groups = weight.view(100, -1, INT4_GROUP_SIZE)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (dequantized - weight).abs().view(100, -1, INT4_GROUP_SIZE).amax(-1)
    # Half a step of rounding, plus the bfloat16 rounding of the scale and minimum.
    assert (error <= 0.5 * step + 0.02 * groups.abs().amax(-1)).all()
    assert error.max() > 0  # 4 bits cannot hold these weights exactly
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = x.bfloat16().float() @ dequantized.t() + layer.bias
        got = quantized(x)
    assert got.shape == (3, 5, 100) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.05, rtol=0.02)


def test_int4_model_predicts_close_to_float32_and_leaves_the_original_alone():
    from gpt2lab.quantize import Int4Linear, quantize

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100, padded_vocab_size=100)).eval()
    before = {name: p.clone() for name, p in model.named_parameters()}
    quantized = quantize(model, "int4")
    assert sum(isinstance(m, Int4Linear) for m in quantized.modules()) == 2 * 4 + 1
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, exact = quantized(ids)[0], model(ids)[0]
        loss = quantized(ids, ids)[1]
    assert 0 < (ours - exact).abs().max() < 0.3
    assert torch.isfinite(loss)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_int4_refuses_a_width_that_is_not_whole_groups():
    from gpt2lab.errors import UserError
    from gpt2lab.quantize import quantize

    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=48, block_size=8, vocab_size=50, padded_vocab_size=50))
    with pytest.raises(UserError, match="groups of 32.*48.*--dtype int8"):
        quantize(model, "int4")


def test_a_copied_int8_layer_is_called_by_its_own_key():
    # A compiled graph reaches an int8 layer through `gpt2lab::int8_linear` and the layer's key: a
    # deep copy given other weights must not be reached through the original's.
    from gpt2lab.quantize import int8_linear

    torch.manual_seed(0)
    original = int8_linear(nn.Linear(32, 16))
    copied = copy.deepcopy(original)
    other = int8_linear(nn.Linear(32, 16))
    copied.set_weight_bias(*other._weight_bias())
    x = torch.randn(3, 32)
    through_op = torch.ops.gpt2lab.int8_linear(x, copied.layer_key, 16)
    assert torch.equal(through_op, copied(x))
    assert not torch.equal(through_op, original(x))
    assert torch.equal(torch.ops.gpt2lab.int8_linear(x, original.layer_key, 16), original(x))
