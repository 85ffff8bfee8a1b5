"""Int8 weights: the layers torch.ao's quantize_dynamic would make, from gpt2lab's own Linear."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from gpt2lab import GPT, GPTConfig
from gpt2lab.quantize import DynamicInt8Linear, quantize_int8


def reference_int8(model: GPT) -> GPT:
    """torch.ao's quantize_dynamic on a copy whose layers are plain nn.Linear (it matches exact
    classes), with the head untied as quantize_int8 unties it."""
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
    quantized = quantize_int8(model)
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
