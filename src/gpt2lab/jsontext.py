"""JSON from users' files: a document Python's parser cannot take is a bad record, never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def parse_json(text: str | bytes) -> Any:
    """`json.loads(text)`, with the documents it crashes on (nested 100,000 deep: RecursionError;
    an integer of more than 4,300 digits: ValueError) raised as the JSONDecodeError every caller
    already turns into a message naming the file and line."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", _as_text(text), 0) from None
    except ValueError as error:  # Python's limit on the digits of an integer
        raise json.JSONDecodeError(str(error).split(";")[0], _as_text(text), 0) from None


def _as_text(text: str | bytes) -> str:
    return text if isinstance(text, str) else text.decode("utf-8", "replace")


def jsonl_lines(path: Path, *, what: str, option: str, form: str) -> Iterator[tuple[int, Any, str]]:
    """Each non-blank line of the JSON-lines file `path` as (line number, value, "PATH line N"),
    streamed. A missing or unreadable file, text that is not UTF-8 (a byte-order mark is fine) or a
    line that is not JSON is a UserError naming `what` ("prompts file"), the file or line, the
    `option` that named it and `form`, how a line is written."""
    try:
        handle = path.open(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; check the path given to {option}") from None
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({error.strerror}); check its permissions") from None
    with handle:
        try:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    value = parse_json(text)
                except json.JSONDecodeError as error:
                    raise UserError(f"{where} is not valid JSON ({error.msg}); write each line as {form}") from None
                yield number, value, where
        except UnicodeDecodeError:
            raise UserError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
