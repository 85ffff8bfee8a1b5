"""The decoding engine: one background thread that advances every running sequence together.

Each loop of the thread (1) drops sequences whose client went away, (2) admits queued sequences
into free cache slots up to `max_concurrency`, reading each prompt in a forward of its own, and
(3) runs one decode step for all admitted sequences at once: a (B, 1) forward over a
`KVCache` where each row sits at its own position. Finished sequences leave between steps and
the last slot moves into the hole, so that the live rows are always slots 0..B-1 (read as a view).

Sampling draws from the distribution of `gpt2lab.inference.sampling.sample_next_token`; a seeded sequence
draws exactly as it does, with a `torch.Generator` of its own, so its tokens depend only on its
prompt, settings and seed: decoded alone, a request gives exactly the tokens of `generate()` (and
`gpt2lab sample`) with the same seed. Decoded in a batch, the matmuls run at another batch size
and may round differently in the last bits, which can change a token only where two candidates
tie to within that rounding.

Results leave the thread through `publish(updates)`, called once per loop with every update of
that loop (the HTTP layer hands them to its event loop in one call).
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UserError
from ..inference.sampling import check_sampling_options, is_greedy, next_token_probs, sample_next_token, seeded_generator
from ..inference.stopping import StopRule
from ..inference.kv_cache import KVCache
from ..model import Transformer
from ..inference.prompts import checked_prompt
from ..tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("gpt2lab.serve")

# The cache starts with room for this many sequences and doubles up to max_concurrency, so that a
# server allowed many concurrent sequences holds memory only for those it has actually seen.
INITIAL_SLOTS = 8


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. `stop` strings end it (they are not part of the text);
    so does a token of `stop_token_ids`, as the tokenizer's control tokens (end-of-text, a chat
    format's turn tokens) always do: such a token counts as generated but adds no text, and the
    sequence finishes with "stop"."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Update:
    """New text of a sequence; `finish_reason` is set on its last update ("stop", "length",
    "cancelled" or "error", with `error` holding the message)."""

    sequence: Sequence
    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. `owner` is the submitter's own handle (the engine ignores it)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    owner: Any
    generator: torch.Generator | None
    decoder: StreamDecoder
    tokens: list[int] = field(default_factory=list)  # generated so far
    cached: int = 0  # tokens whose keys and values are in the cache
    slot: int = -1
    stop: StopRule = field(default_factory=StopRule)
    held: str = ""  # text held back because it may be the start of a stop string
    cancelled: bool = False
    finish_reason: str | None = None


class Engine:
    """Continuous batching over a GPT. Thread-safe: `submit` and `cancel` from any thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_concurrency: int = 64):
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise UserError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.block_size = model.config.block_size
        # Ids a prompt may hold and sampling may draw: those of both the model and the tokenizer
        # (a model trained with vocab_size=50304 on GPT-2's 50257 ids has rows no token decodes to).
        self.vocab_size = min(model.config.vocab_size, tokenizer.vocab_size)
        # End-of-text, and on a chat model its turn tokens, end every sequence: /v1/completions
        # stops at an answer's end of turn, and no text shows a control token.
        self.control_tokens = tokenizer.control_tokens
        param = next(model.parameters())
        self.device = param.device
        self._dtype = param.dtype
        self._cache: KVCache | None = None
        # Unseeded sequences draw from this one, leaving the caller's global torch RNG alone.
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()
        # Seeded rows' noise is drawn on this many threads (`_exponential_noise`); each row's
        # numbers depend on its own generator alone, whichever thread draws them.
        self._draw_threads = max(1, torch.get_num_threads()) if self.device.type == "cpu" else 1
        self._draw_pool: ThreadPoolExecutor | None = None
        self._active: list[Sequence] = []  # index == slot
        self._pending: list[Sequence] = []
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._publish: Callable[[list[Update]], None] = lambda updates: None
        self.tokens_generated = 0
        self.sequences_cancelled = 0
        self.decode_steps = 0

    # ---- control (any thread) ------------------------------------------------------------------

    def start(self, publish: Callable[[list[Update]], None]) -> None:
        """Start the decoding thread; `publish` receives each loop's updates, on that thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._publish = publish
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gpt2lab-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread; sequences still running or queued finish as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._draw_pool is not None:
            self._draw_pool.shutdown()
            self._draw_pool = None

    def submit(
        self, prompt: list[int], params: SamplingParams, *, owner: Any = None, seed_offset: int = 0
    ) -> Sequence:
        """Queue a prompt; its updates come through `publish`. The generator of a seeded sequence
        is seeded with `params.seed + seed_offset` (the choice number, for several per prompt)."""
        check_sampling_options(params.max_tokens, params.temperature, params.top_k, params.top_p)
        prompt = checked_prompt(prompt, self.vocab_size)
        if len(prompt) + params.max_tokens > self.block_size:
            raise UserError(
                f"{len(prompt)} prompt tokens + {params.max_tokens} new tokens exceed the model's "
                f"context of {self.block_size} tokens"
            )
        if any(not s for s in params.stop):
            raise UserError("stop strings must not be empty")
        stop_ids = params.stop_token_ids
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in stop_ids):
            raise UserError(f"stop_token_ids must be token ids in [0, {self.vocab_size}), got {params.stop_token_ids!r}")
        generator = None
        if not is_greedy(params.temperature) and params.seed is not None:
            generator = seeded_generator(self.device, params.seed + seed_offset)
        sequence = Sequence(
            id=next(self._ids),
            prompt=list(prompt),
            params=params,
            owner=owner,
            generator=generator,
            decoder=StreamDecoder(self.tokenizer),
            stop=StopRule.of((*self.control_tokens, *stop_ids), params.stop),
        )
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append(sequence)
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence (its client went away); it frees its slot before the next step."""
        if sequence.finish_reason is None and not sequence.cancelled:
            sequence.cancelled = True
            with self._wake:
                self._wake.notify()

    @property
    def active_count(self) -> int:
        """Sequences holding a cache slot."""
        return len(self._active)

    @property
    def queued_count(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._pending)

    # ---- the decoding thread -------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._pending and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                    gone = [s for s in self._pending if s.cancelled]
                    self._pending = [s for s in self._pending if not s.cancelled]
                    admitted = self._pending[: self.max_concurrency - len(self._active)]
                    del self._pending[: len(admitted)]
                updates: list[Update] = []
                for sequence in gone:
                    self._finish(sequence, "cancelled", updates)
                try:
                    self._drop_cancelled(updates)
                    for sequence in admitted:
                        self._guarded(sequence, updates, self._admit, sequence, updates)
                    if self._active:
                        self._decode_step(updates)
                except Exception as error:  # noqa: BLE001 - a bug must not kill the server
                    # A step of the whole batch failed (its forward): no sequence is to blame.
                    log.exception("decoding failed; ending the running sequences")
                    for sequence in [*self._active, *admitted]:
                        if sequence.finish_reason is None:
                            self._error(sequence, error, updates)
                    self._active.clear()
                if updates:
                    self._publish(updates)
            with self._wake:
                leftover = [*self._active, *self._pending]
                self._active.clear()
                self._pending.clear()
            for sequence in leftover:
                sequence.finish_reason = "cancelled"
            if leftover:
                self._publish([Update(s, "", "cancelled") for s in leftover])

    def _drop_cancelled(self, updates: list[Update]) -> None:
        for sequence in [s for s in self._active if s.cancelled]:
            self._release(sequence)
            self._finish(sequence, "cancelled", updates)

    def _ensure_slot(self) -> int:
        """The next free slot, growing the cache (up to max_concurrency) when it is full."""
        slot = len(self._active)
        capacity = 0 if self._cache is None else self._cache.num_slots
        if slot == capacity:
            grown = KVCache(
                self.model.config,
                min(self.max_concurrency, max(INITIAL_SLOTS, 2 * capacity)),
                self.block_size,
                device=self.device,
                dtype=self._dtype,
            )
            if self._cache is not None and slot:
                grown.copy_slots_from(self._cache, slot)
            self._cache = grown
        return slot

    def _admit(self, sequence: Sequence, updates: list[Update]) -> None:
        if sequence.params.max_tokens == 0:
            self._finish(sequence, "length", updates)
            return
        sequence.slot = self._ensure_slot()
        self._active.append(sequence)
        prompt = torch.tensor([sequence.prompt], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(prompt, kv_cache=self._cache.rows([sequence.slot], [0]))
        sequence.cached = len(sequence.prompt)
        self._sample_and_accept([sequence], self.model.logits(hidden[:, -1]), updates)

    def _decode_step(self, updates: list[Update]) -> None:
        running = list(self._active)
        idx = torch.tensor([[s.tokens[-1]] for s in running], dtype=torch.long, device=self.device)
        starts = [s.cached for s in running]
        hidden = self.model.hidden_states(idx, kv_cache=self._cache.rows(list(range(len(running))), starts))
        for s in running:
            s.cached += 1
        self.decode_steps += 1
        self._sample_and_accept(running, self.model.logits(hidden[:, -1]), updates)

    def _sample_and_accept(self, sequences: list[Sequence], logits: torch.Tensor, updates: list[Update]) -> None:
        """The next token of each sequence; a sequence whose row or token fails ends alone, with
        "error", and the others go on."""
        finite = torch.isfinite(logits.sum(dim=-1))
        if not bool(finite.all()):
            # A row whose sum overflowed may still be finite: only the rows that fail this cheap
            # check are examined in full.
            finite |= torch.isfinite(logits).all(dim=-1)
        kept = []
        for sequence, ok in zip(sequences, finite.tolist()):
            if ok:
                kept.append(sequence)
            else:
                self._release(sequence)
                self._error(sequence, "the model's predictions became NaN or infinite (its precision overflowed)", updates)
        if not kept:
            return
        rows = logits if len(kept) == len(sequences) else logits[finite]
        for sequence, token in zip(kept, self._sample(kept, rows)):
            self._guarded(sequence, updates, self._accept, sequence, token, updates)

    def _guarded(self, sequence: Sequence, updates: list[Update], work: Callable[..., None], *args: Any) -> None:
        """`work(*args)` for one sequence; what it raises ends that sequence alone."""
        try:
            work(*args)
        except Exception as error:  # noqa: BLE001 - one request's failure must not end the others'
            log.exception("sequence %d failed; ending it", sequence.id)
            if sequence in self._active:
                self._release(sequence)
            self._error(sequence, error, updates)

    def _error(self, sequence: Sequence, error: Exception | str, updates: list[Update]) -> None:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        sequence.finish_reason = "error"
        sequence.held = ""
        updates.append(Update(sequence, "", "error", f"decoding failed: {message}"))

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row, from the distribution `sample_next_token` samples for that row alone.

        Rows with the same settings are filtered and normalised together. A seeded row draws
        exactly as `sample_next_token` does with its generator (so it repeats `gpt2lab sample`);
        unseeded rows, which promise no particular tokens, draw together from the CDF.
        """
        tokens: list[torch.Tensor | None] = [None] * len(sequences)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(sequences):
            p = s.params
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            group = logits if len(rows) == len(sequences) else logits[rows]
            if is_greedy(temperature):
                drawn = sample_next_token(group, temperature=0, vocab_size=self.vocab_size)
            else:
                probs = next_token_probs(group, temperature=temperature, top_k=top_k, top_p=top_p,
                                         vocab_size=self.vocab_size)
                drawn = self._draw(probs, [sequences[i].generator for i in rows])
            for i, token in zip(rows, drawn):
                tokens[i] = token
        return torch.stack(tokens).tolist()

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One index per row of `probs` (B, V)."""
        drawn = torch.empty(len(generators), dtype=torch.long, device=probs.device)
        seeded = [j for j, g in enumerate(generators) if g is not None]
        if seeded:
            # torch.multinomial draws one sample as argmax(probs / q), q ~ Exp(1) from the
            # generator, after checks of the probabilities that cost several times the draw.
            # Drawing q row by row from each sequence's generator and dividing once gives its
            # tokens (the seeded tests compare with generate()) at a fraction of the cost.
            noise = self._exponential_noise([generators[j] for j in seeded], probs.size(1), probs)
            drawn[seeded] = (probs[seeded] / noise).argmax(dim=-1)
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if unseeded:
            # Exp(1) noise costs a logarithm per vocabulary entry and row; inverting the CDF
            # costs one uniform number per row. Float64 keeps the CDF's rounding far below the
            # smallest probability that matters; a token of probability 0 is never chosen.
            cdf = probs[unseeded].double().cumsum(dim=-1)
            u = torch.rand(len(unseeded), 1, dtype=torch.float64, device=probs.device, generator=self._rng)
            u = u * cdf[:, -1:]
            drawn[unseeded] = torch.searchsorted(cdf, u, right=True).squeeze(1)
        return drawn

    def _exponential_noise(self, generators: list[torch.Generator], width: int, like: torch.Tensor) -> torch.Tensor:
        """(len(generators), width) of Exp(1), row i from generators[i], the rows shared out
        between the draw threads (on one thread, a generator fills about 1 ms of GPT-2's
        vocabulary, most of a step with 50 seeded rows)."""
        noise = torch.empty(len(generators), width, dtype=like.dtype, device=like.device)
        inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads need it too

        def fill(rows: range) -> None:
            with torch.inference_mode(inference):
                for row in rows:
                    noise[row].exponential_(1, generator=generators[row])

        shares = [range(i, len(generators), self._draw_threads) for i in range(self._draw_threads)]
        if len(generators) > 1 and self._draw_threads > 1:
            if self._draw_pool is None:
                self._draw_pool = ThreadPoolExecutor(self._draw_threads, thread_name_prefix="gpt2lab-draw")
            list(self._draw_pool.map(fill, shares))
        else:
            fill(range(len(generators)))
        return noise

    def _accept(self, sequence: Sequence, token: int, updates: list[Update]) -> None:
        """Record a new token and emit its text; finish the sequence at end-of-text, a stop token,
        a stop string or its length."""
        sequence.tokens.append(token)
        self.tokens_generated += 1
        eos = sequence.stop.ends_at(token)
        last = eos or len(sequence.tokens) == sequence.params.max_tokens
        text = "" if eos else sequence.decoder.push(token)
        if last:
            text += sequence.decoder.flush()
        text, sequence.held, stopped = sequence.stop.cut(sequence.held, text)
        if stopped or last:
            self._release(sequence)
            self._finish(sequence, "stop" if stopped or eos else "length", updates, text + sequence.held)
        elif text:
            updates.append(Update(sequence, text))

    def _release(self, sequence: Sequence) -> None:
        """Free the sequence's slot, moving the last live sequence into it."""
        last = self._active.pop()
        if last is not sequence:
            self._cache.move(last.slot, sequence.slot)
            last.slot = sequence.slot
            self._active[sequence.slot] = last
        sequence.slot = -1

    def _finish(self, sequence: Sequence, reason: str, updates: list[Update], text: str = "") -> None:
        if reason == "cancelled":
            self.sequences_cancelled += 1
        sequence.finish_reason = reason
        sequence.held = ""
        updates.append(Update(sequence, text, reason))
