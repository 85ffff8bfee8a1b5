"""TrainConfig: every setting of a training run, with the named presets of the reproduction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import (
    DEFAULT_ALPHA, DEFAULT_TARGETS, GPT2_PADDED_VOCAB_SIZE, GPTConfig, apply_overrides, check_finite_settings,
    check_lora_settings, load_toml, merge_values, to_toml,
)
from ..errors import UserError
from ..tokenizer import CHAT_FORMATS, DEFAULT_CHAT_FORMAT


@dataclass
class DataSettings:
    path: str = "data/shakespeare-char"  # a folder made by `gpt2lab prepare`
    train_split: str = "train"
    val_split: str = "val"
    shuffle: bool = True
    random_offset: bool = True  # shift the training windows by a seeded offset each epoch


@dataclass
class BatchSettings:
    # Tokens per optimizer step; gradient accumulation = total_tokens / (micro_batch * seq_len * world).
    # 0 means one micro-batch per rank (no accumulation).
    total_tokens: int = 0
    micro_batch: int = 12
    seq_len: int = 64


@dataclass
class OptimSettings:
    name: Literal["adamw", "sgd", "muon"] = "adamw"  # muon: Muon on the hidden matrices, AdamW on the rest
    lr: float = 6e-4  # with muon: the rate of the AdamW groups (embeddings, head, gains, biases)
    min_lr: float = 6e-5
    weight_decay: float = 0.1  # on matrices and embeddings only (tensors of 2+ dimensions)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only
    fused: bool = True  # the fused AdamW kernel where this PyTorch has it for the device
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    muon_lr: float = 0.02  # Muon's rate for the hidden matrices (the schedule scales it as lr)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_ns_steps: int = 5  # Newton-Schulz iterations of the orthogonalization


@dataclass
class ScheduleSettings:
    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 0
    # The decay ends at min_lr on this step (0: at max_steps) and stays there.
    decay_steps: int = 0
    decay_fraction: float = 0.2  # wsd: the share of the run (up to decay_steps) spent decaying


@dataclass
class EvalSettings:
    interval: int = 250  # steps between evaluations; 0 disables
    batches: int = 20  # validation batches per evaluation, over all ranks together (0: the whole split)
    at_start: bool = True
    final_full: bool = True  # at the end, the loss over every window of the validation split
    sample_interval: int = 0  # steps between samples written to samples.txt; 0 disables
    sample_prompt: str = ""
    sample_tokens: int = 64
    hellaswag_interval: int = 0  # steps between HellaSwag evaluations (and at the last step); 0 disables
    hellaswag_limit: int = 0  # score only the first N validation examples; 0: all 10,042
    hellaswag_file: str = ""  # a local HellaSwag .jsonl instead of the downloaded validation file
    core_interval: int = 0  # steps between CORE evaluations (and at the last step); 0 disables
    core_max_per_task: int = 500  # items scored per CORE task (nanochat's default in training); 0: all
    core_bundle: str = ""  # a local, unpacked CORE eval bundle instead of the downloaded one


@dataclass
class CheckpointSettings:
    interval: int = 0  # steps between checkpoints; 0: only at the end and on interrupt
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the lowest validation loss
    final: bool = True  # save one when training ends


@dataclass
class LogSettings:
    interval: int = 10  # steps between console lines (metrics.jsonl gets every step)
    progress_bar: bool = True
    tensorboard: bool = False
    wandb_project: str = ""  # non-empty: log to Weights & Biases under this project


@dataclass
class SystemSettings:
    device: str = "auto"
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "fp32"
    # How several processes share the model: ddp (a full copy each) or fsdp (FSDP2 shards).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False
    seed: int = 1337
    # Peak FLOP/s for MFU; 0 looks the GPU up by name (unknown devices report no MFU).
    peak_flops: float = 0.0
    deterministic: bool = False
    # Steps recorded by torch.profiler after the first: profile/trace.json in the run folder; 0 = off.
    profile_steps: int = 0
    # On the CPU (Linux, glibc 2.39 or later): keep freed memory for the next step's tensors instead
    # of handing it back to the kernel and faulting it in again (gpt2lab.kernels.reuse_freed_cpu_memory):
    # faster steps (docs/benchmarks.md); the process's resident set then stays at its peak.
    reuse_cpu_memory: bool = True


MUON_WITH_LORA = (
    "optim.name=muon does not train LoRA adapters: Muon's orthogonalized steps are made for whole hidden "
    "matrices, not rank-r factors; use optim.name=adamw (or sgd) with finetune.lora_rank"
)


@dataclass
class FinetuneSettings:
    # LoRA adapters of this rank on lora_targets; only they train, the rest is frozen.
    # 0: off (every parameter trains: full fine-tuning).
    lora_rank: int = 0
    lora_alpha: float = DEFAULT_ALPHA  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapters' input
    # c_attn (q, k, v), c_proj (attention's and the MLP's output; attn.c_proj / mlp.c_proj for one), c_fc
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    init_from: str = "scratch"  # or a model for load_model: gpt2, a folder, a checkpoint
    data: DataSettings = field(default_factory=DataSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    max_steps: int = 0
    max_tokens: int = 0  # alternative to max_steps: stop after this many tokens
    max_epochs: int = 0  # or after this many passes over the training split (its first epoch's steps)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log: LogSettings = field(default_factory=LogSettings)
    system: SystemSettings = field(default_factory=SystemSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def tokens_per_micro_batch(self) -> int:
        return self.batch.micro_batch * self.batch.seq_len

    def grad_accum_steps(self, world_size: int = 1) -> int:
        per_step = self.tokens_per_micro_batch() * world_size
        total = self.batch.total_tokens or per_step
        if total % per_step:
            raise UserError(
                f"batch.total_tokens ({total}) is not divisible by batch.micro_batch * batch.seq_len * "
                f"world size ({self.batch.micro_batch} * {self.batch.seq_len} * {world_size} = {per_step}); "
                "change one of them"
            )
        return total // per_step

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.tokens_per_micro_batch() * world_size * self.grad_accum_steps(world_size)

    def total_steps(self, world_size: int = 1, steps_per_epoch: int | None = None) -> int:
        """Optimizer steps of the run; with max_epochs, `steps_per_epoch` (optimizer steps in one
        pass over the training split) must be given."""
        if self.max_steps:
            return self.max_steps
        if self.max_epochs:
            if not steps_per_epoch:
                raise UserError(
                    f"the training split of {self.data.path} is shorter than one optimizer step of "
                    f"{self.tokens_per_step(world_size):,} tokens, so max_epochs counts no step; lower "
                    "batch.total_tokens or batch.micro_batch, or use max_steps"
                )
            return self.max_epochs * steps_per_epoch
        per_step = self.tokens_per_step(world_size)
        return -(-self.max_tokens // per_step)

    def validate(self, world_size: int = 1) -> None:
        """Checks that need no data and no model: everything wrong here is a setting to change."""
        check_finite_settings(self)
        self.model.validate()
        positive = {
            "batch.micro_batch": self.batch.micro_batch,
            "batch.seq_len": self.batch.seq_len,
        }
        for key, value in positive.items():
            if value <= 0:
                raise UserError(f"{key} must be positive, got {value}")
        non_negative = {
            "batch.total_tokens": self.batch.total_tokens,
            "max_steps": self.max_steps,
            "max_tokens": self.max_tokens,
            "max_epochs": self.max_epochs,
            "schedule.warmup_steps": self.schedule.warmup_steps,
            "schedule.decay_steps": self.schedule.decay_steps,
            "eval.interval": self.eval.interval,
            "eval.batches": self.eval.batches,
            "eval.sample_interval": self.eval.sample_interval,
            "eval.sample_tokens": self.eval.sample_tokens,
            "eval.hellaswag_interval": self.eval.hellaswag_interval,
            "eval.hellaswag_limit": self.eval.hellaswag_limit,
            "eval.core_interval": self.eval.core_interval,
            "eval.core_max_per_task": self.eval.core_max_per_task,
            "checkpoint.interval": self.checkpoint.interval,
            "log.interval": self.log.interval,
            "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip,
            "system.peak_flops": self.system.peak_flops,
            "system.profile_steps": self.system.profile_steps,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise UserError(f"{key} must be >= 0, got {value}")
        if not -(2**63) <= self.system.seed < 2**64:
            raise UserError(f"system.seed ({self.system.seed}) does not fit in 64 bits; give 0 to {2**64 - 1}")
        if self.checkpoint.keep_last < 1:
            raise UserError(f"checkpoint.keep_last must be at least 1, got {self.checkpoint.keep_last}")
        lengths = [key for key in ("max_steps", "max_tokens", "max_epochs") if getattr(self, key)]
        if not lengths:
            raise UserError("set max_steps, max_tokens or max_epochs (e.g. --set max_steps=1000)")
        if len(lengths) > 1:
            raise UserError(
                f"set only one of max_steps, max_tokens and max_epochs (given: {', '.join(lengths)}); "
                "set the others to 0"
            )
        if self.batch.seq_len > self.model.block_size:
            raise UserError(
                f"batch.seq_len ({self.batch.seq_len}) exceeds model.block_size ({self.model.block_size}); "
                "lower batch.seq_len or raise model.block_size"
            )
        if not self.optim.lr > 0:
            raise UserError(f"optim.lr must be positive, got {self.optim.lr}")
        if not 0 <= self.optim.min_lr <= self.optim.lr:
            raise UserError(f"optim.min_lr must be in [0, optim.lr], got {self.optim.min_lr}")
        for key in ("beta1", "beta2"):
            value = getattr(self.optim, key)
            if not 0 <= value < 1:
                raise UserError(f"optim.{key} must be in [0, 1), got {value}")
        self._validate_muon_and_schedule()
        self._validate_finetune()
        self.grad_accum_steps(world_size)

    def _validate_finetune(self) -> None:
        finetune = self.finetune
        check_lora_settings(finetune.lora_rank, finetune.lora_alpha, finetune.lora_dropout, finetune.lora_targets)
        if finetune.lora_rank and self.optim.name == "muon":
            raise UserError(MUON_WITH_LORA)

    def _validate_muon_and_schedule(self) -> None:
        optim = self.optim
        if optim.name == "muon":
            if not (math.isfinite(optim.muon_lr) and optim.muon_lr > 0):
                raise UserError(f"optim.muon_lr must be a finite number > 0, got {optim.muon_lr}")
            if not 0 <= optim.muon_momentum < 1:
                raise UserError(f"optim.muon_momentum must be in [0, 1), got {optim.muon_momentum}")
            if optim.muon_ns_steps < 1:
                raise UserError(f"optim.muon_ns_steps must be at least 1, got {optim.muon_ns_steps}")
            if optim.muon_weight_decay < 0:
                raise UserError(f"optim.muon_weight_decay must be >= 0, got {optim.muon_weight_decay}")
            if optim.momentum != OptimSettings.momentum:
                raise UserError(
                    "optim.momentum is SGD's setting; with optim.name=muon set optim.muon_momentum "
                    "(the hidden matrices) or optim.beta1 (the AdamW groups) instead"
                )
        if not 0 < self.schedule.decay_fraction <= 1:
            raise UserError(f"schedule.decay_fraction must be in (0, 1], got {self.schedule.decay_fraction}")


# GPT-2's vocabulary with the default chat format's role and end-of-turn tokens after it.
CHAT_VOCAB_SIZE = max(CHAT_FORMATS[DEFAULT_CHAT_FORMAT].values()) + 1

MODERN_OPTIONS = dict(position="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
                      zero_init_proj=True)


def _char_model(**values) -> GPTConfig:
    return GPTConfig(vocab_size=65, bias=False, **values)


PRESETS: dict[str, TrainConfig] = {
    # nanoGPT's config/train_shakespeare_char.py (a GPU run).
    "shakespeare-char": TrainConfig(
        model=_char_model(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
        data=DataSettings(path="data/shakespeare-char"),
        batch=BatchSettings(micro_batch=64, seq_len=256),
        max_steps=5000,
        optim=OptimSettings(lr=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1),
        schedule=ScheduleSettings(warmup_steps=100),
        eval=EvalSettings(interval=250, batches=200, sample_interval=1000, sample_prompt="\n", sample_tokens=200),
        checkpoint=CheckpointSettings(interval=1000),
        system=SystemSettings(precision="bf16", compile=True),
    ),
    # nanoGPT's documented CPU run of the same: a smaller model, no dropout, 2000 steps.
    "shakespeare-char-cpu": TrainConfig(
        model=_char_model(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
        data=DataSettings(path="data/shakespeare-char"),
        batch=BatchSettings(micro_batch=12, seq_len=64),
        max_steps=2000,
        optim=OptimSettings(lr=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1),
        schedule=ScheduleSettings(warmup_steps=100),
        eval=EvalSettings(interval=250, batches=20, sample_interval=1000, sample_prompt="\n", sample_tokens=200),
        checkpoint=CheckpointSettings(interval=1000),
        system=SystemSettings(device="cpu", precision="fp32"),
    ),
    # The modern recipe at the CPU run's size (docs/recipes.md): RoPE, RMSNorm, QK-norm, ReLU²,
    # an untied head, zero-initialised projections, Muon and a WSD schedule.
    "speedrun-char-cpu": TrainConfig(
        model=_char_model(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, **MODERN_OPTIONS),
        data=DataSettings(path="data/shakespeare-char"),
        # Twice the CPU run's batch for half its steps (and 4 Newton-Schulz steps, not 5): Muon's
        # cost is per step, and at this size it is a quarter of a step (docs/recipes.md).
        batch=BatchSettings(micro_batch=24, seq_len=64),
        max_steps=950,
        optim=OptimSettings(name="muon", lr=3e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.0, muon_lr=0.03,
                            muon_ns_steps=4),
        schedule=ScheduleSettings(kind="wsd", warmup_steps=50, decay_fraction=0.5),
        eval=EvalSettings(interval=250, batches=20, sample_interval=500, sample_prompt="\n", sample_tokens=200),
        checkpoint=CheckpointSettings(interval=500),
        system=SystemSettings(device="cpu", precision="fp32"),
    ),
    # The modern recipe at GPT-2 (124M) size on FineWeb-EDU, one GPU (docs/recipes.md).
    "speedrun-124m": TrainConfig(
        model=GPTConfig.from_preset("gpt2", n_head=6, padded_vocab_size=GPT2_PADDED_VOCAB_SIZE, bias=False,
                                     logit_softcap=30.0, **MODERN_OPTIONS),
        data=DataSettings(path="data/fineweb-edu"),
        batch=BatchSettings(total_tokens=524_288, micro_batch=32, seq_len=1024),
        max_tokens=3_200_000_000,
        optim=OptimSettings(name="muon", lr=4e-3, min_lr=0.0, weight_decay=0.0, beta1=0.9, beta2=0.95,
                            muon_lr=0.05, grad_clip=0.0),
        schedule=ScheduleSettings(kind="wsd", warmup_steps=0, decay_fraction=0.3),
        eval=EvalSettings(interval=250, batches=20, sample_interval=1000, sample_prompt="Hello, I'm a language model,",
                          sample_tokens=32, hellaswag_interval=1000),
        checkpoint=CheckpointSettings(interval=2000),
        system=SystemSettings(precision="bf16", compile=True),
    ),
    # build-nanogpt's GPT-2 (124M) reproduction on FineWeb-EDU sample-10BT.
    "gpt2-124m": TrainConfig(
        model=GPTConfig.from_preset("gpt2", padded_vocab_size=GPT2_PADDED_VOCAB_SIZE),
        data=DataSettings(path="data/fineweb-edu"),
        batch=BatchSettings(total_tokens=524_288, micro_batch=64, seq_len=1024),
        max_steps=19_073,
        optim=OptimSettings(lr=6e-4, min_lr=6e-5, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0),
        schedule=ScheduleSettings(warmup_steps=715),
        eval=EvalSettings(interval=250, batches=20, sample_interval=250, sample_prompt="Hello, I'm a language model,",
                          sample_tokens=32, at_start=True),
        checkpoint=CheckpointSettings(interval=5000),
        system=SystemSettings(precision="bf16", compile=True),
    ),
    # llm.c's GPT-2 (350M) run: same recipe, 3e-4, 0.5M-token batches on FineWeb-EDU.
    "gpt2-350m": TrainConfig(
        model=GPTConfig.from_preset("gpt2-medium", padded_vocab_size=GPT2_PADDED_VOCAB_SIZE),
        data=DataSettings(path="data/fineweb-edu"),
        batch=BatchSettings(total_tokens=524_288, micro_batch=32, seq_len=1024),
        max_steps=60_000,
        optim=OptimSettings(lr=3e-4, min_lr=0.0, weight_decay=0.1, beta2=0.95, grad_clip=1.0),
        schedule=ScheduleSettings(warmup_steps=700),
        eval=EvalSettings(interval=250, batches=20, sample_interval=1000, sample_prompt="Hello, I'm a language model,"),
        checkpoint=CheckpointSettings(interval=5000),
        system=SystemSettings(precision="bf16", compile=True),
    ),
    # llm.c's GPT-2 (774M) run: 1M-token batches, 2.5e-4.
    "gpt2-774m": TrainConfig(
        model=GPTConfig.from_preset("gpt2-large", padded_vocab_size=GPT2_PADDED_VOCAB_SIZE),
        data=DataSettings(path="data/fineweb-edu"),
        batch=BatchSettings(total_tokens=1_048_576, micro_batch=16, seq_len=1024),
        max_steps=286_102,
        optim=OptimSettings(lr=2.5e-4, min_lr=0.0, weight_decay=0.1, beta2=0.95, grad_clip=1.0),
        schedule=ScheduleSettings(warmup_steps=700),
        eval=EvalSettings(interval=250, batches=20, sample_interval=5000, sample_prompt="Hello, I'm a language model,"),
        checkpoint=CheckpointSettings(interval=5000),
        system=SystemSettings(precision="bf16", compile=True, parallel="fsdp"),
    ),
    # llm.c's GPT-2 (1.5B) run: 1M-token batches, 6e-4, on a node of GPUs.
    "gpt2-1558m": TrainConfig(
        model=GPTConfig.from_preset("gpt2-xl", padded_vocab_size=GPT2_PADDED_VOCAB_SIZE),
        data=DataSettings(path="data/fineweb-edu"),
        batch=BatchSettings(total_tokens=1_048_576, micro_batch=16, seq_len=1024),
        max_steps=32_000,
        optim=OptimSettings(lr=6e-4, min_lr=0.0, weight_decay=0.1, beta2=0.95, grad_clip=1.0),
        schedule=ScheduleSettings(warmup_steps=700),
        eval=EvalSettings(interval=250, batches=20, sample_interval=5000, sample_prompt="Hello, I'm a language model,"),
        checkpoint=CheckpointSettings(interval=2000),
        system=SystemSettings(precision="bf16", compile=True, parallel="fsdp"),
    ),
    # Instruction fine-tuning of OpenAI's gpt2 on a `prepare chat` folder (docs/chat.md): loss on
    # the assistant's tokens only, conversations packed without attending across them; the chat
    # tokens take GPT-2's spare padded rows. A small constant-then-cosine rate, as SFT of a
    # pretrained model wants (nanochat and litgpt use 1e-5 to 3e-5), for a few epochs.
    "sft": TrainConfig(
        model=GPTConfig.from_preset("gpt2", vocab_size=CHAT_VOCAB_SIZE, padded_vocab_size=GPT2_PADDED_VOCAB_SIZE),
        init_from="gpt2",
        data=DataSettings(path="data/chat", random_offset=False),
        batch=BatchSettings(total_tokens=16_384, micro_batch=4, seq_len=1024),
        max_epochs=3,
        optim=OptimSettings(lr=2e-5, min_lr=2e-6, weight_decay=0.0, beta2=0.95),
        schedule=ScheduleSettings(warmup_steps=10),
        eval=EvalSettings(interval=100, batches=0, sample_interval=0),
        checkpoint=CheckpointSettings(interval=500),
        system=SystemSettings(precision="bf16"),
    ),
    # nanoGPT's config/finetune_shakespeare.py: OpenAI's gpt2 weights, constant small lr.
    "finetune-shakespeare": TrainConfig(
        model=GPTConfig.from_preset("gpt2"),
        init_from="gpt2",
        data=DataSettings(path="data/shakespeare"),
        batch=BatchSettings(total_tokens=32_768, micro_batch=1, seq_len=1024),
        max_steps=20,
        optim=OptimSettings(lr=3e-5, min_lr=3e-5, beta2=0.99),
        schedule=ScheduleSettings(kind="constant"),
        eval=EvalSettings(interval=5, batches=40, sample_interval=10, sample_prompt="ROMEO:"),
        checkpoint=CheckpointSettings(interval=0),
        system=SystemSettings(precision="bf16"),
    ),
}


BUDGETS = ("max_steps", "max_tokens", "max_epochs")


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    notes: list[str] | None = None,
) -> TrainConfig:
    """Preset, then the TOML file's values, then `key=value` overrides, each on top of the last.

    A run has one budget, so an override of one budget replaces whichever budget the preset or
    the file set (a line saying so is appended to `notes`); two budgets given as overrides stay an
    error for `validate`.
    """
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = dataclasses.replace(PRESETS[preset]) if preset else TrainConfig()
    if config_file is not None:
        values = load_toml(config_file)
        try:
            config = merge_values(config, values)
        except UserError as error:
            raise UserError(f"{config_file}: {error}") from None
    overridden = apply_overrides(config, overrides or [])
    from_command_line = {item.partition("=")[0].strip() for item in overrides or []}
    # What the user said (the command line, their TOML file) wins over what the preset assumed.
    said = from_command_line | (set(_flat_keys(values)) if config_file is not None else set())
    overridden = fit_to_data_and_model(overridden, said, notes if notes is not None else [])
    given = {key for key in BUDGETS if getattr(overridden, key) and key in from_command_line}
    if len(given) != 1:
        return overridden
    replaced = [key for key in BUDGETS if key not in given and getattr(overridden, key)]
    if replaced and notes is not None:
        source = " and ".join(
            ([f"preset {preset}"] if preset else []) + ([str(config_file)] if config_file else [])
        ) or "the defaults"
        (budget,) = given
        notes.append(
            f"--set {budget}={getattr(overridden, budget)} replaces "
            + " and ".join(f"{key}={getattr(overridden, key)}" for key in replaced)
            + f" of {source}"
        )
    return dataclasses.replace(overridden, **{key: 0 for key in replaced})


def _flat_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a nested TOML table: {"model": {"n_layer": 2}} -> ["model.n_layer"]."""
    keys = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, f"{name}.") if isinstance(value, dict) else [name]
    return keys


# A padding of the vocabulary that stays when the vocabulary changes: one that rounds it up.
_PADDING_SLACK = 128


def fit_to_data_and_model(config: TrainConfig, said: set[str], notes: list[str]) -> TrainConfig:
    """A preset states the vocabulary of its own data and the sequence length of its own model.
    Settings the user did not give (`said`) follow the data in data.path (a model from scratch
    takes its vocabulary) and the model init_from names (batches no longer than its context);
    a line in `notes` says what was taken. Data not prepared yet, or a model not on this machine,
    leave the settings as they are: training checks them against the real thing."""
    if config.init_from == "scratch":
        return _vocabulary_from_data(config, said, notes)
    return _sequences_within_model(config, said, notes)


# A BPE vocabulary taken from the data gets rows up to a multiple of this: the head's matrix
# products run faster on such shapes (nanoGPT's 50304 for GPT-2's 50257).
VOCAB_ROW_MULTIPLE = 64


def _vocabulary_from_data(config: TrainConfig, said: set[str], notes: list[str]) -> TrainConfig:
    from ..data.dataset import open_dataset

    if "model.vocab_size" in said:
        return config
    try:
        dataset = open_dataset(config.data.path)
    except UserError:
        return config
    vocab, model = dataset.vocab_size, config.model
    if vocab == model.vocab_size:
        return config
    padded = model.padded_vocab_size
    note = f"model.vocab_size={vocab}, the vocabulary of the data in {config.data.path} (not {model.vocab_size})"
    if "model.padded_vocab_size" not in said and not (padded is not None and vocab <= padded < vocab + _PADDING_SLACK):
        dropped = f"; its padding to {padded} rows dropped" if padded is not None else ""
        padded = None
        if not _is_characters(dataset.tokenizer_spec) and vocab % VOCAB_ROW_MULTIPLE:
            padded = -(-vocab // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE
            dropped = f"{dropped}, padded to {padded} rows" if dropped else f", padded to {padded} rows"
        note += dropped
    notes.append(note)
    return dataclasses.replace(config, model=dataclasses.replace(model, vocab_size=vocab, padded_vocab_size=padded))


def _is_characters(tokenizer_spec: Any) -> bool:
    return isinstance(tokenizer_spec, dict) and tokenizer_spec.get("type") == "char"


def _sequences_within_model(config: TrainConfig, said: set[str], notes: list[str]) -> TrainConfig:
    from ..pretrained import read_config, resolve_model_path

    if "batch.seq_len" in said or not Path(config.init_from).exists():
        return config
    try:
        context = read_config(resolve_model_path(config.init_from)).block_size
    except UserError:
        return config
    batch = config.batch
    if batch.seq_len <= context:
        return config
    changes = {"seq_len": context}
    note = f"batch.seq_len={context}, the context of {config.init_from} (not {batch.seq_len})"
    per_micro_batch = batch.micro_batch * context
    if batch.total_tokens % per_micro_batch and "batch.total_tokens" not in said:
        changes["total_tokens"] = max(1, round(batch.total_tokens / per_micro_batch)) * per_micro_batch
        note += f", and batch.total_tokens={changes['total_tokens']} to hold whole micro-batches"
    notes.append(note)
    return dataclasses.replace(config, batch=dataclasses.replace(batch, **changes))
