"""The training loop: gradient accumulation, mixed precision, clipping, evaluation, samples,
checkpoints that resume exactly, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..console import Console, reader_gone
from ..data.chat_loader import ChatLoader
from ..data.dataset import TokenDataset, open_dataset
from ..data.loader import TokenLoader
from ..errors import UserError
from ..eval.loss import LossResult, loss_over_batches, token_byte_lengths
from ..files import FolderLock, write_atomic
from ..inference.generate import generate
from ..lora import apply_lora, parameter_counts
from ..model import Transformer
from ..inference.prompts import checked_prompt, empty_prompt_start
from ..runtime import autocast, check_fits
from ..inference.sampling import generator_seed
from ..tokenizer import Tokenizer, load_tokenizer, same_ids, tokenizer_from_spec
from .checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_states,
    save_checkpoint,
)
from .config import EvalSettings, FinetuneSettings, SystemSettings, TrainConfig
from .distributed import DistInfo, all_reduce_max, finish_together, init_distributed, shard_model
from .metrics import MetricsLog, peak_flops_for
from .optim import build_optimizer, learning_rate, set_learning_rate
from .profiling import step_profiler

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..eval.core import CoreEvaluation
    from ..eval.hellaswag import HellaSwag

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Copies of every weight that training holds: the weights, their gradients and the optimizer's state.
TRAINING_COPIES = {"adamw": 4, "sgd": 3, "muon": 3}
# Each finishes the step, saves a checkpoint and ends the run; SIGHUP is a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# ---- the builders: Trainer.__init__ calls them in this order ---------------------------------


def open_process_group(config: TrainConfig) -> DistInfo:
    """This process's place in the run (torchrun's process group, or alone) and its device, with
    the settings checked against the number of processes."""
    group = init_distributed(config.system.device)
    config.validate(group.world_size)
    return group


def open_data(
    config: TrainConfig, group: DistInfo, echo: Callable[[str], None]
) -> tuple[TokenDataset, TokenLoader | ChatLoader, TokenLoader | ChatLoader | None]:
    """The dataset, this rank's training loader and its validation loader (None: no evaluation)."""
    dataset = _open_dataset(config)
    train_loader = _train_loader(config, dataset, group, echo)
    return dataset, train_loader, _val_loader(config, dataset, group)


def _open_dataset(config: TrainConfig) -> TokenDataset:
    dataset = open_dataset(config.data.path)
    if dataset.vocab_size > config.model.vocab_size and config.init_from == "scratch":
        raise UserError(
            f"the data in {config.data.path} has a vocabulary of {dataset.vocab_size} but "
            f"model.vocab_size is {config.model.vocab_size}; set model.vocab_size={dataset.vocab_size}"
        )
    return dataset


def _train_loader(
    config: TrainConfig, dataset: TokenDataset, group: DistInfo, echo: Callable[[str], None]
) -> TokenLoader | ChatLoader:
    batch = config.batch
    common = dict(
        split=config.data.train_split, batch_size=batch.micro_batch, seq_len=batch.seq_len, rank=group.rank,
        world_size=group.world_size, seed=config.system.seed, shuffle=config.data.shuffle,
        pin_memory=group.device.type == "cuda",
    )
    if dataset.kind == "chat":
        loader = ChatLoader(dataset, **common)
        _note_cut_conversations(loader, echo)
    else:
        loader = TokenLoader(dataset, random_offset=config.data.random_offset, **common)
    if loader.windows_per_epoch < batch.micro_batch:
        raise UserError(
            f"the {config.data.train_split} split of {config.data.path} is too short for one batch of "
            f"{batch.micro_batch} x {batch.seq_len} tokens; lower batch.micro_batch or batch.seq_len"
        )
    return loader


def _note_cut_conversations(loader: ChatLoader, echo: Callable[[str], None]) -> None:
    if loader.truncated or loader.dropped:
        echo(
            f"{loader.split}: {loader.truncated:,} conversations longer than batch.seq_len + 1 tokens cut at "
            f"a turn boundary, {loader.dropped:,} dropped (no answer fits); raise batch.seq_len to keep them"
        )


def _val_loader(config: TrainConfig, dataset: TokenDataset, group: DistInfo) -> TokenLoader | ChatLoader | None:
    """None when no evaluation is asked for, or the split is shorter than one window."""
    settings, batch = config.eval, config.batch
    if not (settings.interval or settings.final_full or settings.at_start):
        return None
    if dataset.split_tokens(config.data.val_split) <= batch.seq_len:
        return None
    loader_class = ChatLoader if dataset.kind == "chat" else TokenLoader
    return loader_class(
        dataset, split=config.data.val_split, batch_size=batch.micro_batch,
        seq_len=batch.seq_len, rank=group.rank, world_size=group.world_size, shuffle=False,
        pin_memory=group.device.type == "cuda",
    )


def count_steps(config: TrainConfig, world_size: int, train_loader: TokenLoader | ChatLoader) -> tuple[int, int, int]:
    """(micro-batches per optimizer step, tokens per optimizer step, optimizer steps of the run):
    max_epochs counts the steps in the training loader's epoch."""
    grad_accum = config.grad_accum_steps(world_size)
    tokens_per_step = config.tokens_per_step(world_size)
    return grad_accum, tokens_per_step, config.total_steps(world_size, train_loader.steps_per_epoch // grad_accum)


def build_evaluators(
    settings: EvalSettings, dataset: TokenDataset
) -> tuple[Tokenizer, HellaSwag | None, CoreEvaluation | None]:
    """The data's tokenizer (samples, checkpoints and bits per byte use it), HellaSwag when
    eval.hellaswag_interval asks for it, and the CORE tasks when eval.core_interval does."""
    tokenizer = tokenizer_from_spec(dataset.tokenizer_spec)
    return tokenizer, _load_hellaswag(settings, tokenizer), _load_core(settings, tokenizer)


def _load_core(settings: EvalSettings, tokenizer: Tokenizer) -> CoreEvaluation | None:
    if not settings.core_interval:
        return None
    from ..eval.core import CoreEvaluation
    from ..eval.core_bundle import cached_bundle, load_bundle

    bundle = load_bundle(settings.core_bundle or cached_bundle())
    return CoreEvaluation(bundle, tokenizer, max_per_task=settings.core_max_per_task or None)


def _load_hellaswag(settings: EvalSettings, tokenizer: Tokenizer) -> HellaSwag | None:
    if not settings.hellaswag_interval:
        return None
    from ..eval.hellaswag import HellaSwag, load_examples

    examples = load_examples("val", settings.hellaswag_file or None, settings.hellaswag_limit or None)
    return HellaSwag(examples, tokenizer)


def build_model(
    config: TrainConfig, group: DistInfo, data_vocab_size: int, data_tokenizer: Any = None
) -> tuple[Transformer, TrainConfig]:
    """The model to train, still on the CPU and whole (no adapters, shards or compilation yet):
    drawn from system.seed, or loaded from init_from. Returned with the settings, whose model.*
    is then the loaded model's shape. A model from scratch whose training cannot fit in memory
    is refused before it is built, and so is a loaded model whose tokenizer gives other ids
    than the data's (`data_tokenizer`, its record: None skips the check)."""
    if config.init_from == "scratch":
        fsdp = group.enabled and config.system.parallel == "fsdp"
        _check_model_fits(config, group.device, group.world_size if fsdp else 1)
    _configure_torch(config.system, group.device)
    if config.init_from == "scratch":
        model = Transformer(config.model)
    else:
        model, config = _load_initial_model(config, data_vocab_size, data_tokenizer)
    if group.device.type == "cpu":  # elsewhere the kernels package is not even imported
        from ..kernels import accelerate

        model = accelerate(model)
    return model, config


def _check_model_fits(config: TrainConfig, device: torch.device, shards: int) -> None:
    """Refuse, before building it, a model whose training cannot fit in memory (a mistyped
    model.block_size=1e9 would otherwise fail inside the allocator); FSDP keeps 1/`shards` of it
    on each device."""
    with torch.device("meta"):
        shapes = dict(Transformer(config.model).named_parameters())
    weights = sum(p.numel() * p.element_size() for p in shapes.values())
    name, largest = max(shapes.items(), key=lambda item: item[1].numel())
    count, shape = sum(p.numel() for p in shapes.values()), " x ".join(map(str, largest.shape))
    what = f"this model of {count:,} parameters (its largest tensor, {name}, is {shape})"
    fix = "make it smaller: check model.block_size, model.n_embd, model.n_layer and model.vocab_size"
    if device.type != "cpu":
        check_fits(weights, torch.device("cpu"), f"building {what}", fix)
    copies = TRAINING_COPIES.get(config.optim.name, 4)
    check_fits(weights * copies // shards, device, f"training {what} with its gradients and optimizer state", fix)


def _configure_torch(system: SystemSettings, device: torch.device) -> None:
    """The seed, numerics and memory reuse of the run, set before the model draws its initial weights."""
    if system.reuse_cpu_memory and device.type == "cpu":
        from ..kernels import tune_cpu_memory

        tune_cpu_memory(reuse_freed=True)
    torch.manual_seed(generator_seed(system.seed))
    if system.deterministic:
        torch.use_deterministic_algorithms(True)
    if system.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _load_initial_model(
    config: TrainConfig, data_vocab_size: int, data_tokenizer: Any
) -> tuple[Transformer, TrainConfig]:
    """The model init_from names, on the CPU, and the settings with its shape in model.*."""
    from ..pretrained import load_model, read_record, resolve_model_path

    model = load_model(
        config.init_from,
        dropout=config.model.dropout,
        attention=config.model.attention,
        padded_vocab_size=config.model.padded_vocab_size,
    )
    folder = resolve_model_path(config.init_from)
    record = read_record(folder)
    # A folder saved without a tokenizer (a record with no "tokenizer") says nothing to compare;
    # one without gpt2lab's record is transformers' GPT-2, whose BPE it then uses.
    if data_tokenizer is not None and (record is None or "tokenizer" in record):
        model_tokenizer = load_tokenizer(folder)
        if not same_ids(model_tokenizer.spec(), data_tokenizer):
            raise UserError(
                f"the data in {config.data.path} was tokenized with {tokenizer_from_spec(data_tokenizer).describe()}, "
                f"but {config.init_from} was trained with {model_tokenizer.describe()}: the same ids mean other "
                f"text to it; prepare the data again with --tokenizer {config.init_from}"
            )
    if config.batch.seq_len > model.config.block_size:
        raise UserError(
            f"batch.seq_len ({config.batch.seq_len}) is longer than the context of {config.init_from} "
            f"({model.config.block_size} tokens); set batch.seq_len={model.config.block_size} or less"
        )
    if model.config.vocab_size < data_vocab_size <= model.config.embedding_rows:
        _take_spare_rows(model, data_vocab_size, config.system.seed)
    config = dataclasses.replace(config, model=model.config)
    if data_vocab_size > config.model.vocab_size:
        raise UserError(
            f"the data's vocabulary ({data_vocab_size}) is larger than that of "
            f"{config.init_from} ({config.model.vocab_size}); prepare the data with the model's tokenizer"
        )
    return model, config


def _take_spare_rows(model: Transformer, vocab_size: int, seed: int) -> None:
    """Give the ids [vocab_size of the model, vocab_size) of a loaded model (the chat tokens in
    GPT-2's padded rows) embeddings of their own: a padded row holds zeros, and zero rows would
    make the role tokens indistinguishable. Each new row is the mean embedding plus noise of the
    rows' spread, so it starts as a typical, distinct token."""
    known = model.config.vocab_size
    weight = model.transformer.wte.weight
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        rows = weight[:known].float()
        noise = torch.randn(vocab_size - known, weight.size(1), generator=generator)
        weight[known:vocab_size] = (rows.mean(0) + rows.std(0) * noise).to(weight.device, weight.dtype)
    model.config.vocab_size = vocab_size


def add_adapters(model: Transformer, settings: FinetuneSettings, echo: Callable[[str], None]) -> None:
    """LoRA adapters on the model, in place (all else frozen), when finetune.lora_rank asks for them."""
    if not settings.lora_rank:
        return
    apply_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_dropout, settings.lora_targets)
    trainable, total = parameter_counts(model)
    echo(
        f"LoRA rank {settings.lora_rank} on {', '.join(settings.lora_targets)}: {trainable:,} of {total:,} "
        f"parameters train ({trainable / total:.2%})"
    )


def place_on_ranks(model: Transformer, system: SystemSettings, group: DistInfo) -> tuple[bool, torch.dtype | None]:
    """The model on this rank's device, in place, with a dropout stream of the rank's own, and
    sharded across the ranks under FSDP. Returns (whether it is sharded, the dtype the training
    step autocasts to: None for none)."""
    model.to(group.device)
    # Equal initial weights on every rank, then a dropout stream of each rank's own.
    torch.manual_seed(generator_seed(system.seed + group.rank))
    autocast_dtype = AUTOCAST_DTYPES.get(system.precision)
    fsdp = group.enabled and system.parallel == "fsdp"
    if fsdp:
        shard_model(model, autocast_dtype)
        autocast_dtype = None  # FSDP's mixed-precision policy casts instead
    return fsdp, autocast_dtype


def build_optimizer_and_scaler(
    model: Transformer, config: TrainConfig, device: torch.device, fsdp: bool
) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """The optimizer over the parameters that train, and the loss scaler of fp16 training (None
    otherwise, and under FSDP, whose float32 gradient reduction needs none)."""
    optimizer = build_optimizer(model, config.optim, device)
    scaler = torch.amp.GradScaler(device.type) if config.system.precision == "fp16" and not fsdp else None
    return optimizer, scaler


def wrap_for_step(model: Transformer, compile_model: bool, ddp: bool, device: torch.device) -> torch.nn.Module:
    """What the training step calls: the model, compiled if asked, inside DDP on several ranks."""
    wrapped = torch.compile(model) if compile_model else model
    if ddp:
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def lock_run_dir(run_dir: Path, is_main: bool, device: torch.device) -> FolderLock | None:
    """Rank 0 holds the run folder from here to the end of `run()`: a second run there would
    prune this one's checkpoints and interleave its metrics. Every rank stops if it cannot."""
    lock, problem = None, None
    if is_main:
        try:
            lock = FolderLock(run_dir, "run folder")
        except UserError as error:
            problem = error
    if all_reduce_max(float(problem is not None), device) > 0:
        raise problem or UserError(f"rank 0 could not take the run folder {run_dir}; see its message")
    return lock


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a run stands: optimizer steps taken, seconds trained, and the validation losses
    its checkpoints record (the best so far, and the latest)."""

    step: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    last_val_loss: float | None = None


def resume_training(
    run_dir: Path, requested: str | None, *, model: Transformer, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None, train_loader: TokenLoader | ChatLoader, group: DistInfo, seed: int,
    echo: Callable[[str], None],
) -> Progress:
    """The progress of the checkpoint `requested` names (--resume: None, `auto` or a folder), with
    the model, optimizer, scaler, loader and random streams restored from it in place; a fresh
    start's Progress() when there is none."""
    checkpoint = find_resume_checkpoint(run_dir, requested)
    if checkpoint is None:
        return Progress()
    configured = _group_settings(optimizer)
    state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scaler=scaler)
    for change in _keep_group_settings(optimizer, configured):
        echo(f"resuming with this run's optimizer setting {change}")
    progress = Progress(
        step=state["step"], elapsed_s=state.get("elapsed_s", 0.0),
        best_val_loss=state.get("best_val_loss"), last_val_loss=state.get("val_loss"),
    )
    train_loader.load_state_dict(state["loader"])
    saved_rngs = state["rng"]
    if len(saved_rngs) == group.world_size:
        restore_rng_states(saved_rngs[group.rank])
    else:
        # Another world size: dropout streams cannot continue, so start them afresh.
        torch.manual_seed(hash((seed, progress.step, group.rank)) % 2**63)
    echo(f"resumed from {checkpoint} at step {progress.step}")
    return progress


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (betas, weight decay, Newton-Schulz steps, ...) but its
    parameters and its rate, which the schedule sets every step."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]


def _keep_group_settings(optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]]) -> list[str]:
    """Put back the run's own group settings that loading a checkpoint's optimizer state replaced
    (the run's config.toml says what it trains with); returns each change, said as "key: OLD in
    the checkpoint, NEW now"."""
    changes = set()
    for group, settings in zip(optimizer.param_groups, configured):
        for key, value in settings.items():
            saved = group.get(key)
            if isinstance(saved, list):  # a tuple (betas) comes back from the state dict as a list
                saved = tuple(saved)
            if saved != value:
                changes.add(f"{key}: {saved} in the checkpoint, {value} now")
            group[key] = value
    return sorted(changes)


class Trainer:
    """One training run in `run_dir`. Everything that can be wrong with the settings or the data is
    checked in the constructor, before the model is built."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        resume: str | None = None,
        echo: Callable[[str], None] | None = None,
    ):
        self.dist = open_process_group(config)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.is_main = self.dist.is_main
        self.run_dir = Path(run_dir)
        # Output is optional, the run is not: a closed pipe or terminal silences it (console.py).
        self.console = Console(echo or (lambda line: print(line, flush=True)), on_gone=self._silence_progress_bar)
        self.echo = self.console if self.is_main else (lambda line: None)
        self.bar: tqdm | None = None
        self.dataset, self.train_loader, self.val_loader = open_data(config, self.dist, self.echo)
        steps = count_steps(config, self.world_size, self.train_loader)
        self.grad_accum, self.tokens_per_step, self.total_steps = steps
        self.tokenizer, self.hellaswag, self.core = build_evaluators(config.eval, self.dataset)
        self.raw_model, config = build_model(config, self.dist, self.dataset.vocab_size, self.dataset.tokenizer_spec)
        self.config = config
        self.token_bytes = token_byte_lengths(self.tokenizer, config.model.embedding_rows)
        add_adapters(self.raw_model, config.finetune, self.echo)
        self.fsdp, self.autocast_dtype = place_on_ranks(self.raw_model, config.system, self.dist)
        self.optimizer, self.scaler = build_optimizer_and_scaler(self.raw_model, config, self.device, self.fsdp)
        self.ddp = self.dist.enabled and not self.fsdp
        self.model = wrap_for_step(self.raw_model, config.system.compile, self.ddp, self.device)
        self.peak_flops = peak_flops_for(self.device, config.system.peak_flops)
        self.flops_per_token = self.raw_model.flops_per_token(config.batch.seq_len)
        self.stop_signal: int | None = None
        self._lock = lock_run_dir(self.run_dir, self.is_main, self.device)
        try:
            progress = resume_training(
                self.run_dir, resume, model=self.raw_model, optimizer=self.optimizer, scaler=self.scaler,
                train_loader=self.train_loader, group=self.dist, seed=config.system.seed, echo=self.echo,
            )
        except BaseException:
            self.release()
            raise
        self.step, self.elapsed_s = progress.step, progress.elapsed_s
        self.best_val_loss, self.last_val_loss = progress.best_val_loss, progress.last_val_loss

    def release(self) -> None:
        """Let another run use the folder (`run()` does this when it ends)."""
        if self._lock is not None:
            self._lock.release()

    # ---- pieces -------------------------------------------------------------------------------

    def autocast(self):
        return autocast(self.device, self.autocast_dtype or torch.float32)

    def _to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(x, y), or a chat batch's (x, y, position_ids, attn_mask), on the training device."""
        # Only a copy from pinned memory is asynchronous: it overlaps the work already queued.
        non_blocking = self.train_loader.pin_memory
        return tuple(t.to(self.device, non_blocking=non_blocking) for t in batch)

    def evaluate(self, max_batches: int | None) -> LossResult:
        """Validation loss over the first `max_batches` batches counted over all ranks together
        (None: every window). Rank r holds windows r, r + world, ...: so each rank's first
        ceil(max_batches / world) batches are the windows one process scores in its first
        max_batches, and 1 and N processes report the same loss (max_batches a multiple of N)."""
        assert self.val_loader is not None
        per_rank = None if max_batches is None else -(-max_batches // self.world_size)
        return loss_over_batches(
            self.raw_model, self.val_loader, batches=per_rank, autocast_dtype=self.autocast_dtype,
            token_bytes=self.token_bytes,
        )

    def evaluate_hellaswag(self, metrics: MetricsLog, write: Callable[[str], None]) -> None:
        assert self.hellaswag is not None
        result = self._score_choices(self.hellaswag, metrics)
        write(
            f"step {self.step}: HellaSwag acc_norm {result.acc_norm:.4f} (harness {result.acc_norm_harness:.4f}) "
            f"over {result.examples} examples"
        )

    def evaluate_core(self, metrics: MetricsLog, write: Callable[[str], None]) -> None:
        assert self.core is not None
        result = self._score_choices(self.core, metrics)
        write(f"step {self.step}: CORE {result.core:.4f} over {len(result.tasks)} tasks, {result.examples} examples")

    def _score_choices(self, task: HellaSwag | CoreEvaluation, metrics: MetricsLog):
        """Score a multiple-choice evaluation on every rank's share and log its measures."""
        # A row holds at most about 500 tokens (HellaSwag) or the context (CORE): this many rows
        # take no more tokens than a training micro-batch, and need no gradients.
        rows = max(8, self.config.batch.micro_batch * self.config.batch.seq_len // 512)
        result = task.evaluate(
            self.raw_model, batch_size=rows, autocast_dtype=self.autocast_dtype,
            rank=self.rank, world_size=self.world_size,
        )
        metrics.log(self.step, self.step * self.tokens_per_step, self.elapsed_s, **result.metrics())
        return result

    def sample_text(self) -> str:
        settings = self.config.eval
        prompt = self.tokenizer.encode(settings.sample_prompt) if settings.sample_prompt else []
        prompt = checked_prompt(prompt, self.raw_model.config.vocab_size, empty_prompt_start(self.tokenizer))
        out = generate(
            self.raw_model,
            [prompt], settings.sample_tokens, temperature=0.8, top_k=200,
            seed=self.config.system.seed + self.step, eos_token_id=self.tokenizer.eot_token,
            vocab_size=self.tokenizer.vocab_size,
        )[0]
        return self.tokenizer.decode(t for t in out if t != self.tokenizer.eot_token)

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "elapsed_s": self.elapsed_s,
            "loader": self.train_loader.state_dict(),
            "val_loss": self.last_val_loss,
            "best_val_loss": self.best_val_loss,
        }

    def save(self) -> Path | None:
        """Every rank calls this; rank 0 writes and gets the path."""
        path = save_checkpoint(
            self.run_dir, model=self.raw_model, optimizer=self.optimizer, scaler=self.scaler, state=self._state(),
            tokenizer_spec=self.tokenizer.spec(), train_config=self.config.to_dict(),
        )
        if self.is_main:
            prune_checkpoints(self.run_dir, self.config.checkpoint.keep_last, self.config.checkpoint.keep_best)
        return path

    def _silence_progress_bar(self) -> None:
        if self.bar is not None:
            self.bar.disable = True

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = signum
        self.echo(f"{signal.Signals(signum).name} received: finishing step {self.step + 1}, then saving a checkpoint")

    # ---- the loop -----------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, gradient norm)."""
        lr = learning_rate(self.step, self.config.optim, self.config.schedule, self.total_steps)
        set_learning_rate(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        batches = [self.train_loader.next_batch() for _ in range(self.grad_accum)]
        weights = self._micro_batch_weights(batches)
        for micro_step, (batch, weight) in enumerate(zip(batches, weights)):
            # Gradients are averaged across ranks once, on the last micro-step.
            sync = micro_step == self.grad_accum - 1
            if self.ddp:
                self.model.require_backward_grad_sync = sync
            elif self.fsdp:
                self.raw_model.set_requires_gradient_sync(sync)
            with self.autocast():
                _, loss = self.model(*self._to_device(batch))
            loss = loss * weight
            loss_sum += loss.detach()
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if self.dist.enabled:
            loss_sum = loss_sum.detach().clone()
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= self.world_size
        return loss_sum.item(), grad_norm.item()

    def _micro_batch_weights(self, batches: list[tuple[torch.Tensor, ...]]) -> list[float]:
        """What each micro-batch's mean loss is multiplied by, so that the step's gradient (summed
        over micro-batches, averaged over ranks) is that of the mean over all its targets. Windows
        of a token stream all count the same targets: 1 / grad_accum. Packed conversations do not
        (a row of long answers counts more than one of short ones), so each micro-batch weighs by
        its share of the targets of the whole step on every rank, as one batch of them would."""
        if not isinstance(self.train_loader, ChatLoader):
            return [1.0 / self.grad_accum] * len(batches)
        counts = [int((batch[1] != -1).sum()) for batch in batches]
        total = torch.tensor(sum(counts), dtype=torch.int64, device=self.device)
        if self.dist.enabled:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        # Every row of a packed batch holds a whole answer at least, so the total is never 0.
        return [count * self.world_size / int(total) for count in counts]

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks must leave the loop at the same step."""
        asked = self.stop_signal is not None
        if self.dist.enabled:
            asked = all_reduce_max(float(asked), self.device) > 0
            if asked and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM
        return asked

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def run(self) -> dict[str, Any]:
        """Train to the last step (or a stop signal); returns a summary, whose "stopped_by" names
        the signal that ended the run early (None: it ran to its last step)."""
        metrics = self._open_run()
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        bar = self.bar = self._progress_bar()
        write = Console(bar.write, on_gone=self.console.lost) if bar is not None else self.echo
        self.raw_model.train()
        started = time.perf_counter() - self.elapsed_s
        try:
            if self.step == 0 and self.config.eval.at_start and self.val_loader is not None:
                self._validate_at_start(metrics, write)
            last_saved = self._train(metrics, bar, write, started)
            summary = self._finish(metrics, write, last_saved)
            finish_together(self.device)
            return summary
        finally:
            if bar is not None:
                self._update_progress(bar.close)
            metrics.close()
            self.release()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _open_run(self) -> MetricsLog:
        """The run folder with the resolved settings, and its metrics from this step on."""
        config = self.config
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.toml", lambda p: p.write_text(config.to_toml()))
        metrics = MetricsLog(
            self.run_dir, tensorboard=config.log.tensorboard, wandb_project=config.log.wandb_project,
            config=config.to_dict(), enabled=self.is_main,
        )
        metrics.truncate_after(self.step)
        return metrics

    def _validate_at_start(self, metrics: MetricsLog, write: Callable[[str], None]) -> None:
        vocab_size = self.config.model.vocab_size
        # Not kept as last_val_loss: checkpoints record the loss of their own training, and with
        # eval.interval=0 every one would claim the untrained model's (keep_best kept the first).
        result = self.evaluate(self.config.eval.batches or None)
        val_loss = result.loss
        metrics.log(0, 0, 0.0, val_loss=val_loss, val_bpb=result.bpb)
        write(
            f"step 0: val loss {val_loss:.4f} (a uniform guess over {vocab_size} tokens "
            f"gives ln({vocab_size}) = {math.log(vocab_size):.4f}), val bpb {result.bpb:.4f}"
        )

    def _train(self, metrics: MetricsLog, bar: tqdm | None, write: Callable[[str], None], started: float) -> int | None:
        """Steps to the last one or an agreed stop, each with the evaluations and the checkpoint it
        is due; returns the step last saved (None: none yet)."""
        last_saved = self.step if self.step else None
        stopping = False
        profile_steps = self.config.system.profile_steps if self.is_main else 0
        with step_profiler(self.run_dir, profile_steps, self.total_steps - self.step, self.device, write) as profiled:
            while self.step < self.total_steps and not stopping:
                loss, grad_norm, step_s = self._timed_train_step()
                profiled()
                self.step += 1
                self.elapsed_s = time.perf_counter() - started
                stopping = self._stop_agreed()
                self._record_step(metrics, bar, write, loss, grad_norm, step_s)
                self._evaluate_due(metrics, write)
                if self._due(self.config.checkpoint.interval) or stopping:
                    path = self.save()
                    last_saved = self.step
                    write(f"saved {path}")
        return last_saved

    def _timed_train_step(self) -> tuple[float, float, float]:
        """train_step's (loss, gradient norm), and its wall time in seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_start = time.perf_counter()
        loss, grad_norm = self.train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss, grad_norm, time.perf_counter() - step_start

    def _record_step(
        self, metrics: MetricsLog, bar: tqdm | None, write: Callable[[str], None],
        loss: float, grad_norm: float, step_s: float,
    ) -> None:
        """Log the step just taken; one whose loss is no longer finite ends the run."""
        tokens_per_s = self.tokens_per_step / step_s
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        lr = self.optimizer.param_groups[0]["lr"]
        metrics.log(
            self.step, self.step * self.tokens_per_step, self.elapsed_s, train_loss=loss, lr=lr,
            grad_norm=grad_norm, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, mfu=mfu,
        )
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {self.step}; lower optim.lr or use precision=bf16/fp32")
        if self._due(self.config.log.interval) or self.step == 1:
            write(
                f"step {self.step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"norm {grad_norm:.3f} | {step_s * 1e3:.1f} ms | {tokens_per_s:,.0f} tok/s"
                + (f" | mfu {mfu:.1%}" if mfu is not None else "")
            )
        if bar is not None:
            self._update_progress(lambda: (bar.set_postfix(loss=f"{loss:.4f}", refresh=False), bar.update(1)))

    def _update_progress(self, update: Callable[[], object]) -> None:
        """The bar draws on stderr, which a closed terminal takes away too."""
        try:
            update()
        except OSError as error:
            if not reader_gone(error):
                raise
            self.console.lost()

    def _evaluate_due(self, metrics: MetricsLog, write: Callable[[str], None]) -> None:
        """The validation loss, HellaSwag and the sample that this step is due."""
        settings = self.config.eval
        if self.val_loader is not None and self._due(settings.interval):
            result = self.evaluate(settings.batches or None)
            val_loss = result.loss
            self.last_val_loss = val_loss
            self.best_val_loss = val_loss if self.best_val_loss is None else min(self.best_val_loss, val_loss)
            metrics.log(self.step, self.step * self.tokens_per_step, self.elapsed_s, val_loss=val_loss,
                        val_bpb=result.bpb)
            write(f"step {self.step}: val loss {val_loss:.4f}, val bpb {result.bpb:.4f}")
        if self.hellaswag is not None and (self._due(settings.hellaswag_interval) or self.step == self.total_steps):
            self.evaluate_hellaswag(metrics, write)
        if self.core is not None and (self._due(settings.core_interval) or self.step == self.total_steps):
            self.evaluate_core(metrics, write)
        if self._due(settings.sample_interval) and self.is_main and not self.fsdp:
            text = self.sample_text()
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as handle:
                handle.write(f"---- step {self.step} ----\n{text}\n")
            write(f"sample at step {self.step}:\n{text}")

    def _finish(self, metrics: MetricsLog, write: Callable[[str], None], last_saved: int | None) -> dict[str, Any]:
        """The final checkpoint and the evaluation over the whole split; returns the summary."""
        config = self.config
        if last_saved != self.step and (config.checkpoint.final or self.stop_signal is not None):
            path = self.save()
            write(f"saved {path}")
        summary = {
            "step": self.step, "elapsed_s": self.elapsed_s, "interrupted": self.stop_signal is not None,
            "stopped_by": self.stop_signal,
        }
        if self.stop_signal is None and config.eval.final_full and self.val_loader is not None:
            full = self.evaluate(None)
            metrics.log(self.step, self.step * self.tokens_per_step, self.elapsed_s, val_loss=full.loss,
                        val_bpb=full.bpb, val_tokens=full.tokens)
            write(f"step {self.step}: val loss over the whole {config.data.val_split} split "
                  f"({full.tokens:,} tokens): {full.loss:.4f}, val bpb {full.bpb:.4f}")
            summary["val_loss_full"] = full.loss
        if self.stop_signal is not None:
            write(f"stopped at step {self.step}; continue with --resume auto")
        return summary

    def _progress_bar(self) -> tqdm | None:
        if not (self.config.log.progress_bar and self.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False)
