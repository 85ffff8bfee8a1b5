"""The fixture of the CORE fidelity test: a bundle of small tasks of all three types (tests/fixtures/
core_bundle) and the tiny random model nanochat's `core_eval.evaluate_task` scored it with.

The model is drawn from numpy's generator over its parameters in name order, not from torch's
initialization, so that it stays the same model when gpt2lab's initialization changes. Its
context of 48 tokens crops the longer few-shot prompts. nanochat's per-example results
(tests/fixtures/core_reference.json) were computed by a script outside this repository over
nanochat's own code (commit recorded in that file): facts, not its code. To compute them again:
export nanochat/core_eval.py from karpathy/nanochat beside the project, wrap `fixture_model()` as
nanochat's model (`model(ids)` -> `model.logits(model.hidden_states(ids))`, `max_seq_len` = the
block size, so that it crops) and gpt2lab's GPT2Tokenizer as its tokenizer (`tokenizer(texts,
prepend=id)`, `get_bos_token_id()` = end-of-text), load the bundle as its `scripts/base_eval.py`
does (shuffled with seed 1337, cut to max_per_task) and call `evaluate_task` (the accuracy) and
`evaluate_example` (each example) per task, for max_per_task -1 and 8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpt2lab import GPT, GPTConfig

DATA = Path(__file__).resolve().parent / "fixtures"
BUNDLE = DATA / "core_bundle"
REFERENCE = DATA / "core_reference.json"
CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=50257, padded_vocab_size=50304)
SEED = 31


def fixture_model() -> GPT:
    model = GPT(GPTConfig(**CONFIG)).eval()
    rng = np.random.default_rng(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            # Matrices far above GPT-2's 0.02, so that predictions depend on the input and the
            # choices' losses are well apart; gains near 1, biases small.
            scale = 0.3 if param.dim() == 2 else 0.1
            values = rng.standard_normal(tuple(param.shape)) * scale + (1.0 if name.endswith("ln_1.weight")
                                                                       or name.endswith("ln_2.weight")
                                                                       or name.endswith("ln_f.weight") else 0.0)
            param.copy_(torch.from_numpy(values).to(param.dtype))
    return model
