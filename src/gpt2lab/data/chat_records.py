"""Reading chat training records: OpenAI-style `{"messages": [...]}` lines and Alpaca-style
`{"instruction", "input", "output"}` lines of JSONL, each checked with the chat template's rules.

A bad record is reported by its line number and skipped, so one typo does not lose a dataset;
`prepare chat` fails when nothing usable is left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..chat_template import validate_messages
from ..errors import UserError

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


def parse_chat_records(path: str | Path) -> tuple[list[list[dict[str, str]]], list[str]]:
    """(conversations, problems): every usable conversation of a JSONL file, and one line
    `FILE:LINE: problem` for each record that is not. Blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; check the path") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    conversations, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            conversations.append(record_messages(json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})")
        except UserError as error:
            problems.append(f"{path}:{number}: {error}")
    return conversations, problems
