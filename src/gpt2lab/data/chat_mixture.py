"""Mixtures for `prepare chat`: several sources of conversations, each read a given number of
times, shuffled together, as nanochat's SFT mixes its tasks (`tasks/common.py`, `TaskMixture`:
every (source, row) pair, a source named k times present k times, in the order of a shuffle with
seed 42; `scripts/chat_sft.py` mixes SmolTalk once, MMLU's auxiliary_train 3 times and GSM8K's
train 4 times).

A source is a .jsonl file of conversations, a hub dataset of them (HuggingFaceTB/smol-smoltalk),
or a benchmark's training split, `task:mmlu`, `task:gsm8k`, `task:arc-easy`, `task:arc-challenge`
(`chat.tasks.training_conversations`: the question the evaluation asks, answered as the
reference answers it). `SOURCE@N` reads it N times: a whole number of epochs, and a fraction a
seeded share of its rows (`@0.5` half of them, `@2.5` every row twice and half once more).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..chat.records import jsonl_conversations, row_conversation
from ..chat.tasks import TRAINING_SPLITS, training_conversations
from ..errors import UserError
from .sources import looks_like_hub_name, open_hub_dataset

MIX_SEED = 42
TASK_PREFIX = "task:"
_WEIGHTED = re.compile(r"(.+)@([0-9]*\.?[0-9]+)")

Conversation = tuple["list[dict[str, str]] | None", "str | None"]


@dataclass
class MixSource:
    spec: str  # as the user gave it
    epochs: float
    rows: int
    read: Callable[[int], Conversation]


def split_weight(spec: str) -> tuple[str, float]:
    """(source, epochs) of `SOURCE@N` (N = 1 without it; a file whose name holds @ is itself)."""
    match = _WEIGHTED.fullmatch(spec)
    if match is None or Path(spec).exists():
        return spec, 1.0
    epochs = float(match.group(2))
    if epochs <= 0:
        raise UserError(f"{spec}: the number after @ is how many times to read the source; give more than 0")
    return match.group(1), epochs


def is_mixture(inputs: list[str]) -> bool:
    """Whether `prepare chat`'s inputs ask for a mixture: a weight, a task, or a hub dataset among others."""
    names = [split_weight(spec)[0] for spec in inputs]
    return (names != list(inputs) or any(name.startswith(TASK_PREFIX) for name in names)
            or len(inputs) > 1 and any(looks_like_hub_name(name) for name in names))


def _listed(conversations: list[Conversation]) -> Callable[[int], Conversation]:
    return lambda row: conversations[row]


def open_source(spec: str, *, split: str, config: str | None, field: str, data_dir: str | Path | None) -> MixSource:
    name, epochs = split_weight(spec)
    if name.startswith(TASK_PREFIX):
        task = name.removeprefix(TASK_PREFIX)
        if task not in TRAINING_SPLITS:
            raise UserError(f"{spec}: unknown task {task!r}; the tasks with a training split are "
                            f"{', '.join(TASK_PREFIX + t for t in TRAINING_SPLITS)}")
        conversations = [(messages, None) for messages in training_conversations(task, data_dir)]
        return MixSource(spec, epochs, len(conversations), _listed(conversations))
    if Path(name).suffix == ".jsonl" or not looks_like_hub_name(name):
        if not Path(name).is_file():
            raise UserError(f"input file {name} does not exist")
        conversations = list(jsonl_conversations(Path(name)))
        return MixSource(spec, epochs, len(conversations), _listed(conversations))
    # Rows are read in the mixture's order: the dataset is downloaded whole (not streamed).
    dataset, where = open_hub_dataset(name, name=config, data_files=None, split=split, streaming=False,
                                      instead="give local .jsonl files")
    return MixSource(spec, epochs, len(dataset), lambda row: row_conversation(dataset[row], field, f"{where} row {row}"))


def mixture_order(sources: list[MixSource], seed: int = MIX_SEED) -> list[tuple[int, int]]:
    """(source, row) pairs: each source's rows as many whole times as its epochs, a seeded share of
    them for the fraction, all shuffled together with `seed`."""
    pairs = []
    for number, source in enumerate(sources):
        whole = int(source.epochs)
        pairs += [(number, row) for _ in range(whole) for row in range(source.rows)]
        share = round((source.epochs - whole) * source.rows)
        if share:
            rows = random.Random(seed + number + 1).sample(range(source.rows), share)
            pairs += [(number, row) for row in sorted(rows)]
    random.Random(seed).shuffle(pairs)
    return pairs


def mixture_conversations(sources: list[MixSource], seed: int = MIX_SEED) -> Iterator[Conversation]:
    for number, row in mixture_order(sources, seed):
        yield sources[number].read(row)
