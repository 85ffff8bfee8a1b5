"""A synthetic instruction set for chat tests and the SFT acceptance benchmark.

Five kinds of task, each answered by copying or recalling words of the conversation, so that a
small model can learn them and a held-out prompt is a new combination of known words:
reversing words, picking the first or last word, repeating, and two multi-turn recalls where the
answer is in an earlier turn. `split_tasks` keeps every held-out prompt out of the training set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANIMALS = ["cat", "dog", "fish", "bird", "frog", "lion", "bear", "wolf", "duck", "goat", "horse", "mouse",
           "owl", "fox", "deer", "seal"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "purple", "gray", "gold"]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Oscar", "Peggy"]
SYSTEM = "You are a helpful assistant."


def _turns(*pairs: str) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(pairs)]


def _reverse(rng: random.Random) -> list[dict[str, str]]:
    words = rng.sample(ANIMALS, 3)
    return _turns(f"Reverse the words: {' '.join(words)}", " ".join(reversed(words)))


def _first_or_last(rng: random.Random) -> list[dict[str, str]]:
    words = rng.sample(ANIMALS, 4)
    which = rng.choice(["first", "last"])
    return _turns(f"What is the {which} word: {' '.join(words)}", words[0] if which == "first" else words[-1])


def _repeat(rng: random.Random) -> list[dict[str, str]]:
    words = rng.sample(COLORS, 2)
    return _turns(f"Repeat after me: {' '.join(words)}", " ".join(words))


def _recall_color(rng: random.Random) -> list[dict[str, str]]:
    name, color = rng.choice(NAMES), rng.choice(COLORS)
    return _turns(
        f"My name is {name} and my favorite color is {color}.", f"Nice to meet you, {name}.",
        "What is my favorite color?", color,
    )


def _recall_pet(rng: random.Random) -> list[dict[str, str]]:
    animal, name = rng.choice(ANIMALS), rng.choice(NAMES)
    return _turns(
        f"I have a {animal} named {name}.", f"What a nice {animal}!",
        f"What is the name of my {animal}?", name,
    )


TASKS = (_reverse, _first_or_last, _repeat, _recall_color, _recall_pet)


def conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = rng.choice(TASKS)(rng)
    return ([{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []) + messages


def _prompt_key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages[:-1])


def split_tasks(train: int, held_out: int, seed: int = 0) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training conversations, held-out conversations); no held-out prompt (everything but
    the final answer) appears in training."""
    rng = random.Random(seed)
    tests, seen = [], set()
    while len(tests) < held_out:
        messages = conversation(rng)
        if _prompt_key(messages) not in seen:
            seen.add(_prompt_key(messages))
            tests.append(messages)
    training = []
    while len(training) < train:
        messages = conversation(rng)
        if _prompt_key(messages) not in seen:
            training.append(messages)
    return training, tests


def write_jsonl(path: Path, conversations: list[list[dict]], *, with_answers: bool = False) -> Path:
    """Conversations as `{"messages": [...]}` lines; with_answers: the last turn is moved to
    "answer" (the exact-match file of `gpt2lab eval chat`)."""
    with open(path, "w", encoding="utf-8") as out:
        for messages in conversations:
            record = {"messages": messages[:-1], "answer": messages[-1]["content"]} if with_answers else {"messages": messages}
            out.write(json.dumps(record) + "\n")
    return path
