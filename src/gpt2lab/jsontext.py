"""JSON from users' files: a document Python's parser cannot take is a bad record, never a crash."""

from __future__ import annotations

import json
from typing import Any


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
