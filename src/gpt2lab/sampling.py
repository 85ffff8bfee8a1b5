"""Choosing the next token: greedy, temperature, top-k and top-p, and the checks of those settings.
`generate` and the server's engine both sample through these, so that a seeded request to the
server draws what `gpt2lab sample` draws."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    Top-k keeps the k largest (ties with the k-th all kept). Top-p keeps, in order of decreasing
    probability, each token whose predecessors hold less than p of the probability mass: the
    smallest set whose mass reaches p.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = F.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(
            f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be a positive integer (or unset), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"top_p must be in (0, 1] (or unset), got {top_p!r}")
