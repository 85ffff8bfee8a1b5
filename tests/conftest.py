"""Tiny models shared by the test files: seeded, a few layers, built in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.pretrained import save_pretrained

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def tiny_gpt(seed: int = 0, *, peaked: bool = False, **config: Any) -> GPT:
    """A GPT of TINY's shape with `config`'s changes, from `torch.manual_seed(seed)`, in eval mode.

    `peaked` redraws every matrix with std 0.3, far above GPT-2's 0.02: predictions then depend
    on the input, so greedy decoding does not settle into one repeated token and comparisons of
    generated text mean something.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **config})).eval()
    if peaked:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0, 0.3)
    return model


@pytest.fixture(scope="session")
def make_model() -> Callable[..., GPT]:
    """`make_model(seed=0, peaked=False, **config)`: see `tiny_gpt`."""
    return tiny_gpt


@pytest.fixture(scope="session")
def make_model_folder(tmp_path_factory) -> Callable[..., Path]:
    """`make_model_folder(name, tokenizer_spec=None, **model_options)`: a tiny model saved as a
    model folder `<fresh temporary folder>/tiny`; returns the folder."""

    def make(name: str = "model", *, tokenizer_spec: Any = None, **model_options: Any) -> Path:
        folder = tmp_path_factory.mktemp(name) / "tiny"
        return save_pretrained(tiny_gpt(**model_options), folder, tokenizer_spec=tokenizer_spec)

    return make
