"""The training loop: gradient accumulation, mixed precision, clipping, evaluation, samples,
checkpoints that resume exactly, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..files import write_atomic
from ..generate import generate
from ..model import GPT
from ..prompts import checked_prompt, empty_prompt_start
from ..tokenizer import tokenizer_from_spec
from .checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_states,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import all_reduce_max, all_reduce_sum, init_distributed, shard_model
from .metrics import MetricsLog, peak_flops_for
from .optim import build_optimizer, learning_rate, set_learning_rate

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        from ..data.dataset import open_dataset
        from ..data.loader import TokenLoader

        self.dist = init_distributed(config.system.device)
        self.rank, self.world_size, self.device = self.dist.rank, self.dist.world_size, self.dist.device
        self.is_main = self.dist.is_main
        config.validate(self.world_size)
        self.run_dir = Path(run_dir)
        echo = echo or (lambda line: print(line, flush=True))
        self.echo = echo if self.is_main else (lambda line: None)
        self.dataset = open_dataset(config.data.path)
        if self.dataset.vocab_size > config.model.vocab_size and config.init_from == "scratch":
            raise UserError(
                f"the data in {config.data.path} has a vocabulary of {self.dataset.vocab_size} but "
                f"model.vocab_size is {config.model.vocab_size}; set model.vocab_size={self.dataset.vocab_size}"
            )
        batch = config.batch
        self.train_loader = TokenLoader(
            self.dataset,
            split=config.data.train_split,
            batch_size=batch.micro_batch,
            seq_len=batch.seq_len,
            rank=self.rank,
            world_size=self.world_size,
            seed=config.system.seed,
            shuffle=config.data.shuffle,
            random_offset=config.data.random_offset,
        )
        if self.train_loader.windows_per_epoch < batch.micro_batch:
            raise UserError(
                f"the {config.data.train_split} split of {config.data.path} is too short for one batch of "
                f"{batch.micro_batch} x {batch.seq_len} tokens; lower batch.micro_batch or batch.seq_len"
            )
        self.val_loader = None
        if config.eval.interval or config.eval.final_full or config.eval.at_start:
            if self.dataset.split_tokens(config.data.val_split) > batch.seq_len:
                self.val_loader = TokenLoader(
                    self.dataset, split=config.data.val_split, batch_size=batch.micro_batch,
                    seq_len=batch.seq_len, rank=self.rank, world_size=self.world_size, shuffle=False,
                )
        self.grad_accum = config.grad_accum_steps(self.world_size)
        self.tokens_per_step = config.tokens_per_step(self.world_size)
        self.total_steps = config.total_steps(self.world_size)
        self.tokenizer = tokenizer_from_spec(self.dataset.tokenizer_spec)
        self.hellaswag = None
        if config.eval.hellaswag_interval:
            from ..eval.hellaswag import HellaSwag, load_examples

            examples = load_examples("val", config.eval.hellaswag_file or None, config.eval.hellaswag_limit or None)
            self.hellaswag = HellaSwag(examples, self.tokenizer)

        torch.manual_seed(config.system.seed)
        if config.system.deterministic:
            torch.use_deterministic_algorithms(True)
        if config.system.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if config.init_from == "scratch":
            self.raw_model = GPT(config.model)
        else:
            from ..pretrained import load_model

            self.raw_model = load_model(
                config.init_from,
                dropout=config.model.dropout,
                attention=config.model.attention,
                padded_vocab_size=config.model.padded_vocab_size,
            )
            config = dataclasses.replace(config, model=self.raw_model.config)
            if self.dataset.vocab_size > config.model.vocab_size:
                raise UserError(
                    f"the data's vocabulary ({self.dataset.vocab_size}) is larger than that of "
                    f"{config.init_from} ({config.model.vocab_size}); prepare the data with the model's tokenizer"
                )
        self.config = config
        self.raw_model.to(self.device)
        # Equal initial weights on every rank, then a dropout stream of each rank's own.
        torch.manual_seed(config.system.seed + self.rank)
        precision = config.system.precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.fsdp = self.dist.enabled and config.system.parallel == "fsdp"
        if self.fsdp:
            shard_model(self.raw_model, self.autocast_dtype)
            self.autocast_dtype = None  # FSDP's mixed-precision policy casts instead
        self.optimizer = build_optimizer(self.raw_model, config.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" and not self.fsdp else None
        self.model = torch.compile(self.raw_model) if config.system.compile else self.raw_model
        self.ddp = self.dist.enabled and not self.fsdp
        if self.ddp:
            self.model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.peak_flops = peak_flops_for(self.device, config.system.peak_flops)
        self.flops_per_token = self.raw_model.flops_per_token(batch.seq_len)

        self.step = 0
        self.elapsed_s = 0.0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.stop_signal: int | None = None
        checkpoint = find_resume_checkpoint(self.run_dir, resume)
        if checkpoint is not None:
            self._resume(checkpoint)

    # ---- pieces -------------------------------------------------------------------------------

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        if self.device.type == "cuda":
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def _resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, model=self.raw_model, optimizer=self.optimizer, scaler=self.scaler)
        self.step = state["step"]
        self.elapsed_s = state.get("elapsed_s", 0.0)
        self.best_val_loss = state.get("best_val_loss")
        self.last_val_loss = state.get("val_loss")
        self.train_loader.load_state_dict(state["loader"])
        saved_rngs = state["rng"]
        if len(saved_rngs) == self.world_size:
            restore_rng_states(saved_rngs[self.rank])
        else:
            # Another world size: dropout streams cannot continue, so start them afresh.
            torch.manual_seed(hash((self.config.system.seed, self.step, self.rank)) % 2**63)
        self.echo(f"resumed from {checkpoint} at step {self.step}")

    def evaluate(self, max_batches: int | None) -> tuple[float, int]:
        """Mean validation loss per token over the first `max_batches` batches (None: every window)."""
        assert self.val_loader is not None
        model = self.raw_model
        model.eval()
        total, tokens = 0.0, 0
        batches = list(self.val_loader.iter_batches(max_batches))
        if self.fsdp:
            # Every rank must run the same number of forward passes: sharded weights are gathered
            # collectively. A rank with fewer batches repeats one without counting it.
            most = int(all_reduce_max(len(batches), self.device))
            batches += [None] * (most - len(batches))
        with torch.no_grad(), self.autocast():
            for batch in batches:
                x, y = self._to_device(*(batch or self.val_loader.iter_batches(1).__next__()))
                _, loss = model(x, y)
                if batch is not None:
                    total += loss.item() * y.numel()
                    tokens += y.numel()
        model.train()
        total, tokens = all_reduce_sum([total, tokens], self.device)
        return total / max(tokens, 1), int(tokens)

    def evaluate_hellaswag(self, metrics: MetricsLog, write: Callable[[str], None]) -> None:
        assert self.hellaswag is not None
        # A HellaSwag row holds at most about 500 tokens: this many rows take no more tokens than a
        # training micro-batch, and need no gradients.
        rows = max(8, self.config.batch.micro_batch * self.config.batch.seq_len // 512)
        result = self.hellaswag.evaluate(
            self.raw_model, batch_size=rows, autocast_dtype=self.autocast_dtype,
            rank=self.rank, world_size=self.world_size,
        )
        metrics.log(self.step, self.step * self.tokens_per_step, self.elapsed_s, **result.metrics())
        write(
            f"step {self.step}: HellaSwag acc_norm {result.acc_norm:.4f} (harness {result.acc_norm_harness:.4f}) "
            f"over {result.examples} examples"
        )

    def sample_text(self) -> str:
        settings = self.config.eval
        prompt = self.tokenizer.encode(settings.sample_prompt) if settings.sample_prompt else []
        prompt = checked_prompt(prompt, self.raw_model.config.vocab_size, empty_prompt_start(self.tokenizer))
        out = generate(
            self.raw_model,
            [prompt], settings.sample_tokens, temperature=0.8, top_k=200,
            seed=self.config.system.seed + self.step, eos_token_id=self.tokenizer.eot_token,
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
        for micro_step in range(self.grad_accum):
            # Gradients are averaged across ranks once, on the last micro-step.
            sync = micro_step == self.grad_accum - 1
            if self.ddp:
                self.model.require_backward_grad_sync = sync
            elif self.fsdp:
                self.raw_model.set_requires_gradient_sync(sync)
            x, y = self._to_device(*self.train_loader.next_batch())
            with self.autocast():
                _, loss = self.model(x, y)
            loss = loss / self.grad_accum
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
        """Train to the last step (or a stop signal); returns a summary."""
        config = self.config
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.toml", lambda p: p.write_text(config.to_toml()))
        metrics = MetricsLog(
            self.run_dir, tensorboard=config.log.tensorboard, wandb_project=config.log.wandb_project,
            config=config.to_dict(), enabled=self.is_main,
        )
        metrics.truncate_after(self.step)
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = self._progress_bar()
        write = bar.write if bar is not None else self.echo
        self.raw_model.train()
        started = time.perf_counter() - self.elapsed_s
        last_saved = self.step if self.step else None
        try:
            if self.step == 0 and config.eval.at_start and self.val_loader is not None:
                val_loss, _ = self.evaluate(config.eval.batches or None)
                self.last_val_loss = val_loss
                metrics.log(0, 0, 0.0, val_loss=val_loss)
                write(
                    f"step 0: val loss {val_loss:.4f} (a uniform guess over {config.model.vocab_size} tokens "
                    f"gives ln({config.model.vocab_size}) = {math.log(config.model.vocab_size):.4f})"
                )
            stopping = False
            while self.step < self.total_steps and not stopping:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                step_start = time.perf_counter()
                loss, grad_norm = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                step_s = time.perf_counter() - step_start
                self.step += 1
                self.elapsed_s = time.perf_counter() - started
                stopping = self._stop_agreed()
                tokens_per_s = self.tokens_per_step / step_s
                mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
                lr = self.optimizer.param_groups[0]["lr"]
                metrics.log(
                    self.step, self.step * self.tokens_per_step, self.elapsed_s, train_loss=loss, lr=lr,
                    grad_norm=grad_norm, step_ms=step_s * 1e3, tokens_per_s=tokens_per_s, mfu=mfu,
                )
                if not math.isfinite(loss):
                    raise UserError(
                        f"the loss became {loss} at step {self.step}; lower optim.lr or use precision=bf16/fp32"
                    )
                if self._due(config.log.interval) or self.step == 1:
                    write(
                        f"step {self.step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                        f"norm {grad_norm:.3f} | {step_s * 1e3:.1f} ms | {tokens_per_s:,.0f} tok/s"
                        + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.val_loader is not None and self._due(config.eval.interval):
                    val_loss, _ = self.evaluate(config.eval.batches or None)
                    self.last_val_loss = val_loss
                    self.best_val_loss = val_loss if self.best_val_loss is None else min(self.best_val_loss, val_loss)
                    metrics.log(self.step, self.step * self.tokens_per_step, self.elapsed_s, val_loss=val_loss)
                    write(f"step {self.step}: val loss {val_loss:.4f}")
                if self.hellaswag is not None and (
                    self._due(config.eval.hellaswag_interval) or self.step == self.total_steps
                ):
                    self.evaluate_hellaswag(metrics, write)
                if self._due(config.eval.sample_interval) and self.is_main and not self.fsdp:
                    text = self.sample_text()
                    with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as handle:
                        handle.write(f"---- step {self.step} ----\n{text}\n")
                    write(f"sample at step {self.step}:\n{text}")
                if self._due(config.checkpoint.interval) or stopping:
                    path = self.save()
                    last_saved = self.step
                    write(f"saved {path}")
            if last_saved != self.step and (config.checkpoint.final or self.stop_signal is not None):
                path = self.save()
                write(f"saved {path}")
            summary = {"step": self.step, "elapsed_s": self.elapsed_s, "interrupted": self.stop_signal is not None}
            if self.stop_signal is None and config.eval.final_full and self.val_loader is not None:
                val_loss, tokens = self.evaluate(None)
                metrics.log(self.step, self.step * self.tokens_per_step, self.elapsed_s, val_loss=val_loss,
                            val_tokens=tokens)
                write(f"step {self.step}: val loss over the whole {config.data.val_split} split "
                      f"({tokens:,} tokens): {val_loss:.4f}")
                summary["val_loss_full"] = val_loss
            if self.stop_signal is not None:
                write(f"stopped at step {self.step}; continue with --resume auto")
            return summary
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _progress_bar(self):
        if not (self.config.log.progress_bar and self.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False)
