"""Tiny models shared by the test files: seeded, a few layers, built in milliseconds."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.pretrained import save_pretrained

_OWN_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    """The suite's downloads and built kernels go to a cache of its own, unless GPT2LAB_CACHE names
    one: a test run leaves nothing in the user's cache folder. Set before collection, where test
    modules ask whether the kernels build."""
    if not os.environ.get("GPT2LAB_CACHE"):
        os.environ["GPT2LAB_CACHE"] = config.stash[_OWN_CACHE] = tempfile.mkdtemp(prefix="gpt2lab-tests-")


def pytest_unconfigure(config):
    if own := config.stash.get(_OWN_CACHE, None):
        os.environ.pop("GPT2LAB_CACHE", None)
        shutil.rmtree(own, ignore_errors=True)


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


CHAT_TOKENIZER = {"type": "gpt2", "chat": "gpt2lab-chat-v1"}
CHAT_END = 50260  # <|end|>


def chat_gpt(end_at: int | None = None, seed: int = 0, **config: Any) -> GPT:
    """A peaked tiny GPT with the chat vocabulary (50261 ids in 50304 rows) whose every answer
    ends with <|end|> at position `end_at` (0-based, the prompt included), greedy or sampled;
    before it <|end|> is never the greedy choice. `end_at=None`: answers run on.

    Two dimensions of the residual stream are kept clear: the embeddings and every block's output
    projections write zeros there, except <|end|>'s embedding, c * (e0 - e1), and the position
    embeddings from `end_at - 1` on, A * (e0 - e1). Before that position <|end|>'s logit is then
    exactly 0, below the best of 50k random logits; from it on, those two dimensions dominate the
    final LayerNorm and <|end|>'s logit (about 8c) is far above every other (about 1).
    """
    model = tiny_gpt(seed, peaked=True, **{"vocab_size": 50261, "padded_vocab_size": 50304, "block_size": 128, **config})
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte[:, :2] = 0
        wte[CHAT_END] = 0
        wte[CHAT_END, :2] = torch.tensor([5.0, -5.0])
        wpe[:, :2] = 0
        if end_at is not None:
            wpe[max(end_at - 1, 0) :, :2] = torch.tensor([100.0, -100.0])
        for block in model.transformer.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight[:2] = 0
                projection.bias[:2] = 0
    return model


@pytest.fixture(scope="session")
def make_chat_model_folder(tmp_path_factory) -> Callable[..., Path]:
    """`make_chat_model_folder(name, end_at=None, **config)`: `chat_gpt` saved as a model folder
    whose tokenizer record carries the chat format; returns the folder."""

    def make(name: str = "chat", *, end_at: int | None = None, **config: Any) -> Path:
        folder = tmp_path_factory.mktemp(name) / "tiny-chat"
        return save_pretrained(chat_gpt(end_at, **config), folder, tokenizer_spec=CHAT_TOKENIZER)

    return make


class Collector:
    """Gathers the engine's updates per sequence, as the HTTP layer does."""

    def __init__(self):
        self.updates = queue.Queue()

    def __call__(self, updates):
        for update in updates:
            self.updates.put(update)

    def results(self, sequences, timeout=60):
        texts = {s: "" for s in sequences}
        reasons = {}
        deadline = time.monotonic() + timeout
        while len(reasons) < len(sequences):
            update = self.updates.get(timeout=max(0.01, deadline - time.monotonic()))
            if update.sequence not in texts:
                continue
            texts[update.sequence] += update.text
            if update.finish_reason:
                reasons[update.sequence] = update.finish_reason
        return [(texts[s], reasons[s]) for s in sequences]
