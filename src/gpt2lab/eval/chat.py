"""Chat evaluation: exact-match accuracy of greedy answers to a file of prompts.

A prompts file is JSONL, one example a line: `{"messages": [..., a user turn], "answer": "..."}`,
or `{"messages": [..., a user turn, an assistant turn]}` whose last message is the expected
answer. An answer is right when it equals the expected one after stripping whitespace at both
ends. The loss over a prepared chat dataset folder is `chat_loss_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat.session import Chat
from ..chat.template import validate_messages
from ..data.dataset import open_dataset
from ..errors import UserError
from ..jsontext import jsonl_lines
from .loss import LossResult, evaluate_loss

LINE_FORM = '{"messages": [{"role": "user", "content": "..."}], "answer": "..."}'


@dataclass
class ChatExample:
    line: int  # 1-based line of the prompts file
    messages: list[dict[str, str]]
    answer: str


@dataclass
class ExactMatchResult:
    examples: int
    correct: int
    answers: list[str] = field(default_factory=list)  # the model's, in the file's order
    matches: list[bool] = field(default_factory=list)  # whether each answer is right

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else 0.0


def _example(record: Any, where: str, line: int) -> ChatExample:
    if not isinstance(record, dict) or "messages" not in record:
        raise UserError(f"{where} is not an object with a 'messages' list; write each line as {LINE_FORM}")
    try:
        messages = validate_messages(record["messages"])
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, str):
            raise UserError(f"{where} has an 'answer' of type {type(answer).__name__}; the answer must be a string")
    elif messages[-1]["role"] == "assistant":
        messages, answer = messages[:-1], messages[-1]["content"]
    else:
        raise UserError(
            f"{where} has no expected answer: add \"answer\": \"...\", or end its messages with the "
            "assistant's expected message"
        )
    if not messages or messages[-1]["role"] != "user":
        raise UserError(
            f"{where}: the messages before the expected answer must end with a user turn, for the "
            "model to answer it"
        )
    return ChatExample(line, messages, answer)


def load_chat_examples(path: str | Path, limit: int | None = None) -> list[ChatExample]:
    """The examples of a prompts file (the first `limit` of them), or a UserError naming the line
    that is wrong and the fix."""
    path = Path(path)
    examples: list[ChatExample] = []
    for number, record, where in jsonl_lines(path, what="prompts file", option="--data", form=LINE_FORM):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_example(record, where, number))
    if not examples:
        raise UserError(f"prompts file {path} holds no examples; write one per line as {LINE_FORM}")
    return examples


def exact_match(
    chat: Chat, examples: list[ChatExample], max_new_tokens: int = 256, batch_size: int = 16
) -> ExactMatchResult:
    """Greedy answers to every example, compared with the expected ones after stripping."""
    answers = chat.greedy_replies([example.messages for example in examples], max_new_tokens, batch_size)
    matches = [got.strip() == example.answer.strip() for got, example in zip(answers, examples)]
    return ExactMatchResult(examples=len(examples), correct=sum(matches), answers=answers, matches=matches)


def chat_loss_report(
    model: Any, folder: str | Path, *, split: str = "val", batch_size: int = 16, batches: int | None = None,
    seq_len: int | None = None, progress: bool = False,
) -> LossResult:
    """The loss over the assistant tokens of a prepared chat dataset folder (`gpt2lab prepare
    chat`), conversations packed as training packs them (`data.chat_loader`); the first
    `batches` batches, or all (None)."""
    dataset = open_dataset(folder)
    if dataset.kind != "chat":
        raise UserError(
            f"{folder} holds a token stream, not conversations: score it with `gpt2lab eval loss --data {folder}`, "
            "or give a chat dataset folder (`gpt2lab prepare chat`) or a JSONL file of prompts with answers"
        )
    return evaluate_loss(
        model, dataset, split=split, batches=batches, batch_size=batch_size, seq_len=seq_len, progress=progress
    )
