"""`gpt2lab.GPT`: the transformer of `gpt2lab.model` (`Transformer`) with its loader, writer and generation
attached, the way transformers users expect to find them (`GPT.from_pretrained(...)`,
`model.generate(...)`).

The methods live here, at the top of the package, rather than in model.py, so that the model
imports nothing from the stages built on it; each is a one-line call of the function that does
the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from .model import Transformer
from .inference.generate import PromptBatch, generate, generate_stream
from . import pretrained


class GPT(Transformer):
    """GPT-2. ``logits, _ = model(idx)``: logits for every position; ``_, loss = model(idx, targets)``."""

    @classmethod
    def from_pretrained(cls, spec: str | Path, **options: Any) -> GPT:
        """Load a hub name (``gpt2``, ``gpt2-medium``, ..., ``owner/name``), a model folder, a
        checkpoint or a run folder; options as `gpt2lab.pretrained.load_model`. A model loaded onto
        a CPU gets the CPU kernels (`gpt2lab.kernels.accelerate`); `accelerate=False` keeps it plain."""
        accelerated = options.pop("accelerate", True)
        model = pretrained.load_model(spec, model_class=cls, **options)
        if accelerated and next(model.parameters()).device.type == "cpu":
            from .kernels import accelerate

            model = accelerate(model)
        return model

    def save_pretrained(self, directory: str | Path, **options: Any) -> Path:
        """Write a model folder that gpt2lab and transformers load; see `gpt2lab.pretrained.save_pretrained`."""
        return pretrained.save_pretrained(self, directory, **options)

    def generate(self, prompts: PromptBatch, max_new_tokens: int, **options: Any):
        """Continue each prompt; see `gpt2lab.inference.generate.generate` for the options."""
        return generate(self, prompts, max_new_tokens, **options)

    def generate_stream(self, prompts: PromptBatch, max_new_tokens: int, **options: Any) -> Iterator[torch.Tensor]:
        """Yield a (B,) tensor of new tokens at each step; see `gpt2lab.inference.generate.generate_stream`."""
        return generate_stream(self, prompts, max_new_tokens, **options)


# The package's documented resolver: the same loader, for those who think in functions.
load_model = GPT.from_pretrained
