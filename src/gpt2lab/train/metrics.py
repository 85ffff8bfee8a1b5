"""metrics.jsonl (one JSON object a line: step, tokens, elapsed_s and the measures of that event),
optional TensorBoard / Weights & Biases mirrors, and model FLOPs utilization."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import write_atomic

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name().
# Longer names first so that "H100 PCIe" wins over "H100".
GPU_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops_for(device: torch.device, override: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU: the user's figure, else the GPU's from its name, else None."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops
    return None


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None if it is not a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricsLog:
    """Appends events to metrics.jsonl; mirrors scalars to TensorBoard / W&B when asked."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = False,
        wandb_project: str = "",
        config: dict | None = None,
        enabled: bool = True,
    ):
        """`enabled=False` (ranks other than 0) makes every method do nothing."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        self._handle = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    'log.tensorboard is on but tensorboard is not installed: pip install "gpt2lab[tensorboard]"'
                ) from None
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError('log.wandb_project is set but wandb is not installed: pip install "gpt2lab[wandb]"') from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, name=run_dir.name)

    def truncate_after(self, step: int) -> None:
        """Drop events past `step` (written by a run that died after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            record_step = _record_step(line)
            if record_step is None:
                if line.strip():
                    # A torn write (a kill mid-line, a full disk) or an edit: one bad line must not
                    # stop the run, and nothing reads it.
                    print(f"warning: {self.path} line {number} is not a metrics record; dropped: {line[:80]!r}",
                          file=sys.stderr)
            elif record_step <= step:
                kept.append(line)
        write_atomic(self.path, lambda p: p.write_text("".join(line + "\n" for line in kept)))

    def log(self, step: int, tokens: int, elapsed_s: float, **measures: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed_s, 3)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in measures.items()})
        if self._handle is None:
            self._handle = self.path.open("a")
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        scalars = {k: v for k, v in measures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
