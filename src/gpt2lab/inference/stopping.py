"""When a generated sequence ends: at one of its stop tokens (end-of-text, a chat answer's end of
turn), or where one of its stop strings appears in its text. One rule for `Chat`, the server's
engine and its API, so that an answer ends at the same place wherever it is asked for."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StopRule:
    token_ids: frozenset[int] = field(default_factory=frozenset)
    strings: tuple[str, ...] = ()

    @classmethod
    def of(cls, token_ids=(), strings=()) -> StopRule:
        """A rule from any iterables of ids (None entries skipped) and strings."""
        return cls(frozenset(t for t in token_ids if t is not None), tuple(strings))

    def ends_at(self, token: int) -> bool:
        """Whether `token` ends the sequence (it is not part of the text)."""
        return token in self.token_ids

    def cut(self, held: str, text: str) -> tuple[str, str, bool]:
        """(text safe to emit, text held back, whether a stop string was reached) for new `text`
        after the `held` tail of earlier text: a stop string and what follows it are dropped; a
        tail that may begin a stop string is held back until the next text tells."""
        if not self.strings:
            return text, "", False
        text = held + text
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        if hits:
            return text[: min(hits)], "", True
        keep = max(
            (n for s in self.strings for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
            default=0,
        )
        return text[: len(text) - keep], text[len(text) - keep :] if keep else "", False
