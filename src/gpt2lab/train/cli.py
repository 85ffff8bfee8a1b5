"""The `train` and `bench` verbs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from .bench import LADDER, run_ladder
from .config import PRESETS, resolve_config

TRAIN_EPILOG = """presets:
  shakespeare-char       nanoGPT's char-level Shakespeare (6x384, block 256, dropout 0.2), a GPU run
  shakespeare-char-cpu   its documented CPU run (4x128, block 64, batch 12, 2000 steps): minutes on a laptop
  gpt2-124m              build-nanogpt's GPT-2 (124M) on FineWeb-EDU 10B: 0.5M tokens/step, 19,073 steps
  gpt2-350m, gpt2-774m, gpt2-1558m   llm.c's larger GPT-2 runs
  finetune-shakespeare   OpenAI's gpt2 weights fine-tuned on Tiny Shakespeare (BPE), constant lr
  sft                    instruction fine-tuning of OpenAI's gpt2 on a `prepare chat` folder
                         (data/chat): loss on the assistant's tokens only, 3 epochs, lr 2e-5;
                         docs/chat.md
  speedrun-char-cpu      the modern recipe (RoPE, RMSNorm, QK-norm, ReLU², Muon, WSD) at the CPU run's size
  speedrun-124m          the modern recipe at 124M on FineWeb-EDU, one GPU (8: add --nproc 8); docs/recipes.md

settings (--set key=value, or the same keys in a TOML file given with --config):
  model.*        n_layer n_head n_embd block_size vocab_size padded_vocab_size bias dropout
                 tie_embeddings attention (sdpa|plain); the modern recipe, each off by default:
                 position (learned|rope) rope_base norm (layernorm|rmsnorm) qk_norm
                 activation (gelu_tanh|relu2|swiglu) mlp_hidden logit_softcap (0 = off)
                 zero_init_proj n_kv_head (grouped-query attention; unset = n_head)
  init_from      scratch, or a model to start from (gpt2, a folder, a checkpoint)
  data.*         path (a folder made by `gpt2lab prepare`) train_split val_split shuffle
                 random_offset
  batch.*        total_tokens (per optimizer step; 0 = one micro-batch) micro_batch seq_len
  max_steps | max_tokens | max_epochs   how long to train (one of them; max_epochs counts
                 passes over the training split; a --set of one replaces the preset's)
  optim.*        name (adamw|sgd|muon) lr min_lr weight_decay beta1 beta2 eps momentum fused grad_clip
                 muon_lr muon_momentum muon_weight_decay muon_ns_steps (Muon on the hidden
                 matrices, AdamW at lr on embeddings, head, gains and biases)
  schedule.*     kind (cosine|constant|wsd) warmup_steps decay_steps decay_fraction (wsd: the
                 last share of the run, decaying linearly to min_lr)
  eval.*         interval batches (0 = whole split) at_start final_full sample_interval
                 sample_prompt sample_tokens hellaswag_interval (0 = off) hellaswag_limit
                 (0 = all) hellaswag_file (a local .jsonl instead of the download)
  checkpoint.*   interval keep_last keep_best
  log.*          interval progress_bar tensorboard wandb_project
  system.*       device (auto|cpu|cuda|mps) precision (fp32|tf32|bf16|fp16) parallel (ddp|fsdp)
                 compile seed peak_flops deterministic profile_steps (torch.profiler trace of N
                 steps after the first into profile/trace.json, top operators printed; 0 = off)
                 reuse_cpu_memory (default true: on a CPU with glibc 2.39 or later, freed memory
                 is kept for the next step instead of being returned and faulted in again, about
                 1.2x faster bf16 steps; the resident set stays at its peak; older glibc would
                 leak the blocks it keeps, so there nothing changes); large CPU tensors lie in
                 transparent huge pages (fewer page faults for the step's fresh tensors) unless
                 the environment sets THP_MEM_ALLOC_ENABLE=0
  finetune.*     lora_rank (0 = off: every parameter trains) lora_alpha (the update is scaled by
                 alpha / rank) lora_dropout lora_targets (comma-separated, default
                 c_attn,c_proj,c_fc; attn.c_proj or mlp.c_proj name one of the two c_proj): LoRA
                 adapters train, all else is frozen; checkpoints hold the base and
                 adapters.safetensors, and sample/eval/serve/convert merge them (docs/chat.md)

The run folder (--out) gets config.toml (the resolved settings; reload with --config),
metrics.jsonl, samples.txt and checkpoints/step_XXXXXXXX/. Ctrl-C or SIGTERM finish the
current step, save a checkpoint and exit; --resume auto continues from the newest one.

examples:
  gpt2lab prepare shakespeare-char --out data/shakespeare-char
  gpt2lab train --preset shakespeare-char-cpu --out runs/shakespeare-char
  gpt2lab train --preset gpt2-124m --set batch.micro_batch=32 --out runs/gpt2-124m
  gpt2lab train --config runs/gpt2-124m/config.toml --out runs/gpt2-124m --resume auto
  gpt2lab train --preset gpt2-124m --set model.n_layer=2 --set max_steps=10 --print-config
  gpt2lab train --preset finetune-shakespeare --set finetune.lora_rank=8 --set optim.lr=1e-4 --out runs/lora
  gpt2lab train --preset gpt2-124m --nproc 8 --out runs/gpt2-124m        # DDP on 8 GPUs
  torchrun --nproc_per_node=8 -m gpt2lab train --preset gpt2-774m       # FSDP2 (the preset's choice)

Distributed runs (torchrun, DDP, FSDP2, several machines, SLURM): docs/distributed.md."""


# ---- train ---------------------------------------------------------------------------------


def add_train_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = verbs.add_parser(
        "train",
        help="train a model from a preset, a TOML file and overrides",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT-2 model: a preset, then a TOML file, then --set overrides, each on "
        "top of the last. Every setting is checked before any heavy work starts.",
        epilog=TRAIN_EPILOG,
    )
    train.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME", help="a named preset (see below)")
    train.add_argument("--config", help="a TOML file of settings (e.g. a run's config.toml)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    train.add_argument("--out", help="run folder (default: runs/PRESET)")
    train.add_argument(
        "--resume", metavar="auto|PATH",
        help="continue a run: auto takes the newest complete checkpoint in --out (none: start fresh)",
    )
    train.add_argument(
        "--nproc", type=int, default=1, metavar="N",
        help="train with N processes on this machine (runs torchrun --standalone --nproc_per_node=N)",
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    if args.preset is None and args.config is None:
        raise UserError("give --preset NAME or --config FILE.toml (see gpt2lab train --help)")
    notes: list[str] = []
    config = resolve_config(args.preset, args.config, args.overrides, notes)
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks resolve the same settings
        for note in notes:
            print(note, file=sys.stderr)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:
        return launch_torchrun(args.nproc, args.argv)
    out = Path(args.out) if args.out else Path("runs") / (args.preset or Path(args.config).stem)
    checkpoints = out / "checkpoints"
    if args.resume is None and checkpoints.is_dir() and any(checkpoints.glob("step_*")):
        raise UserError(
            f"{out} already holds checkpoints of a run; continue it with --resume auto, "
            "or choose another --out"
        )
    from .trainer import Trainer

    from .distributed import shutdown_distributed

    try:
        Trainer(config, out, resume=args.resume).run()
    finally:
        shutdown_distributed()
    return 0


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` workers on this machine."""
    import os
    import subprocess
    import sys

    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc is for starting a job; this process already runs under torchrun")
    worker_args = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        worker_args.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gpt2lab", *worker_args]
    return subprocess.call(command)


# ---- bench ---------------------------------------------------------------------------------


def add_bench_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = verbs.add_parser(
        "bench",
        help="run the GPT-2 reproduction's speed ladder on this device",
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
the first time. MFU appears where the peak is known (a GPU by name, or system.peak_flops).""",
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
    results = run_ladder(args)
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
