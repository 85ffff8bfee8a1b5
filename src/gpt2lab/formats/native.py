"""gpt2lab's own weight layout: `model.safetensors` holding `Transformer.state_dict()` as it is
(nn.Linear matrices stored (out, in), tied matrices once, padded vocabulary rows kept).

Checkpoint folders of models that transformers cannot load are written this way; `gpt2lab.json`
names the layout (`"weights": "gpt2lab"`) so that a reader never has to guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ..config import GPTConfig
from ..files import write_atomic

LAYOUT = "gpt2lab"


def stored_parameters(
    model_state: dict[str, torch.Tensor], *, tie_embeddings: bool, rows: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each parameter a model folder stores, whatever its layout: names without
    torch.compile's `_orig_mod.`, the tied head once (as the embedding), `rows` vocabulary rows."""
    for name, tensor in model_state.items():
        name = name.replace("_orig_mod.", "")
        if name == "lm_head.weight" and tie_embeddings:
            continue
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:rows]
        yield name, tensor.detach()


def write(model_state: dict[str, torch.Tensor], config: GPTConfig, directory: Path) -> None:
    """model.safetensors in this layout, the vocabulary cut to the config's embedding rows."""
    tensors = {
        name: tensor.to("cpu").contiguous().clone()
        for name, tensor in stored_parameters(model_state, tie_embeddings=config.tie_embeddings, rows=config.embedding_rows)
    }
    metadata = {"format": "pt", "layout": LAYOUT}
    write_atomic(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=metadata))
