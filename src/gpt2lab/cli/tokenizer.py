"""The `tokenizer` verb: `tokenizer train` (a byte-level BPE of your corpus) and `tokenizer eval`
(bytes per token against GPT-2's BPE)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..errors import UserError
from .options import whole_count

TRAIN_DESCRIPTION = """Train a byte-level BPE on your corpus with the `tokenizers` library and write it as a
folder that both gpt2lab and transformers read.

The input is read as `gpt2lab prepare text` reads it: .txt files (one document each), .jsonl
(text in --field), .parquet (text in --column), globs of them, or one dataset name on the
Hugging Face hub (--config, --split, --column), streamed, at most --max-chars characters.
Text is cut into pieces by GPT-2's or GPT-4's pre-tokenization pattern (--pattern) and each
piece into bytes, so every byte is a token and any text round-trips exactly.

Ids: 0 is <|endoftext|>, 1-4 the chat format's <|system|>, <|user|>, <|assistant|>, <|end|>
(so `prepare chat --tokenizer DIR` and `gpt2lab chat` work with it), then the --special
tokens, then the 256 bytes, then one token per merge up to --vocab-size. Text that looks
like a special token is text: only the chat template writes those ids.

DIR holds tokenizer.json, tokenizer_config.json and special_tokens_map.json, which
transformers' AutoTokenizer.from_pretrained(DIR) loads with the ids gpt2lab gives, and
gpt2lab-tokenizer.json, gpt2lab's record (written last). `prepare` encodes with tiktoken
where tiktoken's encoding of the merges gives the ids of `tokenizers` on the first 4M
characters of the training text (checked here, recorded), else with `tokenizers` on every core.

Use it with `gpt2lab prepare text|shakespeare|fineweb-edu|chat ... --tokenizer DIR`: the
datasets, and every model trained on them, record it."""

TRAIN_EPILOG = """examples:
  gpt2lab tokenizer train 'books/*.txt' --vocab-size 32768 --out tok/books-32k
  gpt2lab tokenizer train corpus.jsonl --field body --vocab-size 8192 --pattern gpt2 --out tok/mine
  gpt2lab tokenizer train HuggingFaceFW/fineweb-edu --config sample-10BT --max-chars 2B \\
      --vocab-size 65536 --out tok/edu-64k
  gpt2lab tokenizer train code/*.txt --vocab-size 16384 --special '<|fim_prefix|>' --out tok/code"""

EVAL_DESCRIPTION = """Bytes per token of tokenizers on texts: GPT-2's BPE, then each folder given (a folder of
`gpt2lab tokenizer train`, or a dataset or model folder that records its tokenizer), with
each one's ratio to GPT-2's. More bytes per token is a shorter sequence for the same text.

--data names the texts (.txt, .jsonl, .parquet files or globs, one row each); without it,
the last 10% of the Tiny Shakespeare that ships with gpt2lab (held out by a tokenizer
trained on its first 90%)."""

EVAL_EPILOG = """examples:
  gpt2lab tokenizer eval tok/books-32k
  gpt2lab tokenizer eval tok/books-32k tok/books-8k --data 'heldout/*.txt'"""


def _char_count(text: str) -> int:
    return whole_count(text, "characters")


def _vocab_size(text: str) -> int:
    return whole_count(text, "tokens")


def add_tokenizer_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> argparse.ArgumentParser:
    """The `tokenizer` verb and its two tasks, added to the CLI's subparsers."""
    from ..data.sources import REPLACE_FLAG
    from ..data.tokenizer_train import DEFAULT_PATTERN
    from ..tokenizer import PATTERNS

    parser = verbs.add_parser(
        "tokenizer", help=summary, description="Train a BPE on your corpus, or compare tokenizers. "
        "Run `gpt2lab tokenizer TASK --help` for the manual of each task.",
    )
    parser.set_defaults(handler=lambda args: _missing_task(parser))
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    train = tasks.add_parser(
        "train", help="train a byte-level BPE on files or a hub dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
    )
    train.add_argument("inputs", nargs="+", metavar="INPUT", help="files or globs (.txt, .jsonl, .parquet), or one hub dataset name")
    train.add_argument("--vocab-size", type=_vocab_size, required=True, metavar="N",
                       help="tokens in all: the special ones, the 256 bytes and the merges")
    train.add_argument("--out", required=True, metavar="DIR", help="the tokenizer folder to write (new or empty)")
    train.add_argument("--max-chars", type=_char_count, metavar="N", help="read at most N characters (e.g. 2B)")
    train.add_argument("--pattern", choices=list(PATTERNS), default=DEFAULT_PATTERN,
                       help=f"pre-tokenization: GPT-2's or GPT-4's (cl100k) split of text into pieces (default {DEFAULT_PATTERN})")
    train.add_argument("--special", action="extend", nargs="+", default=[], metavar="TOKEN",
                       help="more special tokens, after the reserved ones (e.g. '<|fim_prefix|>')")
    train.add_argument("--field", default="text", help=".jsonl files: the field that holds the text (default text)")
    train.add_argument("--column", default="text", help=".parquet files and hub datasets: the text column (default text)")
    train.add_argument("--config", help="hub dataset: its configuration name")
    train.add_argument("--split", default="train", help="hub dataset: the split to read (default train)")
    train.add_argument("--download", action="store_true", help="hub dataset: download it whole first instead of streaming")
    train.add_argument(REPLACE_FLAG, dest="replace_invalid_utf8", action="store_true",
                       help="read bytes that are not UTF-8 as U+FFFD instead of stopping at the first")
    train.add_argument("--force", action="store_true", help="replace the tokenizer an --out folder already holds")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    train.set_defaults(handler=cmd_train)

    evaluate = tasks.add_parser(
        "eval", help="bytes per token against GPT-2's BPE",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
    )
    evaluate.add_argument("folders", nargs="+", metavar="DIR", help="tokenizer folders (or dataset or model folders)")
    evaluate.add_argument("--data", nargs="+", metavar="FILE", help="texts to measure (default: Tiny Shakespeare's last 10%%)")
    evaluate.add_argument("--field", default="text", help=".jsonl files: the field that holds the text (default text)")
    evaluate.add_argument("--column", default="text", help=".parquet files: the text column (default text)")
    evaluate.add_argument(REPLACE_FLAG, dest="replace_invalid_utf8", action="store_true",
                          help="read bytes that are not UTF-8 as U+FFFD instead of stopping at the first")
    evaluate.add_argument("--json", action="store_true", help="print the results as one JSON object")
    evaluate.set_defaults(handler=cmd_eval)
    return parser


def _missing_task(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    raise UserError("name a task: train or eval")


def cmd_train(args: argparse.Namespace) -> int:
    from ..data.tokenizer_train import train_tokenizer

    train_tokenizer(
        args.inputs, args.out, vocab_size=args.vocab_size, pattern=args.pattern, special=args.special,
        max_chars=args.max_chars, config=args.config, split=args.split, field=args.field, column=args.column,
        streaming=not args.download, invalid_utf8="replace" if args.replace_invalid_utf8 else "strict",
        force=args.force, command=shlex.join(["gpt2lab", *args.argv]), progress=not args.quiet,
        log=(lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr)),
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data.tokenizer_train import compare_tokenizers

    names, rows = compare_tokenizers(
        args.folders, args.data, field=args.field, column=args.column,
        invalid_utf8="replace" if args.replace_invalid_utf8 else "strict",
    )
    if args.json:
        texts = [{"text": row.name, "bytes": row.bytes, "tokens": dict(zip(names, row.tokens)),
                  "bytes_per_token": dict(zip(names, row.bytes_per_token()))} for row in rows]
        print(json.dumps({"tokenizers": names, "texts": texts}, indent=2))
        return 0
    width = max(12, *(len(name) for name in names))
    label = max(len("text"), *(len(row.name) for row in rows))
    print(f"{'text':<{label}}  {'bytes':>11}  " + "  ".join(f"{name:>{width + 8}}" for name in names))
    for row in rows:
        ratios = row.bytes_per_token()
        cells = [f"{ratio:>{width}.3f} ({ratio / ratios[0]:.2f}x)" for ratio in ratios]
        print(f"{row.name:<{label}}  {row.bytes:>11,}  " + "  ".join(cells))
    print("bytes per token (and the ratio to GPT-2's): higher is fewer tokens for the same text")
    return 0
