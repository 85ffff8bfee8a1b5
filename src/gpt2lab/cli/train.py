"""The `train` verb."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..train.config import PRESETS, resolve_config

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
                 core_interval (0 = off; CORE, as `gpt2lab eval core`) core_max_per_task
                 (default 500, 0 = all) core_bundle (an unpacked bundle instead of the
                 download); every validation logs val_bpb (bits per byte) beside val_loss
  checkpoint.*   interval keep_last keep_best
  log.*          interval progress_bar tensorboard wandb_project
  system.*       device (auto|cpu|cuda|mps) precision (fp32|tf32|bf16|fp16) parallel (ddp|fsdp)
                 compile seed peak_flops deterministic profile_steps (torch.profiler trace of N
                 steps after the first into profile/trace.json, top operators printed; 0 = off)
                 reuse_cpu_memory (default true: on a CPU with glibc 2.39 or later, freed memory
                 is kept for the next step instead of being returned and faulted in again: faster
                 steps, and the resident set stays at its peak; older glibc would
                 leak the blocks it keeps, so there nothing changes); large CPU tensors lie in
                 transparent huge pages (fewer page faults for the step's fresh tensors) unless
                 the environment sets THP_MEM_ALLOC_ENABLE=0
  finetune.*     lora_rank (0 = off: every parameter trains) lora_alpha (the update is scaled by
                 alpha / rank) lora_dropout lora_targets (comma-separated, default
                 c_attn,c_proj,c_fc; attn.c_proj or mlp.c_proj name one of the two c_proj): LoRA
                 adapters train, all else is frozen; checkpoints hold the base and
                 adapters.safetensors, and sample/eval/serve/convert merge them (docs/chat.md)

A preset's model is sized for its own data: what you set wins, and what you leave follows
your data and model (said on one line): a model from scratch takes the vocabulary of data.path
(unless you set model.vocab_size), and one started from init_from keeps batch.seq_len within its
context (unless you set batch.seq_len).

fine-tuning a chat model (docs/chat.md):
  gpt2lab prepare chat my-chats.jsonl --out data/chat      # {"messages": [{"role", "content"}, ...]}
  gpt2lab train --preset sft --set data.path=data/chat --out runs/sft
  gpt2lab train --preset sft --set data.path=data/chat --set init_from=runs/mine --out runs/sft
                                                           # from your own model, or offline
                                                           # from a downloaded gpt2 folder
  gpt2lab chat --model runs/sft

The run folder (--out) gets config.toml (the resolved settings; reload with --config),
metrics.jsonl, samples.txt and checkpoints/step_XXXXXXXX/. Ctrl-C, SIGTERM or a closed
terminal (SIGHUP) finish the current step, save a checkpoint and exit with 128 + the signal's
number (130, 143, 129), also when the output's pipe or terminal is gone; --resume auto continues
from the newest checkpoint.

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


def add_train_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    train = verbs.add_parser(
        "train",
        help=summary,
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
    if args.print_config:
        _print_notes(notes)
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
    from ..train.trainer import Trainer

    from ..train.distributed import shutdown_distributed

    try:
        trainer = Trainer(config, out, resume=args.resume)
        # After the checks: a setting to fix is the one line a mistake gets.
        _print_notes(notes)
        summary = trainer.run()
    finally:
        shutdown_distributed()
    # A run stopped before its last step exits as the signal would have ended it, so that a
    # script or scheduler never takes it for a finished one (its checkpoint is saved).
    return 0 if summary["stopped_by"] is None else 128 + summary["stopped_by"]


def _print_notes(notes: list[str]) -> None:
    """What resolve_config changed of the preset's settings, on stderr, once (rank 0)."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks resolve the same settings
        for note in notes:
            print(note, file=sys.stderr)


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
