"""Reading chat training records: OpenAI-style `{"messages": [...]}` lines and Alpaca-style
`{"instruction", "input", "output"}` lines of JSONL, or the rows of a hub dataset of either kind,
each checked with the chat template's rules.

A bad record is reported by its line number and skipped, so one typo does not lose a dataset;
`prepare chat` fails when nothing usable is left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .template import validate_messages
from ..errors import UserError
from ..data.sources import open_hub_dataset
from ..jsontext import parse_json

ALPACA_FIELDS = {"instruction", "input", "output"}


def alpaca_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """An Alpaca record as a user turn (instruction, then input after a blank line) and the answer."""
    for field in ("instruction", "output"):
        if not isinstance(record.get(field), str):
            raise UserError(f"Alpaca field {field!r} must be a string")
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise UserError("Alpaca field 'input' must be a string")
    question = record["instruction"] + ("\n\n" + extra if extra else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]


def record_messages(record: Any) -> list[dict[str, str]]:
    """The validated messages of one record, or a UserError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise UserError(f"a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        messages = validate_messages(record["messages"])
    elif "instruction" in record and "output" in record:
        messages = validate_messages(alpaca_messages(record))
    else:
        raise UserError('a record needs "messages" or Alpaca\'s "instruction" and "output"')
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn, so nothing to train on; add one")
    return messages


def _problem_or_messages(record: Any, where: str) -> tuple[list[dict[str, str]] | None, str | None]:
    try:
        return record_messages(record), None
    except UserError as error:
        return None, f"{where}: {error}"


def jsonl_conversations(path: Path) -> Iterator[tuple[list[dict[str, str]] | None, str | None]]:
    """(messages, None) for each usable line of a JSONL file, (None, 'FILE:LINE: problem') for
    each that is not; blank lines are skipped. Read line by line, so a large file streams."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; check the path") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                # A byte-order mark (Windows editors write one) is no part of the first record.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield None, f"{where}: not UTF-8 text ({error.reason}); save the file as UTF-8"
                continue
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except json.JSONDecodeError as error:
                yield None, f"{where}: invalid JSON ({error.msg} at column {error.colno})"
                continue
            yield _problem_or_messages(record, where)


def parse_chat_records(path: str | Path) -> tuple[list[list[dict[str, str]]], list[str]]:
    """(conversations, problems): every usable conversation of a JSONL file, and one line
    `FILE:LINE: problem` for each record that is not."""
    conversations, problems = [], []
    for messages, problem in jsonl_conversations(Path(path)):
        if messages is None:
            problems.append(problem)
        else:
            conversations.append(messages)
    return conversations, problems


def hub_conversations(
    name: str, *, split: str = "train", config: str | None = None, field: str = "messages",
    data_files: list[str] | None = None, streaming: bool = True,
) -> Iterator[tuple[list[dict[str, str]] | None, str | None]]:
    """The conversations of a `datasets` dataset (a hub name such as HuggingFaceTB/smol-smoltalk,
    or a builder such as "json"/"parquet" with local `data_files`): the column `field` holds a
    list of messages, or the rows are Alpaca records (tatsu-lab/alpaca)."""
    dataset, where = open_hub_dataset(
        name, name=config, data_files=data_files, split=split, streaming=streaming, instead="give local .jsonl files"
    )
    columns = dataset.column_names
    if columns is not None and field not in columns and not ALPACA_FIELDS - {"input"} <= set(columns):
        raise UserError(
            f"the dataset {where} has no column {field!r} of messages and no Alpaca columns "
            f"(its columns: {', '.join(columns)}); name the messages column with --field"
        )
    for row, record in enumerate(dataset):
        yield row_conversation(record, field, f"{where} row {row}")


def row_conversation(record: dict[str, Any], field: str, where: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, None) of a hub dataset's row (messages in its column `field`, or an Alpaca
    record), or (None, 'WHERE: problem')."""
    if field in record:
        record = {"messages": record[field]}
    return _problem_or_messages(record, where)
