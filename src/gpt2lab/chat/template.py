"""The chat template: a list of `{"role", "content"}` messages to token ids and a loss mask.

One renderer for training data (`prepare chat`), `gpt2lab chat`, the HTTP API and the page.
The format (docs/chat.md), for `gpt2lab-chat-v1`:

    <|endoftext|> [<|system|> SYSTEM <|end|>] (<|user|> TEXT <|end|> | <|assistant|> TEXT <|end|>)...

Contents are BPE by `encode_ordinary`, so text that looks like a special token is text. With
GPT-2's BPE the special tokens are ids 50257.. in the padded rows of its vocabulary; a trained
BPE (`gpt2lab tokenizer train`) reserves them at ids 1..4, after end-of-text at 0. A character
model has no spare rows and no BPE to keep apart from them, so chat refuses it.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import UserError
from ..inference.stopping import StopRule
from ..tokenizer import CHAT_FORMATS, DEFAULT_CHAT_FORMAT, BPETokenizer, GPT2Tokenizer, tokenizer_from_spec

ROLES = ("system", "user", "assistant")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of `{"role", "content"}` (other keys are ignored), or a UserError
    naming the first bad message by its index and the fix."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(
            "a conversation must be a non-empty list of messages like "
            '{"role": "user", "content": "..."}'
        )
    checked = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise UserError(f'{where} is {type(message).__name__}, not an object; write {{"role": ..., "content": ...}}')
        role = message.get("role")
        if role not in ROLES:
            raise UserError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise UserError(
                f"{where} ({role}) has content of type {type(content).__name__}; the content must be a string"
            )
        if role == "system" and index != 0:
            raise UserError(f"{where} is a system message; only the first message may be the system message")
        checked.append({"role": role, "content": content})
    return checked


# The tokenizers whose vocabularies hold a chat format's tokens.
CHAT_TOKENIZERS = (GPT2Tokenizer, BPETokenizer)


class ChatTemplate:
    """Renders conversations for one chat format over GPT-2's BPE or a trained BPE."""

    def __init__(self, tokenizer: Any, name: str | None = None):
        if not isinstance(tokenizer, CHAT_TOKENIZERS):
            raise UserError(
                f"chat needs a BPE tokenizer with the chat tokens (GPT-2's, in its padded vocabulary rows, or one of "
                f"`gpt2lab tokenizer train`); this model uses the {getattr(tokenizer, 'name', type(tokenizer).__name__)!r} "
                "tokenizer: train or load a BPE-tokenized model for chat"
            )
        name = name or tokenizer.chat or DEFAULT_CHAT_FORMAT
        # The tokenizer carries the format, so that its spec() records it wherever it is saved.
        self.tokenizer = tokenizer.with_chat(name)
        self.name = name
        tokens = self.tokenizer.chat_tokens()
        self.role_tokens = {role: tokens[f"<|{role}|>"] for role in ROLES}
        self.end_token = tokens["<|end|>"]
        self.start_token = self.tokenizer.eot_token

    @classmethod
    def from_spec(cls, spec: Any) -> ChatTemplate:
        """The template a tokenizer record carries (the default format for a plain "gpt2")."""
        return cls(tokenizer_from_spec(spec))

    def spec(self) -> Any:
        """The tokenizer record that carries this template (`tokenizer_from_spec` reads it)."""
        return self.tokenizer.spec()

    @property
    def vocab_needed(self) -> int:
        """The smallest vocab_size a model needs for the ids this template writes."""
        return self.tokenizer.vocab_size

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size < self.vocab_needed:
            fix = (
                "use a model padded to 50304 rows (model.vocab_size=50304, as GPT-2's training presets do)"
                if isinstance(self.tokenizer, GPT2Tokenizer) else "use a model trained on data of this tokenizer"
            )
            raise UserError(
                f"the model's vocabulary has {vocab_size} ids but the chat tokens of {self.name} need "
                f"{self.vocab_needed}; {fix}"
            )

    def render(self, messages: Any, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] is 1 where ids[i] is a token to train on, i.e. the assistant's
        content and its end-of-turn; with `add_generation_prompt` the ids end with the
        assistant's role token, for the model to continue."""
        ids = [self.start_token]
        mask = [0]
        for message in validate_messages(messages):
            content = self.tokenizer.encode(message["content"]) + [self.end_token]
            learn = 1 if message["role"] == "assistant" else 0
            ids += [self.role_tokens[message["role"]], *content]
            mask += [0] + [learn] * len(content)
        if add_generation_prompt:
            ids.append(self.role_tokens["assistant"])
            mask.append(0)
        return ids, mask

    def render_prompt(self, messages: Any) -> list[int]:
        """The ids a model continues to answer `messages` as the assistant; the answer ends at
        `end_token`."""
        return self.render(messages, add_generation_prompt=True)[0]

    def stop_tokens(self) -> Sequence[int]:
        """Tokens at which a generated answer ends."""
        return (self.end_token, self.start_token)

    def stop_rule(self) -> StopRule:
        """Where a generated answer ends: `Chat`'s, the server's and the page's answers alike."""
        return StopRule.of(self.stop_tokens())


def jinja_chat_template(name: str = DEFAULT_CHAT_FORMAT) -> str:
    """`ChatTemplate(...).render` as a Jinja template, for exported tokenizers (transformers'
    `apply_chat_template`, vLLM, llama.cpp): the same tokens wherever the contents hold no text
    that looks like a control token (such text is text to gpt2lab; a string template cannot tell)."""
    tokens = CHAT_FORMATS[name]
    assert set(tokens) == {*(f"<|{role}|>" for role in ROLES), "<|end|>"}, "the template below writes these"
    role_tokens = ", ".join(f"'{role}': '<|{role}|>'" for role in ROLES)
    return (
        f"{{%- set role_tokens = {{{role_tokens}}} -%}}"
        "{{- '<|endoftext|>' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in role_tokens -%}"
        "{{- raise_exception('role ' + message['role'] + ' is not one of system, user, assistant') -}}"
        "{%- elif message['role'] == 'system' and not loop.first -%}"
        "{{- raise_exception('only the first message may be the system message') -}}"
        "{%- elif message['content'] is not string -%}"
        "{{- raise_exception('a message content must be a string') -}}"
        "{%- endif -%}"
        "{{- role_tokens[message['role']] + message['content'] + '<|end|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )


GET_A_CHAT_MODEL = (
    "fine-tune one: `gpt2lab prepare chat FILE.jsonl --out DIR`, then `gpt2lab train --preset sft` "
    "on that folder (docs/chat.md)"
)


def base_model_reason(tokenizer: Any, vocab_size: int) -> str | None:
    """Why a model with this tokenizer and vocabulary cannot chat (a base model), or None: every
    entry point (the terminal, `eval chat`, the server) refuses with this reason."""
    if not isinstance(tokenizer, CHAT_TOKENIZERS):
        return "it has a character vocabulary, which holds no chat tokens"
    if tokenizer.chat is None:
        if isinstance(tokenizer, GPT2Tokenizer):
            return "its tokenizer record is plain 'gpt2', without a chat format"
        return "its tokenizer record carries no chat format"
    needed = ChatTemplate(tokenizer).vocab_needed
    if vocab_size < needed:
        return f"its vocabulary has {vocab_size} ids and the chat tokens need {needed}"
    return None


def chat_template_for(tokenizer: Any, vocab_size: int, model_name: str = "this model") -> ChatTemplate:
    """The chat template of a model's tokenizer, or a UserError naming why the model is a base model
    and how to make a chat model."""
    if not isinstance(tokenizer, CHAT_TOKENIZERS):
        return ChatTemplate(tokenizer)  # refuses a character model, with its reason
    reason = base_model_reason(tokenizer, vocab_size)
    if reason is not None:
        raise UserError(
            f"{model_name} is a base model without the chat tokens ({reason}): it continues text but does not "
            f"answer; use `gpt2lab sample` with it, or {GET_A_CHAT_MODEL}"
        )
    return ChatTemplate(tokenizer)
