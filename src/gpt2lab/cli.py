"""The `gpt2lab` command: one verb per job, each a thin layer over the Python API.

This module only assembles the verbs and runs the one asked for. Each verb is an
`add_<verb>_parser(verbs)` and its runner in the CLI module of its stage: data/cli.py (prepare),
train/cli.py (train, bench), eval/cli.py (eval), serve/cli.py (serve), and commands/ for the
verbs over top-level modules (sample, chat, convert, report). Options they share are in cli_options.py.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands.chat import add_chat_parser
from .commands.convert import add_convert_parser
from .commands.report import add_report_parser
from .commands.sample import add_sample_parser
from .data.cli import add_prepare_parser
from .errors import UserError, disk_fault
from .eval.cli import add_eval_parser
from .serve.cli import add_serve_parser
from .train.cli import add_bench_parser, add_train_parser

# In the order `gpt2lab --help` lists them.
VERB_PARSERS = (
    add_sample_parser,
    add_chat_parser,
    add_convert_parser,
    add_prepare_parser,
    add_train_parser,
    add_bench_parser,
    add_eval_parser,
    add_report_parser,
    add_serve_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2lab",
        description="GPT-2 from scratch: prepare data, train, sample, chat, convert, benchmark. "
        "Run `gpt2lab VERB --help` for the manual of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for add_parser in VERB_PARSERS:
        add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for verbs that re-launch themselves
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except UserError as error:
        print(f"gpt2lab {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as error:
        fault = disk_fault(error)
        if fault is None:
            raise
        print(f"gpt2lab {args.verb}: error: {fault}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2lab {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
