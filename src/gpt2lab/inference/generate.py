"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

The cache is allocated once per call. GPT-2 has learned absolute positions, so once a sequence
outgrows the block size every later step re-reads the last `block_size` tokens at positions
0..block_size-1, exactly what generation without a cache does (nanoGPT's cropping).

With `compile=True` the one-token steps run through torch.compile (`compiled_step`); the prompt's
forward and the steps past the block size stay eager.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import torch
import torch.nn as nn

from ..errors import UserError
from . import masks
from .kv_cache import KVCache
from .prompts import checked_prompt
from ..runtime import check_fits, format_bytes
from .sampling import check_sampling_options, sample_next_token, seeded_generator

if TYPE_CHECKING:
    from ..model import Transformer

PromptBatch = Union[torch.Tensor, Sequence[Sequence[int]]]


def _prompt_rows(prompts: PromptBatch, vocab_size: int, eos_token_id: int | None) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        if prompts.dim() != 2:
            raise UserError(f"prompt ids must have shape (batch, time), got {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    elif len(prompts) and isinstance(prompts[0], int):
        raise UserError("prompts must be a list of token-id lists (one per row), not one flat list")
    if not len(prompts):
        raise UserError("no prompts given: pass at least one (possibly empty) prompt")
    start = None if eos_token_id is None else [eos_token_id]
    return [checked_prompt(row, vocab_size, start, name=f"prompt {index}") for index, row in enumerate(prompts)]


def _check_buffers_fit(config, batch: int, width: int, max_new_tokens: int, cache_len: int, device, itemsize: int):
    """Refuse, before allocating them, a token buffer and KV cache that cannot fit (a
    max_new_tokens of 10**12 would otherwise fail inside the allocator)."""
    cache = 2 * config.n_layer * batch * config.kv_heads * config.head_dim * cache_len * itemsize
    per_token = batch * 8  # int64 ids
    check_fits(
        per_token * (width + max_new_tokens) + cache,
        device,
        f"generating max_new_tokens={max_new_tokens} (a buffer of every token, {format_bytes(per_token)} each, "
        "and the KV cache)",
        "ask for fewer new tokens",
    )


class _SingleTokenStep(nn.Module):
    """Logits after one new token per row, every row at the same cache position: the forward that
    `compiled_step` compiles (its shapes do not change from token to token)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, cache: KVCache, position: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(idx, kv_cache=cache.step_rows(position, pads))
        return self.model.logits(hidden[:, -1])


_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_fingerprint(model: nn.Module) -> tuple:
    # Frozen weights (and buffers, such as int4's packed weights) are constants of the compiled
    # graph: an optimizer step (which bumps a tensor's version) or a new tensor must compile afresh.
    from ..kernels import tensor_version

    tensors = itertools.chain(model.parameters(), model.buffers())
    return tuple((t.data_ptr(), tensor_version(t), t.dtype, t.device) for t in tensors)


def compiled_step(model: Transformer) -> _SingleTokenStep:
    """The model's one-token step through torch.compile, made once per model and set of weights
    (the first call compiles, a minute or more on a CPU; inductor's caches on disk shorten later
    processes' compiles)."""
    fingerprint = _weights_fingerprint(model)
    cached = _compiled_steps.get(model)
    if cached is not None and cached[0] != fingerprint:
        # Dynamo's guards pass for the same tensors changed in place, so the graph holding the old
        # values would be reused: drop the compiled graphs (other models' steps recompile on use).
        from ..kernels import forget_compiled

        forget_compiled(_SingleTokenStep.forward)
        cached = None
    if cached is None:
        cached = (fingerprint, torch.compile(_SingleTokenStep(model), dynamic=False, fullgraph=True))
        _compiled_steps[model] = cached
    return cached[1]


class _Decoder:
    """State of one generation call: the token buffer, the left padding of each row, the cache."""

    def __init__(self, model: Transformer, rows: list[list[int]], max_new_tokens: int, use_cache: bool, compile: bool):
        self.model = model
        param = next(model.parameters())
        device = param.device
        lengths = [len(row) for row in rows]
        width = max(lengths)
        self.block_size = model.config.block_size
        cache_len = min(self.block_size, width + max_new_tokens) if use_cache else 0
        _check_buffers_fit(model.config, len(rows), width, max_new_tokens, cache_len, device, param.element_size())
        self.tokens = torch.zeros(len(rows), width + max_new_tokens, dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            self.tokens[r, width - len(row) : width] = torch.tensor(row, dtype=torch.long)
        self.pads = torch.tensor([width - n for n in lengths], device=device)
        self.padded = bool(self.pads.any())
        self.length = width
        self.cache = None
        if use_cache:
            self.cache = KVCache(model.config, len(rows), cache_len, device=device, dtype=param.dtype)
        self.compiled = compiled_step(model) if compile else None
        if self.compiled is not None:
            # One graph for every generation length: the cache's length is a symbol of the graph
            # (it enters no product with the weights, so the autotuned GEMM kernels keep their
            # static shapes).
            from ..kernels import mark_dynamic

            for tensor in self.cache.keys + self.cache.values:
                mark_dynamic(tensor, 2)

    def _cache_rows(self, start: int):
        return None if self.cache is None else self.cache.all_rows(start)

    def prefill(self) -> torch.Tensor:
        """Logits after reading the last `block_size` tokens from scratch."""
        start = max(0, self.length - self.block_size)
        window = self.tokens[:, start : self.length]
        position_ids = attn_mask = None
        if self.padded:
            T = window.size(1)
            columns = torch.arange(T, device=window.device)
            first_real = (self.pads - start).clamp(min=0)
            position_ids = (columns[None, :] - first_real[:, None]).clamp(min=0)
            attn_mask = masks.left_padded(first_real, T)
        with torch.no_grad():
            hidden = self.model.hidden_states(
                window, position_ids=position_ids, attn_mask=attn_mask, kv_cache=self._cache_rows(0)
            )
            return self.model.logits(hidden[:, -1])

    def step(self) -> torch.Tensor:
        """Logits after the newest token, reading earlier ones from the cache."""
        if self.cache is None or self.length > self.block_size:
            return self.prefill()
        position = self.length - 1
        idx = self.tokens[:, position : self.length]
        if self.compiled is not None:
            return self._compiled_step(idx, position)
        position_ids = attn_mask = None
        if self.padded:
            position_ids = (position - self.pads)[:, None]
            attn_mask = masks.real_keys(self.pads, self.length)
        with torch.no_grad():
            hidden = self.model.hidden_states(
                idx,
                position_ids=position_ids,
                attn_mask=attn_mask,
                kv_cache=self._cache_rows(position),
            )
            return self.model.logits(hidden[:, -1])

    def _compiled_step(self, idx: torch.Tensor, position: int) -> torch.Tensor:
        position_tensor = torch.tensor([position], device=idx.device)
        # A column of the token buffer has the buffer's width as its stride, which the graph's
        # guards would check: a copy is laid out the same for every generation.
        idx = idx.clone(memory_format=torch.contiguous_format)
        from ..kernels import compiler_failure, decoding_compile_settings

        try:
            with torch.no_grad(), decoding_compile_settings(idx.device):
                return self.compiled(idx, self.cache, position_tensor, self.pads)
        except Exception as error:
            # Inductor builds C++ (or Triton) kernels: without a working compiler there is no step.
            cause = compiler_failure(error)
            if cause is None:
                raise
            raise UserError(
                f"torch.compile could not build the decoding step here ({type(cause).__name__}: "
                f"{str(cause).strip().splitlines()[0] if str(cause).strip() else 'no message'}); "
                "decode without compiling (drop --compile)"
            ) from None

    def append(self, next_tokens: torch.Tensor) -> None:
        self.tokens[:, self.length] = next_tokens
        self.length += 1


def generate_stream(
    model: Transformer,
    prompts: PromptBatch,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield, at each step, a (B,) tensor with the next token of every row.

    prompts: a (B, T) tensor or a list of token-id lists of any lengths (left-padded inside).
    A row that has produced `eos_token_id` keeps yielding it; the stream ends after
    `max_new_tokens` steps or once every row has ended. `seed` (or a `generator`) makes
    sampling repeatable. Ids at or above `vocab_size` (the tokenizer's: a model trained with
    `model.vocab_size=50304` on GPT-2's 50257 ids has rows no token decodes to; default
    `config.vocab_size`) are never produced, nor those of a padded vocabulary.
    `compile` runs the one-token steps through torch.compile (`compiled_step`): worth its minute
    of compiling on a CPU for long or many generations with one model. Bad options are refused by
    this call, before the first token is asked for.
    """
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise UserError(f"vocab_size must be a positive integer (the tokenizer's), got {vocab_size!r}")
    if compile and not use_cache:
        raise UserError("compiling the decoding needs the KV cache: drop one of compile and no-cache")
    rows = _prompt_rows(prompts, model.config.vocab_size, eos_token_id)
    decoder = _Decoder(model, rows, max_new_tokens, use_cache, compile)
    if generator is None and seed is not None:
        generator = seeded_generator(decoder.tokens.device, seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, vocab_size=vocab_size)
    return _stream(model, decoder, len(rows), max_new_tokens, eos_token_id, sampling)


def _all_finite(logits: torch.Tensor) -> bool:
    # A NaN or inf anywhere makes the sum NaN or inf; one reduction is far cheaper per token than
    # isfinite's element-wise passes. Only finite logits whose sum overflows need the full check.
    return bool(torch.isfinite(logits.sum())) or bool(torch.isfinite(logits).all())


def _stream(model: Transformer, decoder: _Decoder, batch: int, max_new_tokens: int, eos_token_id, sampling: dict):
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        finished = torch.zeros(batch, dtype=torch.bool, device=decoder.tokens.device)
        logits = decoder.prefill()
        for step in range(max_new_tokens):
            if not _all_finite(logits):
                raise UserError(
                    f"the model's predictions became NaN or infinite at new token {step + 1}: its weights hold "
                    "NaN/inf, or its precision overflowed; use an earlier checkpoint, or --dtype float32"
                )
            next_tokens = sample_next_token(logits, **sampling)
            if eos_token_id is not None:
                next_tokens = torch.where(finished, eos_token_id, next_tokens)
                finished |= next_tokens == eos_token_id
            decoder.append(next_tokens)
            yield next_tokens
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = decoder.step()
    finally:
        model.train(was_training)


def generate(
    model: Transformer, prompts: PromptBatch, max_new_tokens: int, **options
) -> torch.Tensor | list[list[int]]:
    """Continue every prompt by up to `max_new_tokens` tokens (options as `generate_stream`).

    A tensor in gives a tensor out, (B, T + steps), rows that ended early filled with the
    end-of-text id. A list of token lists in gives a list out: each prompt followed by its new
    tokens, up to and including end-of-text.
    """
    steps = list(generate_stream(model, prompts, max_new_tokens, **options))
    new = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(0, dtype=torch.long)
    if isinstance(prompts, torch.Tensor):
        prompt_tensor = prompts if prompts.dim() == 2 else prompts.unsqueeze(0)
        if not steps:
            return prompt_tensor.clone()
        return torch.cat([prompt_tensor, new.to(prompt_tensor.device)], dim=1)
    eos = options.get("eos_token_id")
    results = []
    for r, prompt in enumerate(prompts):
        continuation = new[r].tolist() if steps else []
        if eos is not None and eos in continuation:
            continuation = continuation[: continuation.index(eos) + 1]
        start = list(prompt) if len(prompt) else [eos]  # an empty prompt started from end-of-text
        results.append(start + continuation)
    return results
