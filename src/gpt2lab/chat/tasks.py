"""The five chat benchmarks of nanochat's ChatCORE: their data, how an answer is judged, and their
training splits as conversations (for `prepare chat` mixtures, as nanochat's SFT mixes them).

ARC-Easy and ARC-Challenge (allenai/ai2_arc), MMLU (cais/mmlu, config "all"), GSM8K
(openai/gsm8k, config "main") and HumanEval (openai/openai_humaneval), each its test split, read
through `datasets` from the hub into the gpt2lab cache, or from a folder holding the same files
(`DIR/<owner>/<name>/<config>/<split>-*.parquet`, or `.jsonl`). Rows are taken in the order
`datasets`' `shuffle(seed=42)` gives them, as nanochat's tasks take them, so that
`--max-per-task N` scores the same N items.

An example's id is ARC's `id`, HumanEval's `task_id`, and for MMLU and GSM8K, which have none,
the row's number in its split (from 0). What the model is asked, and how its answer is judged:

- ARC, MMLU: the question and its lettered choices as one user turn (nanochat's
  `render_mc`: each choice followed by `=` and its letter, then "Respond only with the letter
  of the correct answer."); the answer is a letter.
- GSM8K: the question; right when the last number of the answer equals the number after
  `####` in the reference solution, commas removed.
- HumanEval: the prompt (a signature and docstring); the answer's code (its first fenced
  block, or all of it) is appended to the prompt, then the task's tests and `check(ENTRY)`,
  and run in `gpt2lab.sandbox`: right when it runs to the end.

Training conversations (`training_conversations`): ARC's and MMLU's questions answered with the
letter (MMLU's `auxiliary_train` split, ARC's `train`), GSM8K's `train` questions answered with
the reference solution, its `<<expression=result>>` calculator notes left out (nanochat turns
them into tool calls; gpt2lab's chat format has none). HumanEval has no training split.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import cache_dir
from ..data.sources import open_hub_dataset
from ..errors import UserError

TASK_NAMES = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")
SHUFFLE_SEED = 42
MMLU_LETTERS = ("A", "B", "C", "D")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_REFERENCE = re.compile(r"####\s*(-?[\d.,]+)")
_FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_CALCULATOR = re.compile(r"<<[^>]*>>")
TRAINING_SPLITS = {"arc-easy": "train", "arc-challenge": "train", "mmlu": "auxiliary_train", "gsm8k": "train"}


@dataclass(frozen=True)
class TaskSource:
    name: str
    repo: str
    config: str
    split: str
    categorical: bool
    baseline: float  # the accuracy of answering at random, for the centered accuracy
    fields: tuple[str, ...]


SOURCES = {
    "arc-easy": TaskSource("arc-easy", "allenai/ai2_arc", "ARC-Easy", "test", True, 0.25,
                           ("id", "question", "choices", "answerKey")),
    "arc-challenge": TaskSource("arc-challenge", "allenai/ai2_arc", "ARC-Challenge", "test", True, 0.25,
                                ("id", "question", "choices", "answerKey")),
    "mmlu": TaskSource("mmlu", "cais/mmlu", "all", "test", True, 0.25, ("question", "subject", "choices", "answer")),
    "gsm8k": TaskSource("gsm8k", "openai/gsm8k", "main", "test", False, 0.0, ("question", "answer")),
    "humaneval": TaskSource("humaneval", "openai/openai_humaneval", "openai_humaneval", "test", False, 0.0,
                            ("task_id", "prompt", "canonical_solution", "test", "entry_point")),
}


@dataclass(frozen=True)
class Example:
    task: str
    id: str
    where: str  # "FILE row N" or "DATASET row N", for messages
    prompt: str  # the user turn
    answer: str  # the right letter, GSM8K's reference number, "" for HumanEval
    letters: tuple[str, ...] = ()  # the choices' letters, for ARC and MMLU
    tests: str = ""  # HumanEval: the tests and the check of the entry point, appended to the program
    solution: str = ""  # the reference answer as the assistant would write it (training conversations)


def parse_task_names(text: str | None) -> list[str]:
    """The tasks `--tasks` names (all five without it), or a UserError naming the unknown one."""
    if text is None:
        return list(TASK_NAMES)
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--tasks names no task; give some of {','.join(TASK_NAMES)}, or leave it out for all")
    for name in names:
        if name not in SOURCES:
            raise UserError(f"unknown task {name!r} in --tasks; the tasks are {', '.join(TASK_NAMES)}")
    return list(dict.fromkeys(names))


def multiple_choice_prompt(question: str, letters: tuple[str, ...], choices: list[str]) -> str:
    """The user turn of a multiple-choice question, as nanochat's `render_mc` writes it: the letter
    after its choice, no space after `=` (so that the letter is the same token as the answer)."""
    listed = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{listed}\nRespond only with the letter of the correct answer."


# ---- the data -----------------------------------------------------------------------------------


def _local_files(source: TaskSource, data_dir: Path) -> tuple[list[str], str]:
    folder = data_dir / source.repo / source.config
    for pattern, builder in ((f"{source.split}-*.parquet", "parquet"), (f"{source.split}*.jsonl", "json")):
        files = sorted(str(path) for path in folder.glob(pattern))
        if files:
            return files, builder
    raise UserError(
        f"{folder} holds no {source.split}-*.parquet (or {source.split}*.jsonl) file of {source.repo}; download "
        f"them with `hf download {source.repo} --repo-type dataset --local-dir {data_dir / source.repo}` on a "
        "machine online and copy the folder over"
    )


def _open_rows(source: TaskSource, data_dir: Path | None) -> tuple[Any, str]:
    """(the split as a `datasets` Dataset, how messages name it)."""
    where_else = (f"download {source.repo} with `hf download {source.repo} --repo-type dataset --local-dir "
                  f"DIR/{source.repo}` on a machine online and pass --data-dir DIR")
    cache = str(cache_dir() / "datasets")
    if data_dir is None:
        return open_hub_dataset(source.repo, name=source.config, data_files=None, split=source.split,
                                streaming=False, instead=where_else, cache_dir=cache)
    files, builder = _local_files(source, data_dir)
    dataset, _ = open_hub_dataset(builder, name=None, data_files=files, split="train", streaming=False,
                                  instead="check the files", cache_dir=cache)
    return dataset, files[0] if len(files) == 1 else f"{Path(files[0]).parent}/{source.split}-*"


def _field(row: dict, name: str, kind: type, where: str) -> Any:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where} has no {name!r}; a row of this task needs {name!r}")
    if not isinstance(value, kind):
        raise UserError(f"{where}: {name!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _arc(row: dict, where: str) -> Example:
    choices = _field(row, "choices", dict, where)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
        raise UserError(f"{where}: 'choices' should hold lists 'text' and 'label' of the same length")
    answer = _field(row, "answerKey", str, where)
    if answer not in labels:
        raise UserError(f"{where}: answerKey {answer!r} is not one of the choices' labels {labels}")
    question = _field(row, "question", str, where)
    return Example("", _field(row, "id", str, where), where, multiple_choice_prompt(question, tuple(labels), texts),
                   answer, tuple(labels), solution=answer)


def _mmlu(row: dict, where: str, number: int) -> Example:
    choices = _field(row, "choices", list, where)
    answer = _field(row, "answer", int, where)
    if len(choices) != len(MMLU_LETTERS) or not 0 <= answer < len(MMLU_LETTERS):
        raise UserError(f"{where}: an MMLU row has 4 choices and an answer from 0 to 3, got {len(choices)} and {answer}")
    prompt = multiple_choice_prompt(_field(row, "question", str, where), MMLU_LETTERS, choices)
    return Example("", str(number), where, prompt, MMLU_LETTERS[answer], MMLU_LETTERS, solution=MMLU_LETTERS[answer])


def _gsm8k(row: dict, where: str, number: int) -> Example:
    solution = _field(row, "answer", str, where)
    reference = reference_number(solution)
    if reference is None:
        raise UserError(f"{where}: the answer has no '#### NUMBER' line, which GSM8K's reference solutions end with")
    return Example("", str(number), where, _field(row, "question", str, where), reference,
                   solution=_CALCULATOR.sub("", solution))


def _humaneval(row: dict, where: str) -> Example:
    entry = _field(row, "entry_point", str, where)
    tests = f"\n\n{_field(row, 'test', str, where)}\n\ncheck({entry})\n"
    prompt = _field(row, "prompt", str, where)
    return Example("", _field(row, "task_id", str, where), where, prompt, "", tests=tests,
                   solution=prompt + _field(row, "canonical_solution", str, where))


def _example(name: str, row: dict, where: str, number: int) -> Example:
    if name in ("arc-easy", "arc-challenge"):
        example = _arc(row, where)
    elif name == "mmlu":
        example = _mmlu(row, where, number)
    elif name == "gsm8k":
        example = _gsm8k(row, where, number)
    else:
        example = _humaneval(row, where)
    return dataclasses.replace(example, task=name)


def shuffled_order(count: int) -> np.ndarray:
    """The row order of `datasets`' `Dataset.shuffle(seed=42)`, nanochat's order."""
    return np.random.default_rng(SHUFFLE_SEED).permutation(count)


def load_task(name: str, data_dir: str | Path | None = None, max_per_task: int | None = None,
              shuffle: bool = True, split: str | None = None) -> list[Example]:
    """The examples of a task's test split (or `split`) in nanochat's order (the file's with
    `shuffle=False`), the first `max_per_task` of them; every row used is checked."""
    source = SOURCES[name] if split is None else dataclasses.replace(SOURCES[name], split=split)
    dataset, where = _open_rows(source, Path(data_dir) if data_dir is not None else None)
    missing = [f for f in source.fields if f not in (dataset.column_names or [])]
    if missing:
        raise UserError(f"{where} has no column {missing[0]!r} (its columns: {', '.join(dataset.column_names)}); "
                        f"{source.repo}'s {source.config} rows have {', '.join(source.fields)}")
    order = shuffled_order(len(dataset)) if shuffle else np.arange(len(dataset))
    if max_per_task is not None:
        order = order[:max_per_task]
    label = "line" if where.endswith(".jsonl") else "row"
    # A jsonl file's row n is its line n + 1 when it has no blank lines.
    return [_example(name, dataset[int(i)], f"{where} {label} {int(i) + (label == 'line')}", int(i)) for i in order]


# ---- judging an answer ---------------------------------------------------------------------------


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def reference_number(solution: str) -> str | None:
    match = _REFERENCE.search(solution)
    return match.group(1).replace(",", "").rstrip(".") if match else None


def last_number(answer: str) -> str | None:
    numbers = _NUMBER.findall(answer)
    return numbers[-1].replace(",", "") if numbers else None


def gsm8k_right(answer: str, reference: str) -> bool:
    """Whether the answer's last number equals the reference (as numbers: 18.00 is 18)."""
    found = last_number(answer)
    return found is not None and _number(found) is not None and _number(found) == _number(reference)


def code_of(answer: str) -> str:
    """The program in an answer: its first fenced code block, else all of it."""
    match = _FENCED.search(answer)
    return match.group(1) if match else answer


def humaneval_program(example: Example, answer: str) -> str:
    """The prompt, the answer's code after it (a body continues the prompt's function, a whole
    definition replaces it), then the tests."""
    return example.prompt + code_of(answer) + example.tests


def letter_right(answer: str, example: Example) -> bool:
    return answer.strip() == example.answer


def training_conversations(name: str, data_dir: str | Path | None = None) -> list[list[dict[str, str]]]:
    """A task's training split as conversations, in the file's order: the user turn the
    evaluation asks and the reference answer."""
    if name not in TRAINING_SPLITS:
        trainable = ", ".join(TRAINING_SPLITS)
        raise UserError(f"task {name!r} has no training split to prepare; the tasks with one are {trainable}")
    examples = load_task(name, data_dir, shuffle=False, split=TRAINING_SPLITS[name])
    return [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.solution}] for e in examples]
