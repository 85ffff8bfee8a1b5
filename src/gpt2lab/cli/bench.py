"""The `bench` verb: the reproduction's speed ladder (`train.bench`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from ..train.bench import LADDER, LadderStopped, run_ladder


def add_bench_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    bench = verbs.add_parser(
        "bench",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT-2 (124M)-shaped model on synthetic tokens through the real training loop, "
        "one rung of the reproduction's speed ladder at a time, each rung keeping the speed-ups before "
        "it: fp32, TF32, bf16 autocast, SDPA flash attention, padded vocabulary, fused AdamW, "
        "torch.compile. Prints ms/step (median after warm-up), tokens/s and MFU as one Markdown table.",
        epilog="""examples:
  gpt2lab bench                                   # 124M, B=4, T=256: sized for a CPU
  gpt2lab bench --device cuda --micro-batch 16 --seq-len 1024 --steps 20
  gpt2lab bench --set model.n_layer=2 --rungs 1 3 7
  gpt2lab bench --set system.peak_flops=2e12      # MFU against a peak you know
  gpt2lab bench --rungs 7 --profile               # a torch.profiler trace into bench-profile/rung7/

On a CPU, TF32 changes nothing (it is a GPU setting), and compile takes a minute or more
the first time. MFU appears where the peak is known (a GPU by name, or system.peak_flops).
Ctrl-C or SIGTERM stop the ladder: the rung cut short is not reported, the finished ones are
named, and the exit status is 128 + the signal's number.""",
    )
    bench.add_argument("--micro-batch", type=int, default=4, help="sequences per step (default 4)")
    bench.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    bench.add_argument("--steps", type=int, default=5, help="timed steps per rung (default 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    bench.add_argument("--rungs", type=int, nargs="+", help="run only these rungs (1-7)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a training setting for every rung, e.g. model.n_layer=4")
    bench.add_argument("--json", help="also write the table as JSON here")
    bench.add_argument(
        "--profile", nargs="?", const="bench-profile", metavar="DIR",
        help="also record each rung's timed steps with torch.profiler: DIR/rungN/trace.json (Chrome/Perfetto) "
        "and the top operators, printed after the table (default DIR: bench-profile; the profiled times "
        "carry the profiler's overhead)",
    )
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 1 or args.seq_len < 2:
        raise UserError("--steps, --micro-batch must be >= 1, --warmup >= 0, --seq-len >= 2")
    if args.rungs and not all(1 <= r <= len(LADDER) for r in args.rungs):
        raise UserError(f"--rungs take numbers 1 to {len(LADDER)}")
    json_path = _checked_output(args.json) if args.json else None
    print(f"| {'rung':<26} | {'ms/step':>10} | {'tokens/s':>12} | {'MFU':>6} | loss first -> last |")
    print(f"|{'-' * 28}|{'-' * 12}:|{'-' * 14}:|{'-' * 7}:|--------------------|")
    try:
        results = run_ladder(args)
    except LadderStopped as stop:
        finished = ", ".join(row["rung"] for row in stop.finished) or "none"
        unwritten = f"; {json_path} not written" if json_path is not None else ""
        print(f"gpt2lab bench: {signal.Signals(stop.signum).name} during rung {stop.rung!r}: stopped. "
              f"Rungs finished: {finished}{unwritten}", file=sys.stderr)
        return 128 + stop.signum
    for row in results:
        if "profile" in row:
            rung = 1 + [name for name, _ in LADDER].index(row["rung"])
            table = (Path(row["profile"]) / "top_ops.txt").read_text()
            print(f"\ntop operators of rung {rung} ({row['rung']}), trace {row['profile']}/trace.json:\n{table}", end="")
    if json_path is not None:
        write_atomic(json_path, lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    return 0


def _checked_output(name: str) -> Path:
    """--json's file, refused before the benchmark runs (minutes) if it cannot be written there."""
    path = Path(name)
    if path.is_dir():
        raise UserError(f"--json {path} is a folder; give a file name, e.g. {path / 'bench.json'}")
    if not path.parent.is_dir():
        raise UserError(f"--json {path}: the folder {path.parent} does not exist; create it or write elsewhere")
    return path
