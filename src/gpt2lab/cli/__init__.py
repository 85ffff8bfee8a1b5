"""The `gpt2lab` command: one verb per job, each a thin layer over the Python API.

The package holds a module per verb (`cli/<verb>.py`: its `add_<verb>_parser(verbs, summary)`
and its runner, over library functions); this module only assembles them, importing the one
asked for, and runs it.
Options several verbs share are in `cli/options.py`.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from ..console import detach_stdout
from ..errors import UserError, disk_fault
from ..kernels import tune_cpu_memory
from ..version import __version__

# Each verb, in the order `gpt2lab --help` lists them, and its one-line summary. A verb's module
# (cli/<verb>.py, with its `add_<verb>_parser(verbs, summary)`) is imported only when that verb
# runs, so that `gpt2lab --help` and the verbs that need no model do not wait for PyTorch.
VERBS = {
    "sample": "generate text from a model, streaming it to the terminal",
    "chat": "talk to a chat model in the terminal, or answer one --prompt",
    "convert": "export a model or checkpoint for transformers (GPT-2, Llama or Qwen3) or llama.cpp (GGUF)",
    "tokenizer": "train a byte-level BPE on your corpus, or compare tokenizers' bytes per token",
    "prepare": "turn a corpus into token shards for training",
    "train": "train a model from a preset, a TOML file and overrides",
    "bench": "run the GPT-2 reproduction's speed ladder on this device",
    "eval": "evaluate a model: HellaSwag, CORE, loss and perplexity or bits per byte on a dataset, chat benchmarks",
    "report": "plot training runs (loss, HellaSwag, CORE, bits per byte) and summarize them in Markdown",
    "serve": "serve a model over an OpenAI-compatible HTTP API, with a web playground",
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command's parser, with the full parser of `verb` (all verbs' when None) and only the
    name and summary of the others."""
    parser = argparse.ArgumentParser(
        prog="gpt2lab",
        description="GPT-2 from scratch: prepare data, train, sample, chat, convert, benchmark. "
        "Run `gpt2lab VERB --help` for the manual of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, summary in VERBS.items():
        if verb is None or name == verb:
            module = importlib.import_module(f"{__name__}.{name}")
            getattr(module, f"add_{name}_parser")(verbs, summary)
        else:
            verbs.add_parser(name, help=summary)
    return parser


def _verb_asked(argv: list[str]) -> str:
    """The verb of a command line (before parsing: only its parser is built), or "" for none."""
    words = [word for word in argv if not word.startswith("-")]
    return words[0] if words and words[0] in VERBS else ""


def main(argv: list[str] | None = None) -> int:
    words = list(argv) if argv is not None else sys.argv[1:]
    parser = build_parser(_verb_asked(words))
    args = parser.parse_args(words)
    args.argv = words  # for verbs that re-launch themselves
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
        detach_stdout()
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
