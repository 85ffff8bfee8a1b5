"""The rules every entry point applies to a prompt before a model continues it: `generate`,
`gpt2lab sample`, the server's engine and API, and the trainer's samples."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import UserError


def empty_prompt_start(tokenizer: Any) -> list[int] | None:
    """What an empty prompt starts from: end-of-text, or for a character model, which has none,
    a newline as nanoGPT does; None when the vocabulary has neither."""
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except UserError:
        return None


def checked_prompt(
    ids: Sequence[Any], vocab_size: int, start: Sequence[int] | None = None, *, name: str = "the prompt"
) -> list[int]:
    """`ids` as a list, every id an int in [0, vocab_size); an empty prompt becomes `start`.

    Raises UserError naming the prompt (`name`, e.g. "prompt 2") and the fix.
    """
    rows = list(ids)
    if not rows:
        if not start:
            raise UserError(
                f"{name} is empty and no start token (end-of-text) was given to begin from; give a prompt"
            )
        rows = list(start)
    bad = [t for t in rows if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise UserError(
            f"{name} has token id {bad[0]!r}, outside the vocabulary [0, {vocab_size}); "
            "encode the prompt with the model's own tokenizer"
        )
    return rows
