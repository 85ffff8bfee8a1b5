"""The `eval` verb: `eval hellaswag`, `eval loss` and `eval chat`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .options import MODEL_HELP, add_device_options, non_negative_int, positive_int
from ..errors import UserError
from ..files import write_atomic
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

examples:
  gpt2lab eval hellaswag --model gpt2
  gpt2lab eval loss --model runs/gpt2-124m --data data/fineweb-edu
  gpt2lab eval chat --model runs/sft --data heldout.jsonl""",
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
    _add_chat_task(tasks)


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


def cmd_loss(args: argparse.Namespace) -> int:
    from ..data.dataset import open_dataset
    from ..tokenizer import load_tokenizer
    from ..eval.loss import evaluate_loss

    dataset = open_dataset(args.data)
    folder, model, device, precision = _load(args)
    model_tokens = load_tokenizer(folder).spec()
    if model_tokens != dataset.tokenizer_spec:
        raise UserError(
            f"the data in {args.data} was tokenized with a different tokenizer than the model's; "
            "prepare the data with the model's tokenizer (GPT-2 models: `gpt2lab prepare` of a BPE source)"
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
