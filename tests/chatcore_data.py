"""Small files in the hub's layouts and column types of the five ChatCORE datasets, for tests, and
an MMLU-style question set a tiny model can learn: which of four words is the animal.

Layout: DIR/<owner>/<name>/<config>/<split>-00000-of-00001.parquet, as `hf download REPO
--repo-type dataset --local-dir DIR/REPO` leaves them; the columns and types of each dataset's
parquet export (ARC's `choices` a struct of two string lists, MMLU's `answer` an int64 class).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ANIMALS = ["cat", "dog", "fish", "bird", "frog", "lion", "bear", "wolf", "duck", "goat", "horse", "mouse",
           "owl", "fox", "deer", "seal", "tiger", "sheep", "snake", "whale"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "purple", "gray", "gold"]
LETTERS = ("A", "B", "C", "D")

ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
MMLU_SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
HUMANEVAL_SCHEMA = pa.schema([("task_id", pa.string()), ("prompt", pa.string()), ("canonical_solution", pa.string()),
                              ("test", pa.string()), ("entry_point", pa.string())])


def write_parquet(folder: Path, rows: list[dict], schema: pa.Schema, split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def animal_question(rng: random.Random, answer: int | None = None) -> tuple[str, list[str], int]:
    """(question, four choices, index of the right one): one animal among three colours."""
    animal, colors = rng.choice(ANIMALS), rng.sample(COLORS, 3)
    answer = rng.randrange(4) if answer is None else answer
    choices = colors[:answer] + [animal] + colors[answer:]
    return "Which one is an animal?", choices, answer


def animal_split(train: int, held_out: int, seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """Training and held-out questions; no held-out (choices) in training. The held-out answers
    are A, B, C, D in turn, so that answering one letter always scores exactly a quarter."""
    rng = random.Random(seed)
    seen, tests = set(), []
    while len(tests) < held_out:
        item = animal_question(rng, len(tests) % 4)
        if tuple(item[1]) not in seen:
            seen.add(tuple(item[1]))
            tests.append(item)
    items = []
    while len(items) < train:
        item = animal_question(rng)
        if tuple(item[1]) not in seen:
            items.append(item)
    return items, tests


def mmlu_rows(items: list[tuple]) -> list[dict]:
    return [{"question": q, "subject": "animals", "choices": c, "answer": a} for q, c, a in items]


def arc_rows(items: list[tuple], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}_{k}", "question": q, "choices": {"text": c, "label": list(LETTERS[: len(c)])},
             "answerKey": LETTERS[a]} for k, (q, c, a) in enumerate(items)]


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A shop sells 1,200 pens a day. How many pens in 2 days?",
     "answer": "It sells 1,200 * 2 = <<1200*2=2400>>2,400 pens.\n#### 2,400"},
    {"question": "Ann had 10 dollars and spent 2.5. How much is left?",
     "answer": "10 - 2.5 = <<10-2.5=7.5>>7.5\n#### 7.5"},
]

HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "HumanEval/1", "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
     "canonical_solution": "    return sum(xs)\n", "entry_point": "total",
     "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"},
]


def write_chatcore_data(folder: Path, items: list[tuple] | None = None) -> Path:
    """All five datasets' test splits under `folder` (the --data-dir layout); MMLU and both ARCs
    ask animal questions (`items`, or a few drawn here)."""
    items = items if items is not None else animal_split(0, 12, seed=5)[1]
    write_parquet(folder / "allenai/ai2_arc/ARC-Easy", arc_rows(items, "easy"), ARC_SCHEMA)
    write_parquet(folder / "allenai/ai2_arc/ARC-Challenge", arc_rows(items[::-1], "challenge"), ARC_SCHEMA)
    write_parquet(folder / "cais/mmlu/all", mmlu_rows(items), MMLU_SCHEMA)
    write_parquet(folder / "openai/gsm8k/main", GSM8K_ROWS, GSM8K_SCHEMA)
    write_parquet(folder / "openai/openai_humaneval/openai_humaneval", HUMANEVAL_ROWS, HUMANEVAL_SCHEMA)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_mmlu_training(folder: Path, items: list[tuple]) -> Path:
    """MMLU's auxiliary_train split in the hub's layout (`task:mmlu` of `prepare chat`)."""
    return write_parquet(folder / "cais/mmlu/all", mmlu_rows(items), MMLU_SCHEMA, split="auxiliary_train")
