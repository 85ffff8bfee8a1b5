"""The one prompt rule of every entry point."""

from __future__ import annotations

import pytest

from gpt2lab import UserError
from gpt2lab.inference.prompts import checked_prompt, empty_prompt_start
from gpt2lab.tokenizer import GPT2Tokenizer, CharTokenizer


def test_ids_inside_the_vocabulary_pass_as_a_list():
    assert checked_prompt((1, 2, 3), 4) == [1, 2, 3]


@pytest.mark.parametrize("bad", [4, -1, True, 2.0, "a"])
def test_ids_outside_the_vocabulary_name_the_prompt_and_the_fix(bad):
    with pytest.raises(UserError, match=rf"prompt 3 has token id {bad!r}, outside the vocabulary \[0, 4\); encode"):
        checked_prompt([1, bad], 4, name="prompt 3")


def test_an_empty_prompt_starts_from_the_start_tokens_or_is_refused():
    assert checked_prompt([], 10, [7]) == [7]
    with pytest.raises(UserError, match="the prompt is empty"):
        checked_prompt([], 10)


def test_empty_prompts_start_from_end_of_text_or_a_newline():
    assert empty_prompt_start(GPT2Tokenizer()) == [50256]
    char = CharTokenizer.from_text("ab\n")
    assert empty_prompt_start(char) == char.encode("\n")
    assert empty_prompt_start(CharTokenizer.from_text("ab")) is None
