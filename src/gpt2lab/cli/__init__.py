"""The `gpt2lab` command: one verb per job, each a thin layer over the Python API.

The package holds a module per verb (`cli/<verb>.py`: its `add_<verb>_parser(verbs)` and its
runner, over library functions); this module only assembles them and runs the one asked for.
Options several verbs share are in `cli/options.py`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..console import detach
from ..version import __version__
from .bench import add_bench_parser
from .chat import add_chat_parser
from .convert import add_convert_parser
from .report import add_report_parser
from .sample import add_sample_parser
from .prepare import add_prepare_parser
from ..errors import UserError, disk_fault
from .eval import add_eval_parser
from ..kernels import tune_cpu_memory
from .serve import add_serve_parser
from .train import add_train_parser

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
    # Before the verb allocates its first tensor, which fixes PyTorch's page size for the process.
    tune_cpu_memory(reuse_freed=False)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"gpt2lab {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output went away (`| head`): end as a killed writer would, quietly.
        detach(sys.stdout)
        return 128 + signal.SIGPIPE
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
