"""`gpt2lab prepare chat`: conversations into a chat dataset folder.

Each conversation is rendered by the chat template (`chat_template.ChatTemplate`) to its ids and
loss mask. A split is a sequence of shards in llm.c's layout (each conversation starts with
end-of-text, so every shard also reads as plain BOS-aligned pretraining data), each with a mask
file beside it: `{split}_{index:06d}.mask.npy`, one uint8 per token, 1 where the token is
trained on. A conversation never crosses a shard. Every `val_every`-th usable conversation goes
to the validation split (a spread sample, not the head of a sorted dataset).

Progress is recorded after each write of shards, at a point where no conversation waits in
memory, so running the same command again continues after the last recorded record.
"""

from __future__ import annotations

import hashlib
import itertools
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..chat.template import ChatTemplate
from ..errors import UserError
from ..files import write_atomic
from ..tokenizer import Tokenizer
from . import sources
from ..chat.records import hub_conversations, jsonl_conversations
from .chat_mixture import MIX_SEED, is_mixture, mixture_conversations, open_source
from .prepare import _new_meta, _save_meta, _start, _summary, _tokenizer_recipe, document_tokenizer, shard_dtype, shard_name
from .shards import write_shard

DEFAULT_CONTEXT = 1024
DEFAULT_CHAT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_EVERY = 20
SHOWN_PROBLEMS = 20

Conversations = Iterator[tuple["list[dict[str, str]] | None", "str | None"]]


def mask_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.mask.npy"


def write_mask(path: Path, mask: np.ndarray) -> str:
    """Write a uint8 mask as .npy, atomically; return the file's sha256."""

    def write(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(mask, dtype=np.uint8), allow_pickle=False)

    write_atomic(path, write)
    digest = hashlib.sha256(path.read_bytes())
    return digest.hexdigest()


def fit_to_context(template: ChatTemplate, messages: list[dict[str, str]], context: int) -> tuple[list[int], list[int], bool] | None:
    """(ids, mask, truncated): the conversation, or its longest prefix of whole turns that ends
    with an assistant turn and fits in `context` tokens; None when not even the first answer fits."""
    ids, mask = template.render(messages)
    if len(ids) <= context:
        return ids, mask, False
    role_ids = set(template.role_tokens.values())
    # Message k starts at the k-th role token; a prefix of k messages is ids[:starts[k]].
    starts = [i for i, token in enumerate(ids) if token in role_ids] + [len(ids)]
    for count in range(len(messages) - 1, 0, -1):
        if messages[count - 1]["role"] == "assistant" and starts[count] <= context:
            return ids[: starts[count]], mask[: starts[count]], True
    return None


class _ChatShardWriter:
    """Conversations of both splits held until the training split has a shard's worth; then both
    are written, and the progress with them, so that nothing recorded waits in memory."""

    def __init__(self, folder: Path, meta: dict[str, Any], shard_tokens: int):
        self.folder, self.meta, self.shard_tokens = folder, meta, shard_tokens
        self.pending: dict[str, tuple[list[list[int]], list[list[int]]]] = {"train": ([], []), "val": ([], [])}
        self.progress = meta["progress"]

    def add(self, split: str, ids: list[int], mask: list[int]) -> None:
        tokens, masks = self.pending[split]
        tokens.append(ids)
        masks.append(mask)
        self.progress["conversations"][split] += 1
        if sum(map(len, self.pending["train"][0])) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        for split, (tokens, masks) in self.pending.items():
            if tokens:
                self._write(split, np.concatenate(tokens), np.concatenate(masks), len(tokens))
                tokens.clear()
                masks.clear()
        _save_meta(self.folder, self.meta)

    def _write(self, split: str, tokens: np.ndarray, mask: np.ndarray, conversations: int) -> None:
        entry = self.meta["splits"][split]
        index = len(entry["shards"])
        name, masks = shard_name(split, index), mask_name(split, index)
        digest = write_shard(self.folder / name, tokens, shard_dtype(self.meta))
        mask_digest = write_mask(self.folder / masks, mask)
        entry["shards"].append({
            "file": name, "tokens": int(len(tokens)), "sha256": digest,
            "mask": masks, "mask_sha256": mask_digest, "conversations": conversations,
        })
        entry["tokens"] += int(len(tokens))


def _input_conversations(
    inputs: list[str], *, split: str, config: str | None, field: str, streaming: bool, log: Callable[[str], Any],
    data_dir: str | Path | None = None,
) -> tuple[dict[str, Any], Callable[[], Conversations], str]:
    """(recipe, a reader of the (messages, problem) stream, a description for messages)."""
    if not inputs:
        raise UserError("prepare chat needs .jsonl files, globs of them, or one hub dataset name")
    if is_mixture(inputs):
        mix = [open_source(spec, split=split, config=config, field=field, data_dir=data_dir)
               for spec in inputs]
        recipe = {"mixture": [[source.spec, source.rows] for source in mix], "seed": MIX_SEED,
                  "split": split, "config": config, "field": field}
        log("mixture: " + ", ".join(f"{s.spec} ({s.rows:,} conversations x {s.epochs:g})" for s in mix))
        return recipe, lambda: mixture_conversations(mix), "the mixture of " + ", ".join(inputs)
    if len(inputs) == 1 and sources.looks_like_hub_name(inputs[0]):
        name = inputs[0]
        recipe = {"dataset": name, "config": config, "split": split, "field": field}
        return recipe, lambda: hub_conversations(name, split=split, config=config, field=field, streaming=streaming), name
    paths = sources.expand_inputs(inputs, suffixes=(".jsonl",), log=log)
    recipe = {"inputs": [[str(path), path.stat().st_size] for path in paths]}
    description = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return recipe, lambda: itertools.chain.from_iterable(jsonl_conversations(path) for path in paths), description


def _check_chat_options(context: int, shard_tokens: int, val_every: int, max_conversations: int | None) -> None:
    if not isinstance(context, int) or context < 4:
        raise UserError(f"--context must be at least 4 tokens, got {context!r}")
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be a positive integer, got {shard_tokens!r}")
    if not isinstance(val_every, int) or val_every < 0 or val_every == 1:
        raise UserError(
            f"--val-every must be 0 (no validation split) or 2 or more (one conversation in N), got {val_every!r}"
        )
    if max_conversations is not None and max_conversations <= 0:
        raise UserError(f"--max-conversations must be positive, got {max_conversations!r}")


def prepare_chat(
    inputs: list[str],
    out: str | Path,
    *,
    split: str = "train",
    config: str | None = None,
    field: str = "messages",
    context: int = DEFAULT_CONTEXT,
    shard_tokens: int = DEFAULT_CHAT_SHARD_TOKENS,
    val_every: int = DEFAULT_VAL_EVERY,
    max_conversations: int | None = None,
    streaming: bool = True,
    tokenizer: str | Path | Tokenizer | None = None,
    data_dir: str | Path | None = None,
    command: str | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = lambda message: print(message, file=sys.stderr),
) -> dict[str, Any]:
    """Prepare the conversations of `inputs` (JSONL files, one hub dataset, or a mixture:
    `data.chat_mixture`) into `out`; return its `dataset.json` contents. Options as `gpt2lab
    prepare chat --help` describes them; `tokenizer` as for `prepare` (GPT-2's BPE by default);
    `data_dir` holds the benchmarks' files for `task:` sources."""
    _check_chat_options(context, shard_tokens, val_every, max_conversations)
    template = ChatTemplate(document_tokenizer(tokenizer))
    folder = Path(out)
    source_recipe, read, description = _input_conversations(
        inputs, split=split, config=config, field=field, streaming=streaming, log=log, data_dir=data_dir
    )
    recipe = {"source": "chat", **source_recipe, **_tokenizer_recipe(template.tokenizer), "context": context,
              "shard_tokens": shard_tokens, "val_every": val_every, "max_conversations": max_conversations}
    command = command or shlex.join(["gpt2lab", "prepare", "chat", *inputs, "--out", str(folder)])
    meta = _start(folder, recipe)
    if meta is not None and meta["complete"]:
        log(f"{folder} is already prepared; nothing to do")
        return meta
    if meta is None:
        meta = _new_meta("chat", recipe, template.tokenizer, command)
        meta.update(kind="chat", chat={"format": template.name, "context": context})
        meta["progress"] = {"records": 0, "usable": 0, "bad": 0, "truncated": 0, "dropped": 0,
                            "conversations": {"train": 0, "val": 0}}
        _save_meta(folder, meta)
    elif meta["progress"]["records"]:
        log(f"resuming after {meta['progress']['records']:,} records")
    writer = _ChatShardWriter(folder, meta, shard_tokens)
    _write_conversations(writer, template, read(), context, val_every, max_conversations, progress, log)
    writer.flush()
    return _finish(folder, meta, description, log)


def _write_conversations(
    writer: _ChatShardWriter, template: ChatTemplate, stream: Conversations, context: int,
    val_every: int, max_conversations: int | None, progress: bool, log,
) -> None:
    from tqdm import tqdm

    counts = writer.progress
    stream = itertools.islice(stream, counts["records"], None)
    with tqdm(initial=counts["records"], unit="conv", disable=None if progress else True, leave=False) as bar:
        for messages, problem in stream:
            if max_conversations is not None and counts["usable"] >= max_conversations:
                break
            # Counted before it is handled: a record is consumed once its outcome is in `counts`,
            # and counts are saved only together with the shards holding what it gave.
            counts["records"] += 1
            bar.update(1)
            if messages is None:
                counts["bad"] += 1
                if counts["bad"] <= SHOWN_PROBLEMS:
                    log(f"skipped {problem}")
                continue
            fitted = fit_to_context(template, messages, context)
            if fitted is None:
                counts["dropped"] += 1
                continue
            ids, mask, truncated = fitted
            counts["truncated"] += truncated
            to_val = val_every and counts["usable"] % val_every == val_every - 1
            counts["usable"] += 1
            writer.add("val" if to_val else "train", ids, mask)


def _finish(folder: Path, meta: dict[str, Any], description: str, log) -> dict[str, Any]:
    counts = meta.pop("progress")
    if counts["usable"] == 0:
        meta["progress"] = counts
        raise UserError(
            f"nothing usable in {description}: {counts['records']:,} records, {counts['bad']:,} bad, "
            f"{counts['dropped']:,} longer than the context even at their first answer; fix the records "
            "(the lines above name them) or raise --context"
        )
    meta["chat"].update(
        conversations=counts["conversations"], bad_records=counts["bad"], truncated=counts["truncated"],
        dropped=counts["dropped"], records=counts["records"],
    )
    meta["complete"] = True
    _save_meta(folder, meta)
    chat = meta["chat"]
    log(_summary(folder, meta))
    log(
        f"conversations: {chat['conversations']['train']:,} train, {chat['conversations']['val']:,} val, of "
        f"{chat['records']:,} records; {chat['bad_records']:,} bad records skipped"
        f"{' (the first ' + str(SHOWN_PROBLEMS) + ' are named above)' if chat['bad_records'] > SHOWN_PROBLEMS else ''}, "
        f"{chat['truncated']:,} truncated at a turn boundary to fit {chat['context']:,} tokens, "
        f"{chat['dropped']:,} dropped (even their first answer does not fit)"
    )
    return meta
