"""Choosing the next token: greedy, temperature, top-k and top-p, and the checks of those settings.
`generate` and the server's engine both sample through these, so that a seeded request to the
server draws what `gpt2lab sample` draws.

Every setting that passes `check_sampling_options` gives finite probabilities over the ids
[0, vocab_size) of the tokenizer. A temperature below float32's smallest normal number (the
logits' precision, in which a smaller one's inverse overflows or it rounds to 0) is greedy, its
limit; top-p always keeps the most likely token, so a top_p that rounds to 0 is greedy too. Ids a
model has beyond its tokenizer's vocabulary (rows padded to 50304 on GPT-2's 50257) are never
drawn.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

# float32's smallest normal number: its inverse is still finite (8.5e37), while the inverse of one
# below 2.9e-39 overflows float32 and one below 7e-46 rounds to 0 there.
_TINIEST_TEMPERATURE = torch.finfo(torch.float32).tiny


def generator_seed(seed: int) -> int:
    """The value to seed a torch generator with for the 64-bit `seed` (negative ones too). A CPU
    generator keeps only the low 32 bits, so seeds 2**32 apart would draw the same numbers: a seed
    in [0, 2**32) is taken as it is (every seeded figure stays), any other is first mixed, all of
    its bits into the low 32 (splitmix64's finalizer)."""
    if 0 <= seed < 2**32:
        return seed
    mixed = seed % 2**64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) % 2**64
    return mixed ^ (mixed >> 31)


def seeded_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on `device` seeded from all 64 bits of `seed` (None: from the system's entropy)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(generator_seed(seed))
    return generator


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` samples as temperature 0 does: the argmax."""
    return temperature < _TINIEST_TEMPERATURE


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus.

    Top-k keeps the k largest (ties with the k-th all kept). Top-p keeps, in order of decreasing
    probability, each token whose predecessors hold less than p of the probability mass: the
    smallest set whose mass reaches p, and never less than the most likely token.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        # A top_p that rounds to 0 in float32 would drop every token and leave NaN probabilities.
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token_probs(
    logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None = None
) -> torch.Tensor:
    """Float32 probabilities (B, vocab_size) of the next token, finite for finite `logits` (B, V)
    and any temperature that `is_greedy` does not call greedy."""
    logits = logits[..., :vocab_size].float()
    # The largest logit becomes exactly 0, so that a tiny temperature sends the others to -inf,
    # never a row to inf or NaN.
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return F.softmax(filter_logits(shifted / temperature, top_k, top_p), dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V), below `vocab_size` (the tokenizer's; None: every
    column of `logits`); temperature 0 is greedy."""
    if is_greedy(temperature):
        return logits[..., :vocab_size].argmax(dim=-1)
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
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
