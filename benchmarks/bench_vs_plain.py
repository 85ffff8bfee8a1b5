"""gpt2lab's training step against a plain PyTorch GPT-2 written the straightforward way (below:
nn.Linear layers, scaled_dot_product_attention, F.cross_entropy on the full logits), with the same
weights, shape and batch: forward + backward + fused AdamW, in float32, bf16 autocast, bf16 +
torch.compile and float32 + torch.compile, the two measured in alternating rounds, medians
reported. gpt2lab's model steps as `gpt2lab train` steps it: on its device, with the CPU fast paths
applied by `gpt2lab.kernels.accelerate` where that is a CPU, then compiled where the mode says.
Each model steps in a process of its own; --allocator says which is set up as `gpt2lab train`
sets up its own process on a CPU (`gpt2lab.kernels.tune_cpu_memory`: large tensors in transparent
huge pages, which the CLI asks for before any verb runs; freed memory kept, which the trainer adds
on a CPU with system.reuse_cpu_memory, on by default): by default gpt2lab's, as shipped, and not
the plain model's, as a script of its own would run; `--allocator default` (neither) or `gpt2lab`
(both) gives both the same, which measures the models alone.

    python benchmarks/bench_vs_plain.py                          # 124M, B=4, T=256, every mode
    python benchmarks/bench_vs_plain.py --modes bf16 --rounds 10 --json out.json
    python benchmarks/bench_vs_plain.py --modes fp32 compile-fp32   # a CPU without native bf16
    python benchmarks/bench_vs_plain.py --allocator gpt2lab      # the models alone, both set up as gpt2lab's
    python benchmarks/bench_vs_plain.py --memory                 # peak memory, B=8, T=1024, bf16
    python benchmarks/bench_vs_plain.py --n-layer 2 --n-embd 64 --n-head 2 --batch 2 --seq-len 32 --rounds 2

--memory runs three training steps of each model in its own process and reports its peak: the
resident set (resource.getrusage's maxrss) on the CPU, torch.cuda.max_memory_allocated on a GPU;
the target is gpt2lab at most 0.7x the plain model. Time on a quiet machine: nothing else using
the cores (or the GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.kernels import accelerate, tune_cpu_memory
from gpt2lab.kernels.memory import THP_SWITCH
from gpt2lab.train.config import SystemSettings

# "compile" is bf16 autocast + torch.compile (the seed's first comparison); "compile-fp32" compiles
# the float32 step, the one a CPU without native bf16 trains in.
MODES = ("fp32", "bf16", "compile", "compile-fp32")
DEFAULT_MODES = ("fp32", "bf16", "compile")
MEMORY_TARGET = 0.7
# Steps the peak is read over: kept memory settles into its pattern after the first.
MEMORY_STEPS = 3
ALLOCATORS = ("as-shipped", "default", "gpt2lab")


# ---- the plain model: GPT-2 as one writes it first ----------------------------------------------


class PlainAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class PlainMLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class PlainBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = PlainAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = PlainMLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    """Module names as gpt2lab's, so that one state dict fits both."""

    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(PlainBlock(n_embd, n_head) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


# ---- building and stepping ----------------------------------------------------------------------


def build(impl: str, args, device: torch.device) -> nn.Module:
    """The model `impl` (gpt2lab or plain) with the weights of seed 0, on `device`, in training
    mode; gpt2lab's as its trainer steps it, with the CPU fast paths where `device` is a CPU."""
    torch.manual_seed(0)
    vocab_size = min(args.vocab, 50257)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.seq_len,
                       vocab_size=vocab_size, padded_vocab_size=args.vocab if args.vocab > vocab_size else None,
                       dropout=0.0)
    model = GPT(config)
    if impl == "plain":
        plain = PlainGPT(args.vocab, args.seq_len, args.n_layer, args.n_head, args.n_embd)
        plain.load_state_dict(model.state_dict())
        return plain.to(device).train()
    # As the trainer: placed on its device, then accelerated (a no-op off the CPU), then compiled.
    return accelerate(model.to(device).train())


def make_step(impl: str, mode: str, args, device: torch.device):
    """A function running one training step of `impl` in `mode`; returns its loss (a tensor)."""
    model = build(impl, args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = torch.compile(model) if mode.startswith("compile") else model
    autocast = nullcontext() if mode in ("fp32", "compile-fp32") else torch.autocast(device.type, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, min(args.vocab, 50257), (args.batch, args.seq_len + 1), generator=generator).to(device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step() -> torch.Tensor:
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_up_as_gpt2lab(impl: str, allocator: str) -> bool:
    """Whether `impl`'s process is set up as gpt2lab sets up its own under `allocator`: as-shipped
    does it for gpt2lab alone."""
    return allocator == "gpt2lab" or (allocator == "as-shipped" and impl == "gpt2lab")


def huge_page_switch(impl: str, allocator: str) -> str | None:
    """PyTorch's huge-page switch for `impl`'s process, read at its first allocation: None (unset)
    for a process set up as gpt2lab's, which `set_up_process` then decides as the CLI does on a
    machine where it is not set; off for the others, whatever this process's environment says."""
    return None if set_up_as_gpt2lab(impl, allocator) else "0"


def child_environment(impl: str, allocator: str) -> dict[str, str]:
    """This process's environment with `impl`'s huge-page switch."""
    environment = {key: value for key, value in os.environ.items() if key != THP_SWITCH}
    switch = huge_page_switch(impl, allocator)
    if switch is not None:
        environment[THP_SWITCH] = switch
    return environment


def set_up_process(impl: str, allocator: str, device: torch.device) -> None:
    """Set up this process as `gpt2lab train` sets up its own, where `allocator` says so for `impl`:
    before the first tensor, the CLI's huge pages and, on a CPU, the trainer's kept freed memory."""
    if set_up_as_gpt2lab(impl, allocator):
        tune_cpu_memory(reuse_freed=device.type == "cpu" and SystemSettings().reuse_cpu_memory)


def step_server(conn, impl: str, mode: str, args) -> None:
    """A child process's loop: build `impl`'s step, warm up, send the first loss, then for each
    request of n steps send their mean time, until asked for 0."""
    device = torch.device(args.device)
    set_up_process(impl, args.allocator, device)
    step = make_step(impl, mode, args, device)
    conn.send((step().item(), os.environ.get(THP_SWITCH) == "1"))
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    while count := conn.recv():
        start = time.perf_counter()
        for _ in range(count):
            step()
        sync(device)
        conn.send((time.perf_counter() - start) / count)


def time_mode(mode: str, args, device: torch.device) -> dict:
    """Alternating rounds of `args.steps` steps of each model, after `args.warmup` untimed steps.
    Each model steps in a process of its own, so that each has the allocator it would have alone."""
    context = multiprocessing.get_context("spawn")
    pipes, children = {}, []
    for impl in ("plain", "gpt2lab"):
        ours, theirs = context.Pipe()
        child = context.Process(target=step_server, args=(theirs, impl, mode, args))
        # A spawned child starts with this process's environment as it is at start().
        ours_switch = os.environ.pop(THP_SWITCH, None)
        if (switch := huge_page_switch(impl, args.allocator)) is not None:
            os.environ[THP_SWITCH] = switch
        try:
            child.start()
        finally:
            if ours_switch is None:
                os.environ.pop(THP_SWITCH, None)
            else:
                os.environ[THP_SWITCH] = ours_switch
        pipes[impl] = ours
        children.append(child)
    try:
        first_loss, huge_pages = {}, {}
        for impl, pipe in pipes.items():
            first_loss[impl], huge_pages[impl] = pipe.recv()
        times = {impl: [] for impl in pipes}
        for round_index in range(args.rounds):
            order = list(pipes) if round_index % 2 == 0 else list(pipes)[::-1]
            for impl in order:
                pipes[impl].send(args.steps)
                times[impl].append(pipes[impl].recv())
        for pipe in pipes.values():
            pipe.send(0)
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    tokens = args.batch * args.seq_len
    row = {"mode": mode, "allocator": args.allocator}
    for impl, values in times.items():
        row[f"{impl}_ms"] = statistics.median(values) * 1e3
        row[f"{impl}_tokens_per_s"] = tokens / statistics.median(values)
        row[f"{impl}_first_loss"] = first_loss[impl]
        row[f"{impl}_huge_pages"] = huge_pages[impl]
    row["speedup"] = row["plain_ms"] / row["gpt2lab_ms"]
    return row


# ---- peak memory, one process per model ------------------------------------------------------------


def child_peak(args, device: torch.device) -> dict:
    """MEMORY_STEPS training steps of `args.child` (in this process alone): its peak memory, and
    the first step's loss."""
    set_up_process(args.child, args.allocator, device)
    step = make_step(args.child, args.memory_mode, args, device)
    loss = step().item()
    for _ in range(MEMORY_STEPS - 1):
        step()
    sync(device)
    peak = {"impl": args.child, "loss": loss, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def measure_memory(args) -> dict:
    shape = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--n-layer", str(args.n_layer),
             "--n-head", str(args.n_head), "--n-embd", str(args.n_embd), "--vocab", str(args.vocab),
             "--device", args.device, "--memory-mode", args.memory_mode, "--allocator", args.allocator]
    peaks = {}
    for impl in ("plain", "gpt2lab"):
        out = subprocess.run([sys.executable, __file__, "--child", impl, *shape], check=True,
                             capture_output=True, text=True, env=child_environment(impl, args.allocator)).stdout
        peaks[impl] = json.loads(out.strip().splitlines()[-1])
    key = "cuda_max_allocated_mib" if "cuda_max_allocated_mib" in peaks["plain"] else "maxrss_mib"
    ratio = peaks["gpt2lab"][key] / peaks["plain"][key]
    return {"measure": key, "plain": peaks["plain"], "gpt2lab": peaks["gpt2lab"], "ratio": ratio,
            "target": MEMORY_TARGET, "met": ratio <= MEMORY_TARGET,
            "same_loss": math.isclose(peaks["plain"]["loss"], peaks["gpt2lab"]["loss"], rel_tol=1e-2)}


# ---- the command ------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                        help="fp32, bf16 (autocast), compile (bf16 + torch.compile), compile-fp32 "
                             "(float32 + torch.compile); default: the first three")
    parser.add_argument("--batch", type=int, help="sequences per step (default 4; --memory: 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 256; --memory: 1024)")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304, help="rows of the embedding and the head")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (default 5)")
    parser.add_argument("--steps", type=int, default=2, help="steps per round (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first (default 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--memory", action="store_true", help="peak memory of one step instead of timings")
    parser.add_argument("--memory-mode", choices=MODES, default="bf16", help="the mode --memory measures")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="as-shipped",
        help="which process is set up as gpt2lab sets up its own on a CPU (huge pages, kept freed memory): "
        "as-shipped gpt2lab's alone (default), default neither, gpt2lab both",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=["plain", "gpt2lab"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    big = args.memory or args.child
    args.batch = args.batch or (8 if big else 4)
    args.seq_len = args.seq_len or (1024 if big else 256)
    if args.warmup < 1 or args.rounds < 1 or args.steps < 1:
        parser.error("--warmup, --rounds and --steps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(child_peak(args, device)))
        return 0
    shape = f"{args.n_layer}x{args.n_embd}, B={args.batch}, T={args.seq_len}, vocab {args.vocab}, allocator {args.allocator}"
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "shape": shape}
    if args.memory:
        memory = measure_memory(args)
        results["memory"] = memory
        print(f"peak memory over {MEMORY_STEPS} {args.memory_mode} steps ({shape}), {memory['measure']}: "
              f"plain {memory['plain'][memory['measure']]:,.0f} MiB, gpt2lab {memory['gpt2lab'][memory['measure']]:,.0f} MiB, "
              f"ratio {memory['ratio']:.2f} (target <= {MEMORY_TARGET}: {'met' if memory['met'] else 'NOT met'})")
    else:
        print(f"training step, {shape}, {args.device}; median of {args.rounds} alternating rounds")
        print(f"| {'mode':<12} | {'plain ms':>9} | {'gpt2lab ms':>10} | {'speed-up':>8} | first loss plain / gpt2lab |")
        print(f"|{'-' * 14}|{'-' * 10}:|{'-' * 11}:|{'-' * 9}:|----------------------------|")
        results["rows"] = []
        for mode in args.modes:
            row = time_mode(mode, args, device)
            results["rows"].append(row)
            print(f"| {mode:<12} | {row['plain_ms']:>9.1f} | {row['gpt2lab_ms']:>10.1f} | {row['speedup']:>7.2f}x | "
                  f"{row['plain_first_loss']:.4f} / {row['gpt2lab_first_loss']:.4f} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
