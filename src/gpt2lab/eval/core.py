"""The CORE metric of the DCLM paper (arXiv 2406.11794), computed as nanochat computes it
(`nanochat/core_eval.py`, `scripts/base_eval.py`), so that a score here sits on nanochat's
"time to GPT-2" scale.

Each task's items are shuffled with `random.Random(1337)` and cut to `max_per_task`; item i
gets `num_fewshot` examples drawn with `random.Random(1234 + i)` from the other items of that
cut list. Its prompts are rendered as the reference's templates render them (few-shot
examples, each ending in a blank line, then the item; a language-modelling context stripped),
tokenized with end-of-text prepended, and cropped from the left to the model's context:

- multiple_choice: one prompt per choice; the continuation is what follows the prompts'
  common prefix of tokens; right when the gold choice has the lowest mean loss.
- schema: one prompt per context option; the continuation is the common suffix of tokens;
  right when the gold option has the lowest mean loss.
- language_modeling: right when the greedy prediction equals every continuation token.

A tie, or a mean over no tokens (NaN), is settled as Python's `min` and `list.index` settle it
in the reference. A task's centered accuracy is (acc - rb) / (1 - rb) for its random baseline
rb; CORE is the mean over the tasks.

Scoring packs an example's sequences into one row: their common prefix once, then each
sequence's remaining inputs, each seeing the prefix and itself (positions restarting after the
prefix), so every sequence is computed as if alone, the shared few-shot text once; the output
layer runs only where a continuation token is predicted. Rows of many examples, of all tasks,
go through the model together.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..inference import masks
from ..errors import UserError
from ..runtime import autocast
from ..tokenizer import Tokenizer
from .core_bundle import Bundle, Item, TaskSpec
from . import ranks

FEWSHOT_SEED = 1234
SHUFFLE_SEED = 1337
# Rows of the output layer computed at once: bounds the (positions, vocabulary) float32 logits.
HEAD_CHUNK = 1024
# Items whose prompts are rendered and tokenized at once.
PROMPTS_AT_ONCE = 512
# Published CORE of OpenAI's GPT-2 checkpoints, as nanochat measured them over the full bundle:
# 124M from the table in nanochat's dev/estimate_gpt3_core.ipynb (four decimals there), 1.5B
# (gpt2-xl) from its README and dev/LEADERBOARD.md, the "time to GPT-2" bar.
GPT2_CORE = {"GPT-2 124M": 0.1139, "GPT-2 1.5B": 0.256525}


# ---- prompts ------------------------------------------------------------------------------------


def fewshot_indices(count: int, index: int, shots: int) -> list[int]:
    if shots == 0:
        return []
    return random.Random(FEWSHOT_SEED + index).sample([i for i in range(count) if i != index], shots)


def render_prompts(task: TaskSpec, item: Item, shots: Sequence[Item]) -> list[str]:
    """The prompts of one item: one per choice (multiple_choice) or context option (schema); for
    language_modeling the prompt without its continuation and the prompt with it."""
    d, f = task.delimiter, item.fields
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{s.fields['query']}{d}{s.fields['choices'][s.fields['gold']]}\n\n" for s in shots)
        return [f"{prefix}{f['query']}{d}{choice}" for choice in f["choices"]]
    if task.task_type == "schema":
        prefix = "".join(f"{s.fields['context_options'][s.fields['gold']]}{d}{s.fields['continuation']}\n\n"
                         for s in shots)
        return [f"{prefix}{option}{d}{f['continuation']}" for option in f["context_options"]]
    prefix = "".join(f"{s.fields['context'].strip()}{d}{s.fields['continuation']}\n\n" for s in shots)
    without = f"{prefix}{f['context'].strip()}{d}"
    # Stripped, so that trailing spaces are not left to merge into the continuation's first token.
    return [without.strip(), without + f["continuation"]]


def common_length(sequences: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """The length of the common prefix (or suffix) of `sequences`."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        at = -1 - i if from_end else i
        if any(s[at] != sequences[0][at] for s in sequences):
            return i
    return shortest


@dataclass(frozen=True)
class Example:
    """One item in tokens: its sequences (kept as their common prefix and what follows it in each,
    int32, so that a whole bundle of 10-shot prompts fits in memory) and, for each, the span
    [start, end) scored."""

    task: int  # index of the task in the evaluation
    index: int  # position in the task's shuffled, cut list
    line: int
    prefix: np.ndarray
    rests: tuple[np.ndarray, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    gold: int | None  # None: language modelling

    @property
    def sequences(self) -> list[list[int]]:
        head = self.prefix.tolist()
        return [head + rest.tolist() for rest in self.rests]

    def row_length(self, block_size: int) -> int:
        """About the length of its packed row (for ordering rows by length)."""
        return min(len(self.prefix), block_size) + sum(len(rest) for rest in self.rests)


def _spans(task: TaskSpec, tokens: list[list[int]], where: str, line: int):
    """(sequences, starts, ends) as the reference finds the continuations in the tokens."""
    if task.task_type == "multiple_choice":
        start = common_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task.task_type == "schema":
        suffix = common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, whole = tokens
    if len(without) >= len(whole) or whole[: len(without)] != without:
        raise UserError(
            f"{where} line {line}: the prompt without its continuation is not a prefix, in tokens, of the prompt "
            "with it (or the continuation is empty), so its continuation cannot be scored; fix the item"
        )
    return [whole], [len(without)], [len(whole)]


def build_examples(task: TaskSpec, task_number: int, items: Sequence[Item], indices: Sequence[int],
                   tokenizer: Tokenizer, where: str) -> list[Example]:
    """The examples of `items[i]` for i in `indices`, their prompts tokenized together."""
    prompts = []
    for index in indices:
        shots = [items[i] for i in fewshot_indices(len(items), index, task.num_fewshot)]
        prompts.append(render_prompts(task, items[index], shots))
    flat = [p for group in prompts for p in group]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(flat) if encode_batch else [tokenizer.encode(p) for p in flat]
    examples, at = [], 0
    for index, group in zip(indices, prompts):
        tokens = [[tokenizer.eot_token, *ids] for ids in encoded[at : at + len(group)]]
        at += len(group)
        item = items[index]
        sequences, starts, ends = _spans(task, tokens, where, item.line)
        shared = common_length(sequences)
        prefix = np.asarray(sequences[0][:shared], dtype=np.int32)
        rests = tuple(np.asarray(s[shared:], dtype=np.int32) for s in sequences)
        examples.append(Example(task_number, index, item.line, prefix, rests, tuple(starts), tuple(ends),
                                item.fields.get("gold")))
    return examples


def build_example(task: TaskSpec, task_number: int, items: Sequence[Item], index: int, tokenizer: Tokenizer,
                  where: str) -> Example:
    return build_examples(task, task_number, items, [index], tokenizer, where)[0]


def check_fits(example: Example, block_size: int, where: str) -> None:
    """Refuse an example whose continuation and one token before it do not fit the context (the
    reference's crop would leave nothing, or nonsense, to score)."""
    for rest, start, end in zip(example.rests, example.starts, example.ends):
        cut = max(0, len(example.prefix) + len(rest) - block_size)
        if start - cut < 1:
            raise UserError(
                f"{where} line {example.line}: its continuation ({end - start} tokens) and one token before it do "
                f"not fit this model's context of {block_size} tokens; use a model with a longer context "
                "(or leave the task out with --tasks)"
            )


def crop(example: Example, block_size: int, where: str) -> tuple[list[list[int]], list[int], list[int]]:
    """The example's sequences cut from the left to `block_size` tokens, spans moved with them."""
    check_fits(example, block_size, where)
    sequences, starts, ends = [], [], []
    for tokens, start, end in zip(example.sequences, example.starts, example.ends):
        cut = max(0, len(tokens) - block_size)
        sequences.append(tokens[cut:])
        starts.append(start - cut)
        ends.append(end - cut)
    return sequences, starts, ends


# ---- packed rows --------------------------------------------------------------------------------


@dataclass
class _Row:
    example: int  # index in the list being scored
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # 0: the shared prefix, k: the k-th sequence
    # (position in the row whose output predicts the token, target token, sequence index)
    predictions: list[tuple[int, int, int]] = field(default_factory=list)


def pack_row(number: int, sequences: Sequence[Sequence[int]], starts: Sequence[int], ends: Sequence[int]) -> _Row:
    """One row computing what each sequence alone would: the prefix all sequences' inputs share,
    then the rest of each sequence's inputs (a sequence's last token is only predicted)."""
    inputs = [s[: e - 1] for s, e in zip(sequences, ends)]
    shared = common_length(inputs)
    row = _Row(number, list(inputs[0][:shared]), list(range(shared)), [0] * shared)
    for k, (tokens, start, end) in enumerate(zip(sequences, starts, ends)):
        offset = len(row.tokens)
        rest = inputs[k][shared:]
        row.tokens.extend(rest)
        row.positions.extend(range(shared, shared + len(rest)))
        row.groups.extend([k + 1] * len(rest))
        for p in range(start - 1, end - 1):
            row.predictions.append((p if p < shared else offset + p - shared, tokens[p + 1], k))
    return row


@torch.no_grad()
def score_rows(model, make_row: Callable[[int], _Row], lengths: Sequence[int], sequences_per_row: Sequence[int], *,
               batch_size: int, autocast_dtype: torch.dtype | None, progress: bool
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each row `make_row(i)` (i < len(lengths); built when its batch comes, so that only a
    batch of rows is ever in memory), per sequence: (summed loss in nats, tokens scored, whether
    every greedy prediction was right); `batch_size` rows per forward pass."""
    device = next(model.parameters()).device
    sums = [np.zeros(n) for n in sequences_per_row]
    counts = [np.zeros(n, dtype=np.int64) for n in sequences_per_row]
    wrong = [np.zeros(n, dtype=np.int64) for n in sequences_per_row]
    # Rows of one sequence (language modelling) apart from packed ones: a batch of them needs no
    # mask and takes attention's causal path. Longest first: a batch that does not fit in memory
    # fails at once, not at the end.
    order = sorted(range(len(lengths)), key=lambda r: (sequences_per_row[r] > 1, -lengths[r]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    short = ranks.passes_short(len(batches), device)
    dtype = autocast_dtype or torch.float32
    bar = tqdm(total=len(lengths), unit="example", desc="core", disable=None if progress else True, leave=False)
    for batch in batches:
        rows = {r: make_row(r) for r in batch}
        tokens, positions, mask = masks.grouped_batch(list(rows.values()), device)
        if all(max(row.groups) == 0 for row in rows.values()):
            positions = mask = None  # right padding is never seen by a causal query before it
        with autocast(device, dtype):
            hidden = model.hidden_states(tokens, position_ids=positions, attn_mask=mask)
        where = torch.tensor([(b, p, t, r, k) for b, r in enumerate(batch) for p, t, k in rows[r].predictions],
                             dtype=torch.long)
        picked = hidden[where[:, 0].to(device), where[:, 1].to(device)]
        targets = where[:, 2].to(device)
        losses, hits = [], []
        for chunk in range(0, len(where), HEAD_CHUNK):
            with autocast(device, dtype):
                logits = model.logits(picked[chunk : chunk + HEAD_CHUNK])
            aimed = targets[chunk : chunk + HEAD_CHUNK]
            losses.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, aimed[:, None]).squeeze(1))
            hits.append(logits.argmax(dim=-1) == aimed)
        loss_values = torch.cat(losses).double().cpu().numpy()
        hit_values = torch.cat(hits).cpu().numpy()
        for (_, _, _, r, k), loss, hit in zip(where.tolist(), loss_values, hit_values):
            sums[r][k] += loss
            counts[r][k] += 1
            wrong[r][k] += not hit
        bar.update(len(batch))
    bar.close()
    ranks.idle_passes(model, short, device, dtype)
    return [(s, c, w == 0) for s, c, w in zip(sums, counts, wrong)]


def is_correct(example: Example, sums: np.ndarray, counts: np.ndarray, all_right: np.ndarray) -> bool:
    if example.gold is None:
        return bool(all_right[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = [float(s / c) if c else math.nan for s, c in zip(sums, counts)]
    # Python's min then list.index, as the reference picks: the first of equal means wins, and a
    # NaN in front is never replaced.
    best = 0
    for k in range(1, len(means)):
        if means[k] < means[best]:
            best = k
    return best == example.gold


# ---- the evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    accuracy: float
    centered: float
    examples: int


@dataclass(frozen=True)
class CoreResult:
    """Accuracies over all ranks' examples; `outcomes` holds this rank's: for each task label,
    (index in the task's shuffled list, file line, right) of each example scored here."""

    tasks: dict[str, TaskResult]
    outcomes: dict[str, list[tuple[int, int, bool]]]

    @property
    def core(self) -> float:
        return sum(t.centered for t in self.tasks.values()) / len(self.tasks)

    @property
    def examples(self) -> int:
        return sum(t.examples for t in self.tasks.values())

    def metrics(self) -> dict[str, float | int]:
        """The measures under their metrics.jsonl names: `core`, each task's centered accuracy as
        `core_<label>`, and `core_examples`."""
        return {"core": self.core, **{f"core_{label}": t.centered for label, t in self.tasks.items()},
                "core_examples": self.examples}

    def to_json(self) -> dict:
        return {"core": self.core, "tasks": {label: {"accuracy": t.accuracy, "centered": t.centered,
                                                     "examples": t.examples} for label, t in self.tasks.items()}}


CHARACTER_MODEL = (
    "CORE needs a tokenizer with an end-of-text token to start every prompt, and its tasks hold text far "
    "beyond a character vocabulary; this is a character-level model, which CORE does not support. Use "
    "`gpt2lab eval bpb` (bits per byte), which compares it with models of any tokenizer"
)


class CoreEvaluation:
    """A bundle's tasks read, cut and tokenized once, to be scored on any model as often as needed."""

    def __init__(self, bundle: Bundle, tokenizer: Tokenizer, labels: list[str] | None = None,
                 max_per_task: int | None = None):
        if tokenizer.eot_token is None:
            raise UserError(CHARACTER_MODEL)
        if max_per_task is not None and max_per_task <= 0:
            raise UserError(f"max_per_task must be positive (or None for every item), got {max_per_task}")
        self.bundle = bundle
        self.tasks = bundle.select(labels)
        self.examples: list[list[Example]] = []
        for number, task in enumerate(self.tasks):
            items = bundle.items(task)
            random.Random(SHUFFLE_SEED).shuffle(items)
            items = items[:max_per_task] if max_per_task else items
            if task.num_fewshot > len(items) - 1:
                raise UserError(
                    f"task {task.label!r} draws {task.num_fewshot} few-shot examples from the other items, but "
                    f"{len(items)} items are scored; raise --max-per-task above {task.num_fewshot}"
                )
            where = str(bundle.folder / "eval_data" / task.dataset_uri)
            examples = []
            # In pieces: the rendered prompts of a whole task are far larger than its tokens.
            for start in range(0, len(items), PROMPTS_AT_ONCE):
                indices = range(start, min(start + PROMPTS_AT_ONCE, len(items)))
                examples += build_examples(task, number, items, indices, tokenizer, where)
            self.examples.append(examples)

    def _row(self, number: int, example: Example, block_size: int, vocab_size: int) -> _Row:
        task = self.tasks[example.task]
        sequences, starts, ends = crop(example, block_size, str(self.bundle.folder / "eval_data" / task.dataset_uri))
        top = max(max(s) for s in sequences)
        if top >= vocab_size:
            raise UserError(f"task {task.label!r} holds token id {top}, beyond this model's vocabulary of "
                            f"{vocab_size}; the model was not trained with this tokenizer")
        return pack_row(number, sequences, starts, ends)

    def evaluate(self, model, *, batch_size: int = 16, autocast_dtype: torch.dtype | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = False) -> CoreResult:
        """Score each task's examples rank, rank + world_size, ... and add up every rank's counts
        when torch.distributed is initialized; `batch_size` examples go through the model at once."""
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, {world_size}), got {rank}")
        mine = [e for examples in self.examples for e in examples[rank::world_size]]
        config = model.config
        for example in mine:  # before any scoring
            check_fits(example, config.block_size, str(self.bundle.folder / "eval_data" / self.tasks[example.task].dataset_uri))
        with ranks.scoring(model):
            scores = score_rows(
                model, lambda i: self._row(i, mine[i], config.block_size, config.vocab_size),
                [e.row_length(config.block_size) for e in mine], [len(e.rests) for e in mine],
                batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress and rank == 0,
            )
        outcomes: dict[str, list[tuple[int, int, bool]]] = {task.label: [] for task in self.tasks}
        counts = np.zeros((len(self.tasks), 2), dtype=np.int64)
        for example, score in zip(mine, scores):
            right = is_correct(example, *score)
            outcomes[self.tasks[example.task].label].append((example.index, example.line, right))
            counts[example.task] += (right, 1)
        summed = ranks.summed_counts(counts.ravel().tolist(), next(model.parameters()).device)
        results = {}
        for task, (right, total) in zip(self.tasks, np.reshape(summed, (-1, 2)).tolist()):
            accuracy = right / total
            baseline = 0.01 * task.random_baseline
            results[task.label] = TaskResult(accuracy, (accuracy - baseline) / (1.0 - baseline), total)
        return CoreResult(results, outcomes)
