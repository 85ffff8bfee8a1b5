"""The `prepare` verb: its parser and the runner that calls `prepare`."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from ..errors import UserError
from ..data import sources
from ..data.chat_prepare import DEFAULT_CONTEXT, DEFAULT_VAL_EVERY, prepare_chat
from ..data.prepare import DEFAULT_SHARD_TOKENS, SOURCES, prepare
from .options import whole_count

CHAT_SOURCE = "chat"
VERB_SOURCES = (*SOURCES, CHAT_SOURCE)

SHAKESPEARE_SOURCES = ("shakespeare-char", "shakespeare")

PREPARE_DESCRIPTION = """Tokenize a corpus into a dataset folder: shards named {split}_{index:06d}.bin in
llm.c's format (a 256 x int32 header: magic 20240520, version 1, token count; then uint16
tokens), which llm.c and modded-nanogpt read as they are, and dataset.json with the
tokenizer, vocabulary size, token counts, each shard's size and sha256, and this command.

sources:
  shakespeare-char  Tiny Shakespeare, one token per character (a 65-character vocabulary),
                    first 90% of the text train, the rest validation (nanoGPT's split)
  shakespeare       Tiny Shakespeare in GPT-2 tokens, the same 90/10 split
                    (both: one stream with no end-of-text token, as nanoGPT prepares it, so
                    val losses compare with nanoGPT's; llm.c's own shards put one before each
                    section. For a loader that aligns windows to end-of-text, such as
                    modded-nanogpt's, use `text` on a .jsonl of one section per line)
  fineweb-edu       FineWeb-EDU sample-10BT (--sample for the larger ones) from the Hugging
                    Face hub, or local parquet files of its schema (--data-files)
  text              your own files (.txt: one document per file; .jsonl: one per line, text
                    in --field; .parquet: text in --column), globs of them, or one dataset
                    name on the hub (with --config, --split, --column); GPT-2 tokens, or with
                    --char one token per character (the vocabulary is the text's characters,
                    the documents are joined each ending in a newline, the last --val-tokens
                    characters validate, default the last 10%, as shakespeare-char does)
  chat              conversations for instruction fine-tuning (--preset sft): .jsonl files of
                    OpenAI-style {"messages": [{"role", "content"}, ...]} lines or Alpaca
                    records {"instruction", "input", "output"}, or one hub dataset of either
                    kind (HuggingFaceTB/smol-smoltalk, tatsu-lab/alpaca; --split, --config,
                    --field names the messages column, default messages). Each conversation is
                    rendered by the chat template (docs/chat.md) with its loss mask, which
                    goes beside each shard as {split}_{index:06d}.mask.npy (1 = trained on:
                    the assistant's turns). Every --val-every-th conversation (default 20th)
                    is validation. One longer than --context tokens (default 1024) is cut
                    after its last answer that fits, or dropped if none does; a bad record
                    (invalid JSON, unknown role, non-string content, no assistant turn) is
                    named with its line and skipped; the run fails if nothing is usable.
                    Shards end on conversation boundaries; re-running continues after the
                    last complete write.
                    Mixtures, as nanochat's SFT mixes its data: several sources, each
                    SOURCE@N read N times (a fraction: a seeded share of its rows), all
                    shuffled together with seed 42. A source is a .jsonl file, a hub dataset,
                    or a benchmark's training split: task:mmlu (MMLU's auxiliary_train),
                    task:gsm8k, task:arc-easy, task:arc-challenge, asked as `eval chatcore`
                    asks them and answered with the reference (from the hub, or --data-dir).

Tiny Shakespeare (1.1 MB, public domain) ships with gpt2lab: by default the shakespeare
sources read that copy, checked against its sha256, and need no network. --input FILE reads
your own copy instead; --download fetches it once from karpathy/char-rnn on GitHub into the
gpt2lab cache ($GPT2LAB_CACHE, else the user cache folder), checked against the same sha256.

For fineweb-edu and text, every document becomes an end-of-text token followed by its GPT-2
tokens (or those of --tokenizer DIR, a BPE of `gpt2lab tokenizer train`), tokenized on all
cores; empty documents are skipped. The first --val-tokens tokens
of this stream are the validation split, the rest the training split, each cut into shards
of --shard-tokens. dataset.json records progress after each shard, so running the same
command again after an interruption continues after the last complete shard, and on a
finished folder does nothing. Shards are written under a temporary name and renamed when
complete."""

PREPARE_EPILOG = """examples:
  gpt2lab prepare shakespeare-char --out data/shakespeare-char
  gpt2lab prepare shakespeare --out data/shakespeare --input ./tinyshakespeare.txt
  gpt2lab prepare shakespeare --out data/shakespeare --download
  gpt2lab prepare fineweb-edu --out data/edu-fineweb-10B
  gpt2lab prepare fineweb-edu --out data/edu-sample --max-tokens 50M --shard-tokens 10M
  gpt2lab prepare fineweb-edu --out data/edu-local --data-files 'fineweb/*.parquet'
  gpt2lab prepare text 'books/*.txt' notes.jsonl --out data/mine --field body
  gpt2lab prepare text mycode.txt --char --out data/mycode-char
  gpt2lab prepare text lucadiliello/bookcorpusopen --split train --column text --out data/books
  gpt2lab prepare chat conversations.jsonl more/*.jsonl --out data/chat
  gpt2lab prepare chat HuggingFaceTB/smol-smoltalk --out data/smoltalk --context 2048
  gpt2lab prepare chat tatsu-lab/alpaca --out data/alpaca --val-every 50
  gpt2lab prepare text 'books/*.txt' --tokenizer tok/books-32k --out data/books-32k
  gpt2lab prepare chat HuggingFaceTB/smol-smoltalk task:mmlu@3 task:gsm8k@4 --out data/sft-mix  # nanochat's SFT

Token counts accept suffixes: 100M, 10k, 1B. The folder works as the data of training and as
a tokenizer name (its dataset.json records the tokenizer)."""


def _token_count(text: str) -> int:
    """A positive token count; accepts 100M, 10k, 1e8 and 100_000_000."""
    return whole_count(text, "tokens")


def _conversation_count(text: str) -> int:
    """A positive number of conversations (suffixes as for tokens: 10k)."""
    try:
        return _token_count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of conversations, 1 or more") from None


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("give 1 or more processes")
    return value


# (flag, argparse destination) of each option, in the order the recorded command lists them.
_OPTIONS = (
    ("--input", "input_file"),
    ("--sample", "sample"),
    ("--data-files", "data_files"),
    ("--config", "config"),
    ("--split", "split"),
    ("--field", "field"),
    ("--column", "column"),
    ("--download", "download"),
    ("--char", "char"),
    ("--tokenizer", "tokenizer"),
    ("--replace-invalid-utf8", "replace_invalid_utf8"),
    ("--shard-tokens", "shard_tokens"),
    ("--val-tokens", "val_tokens"),
    ("--max-tokens", "max_tokens"),
    ("--context", "context"),
    ("--val-every", "val_every"),
    ("--max-conversations", "max_conversations"),
    ("--data-dir", "data_dir"),
)


def add_prepare_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> argparse.ArgumentParser:
    """The `prepare` verb, added to the CLI's subparsers."""
    parser = verbs.add_parser(
        "prepare",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=PREPARE_DESCRIPTION,
        epilog=PREPARE_EPILOG,
    )
    parser.add_argument("source", nargs="?", choices=VERB_SOURCES, help="what to prepare (see above)")
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT",
        help="text source: files or globs (.txt, .jsonl, .parquet), or one hub dataset name; chat: .jsonl files "
        "or globs, or one hub dataset name",
    )
    parser.add_argument("--out", required=True, help="dataset folder to write (created if needed)")
    parser.add_argument(
        "--input", dest="input_file", metavar="FILE", help="shakespeare sources: a local copy of Tiny Shakespeare instead of the one that ships with gpt2lab"
    )
    parser.add_argument(
        "--sample", default="10BT", choices=list(sources.FINEWEB_EDU_SAMPLES), help="fineweb-edu: which sample (default 10BT)"
    )
    parser.add_argument(
        "--data-files", nargs="+", metavar="FILE", help="fineweb-edu: local parquet files or globs with a 'text' column, instead of the hub"
    )
    parser.add_argument("--config", help="text source, hub dataset: its configuration name")
    parser.add_argument("--split", default="train", help="text source, hub dataset: the split to read (default train)")
    parser.add_argument(
        "--field", help=".jsonl files: the field that holds the text (default text); chat, hub dataset: the column "
        "of messages (default messages)"
    )
    parser.add_argument(
        "--column", default="text", help=".parquet files and hub datasets: the column that holds the text (default text)"
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="shakespeare sources: fetch Tiny Shakespeare from its public address into the gpt2lab cache instead of "
        "using the copy that ships with gpt2lab; hub datasets: download the whole dataset into the Hugging Face "
        "cache first, instead of streaming it",
    )
    parser.add_argument(
        "--char", action="store_true",
        help="text source: one token per character instead of GPT-2's BPE (a character-level model of your own text)",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR",
        help="shakespeare, fineweb-edu, text and chat: the BPE to tokenize with instead of GPT-2's: a folder of "
        "`gpt2lab tokenizer train` (or a dataset or model folder made with one); shards hold uint16 ids while its "
        "vocabulary fits, else uint32 (llm.c's Llama 3 layout: magic 20240801, version 7)",
    )
    parser.add_argument(
        sources.REPLACE_FLAG, dest="replace_invalid_utf8", action="store_true",
        help="text source: read bytes that are not UTF-8 as U+FFFD instead of stopping at the first (which names "
        "the file and byte offset)",
    )
    _add_size_and_chat_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(handler=cmd_prepare, option_defaults={dest: parser.get_default(dest) for _, dest in _OPTIONS})
    return parser


def _add_size_and_chat_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-tokens", type=_token_count, default=DEFAULT_SHARD_TOKENS, metavar="N", help="tokens per shard (default 100M)"
    )
    parser.add_argument(
        "--val-tokens",
        type=_token_count,
        metavar="N",
        help="tokens of the validation split, taken from the start of the stream (default: fineweb-edu one shard, "
        "or a tenth of --max-tokens if less; text a tenth of the tokens, at most 10M)",
    )
    parser.add_argument(
        "--max-tokens", type=_token_count, metavar="N", help="stop after this many tokens in all (a sample of a large corpus)"
    )
    parser.add_argument(
        "--workers", type=_workers, metavar="N", help="tokenizing processes (default: one per available core)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="write nothing: read every shard of the --out folder in full and check it against dataset.json "
        "(sha256, token count) and its vocabulary (no id out of range); exit 2 naming each problem",
    )
    parser.add_argument(
        "--context", type=_token_count, default=DEFAULT_CONTEXT, metavar="N",
        help="chat: the most tokens a conversation keeps (default 1024; longer ones are cut after their last "
        "answer that fits)",
    )
    parser.add_argument(
        "--val-every", type=int, default=DEFAULT_VAL_EVERY, metavar="N",
        help="chat: every N-th usable conversation goes to the validation split (default 20; 0: none)",
    )
    parser.add_argument(
        "--max-conversations", type=_conversation_count, metavar="N", help="chat: stop after N usable conversations"
    )
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help="chat, task: sources: local copies of the benchmarks' datasets (DIR/REPO/CONFIG/SPLIT-*.parquet, as "
        "`eval chatcore --data-dir`) instead of the hub",
    )


def _command_line(args: argparse.Namespace, defaults: dict[str, Any]) -> str:
    words = ["gpt2lab", "prepare", args.source, *args.inputs, "--out", args.out]
    for flag, dest in _OPTIONS:
        value = getattr(args, dest)
        if value == defaults[dest]:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *value]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _shakespeare_file(args: argparse.Namespace) -> str | None:
    """The Tiny Shakespeare file to prepare: --input's, the download's, or None for the packaged copy."""
    if not args.download or args.source not in SHAKESPEARE_SOURCES:
        return args.input_file
    if args.input_file is not None:
        raise UserError(
            "--input and --download both say where Tiny Shakespeare comes from; give one of them "
            "(or neither, for the copy that ships with gpt2lab)"
        )
    return str(sources.download_shakespeare())


def cmd_verify(folder: str) -> int:
    from ..data.dataset import open_dataset

    dataset = open_dataset(folder)
    problems = dataset.verify()
    if problems:
        raise UserError(f"{folder} is damaged, prepare it again: " + "; ".join(problems))
    shards = sum(len(shards) for shards in dataset.splits.values())
    print(f"{folder}: {shards} shards sound (recorded sha256, token counts, ids below the vocabulary of {dataset.vocab_size:,})")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.verify:
        return cmd_verify(args.out)
    if args.source is None:
        raise UserError(f"name what to prepare (one of {', '.join(VERB_SOURCES)}), or check a folder with --verify")
    if args.source == CHAT_SOURCE:
        return cmd_prepare_chat(args)
    _refuse_chat_options(args)
    prepare(
        args.source,
        args.out,
        inputs=args.inputs,
        input_file=_shakespeare_file(args),
        sample=args.sample,
        data_files=args.data_files,
        split=args.split,
        config=args.config,
        field=args.field or "text",
        column=args.column,
        streaming=not args.download,
        shard_tokens=args.shard_tokens,
        val_tokens=args.val_tokens,
        max_tokens=args.max_tokens,
        workers=args.workers,
        char=args.char,
        tokenizer=args.tokenizer,
        invalid_utf8="replace" if args.replace_invalid_utf8 else "strict",
        command=_command_line(args, args.option_defaults),
        progress=not args.quiet,
        log=(lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr)),
    )
    return 0


_CHAT_ONLY = (("--context", "context"), ("--val-every", "val_every"), ("--max-conversations", "max_conversations"),
              ("--data-dir", "data_dir"))
_NOT_FOR_CHAT = (("--input", "input_file"), ("--data-files", "data_files"), ("--column", "column"),
                 ("--val-tokens", "val_tokens"), ("--max-tokens", "max_tokens"), ("--char", "char"),
                 ("--replace-invalid-utf8", "replace_invalid_utf8"))


def _misplaced(args: argparse.Namespace, options) -> list[str]:
    return [flag for flag, dest in options if getattr(args, dest) != args.option_defaults[dest]]


def _refuse_chat_options(args: argparse.Namespace) -> None:
    misplaced = _misplaced(args, _CHAT_ONLY)
    if misplaced:
        raise UserError(f"{misplaced[0]} applies to the chat source only; drop it for {args.source}")


def cmd_prepare_chat(args: argparse.Namespace) -> int:
    misplaced = _misplaced(args, _NOT_FOR_CHAT)
    if misplaced:
        raise UserError(
            f"{misplaced[0]} does not apply to the chat source; chat takes .jsonl files or a hub dataset "
            "(--split, --config, --field), --context, --val-every, --max-conversations, --shard-tokens and --tokenizer"
        )
    prepare_chat(
        args.inputs,
        args.out,
        split=args.split,
        config=args.config,
        field=args.field or "messages",
        context=args.context,
        shard_tokens=args.shard_tokens,
        val_every=args.val_every,
        max_conversations=args.max_conversations,
        streaming=not args.download,
        tokenizer=args.tokenizer,
        data_dir=args.data_dir,
        command=_command_line(args, args.option_defaults),
        progress=not args.quiet,
        log=(lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr)),
    )
    return 0
