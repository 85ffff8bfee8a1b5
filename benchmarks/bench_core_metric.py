"""CORE scoring speed: gpt2lab's packed, batched evaluation against one example per forward pass,
the way nanochat's `core_eval.evaluate_example` scores (every sequence of the example padded into
one batch, logits and cross-entropy at every position, one forward pass per example).

A 124M-shaped GPT-2 with random weights scores a synthetic bundle of CORE-shaped tasks of all
three types (`--write-bundle DIR` keeps it; texts of random words at the lengths of the real
tasks, few-shot counts as in CORE's core.yaml, the long 10-shot passages cropped to the 1,024-token
context as BoolQ's are), both ways, alternately; the medians are reported. Both ways must agree
on every example before timing.

    python benchmarks/bench_core_metric.py                           # 50 per task, 3 rounds
    python benchmarks/bench_core_metric.py --write-bundle /tmp/core-bundle --rounds 1
    gpt2lab eval core --model DIR --bundle /tmp/core-bundle --max-per-task 50   # the command itself
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.eval.core import CoreEvaluation, build_example, crop, is_correct
from gpt2lab.eval.core_bundle import load_bundle
from gpt2lab.kernels import accelerate
from gpt2lab.tokenizer import GPT2Tokenizer

WORDS = (
    "the a man woman person people is are then and while he she they it his her their with on in into of to "
    "water ball camera shows holding begins continues playing running walking talking large small white "
    "kitchen street field room table hands hair paper bowl brush piece pieces side around back down up "
    "again slowly quickly finally several another front behind using make sure your you can should will "
    "step tips remove place cut add mix wash dry paint clean check keep"
).split()

# label, type, shots, delimiter, random baseline (percent), item maker; lengths in words, as in the
# real tasks they stand for.
TASKS = [
    ("hellaswag_zeroshot_like", "multiple_choice", 0, " ", 25.0, lambda w: {
        "query": w(25, 50), "choices": [w(8, 20) for _ in range(4)], "gold": 0}),
    ("arc_easy_like", "multiple_choice", 10, "\nAnswer: ", 25.0, lambda w: {
        "query": "Question: " + w(10, 20), "choices": [w(2, 5) for _ in range(4)], "gold": 1}),
    ("boolq_like", "multiple_choice", 10, "\nAnswer: ", 62.0, lambda w: {
        "query": "Passage: " + w(70, 100) + "\nQuestion: " + w(6, 10) + "?", "choices": ["no", "yes"], "gold": 1}),
    ("winograd_like", "schema", 0, " ", 50.0, lambda w: {
        "context_options": [w(10, 18) for _ in range(2)], "continuation": w(3, 7), "gold": 0}),
    ("lambada_like", "language_modeling", 0, " ", 0.0, lambda w: {"context": w(40, 70), "continuation": w(1, 1)}),
    ("jeopardy_like", "language_modeling", 10, "\nAnswer: ", 0.0, lambda w: {
        "context": "CATEGORY: " + w(1, 3) + "\n" + w(10, 20), "continuation": w(1, 3)}),
]


def write_bundle(folder: Path, items: int, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    (folder / "eval_data").mkdir(parents=True, exist_ok=True)
    yaml = ["icl_tasks:"]
    csv = ["Eval Task,Random baseline"]
    for label, kind, shots, delimiter, baseline, make in TASKS:
        records = []
        for _ in range(items):
            record = make(words)
            if "gold" in record:
                record["gold"] = rng.randrange(len(record.get("choices") or record["context_options"]))
            records.append(record)
        (folder / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        yaml += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                 f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delimiter)}"]
        csv.append(f"{label},{baseline}")
    (folder / "core.yaml").write_text("\n".join(yaml) + "\n")
    (folder / "eval_meta_data.csv").write_text("\n".join(csv) + "\n")
    return folder


def run_gpt2lab(model, bundle, max_per_task: int, batch_size: int) -> list[bool]:
    result = CoreEvaluation(bundle, GPT2Tokenizer(), max_per_task=max_per_task).evaluate(model, batch_size=batch_size)
    return [right for label in result.outcomes for _, _, right in sorted(result.outcomes[label])]


@torch.no_grad()
def run_one_per_forward(model, bundle, max_per_task: int) -> list[bool]:
    """Each example rendered and tokenized, its sequences right-padded (with end-of-text) into one
    batch, logits and cross-entropy at every position: one forward pass per example."""
    tokenizer, block = GPT2Tokenizer(), model.config.block_size
    rights = []
    for number, task in enumerate(bundle.tasks):
        items = bundle.items(task)
        random.Random(1337).shuffle(items)
        items = items[:max_per_task]
        for index in range(len(items)):
            example = build_example(task, number, items, index, tokenizer, task.label)
            sequences, starts, ends = crop(example, block, task.label)
            ids = torch.full((len(sequences), max(map(len, sequences))), tokenizer.eot_token, dtype=torch.long)
            for row, tokens in enumerate(sequences):
                ids[row, : len(tokens)] = torch.tensor(tokens)
            logits, _ = model(ids)
            logits = logits[..., : model.config.vocab_size]
            losses = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten(), reduction="none")
            losses = losses.view(ids.shape)
            predictions = logits.argmax(-1)
            sums = [losses[r, s - 1 : e - 1].double().sum().item() for r, (s, e) in enumerate(zip(starts, ends))]
            counts = [e - s for s, e in zip(starts, ends)]
            all_right = [bool((predictions[r, s - 1 : e - 1] == ids[r, s:e]).all()) for r, (s, e) in
                         enumerate(zip(starts, ends))]
            rights.append(is_correct(example, sums, counts, all_right))
    return rights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-per-task", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass of gpt2lab's path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-bundle", metavar="DIR", help="write the synthetic bundle here and keep it")
    parser.add_argument("--bundle", metavar="DIR", help="score this bundle instead of a synthetic one "
                        "(e.g. tests/fixtures/core_bundle)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.bundle:
        folder = Path(args.bundle)
    else:
        folder = write_bundle(Path(args.write_bundle or tempfile.mkdtemp(prefix="core-bundle-")),
                              items=max(60, args.max_per_task + 10))
    bundle = load_bundle(folder)
    torch.manual_seed(0)
    model = accelerate(GPT(GPTConfig()).eval())  # 124M-shaped, random weights, float32, as `eval core` loads it
    examples = sum(min(len(bundle.items(task)), args.max_per_task) for task in bundle.tasks)
    print(f"{len(bundle.tasks)} tasks, {examples} examples from {folder}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    reference = run_one_per_forward(model, bundle, args.max_per_task)
    assert run_gpt2lab(model, bundle, args.max_per_task, args.batch_size) == reference, "the two ways disagree"
    paths = {
        "one example per forward (nanochat's way)": lambda: run_one_per_forward(model, bundle, args.max_per_task),
        f"gpt2lab ({args.batch_size} examples per forward)":
            lambda: run_gpt2lab(model, bundle, args.max_per_task, args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(args.rounds):
        for name, run in paths.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
        print(f"round {round_index + 1}: " + ", ".join(f"{t[-1]:.1f} s" for t in times.values()), flush=True)
    baseline = statistics.median(next(iter(times.values())))
    results = {}
    for name, measured in times.items():
        median = statistics.median(measured)
        results[name] = {"seconds": measured, "examples_per_s": examples / median, "speedup": baseline / median}
        print(f"{name:<44} {examples / median:7.2f} examples/s   {baseline / median:5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"examples": examples, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
