"""`gpt2lab bench`: the GPT-2 reproduction's speed ladder, each rung adding one speed-up to the
ones before it, measured through the real training loop on synthetic tokens."""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from ..config import GPT2_PADDED_VOCAB_SIZE, GPT2_VOCAB_SIZE, apply_overrides
from .config import PRESETS, BatchSettings, CheckpointSettings, EvalSettings, LogSettings, TrainConfig

# (name, what the rung changes); each rung keeps every change above it.
LADDER = [
    ("fp32 baseline", {}),
    ("+ TF32 matmuls", {"system.precision": "tf32"}),
    ("+ bf16 autocast", {"system.precision": "bf16"}),
    ("+ SDPA flash attention", {"model.attention": "sdpa"}),
    ("+ vocab padded to 50304", {"model.padded_vocab_size": str(GPT2_PADDED_VOCAB_SIZE)}),
    ("+ fused AdamW", {"optim.fused": "true"}),
    ("+ torch.compile", {"system.compile": "true"}),
]


def baseline_config(args) -> TrainConfig:
    base = PRESETS["gpt2-124m"]
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, attention="plain", padded_vocab_size=None, block_size=args.seq_len),
        batch=BatchSettings(total_tokens=0, micro_batch=args.micro_batch, seq_len=args.seq_len),
        max_steps=args.warmup + args.steps,
        eval=EvalSettings(interval=0, at_start=False, final_full=False, sample_interval=0),
        checkpoint=CheckpointSettings(interval=0, final=False),
        log=LogSettings(interval=0, progress_bar=False),
    )
    config = apply_overrides(config, ["optim.fused=false", "system.precision=fp32", "system.compile=false",
                                      f"system.device={args.device}"])
    return apply_overrides(config, args.overrides)


def synthetic_dataset(folder: Path, tokens: int, seed: int) -> Path:
    from ..data.shards import write_shard

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "train_000000.bin", rng.integers(0, GPT2_VOCAB_SIZE, tokens, dtype=np.uint16))
    write_shard(folder / "val_000000.bin", rng.integers(0, GPT2_VOCAB_SIZE, 4096, dtype=np.uint16))
    return folder


class LadderStopped(Exception):
    """A stop signal cut a rung short: its timings would mislead, and the rungs after it never ran."""

    def __init__(self, signum: int, rung: str, finished: list[dict]):
        super().__init__(rung)
        self.signum, self.rung, self.finished = signum, rung, finished


def run_ladder(args) -> list[dict]:
    """Each rung's row, printed as it finishes; raises LadderStopped on Ctrl-C or SIGTERM."""
    from .trainer import Trainer

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base = baseline_config(args)
        tokens = base.tokens_per_step() * (base.max_steps + 1) + 1
        base = apply_overrides(base, [f"data.path={synthetic_dataset(scratch / 'data', tokens, base.system.seed)}"])
        changes: list[str] = []
        for rung, (name, rung_changes) in enumerate(LADDER):
            changes += [f"{k}={v}" for k, v in rung_changes.items()]
            if args.rungs and rung + 1 not in args.rungs:
                continue
            profiled = [f"system.profile_steps={args.steps}"] if args.profile else []
            config = apply_overrides(base, changes + profiled)
            run_dir = scratch / f"rung{rung}"
            trainer = Trainer(config, run_dir, echo=lambda line: None)
            stopped_by = trainer.run()["stopped_by"]
            if stopped_by is not None:
                raise LadderStopped(stopped_by, name, results)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            timed = [r for r in records if "step_ms" in r][args.warmup:]
            step_ms = statistics.median(r["step_ms"] for r in timed)
            tokens_per_s = trainer.tokens_per_step / (step_ms / 1e3)
            mfu = trainer.flops_per_token * tokens_per_s / trainer.peak_flops if trainer.peak_flops else None
            losses = [r["train_loss"] for r in records if "train_loss" in r]
            results.append({
                "rung": name, "step_ms": step_ms, "tokens_per_s": tokens_per_s, "mfu": mfu,
                "first_loss": losses[0], "last_loss": losses[-1],
            })
            if args.profile:
                results[-1]["profile"] = str(keep_profile(run_dir / "profile", Path(args.profile) / f"rung{rung + 1}"))
            print(format_row(results[-1]), flush=True)
    return results


def keep_profile(source: Path, folder: Path) -> Path:
    """The rung's trace and top-operators table, moved out of the scratch run folder."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("trace.json", "top_ops.txt"):
        shutil.move(source / name, folder / name)
    return folder


def format_row(row: dict) -> str:
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    return (f"| {row['rung']:<26} | {row['step_ms']:>10.1f} | {row['tokens_per_s']:>12,.0f} | {mfu:>6} | "
            f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} |")

