"""A training step of the modern 124M shape (preset speedrun-124m: RoPE, RMSNorm, QK-norm, ReLU²,
an untied head, Muon for the hidden matrices) against the GPT-2 shape (preset gpt2-124m, AdamW)
on this CPU, at the same precision and batch: forward + backward + gradient norm + optimizer step,
each model and optimizer built as the trainer builds them, the two measured in alternating rounds,
medians reported. The target (issue 11): the modern step at most 1.25x the GPT-2 step, Muon's
orthogonalization included; the optimizer step's own median is reported too, to show Muon's share.

Muon's cost is per optimizer step, not per token: five Newton-Schulz iterations over the 124M
shape's hidden matrices are about 1.6 TFLOP, twice the forward and backward of a 1,024-token
batch. Both presets take one optimizer step per 524,288 tokens, so the ratio that decides is the
one at the preset's step: micro-batches of this size, as many as make up those tokens (their
forward and backward, timed here), and one optimizer step. Both ratios are printed; `met` is the
preset step's.

    python benchmarks/bench_modern.py                          # 124M shapes, B=4, T=256, fp32 and bf16
    python benchmarks/bench_modern.py --modes bf16 --rounds 10 --json out.json
    python benchmarks/bench_modern.py --compile                # torch.compile'd models, as system.compile does
    python benchmarks/bench_modern.py --n-layer 2 --n-embd 128 --batch 2 --seq-len 32 --rounds 2 --vocab 512

--n-layer, --n-embd and --vocab shrink both shapes alike; each keeps its preset's head dimension
(64 for GPT-2, 128 for the modern shape), so --n-embd must be a multiple of 128. Time on a quiet
machine: nothing else using the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from gpt2lab import GPT
from gpt2lab.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2lab.train.config import PRESETS
from gpt2lab.train.optim import build_optimizer

MODES = ("fp32", "bf16")
SHAPES = {"gpt2": "gpt2-124m", "modern": "speedrun-124m"}
assert len({PRESETS[preset].batch.total_tokens for preset in SHAPES.values()}) == 1, "presets' steps differ"
PRESET_STEP_TOKENS = PRESETS[SHAPES["modern"]].batch.total_tokens
TARGET = 1.25
HEAD_DIM_MULTIPLE = math.lcm(*(PRESETS[preset].model.head_dim for preset in SHAPES.values()))


def model_config(base: GPTConfig, args) -> GPTConfig:
    """The preset's model, resized by the command's overrides."""
    n_embd = args.n_embd or base.n_embd
    changes = dict(n_layer=args.n_layer or base.n_layer, n_embd=n_embd, n_head=n_embd // base.head_dim,
                   block_size=max(base.block_size, args.seq_len))
    if args.vocab:
        vocab_size = min(args.vocab, GPT2_VOCAB_SIZE)
        changes.update(vocab_size=vocab_size, padded_vocab_size=args.vocab if args.vocab > vocab_size else None)
    return dataclasses.replace(base, **changes)


def make_step(shape: str, mode: str, args, idx: torch.Tensor):
    """A function running one training step of `shape` in `mode` on the batch `idx`; returns its
    loss (a tensor) and the seconds its optimizer step took. Also the model, for its size."""
    preset = PRESETS[SHAPES[shape]]
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = GPT(model_config(preset.model, args)).to(device).train()
    optimizer = build_optimizer(model, preset.optim, device)
    forward = torch.compile(model) if args.compile else model
    autocast = nullcontext() if mode == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)
    # The trainer computes the gradient norm on every step (it logs it), clipping or not.
    max_norm = preset.optim.grad_clip or math.inf
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step() -> tuple[torch.Tensor, float]:
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        start = time.perf_counter()
        optimizer.step()
        optimizer_s = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), optimizer_s

    return step, model


def time_mode(mode: str, args) -> dict:
    """Alternating rounds of `args.steps` steps of each shape, after `args.warmup` untimed steps."""
    vocab = min(model_config(PRESETS[preset].model, args).vocab_size for preset in SHAPES.values())
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=generator)
    built = {shape: make_step(shape, mode, args, idx) for shape in SHAPES}
    steps = {shape: step for shape, (step, _) in built.items()}
    row = {"mode": mode}
    for shape, step in steps.items():
        row[f"{shape}_params"] = sum(p.numel() for p in built[shape][1].parameters())
        row[f"{shape}_first_loss"] = step()[0].item()
        for _ in range(args.warmup - 1):
            step()
    step_times = {shape: [] for shape in steps}
    optimizer_times = {shape: [] for shape in steps}
    for round_index in range(args.rounds):
        # Reversing the order each round spreads any drift of the machine over both shapes.
        order = list(steps) if round_index % 2 == 0 else list(steps)[::-1]
        for shape in order:
            for _ in range(args.steps):
                start = time.perf_counter()
                _, optimizer_s = steps[shape]()
                step_times[shape].append(time.perf_counter() - start)
                optimizer_times[shape].append(optimizer_s)
    for shape in steps:
        row[f"{shape}_ms"] = statistics.median(step_times[shape]) * 1e3
        row[f"{shape}_optimizer_ms"] = statistics.median(optimizer_times[shape]) * 1e3
    row["ratio"] = row["modern_ms"] / row["gpt2_ms"]
    micro_batches = max(1, PRESET_STEP_TOKENS // (args.batch * args.seq_len))
    row["micro_batches_per_preset_step"] = micro_batches
    for shape in steps:
        optimizer_ms = row[f"{shape}_optimizer_ms"]
        row[f"{shape}_preset_step_s"] = (micro_batches * (row[f"{shape}_ms"] - optimizer_ms) + optimizer_ms) / 1e3
    row["ratio_at_preset_step"] = row["modern_preset_step_s"] / row["gpt2_preset_step_s"]
    row["met"] = row["ratio_at_preset_step"] <= TARGET
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (not the optimizers)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--n-layer", type=int, help="blocks of both shapes (default: the presets' 12)")
    parser.add_argument("--n-embd", type=int, help="width of both shapes (default: the presets' 768)")
    parser.add_argument("--vocab", type=int, help="rows of the embedding and the head (default: the presets' 50304)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (default 5)")
    parser.add_argument("--steps", type=int, default=1, help="steps per round (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each shape first (default 2)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--warmup, --rounds and --steps must be at least 1")
    if args.n_embd is not None and (args.n_embd <= 0 or args.n_embd % HEAD_DIM_MULTIPLE):
        parser.error(f"--n-embd must be a positive multiple of {HEAD_DIM_MULTIPLE} (both shapes' head dimensions)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = {shape: model_config(PRESETS[preset].model, args) for shape, preset in SHAPES.items()}
    described = {shape: f"{c.n_layer}x{c.n_embd}, n_head {c.n_head}, vocab {c.embedding_rows}"
                 for shape, c in shapes.items()}
    results = {"device": platform.processor() or "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "batch": args.batch, "seq_len": args.seq_len, "compile": args.compile, "target": TARGET,
               "shapes": described, "rows": []}
    print(f"training step on the CPU, B={args.batch}, T={args.seq_len}{', compiled' if args.compile else ''}; "
          f"gpt2 {described['gpt2']}, modern {described['modern']}; median of {args.rounds * args.steps} steps "
          "in alternating rounds", file=sys.stderr)
    for mode in args.modes:
        row = time_mode(mode, args)
        results["rows"].append(row)
        print(f"{mode}: gpt2 {row['gpt2_ms']:.1f} ms (optimizer {row['gpt2_optimizer_ms']:.1f}), "
              f"modern {row['modern_ms']:.1f} ms (optimizer {row['modern_optimizer_ms']:.1f}), "
              f"ratio {row['ratio']:.2f} with an optimizer step per batch; at the presets' step "
              f"({row['micro_batches_per_preset_step']} such batches, one optimizer step) "
              f"{row['ratio_at_preset_step']:.2f} (target <= {TARGET}: {'met' if row['met'] else 'NOT met'})",
              file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
