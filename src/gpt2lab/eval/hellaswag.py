"""HellaSwag: the data file, its two standard scorings, and batched evaluation of a model.

Both scorings pick, for each example, the ending the model finds most likely after the context:

- ``completion`` (build-nanogpt, llm.c): the context is ``ctx``; each ending is appended with a
  leading space and tokenized on its own. acc takes the ending with the highest summed
  log-likelihood of its tokens, acc_norm the highest mean per token.
- ``harness`` (EleutherAI's lm-evaluation-harness, task ``hellaswag``): the context is
  ``activity_label: ctx_a Ctx_b`` and each ending ``" " + ending``, both cleaned of WikiHow's
  bracket markup; the ending's tokens are those of context + ending past the context's tokens.
  acc takes the highest summed log-likelihood, acc_norm the highest log-likelihood divided by
  the ending's length in characters (the harness's ``len(choice)``, the space not counted).

Evaluation packs each example into one row per scoring: the context once, then every ending's
tokens, each ending attending to the context and to itself only, with positions that restart
after the context. That computes exactly what four separate context + ending sequences would,
with the context's work done once, and the output layer runs only where an ending token is
predicted. Rows of many examples go through the model together, right-padded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..cache import cache_dir, download, file_sha256
from ..inference import masks
from ..errors import UserError
from ..files import write_atomic
from ..runtime import autocast
from ..tokenizer import Tokenizer
from . import ranks

SPLITS = ("val", "train")
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
NUM_ENDINGS = 4
# Rows of the output layer computed at once: bounds the (positions, vocabulary) float32 logits.
HEAD_CHUNK = 1024


# ---- the data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in the file, for messages
    ctx: str
    ctx_a: str
    ctx_b: str
    activity_label: str
    endings: tuple[str, ...]
    label: int


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def cached_file(split: str = "val") -> Path:
    """The HellaSwag file of `split` in the gpt2lab cache, downloaded on first use.

    Its sha256 is recorded beside it at the download and checked on every later use; a cached
    file that no longer matches is downloaded again and must match the record.
    """
    if split not in SPLITS:
        raise UserError(
            f"unknown HellaSwag split {split!r}; use one of {', '.join(SPLITS)} "
            "(the test split's labels are not public)"
        )
    url = URL.format(split=split)
    filename = f"hellaswag/hellaswag_{split}.jsonl"
    sidecar = _sidecar(cache_dir() / filename)
    recorded = None
    if sidecar.is_file():
        recorded = sidecar.read_text().strip() or None
    path = download(
        url,
        filename,
        recorded,
        hint=f"download {url} elsewhere and pass the file with --data-file FILE "
        "(in training: --set eval.hellaswag_file=FILE)",
    )
    if recorded is None:
        digest = file_sha256(path)
        write_atomic(sidecar, lambda p: p.write_text(digest + "\n"))
    return path


def _text_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise UserError(f"{where} has no {name!r} field; every HellaSwag line needs ctx, ctx_a, ctx_b, "
                        "activity_label, endings and label")
    value = record[name]
    if not isinstance(value, str):
        raise UserError(f"{where}: {name!r} should be a string, got {type(value).__name__}")
    return value


def _label(record: dict, where: str) -> int:
    if "label" not in record:
        raise UserError(f"{where} has no 'label' field; HellaSwag evaluation needs the labelled val or train split")
    value = record["label"]
    # Exports of the hub's copy store labels as strings.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < NUM_ENDINGS:
        raise UserError(f"{where}: label {record['label']!r} is not one of 0, 1, 2, 3 (the index of the right ending)")
    return value


def parse_example(text: str, line: int, source: str = "<text>") -> Example:
    """One line of a HellaSwag jsonl file, checked."""
    where = f"{source} line {line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{where} is not valid JSON ({error.msg} at column {error.colno}); fix or remove the line"
        ) from None
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; each line of a HellaSwag file is one example object")
    endings = record.get("endings")
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' should be a list of {NUM_ENDINGS} strings")
    if len(endings) != NUM_ENDINGS:
        raise UserError(f"{where} has {len(endings)} endings; a HellaSwag example has exactly {NUM_ENDINGS}")
    ctx = _text_field(record, "ctx", where)
    if not ctx.strip():
        raise UserError(f"{where}: 'ctx' is empty; there is nothing to continue")
    return Example(
        line=line,
        ctx=ctx,
        ctx_a=_text_field(record, "ctx_a", where),
        ctx_b=_text_field(record, "ctx_b", where),
        activity_label=_text_field(record, "activity_label", where),
        endings=tuple(endings),
        label=_label(record, where),
    )


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag jsonl file (the first `limit` of them), each line checked."""
    path = Path(path)
    examples: list[Example] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if limit is not None and len(examples) >= limit:
                    break
                if text.strip():
                    examples.append(parse_example(text, number, str(path)))
    except FileNotFoundError:
        raise UserError(f"HellaSwag file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a HellaSwag .jsonl file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason}); pass a HellaSwag .jsonl file") from None
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def load_examples(split: str = "val", data_file: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """HellaSwag examples from `data_file`, else from the cached (downloaded once) file of `split`."""
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be positive, got {limit}")
    path = Path(data_file) if data_file else cached_file(split)
    return read_examples(path, limit)


# ---- the two scorings --------------------------------------------------------------------------


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up of HellaSwag text (brackets are WikiHow artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def harness_query(example: Example) -> str:
    return harness_preprocess(example.activity_label + ": " + example.ctx_a + " " + example.ctx_b.capitalize())


def harness_choices(example: Example) -> list[str]:
    return [harness_preprocess(ending) for ending in example.endings]


@dataclass(frozen=True)
class Item:
    """One example under one scoring, in tokens: the context and each ending's tokens."""

    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]


def _encode(tokenizer: Tokenizer, text: str, example: Example) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UserError as error:
        raise UserError(
            f"HellaSwag line {example.line} cannot be written in this model's tokens ({error}); "
            "HellaSwag needs a model trained with GPT-2's tokenizer"
        ) from None


def completion_item(example: Example, tokenizer: Tokenizer) -> Item:
    return Item(
        tuple(_encode(tokenizer, example.ctx, example)),
        tuple(tuple(_encode(tokenizer, " " + ending, example)) for ending in example.endings),
    )


def harness_item(example: Example, tokenizer: Tokenizer) -> Item:
    # The query is stripped, so the harness's move of trailing context spaces into the
    # continuation never applies; its split of the whole text after the context's tokens does.
    query = harness_query(example)
    context = _encode(tokenizer, query, example)
    endings = []
    for choice in harness_choices(example):
        whole = _encode(tokenizer, query + " " + choice, example)
        endings.append(tuple(whole[len(context):]))
    return Item(tuple(context), tuple(endings))


# ---- scoring ------------------------------------------------------------------------------------


@dataclass
class _Row:
    """A packed row: a context, then the inputs of one or more of an item's endings."""

    item: int
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # 0: context, k: the k-th ending in the row
    # (position in the row whose output predicts the token, target token, ending index)
    predictions: list[tuple[int, int, int]] = field(default_factory=list)


def _add_context(row: _Row, context: Sequence[int]) -> None:
    row.tokens.extend(context)
    row.positions.extend(range(len(context)))
    row.groups.extend([0] * len(context))


def _add_ending(row: _Row, context_len: int, ending: int, targets: Sequence[int]) -> None:
    group = max(row.groups) + 1
    start = len(row.tokens)
    inputs = targets[:-1]  # an ending's last token is only ever predicted
    row.tokens.extend(inputs)
    row.positions.extend(range(context_len, context_len + len(inputs)))
    row.groups.extend([group] * len(inputs))
    predictors = [context_len - 1] + list(range(start, start + len(inputs)))
    row.predictions.extend((p, t, ending) for p, t in zip(predictors, targets))


def pack_rows(items: Sequence[Item], block_size: int) -> list[_Row]:
    """One row per item whose every context + ending fits the block; otherwise one row per ending,
    its context cut from the left so that context + ending fits (an ending longer than the block
    keeps its last block-size tokens scored)."""
    rows = []
    for index, item in enumerate(items):
        context = item.context
        if all(len(context) + len(ending) - 1 <= block_size for ending in item.endings):
            row = _Row(index)
            _add_context(row, context)
            for j, ending in enumerate(item.endings):
                _add_ending(row, len(context), j, ending)
            rows.append(row)
            continue
        for j, ending in enumerate(item.endings):
            window = (context + ending)[-(block_size + 1) :]
            scored = min(len(ending), len(window) - 1)
            row = _Row(index)
            _add_context(row, window[:-scored])
            _add_ending(row, len(window) - scored, j, window[-scored:])
            rows.append(row)
    return rows


@torch.no_grad()
def ending_loglikelihoods(
    model,
    items: Sequence[Item],
    *,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-likelihood, number of tokens scored) of every ending of every item, each an
    (items, endings) array; `batch_size` rows go through the model at once."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    config = model.config
    device = next(model.parameters()).device
    sums = np.zeros((len(items), NUM_ENDINGS), dtype=np.float64)
    counts = np.zeros((len(items), NUM_ENDINGS), dtype=np.int64)
    top = max((max(item.context + sum(item.endings, ())) for item in items), default=0)
    if top >= config.vocab_size:
        raise UserError(
            f"the examples hold token id {top}, beyond this model's vocabulary of {config.vocab_size}; "
            "the model was not trained with this tokenizer"
        )
    # Longest first: a batch that does not fit in memory fails at once, not at the end.
    rows = sorted(pack_rows(items, config.block_size), key=lambda row: len(row.tokens), reverse=True)
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    short = ranks.passes_short(len(batches), device)
    dtype = autocast_dtype or torch.float32
    bar = tqdm(total=len(rows), unit="row", desc="hellaswag", disable=None if progress else True, leave=False)
    for batch in batches:
        tokens, positions, mask = masks.grouped_batch(batch, device)
        with autocast(device, dtype):
            hidden = model.hidden_states(tokens, position_ids=positions, attn_mask=mask)
        where = [(r, p, t, row.item, j) for r, row in enumerate(batch) for p, t, j in row.predictions]
        where_t = torch.tensor(where, dtype=torch.long)
        picked = hidden[where_t[:, 0].to(device), where_t[:, 1].to(device)]
        targets = where_t[:, 2].to(device)
        scores = []
        for chunk in range(0, len(where), HEAD_CHUNK):
            with autocast(device, dtype):
                logits = model.logits(picked[chunk : chunk + HEAD_CHUNK])
            # Padded vocabulary rows are never produced: the distribution is over real tokens.
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(logprobs.gather(1, targets[chunk : chunk + HEAD_CHUNK, None]).squeeze(1))
        values = torch.cat(scores).double().cpu().numpy()
        owner = where_t[:, 3].numpy(), where_t[:, 4].numpy()
        np.add.at(sums, owner, values)
        np.add.at(counts, owner, 1)
        bar.update(len(batch))
    bar.close()
    ranks.idle_passes(model, short, device, dtype)
    return sums, counts


# ---- results ------------------------------------------------------------------------------------


def _first_argmax(values: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def _per_char(loglik: Sequence[float], chars: Sequence[int]) -> list[float]:
    # The harness divides by the length with numpy: an empty ending gets -inf and never wins.
    return [ll / n if n else -math.inf for ll, n in zip(loglik, chars)]


@dataclass(frozen=True)
class ExampleScore:
    """The log-likelihoods behind one example's four predictions."""

    index: int  # position in the evaluated list of examples
    label: int
    loglik: tuple[float, ...]  # completion scoring: summed log-likelihood of each ending
    tokens: tuple[int, ...]  # completion scoring: tokens scored per ending
    loglik_harness: tuple[float, ...]
    chars_harness: tuple[int, ...]  # the harness's length of each ending, in characters

    @property
    def pred(self) -> int:
        return _first_argmax(self.loglik)

    @property
    def pred_norm(self) -> int:
        return _first_argmax([ll / n for ll, n in zip(self.loglik, self.tokens)])

    @property
    def pred_harness(self) -> int:
        return _first_argmax(self.loglik_harness)

    @property
    def pred_norm_harness(self) -> int:
        return _first_argmax(_per_char(self.loglik_harness, self.chars_harness))


@dataclass(frozen=True)
class HellaSwagResult:
    """Accuracies over all ranks' examples; `scores` holds this rank's examples only."""

    examples: int
    correct: int
    correct_norm: int
    correct_harness: int
    correct_norm_harness: int
    scores: tuple[ExampleScore, ...] = ()

    def _fraction(self, count: int) -> float:
        return count / self.examples if self.examples else float("nan")

    @property
    def acc(self) -> float:
        return self._fraction(self.correct)

    @property
    def acc_norm(self) -> float:
        return self._fraction(self.correct_norm)

    @property
    def acc_harness(self) -> float:
        return self._fraction(self.correct_harness)

    @property
    def acc_norm_harness(self) -> float:
        return self._fraction(self.correct_norm_harness)

    def metrics(self) -> dict[str, float | int]:
        """The measures under their metrics.jsonl names."""
        return {
            "hellaswag_acc": self.acc,
            "hellaswag_acc_norm": self.acc_norm,
            "hellaswag_acc_harness": self.acc_harness,
            "hellaswag_acc_norm_harness": self.acc_norm_harness,
            "hellaswag_examples": self.examples,
        }


class HellaSwag:
    """Examples tokenized once under both scorings, to be scored on any model, as often as needed."""

    def __init__(self, examples: Iterable[Example], tokenizer: Tokenizer):
        self.examples = list(examples)
        if not self.examples:
            raise UserError("no HellaSwag examples to evaluate")
        self.completion = [completion_item(e, tokenizer) for e in self.examples]
        self.harness = [harness_item(e, tokenizer) for e in self.examples]
        self.harness_chars = [tuple(len(c) for c in harness_choices(e)) for e in self.examples]

    def evaluate(
        self,
        model,
        *,
        batch_size: int = 32,
        autocast_dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> HellaSwagResult:
        """Score the examples `rank`, `rank + world_size`, ... and add up every rank's counts
        when torch.distributed is initialized. `batch_size` counts rows: one row holds one
        example under one scoring, so an example takes two."""
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, {world_size}), got {rank}")
        mine = list(range(rank, len(self.examples), world_size))
        items = [self.completion[i] for i in mine] + [self.harness[i] for i in mine]
        with ranks.scoring(model):
            sums, counts = ending_loglikelihoods(
                model, items, batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress and rank == 0
            )
        n = len(mine)
        scores = tuple(
            ExampleScore(
                index=i,
                label=self.examples[i].label,
                loglik=tuple(sums[k].tolist()),
                tokens=tuple(counts[k].tolist()),
                loglik_harness=tuple(sums[n + k].tolist()),
                chars_harness=self.harness_chars[i],
            )
            for k, i in enumerate(mine)
        )
        totals = [
            n,
            sum(s.pred == s.label for s in scores),
            sum(s.pred_norm == s.label for s in scores),
            sum(s.pred_harness == s.label for s in scores),
            sum(s.pred_norm_harness == s.label for s in scores),
        ]
        totals = ranks.summed_counts(totals, next(model.parameters()).device)
        return HellaSwagResult(*totals, scores=scores)
