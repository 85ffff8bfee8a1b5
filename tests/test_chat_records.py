import json

import pytest

from gpt2lab.chat.records import parse_chat_records
from gpt2lab.errors import UserError


def write(tmp_path, lines):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_openai_and_alpaca_records_are_read(tmp_path):
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}]}
    path = write(tmp_path, [json.dumps(chat), "", json.dumps({"instruction": "Do", "input": "this", "output": "Done"}),
                            json.dumps({"instruction": "Say hi", "output": "hi"})])
    conversations, problems = parse_chat_records(path)
    assert problems == []
    assert conversations == [
        chat["messages"],
        [{"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "Done"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]


def test_bad_records_are_reported_by_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
    path = write(tmp_path, [
        good,
        json.dumps({"messages": [{"role": "user", "content": "Q"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "A"}]}),
        "{not json",
        json.dumps({"instruction": "Do", "output": 5}),
        json.dumps([1, 2]),
        json.dumps({"text": "x"}),
    ])
    conversations, problems = parse_chat_records(path)
    assert len(conversations) == 1
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in range(2, 9)]
    assert "no assistant turn" in problems[0]
    assert "role 'robot'" in problems[1]
    assert "content of type int" in problems[2]
    assert "invalid JSON" in problems[3]
    assert "'output' must be a string" in problems[4]
    assert "JSON object, not list" in problems[5]
    assert 'needs "messages"' in problems[6]


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        parse_chat_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "latin1.jsonl"
    # A line that is not UTF-8 is one bad record, named by its line, not the loss of the file.
    bad.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n{"instruction": "ok", "output": "y"}\n')
    conversations, problems = parse_chat_records(bad)
    assert len(conversations) == 1 and len(problems) == 1
    assert problems[0].startswith(f"{bad}:1: not UTF-8")
