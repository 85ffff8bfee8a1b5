"""Answering a conversation as the assistant: a model, its tokenizer's chat template, sampling.

`Chat(model, tokenizer)` refuses a base model (no chat format recorded, or a vocabulary without
the chat tokens) once, when made; then `stream(messages, settings)` yields the answer's text as
it is generated, `reply` returns it whole, and `greedy_replies` answers many conversations in
left-padded batches (what `gpt2lab eval chat` scores). `gpt2lab chat` is the verb over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .template import chat_template_for, validate_messages
from ..errors import UserError
from ..inference.generate import generate_stream
from ..inference.sampling import check_sampling_options
from ..inference.stopping import StopRule
from ..pretrained import load_for_inference
from ..tokenizer import StreamDecoder, load_tokenizer

if TYPE_CHECKING:
    from ..model import Transformer

@dataclass
class ChatSettings:
    """How an answer is sampled; temperature 0 is greedy (top_k and top_p then do nothing)."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int | None = None

    def validate(self) -> None:
        check_sampling_options(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


class ReplyStream:
    """The text of one answer, piece by piece as tokens arrive. After the loop, `finish_reason`
    is "stop" (the model ended its turn) or "length" (max_new_tokens ran out) and `token_ids`
    holds the answer's tokens, the stop token not among them."""

    def __init__(self, tokens: Iterator[torch.Tensor], tokenizer: Any, stop: StopRule):
        self._tokens = tokens
        self._decoder = StreamDecoder(tokenizer)
        self._stop = stop
        self.token_ids: list[int] = []
        self.finish_reason = "length"

    def __iter__(self) -> Iterator[str]:
        for step in self._tokens:
            token = int(step[0])
            if self._stop.ends_at(token):
                self.finish_reason = "stop"
                break
            self.token_ids.append(token)
            piece = self._decoder.push(token)
            if piece:
                yield piece
        tail = self._decoder.flush()
        if tail:
            yield tail


class Chat:
    """A chat model: the model and its tokenizer's chat template, checked to fit each other."""

    def __init__(self, model: Transformer, tokenizer: Any, model_name: str = "this model", compile: bool = False):
        self.model = model
        self.compile = compile  # decode through `generate`'s compiled one-token step
        self.template = chat_template_for(tokenizer, model.config.vocab_size, model_name)
        self.stop = self.template.stop_rule()
        self.tokenizer = self.template.tokenizer

    def prompt_ids(self, messages: Any) -> list[int]:
        """The ids the model continues: `messages` rendered, ending with the assistant's role token."""
        return self.template.render_prompt(messages)

    def stream(
        self, messages: Any, settings: ChatSettings, generator: torch.Generator | None = None
    ) -> ReplyStream:
        """The answer to `messages` (ending with a user turn, usually). Options are checked here,
        before the first token. `generator` (else one seeded by `settings.seed`) carries the
        randomness across several answers of one session."""
        settings.validate()
        tokens = generate_stream(
            self.model,
            [self.prompt_ids(messages)],
            settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            eos_token_id=self.template.end_token,
            seed=settings.seed if generator is None else None,
            generator=generator,
            compile=self.compile,
            vocab_size=self.tokenizer.vocab_size,
        )
        return ReplyStream(tokens, self.tokenizer, self.stop)

    def reply(self, messages: Any, settings: ChatSettings, generator: torch.Generator | None = None) -> str:
        return "".join(self.stream(messages, settings, generator))

    def greedy_replies(
        self, conversations: Sequence[Any], max_new_tokens: int, batch_size: int = 16
    ) -> list[str]:
        """Each conversation's greedy answer, in order. Prompts of similar length share a batch
        (left-padded inside `generate`), so that little of a batch is padding."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        check_sampling_options(max_new_tokens, 0.0, None, None)
        prompts = [self.prompt_ids(messages) for messages in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for index, ids in zip(chunk, self._greedy_batch([prompts[i] for i in chunk], max_new_tokens)):
                replies[index] = self.tokenizer.decode(ids)
        return replies

    def _greedy_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        answers: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0:
            return answers
        done = [False] * len(prompts)
        # generate ends a row only at one id (<|end|>); a row that stops at end-of-text is ended
        # here, and the batch is left as soon as every row has ended either way.
        stream = generate_stream(
            self.model, prompts, max_new_tokens, temperature=0.0, eos_token_id=self.template.end_token,
            compile=self.compile, vocab_size=self.tokenizer.vocab_size,
        )
        for step in stream:
            for row, token in enumerate(step.tolist()):
                if done[row]:
                    continue
                if self.stop.ends_at(token):
                    done[row] = True
                else:
                    answers[row].append(token)
            if all(done):
                break
        return answers


def fit_to_context(messages: Any, chat: Chat, limit: int) -> tuple[list[dict[str, str]], int]:
    """(messages, how many were dropped): the oldest turns after the system message left out
    until the rendered prompt is at most `limit` tokens, so that what is kept starts with a
    user turn. The last message is always kept (a prompt still too long is cut from the left
    by `generate`)."""
    messages = validate_messages(messages)
    if len(chat.prompt_ids(messages)) <= limit:
        return messages, 0
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(head) :]
    dropped = 0
    while len(turns) > 1 and (len(chat.prompt_ids(head + turns)) > limit or turns[0]["role"] != "user"):
        turns = turns[1:]
        dropped += 1
    return head + turns, dropped


def load_chat(spec: str | Path, device: str = "auto", dtype: str = "auto", compile: bool = False):
    """(Chat, device, precision name) for a model as `--model`, `--device`, `--dtype` and
    `--compile` name them."""
    folder, model, device_, precision = load_for_inference(spec, device, dtype)
    chat = Chat(model, load_tokenizer(folder), model_name=f"model {spec}", compile=compile)
    return chat, device_, precision
