"""The `report` verb: its parser and the runner that calls `write_report`."""

from __future__ import annotations

import argparse

from ..eval.report import BASELINE_CHOICES, write_report


def add_report_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    """The `report` verb, added to the CLI's subparsers."""
    parser = verbs.add_parser(
        "report",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Draw the curves of one or more training runs from their metrics.jsonl into one PNG:
train loss (raw points faint, smoothed line) and validation loss, and when the runs measured
them HellaSwag acc_norm (both scorings), CORE (eval.core_interval) and validation bits per byte,
each against optimizer steps and against tokens seen. Several runs are overlaid in different
colors.

Baselines are drawn as labelled horizontal lines for the runs' model size (--baselines auto:
GPT-2-tokenizer runs, by the first run's shape, the nearest of 124M, 350M, 774M, 1558M within
a factor of 2 in non-embedding parameters; the val loss only for a run on FineWeb-EDU data):
  val loss    GPT-2 124M checkpoint on FineWeb-EDU val: 3.2924
  HellaSwag   GPT-2 124M 0.2945, 350M 0.3752, 774M 0.4320, 1558M 0.4889
              GPT-3 125M 0.337, 350M 0.436, 760M 0.510, 1.3B 0.547
  CORE        GPT-2 124M 0.1139, GPT-2 1.5B 0.256525 (nanochat's measurements; drawn for
              every run but --baselines none: CORE does not depend on the tokenizer)

A Markdown summary (steps, tokens seen, wall time, last train loss, best val loss, last
HellaSwag) and a report card (each run's latest val loss, val bpb, HellaSwag and CORE beside
GPT-2 124M's and 1.5B's, with where those come from) is printed and written next to the PNG
with the same name and .md. A run whose checkpoints `gpt2lab eval chatcore` scored (its
chatcore.jsonl) also gets their ARC, MMLU, GSM8K, HumanEval and ChatCORE beside those of
nanochat's d20 model after midtraining and after SFT (its README's report card, first release). Both files are written under a temporary name and renamed when
complete.""",
        epilog="""examples:
  gpt2lab report runs/gpt2-124m                          # writes runs/gpt2-124m/report.png and .md
  gpt2lab report runs/a runs/b --out compare.png         # two runs overlaid
  gpt2lab report runs/shakespeare-char --baselines none""",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with metrics.jsonl)")
    parser.add_argument(
        "--out", metavar="FILE.png",
        help="the PNG to write (default: RUN_DIR/report.png for one run, ./report.png for several)",
    )
    parser.add_argument(
        "--baselines", default="auto", choices=BASELINE_CHOICES,
        help="which model size's baselines to draw (default auto: from the first run's config)",
    )
    parser.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    png, summary = write_report(args.runs, args.out, args.baselines)
    print(summary.read_text(encoding="utf-8"), end="")
    print(f"\nwrote {png} and {summary}")
    return 0
