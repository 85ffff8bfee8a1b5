"""The optimizer (AdamW with GPT-2's decay groups, SGD, or Muon for the hidden matrices with AdamW
for the rest), and the learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch

from ..errors import UserError
from ..lora import lora_config
from .config import MUON_WITH_LORA, OptimSettings, ScheduleSettings
from .muon import Muon


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors of 2+ dimensions (matmul weights, embeddings), none on biases and
    LayerNorm gains, as in GPT-2 and nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def fused_adamw_available(device: torch.device) -> bool:
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu", "mps", "xpu")


def muon_groups(model: torch.nn.Module, settings: OptimSettings) -> list[dict]:
    """Muon for the 2-D matrices inside the blocks (q/k/v, the projections, the MLP), each fused
    matrix split into the blocks it stands for; AdamW for embeddings and the head (decayed) and
    for gains and biases (not). Each group's `lr_ratio` is its learning rate over `optim.lr`,
    so that one schedule drives them all."""
    config = model.config
    kv_width = config.kv_heads * config.head_dim
    hidden: dict[tuple[int, ...] | None, list[torch.nn.Parameter]] = {}
    embeddings, gains = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() == 2 and ".h." in f".{name}":
            if name.endswith("attn.c_attn.weight"):
                blocks = (config.n_embd, kv_width, kv_width)
            elif name.endswith("mlp.c_fc.weight") and config.activation == "swiglu":
                blocks = (config.hidden_size, config.hidden_size)
            else:
                blocks = None
            hidden.setdefault(blocks, []).append(param)
        elif param.dim() >= 2:
            embeddings.append(param)
        else:
            gains.append(param)
    muon = dict(muon=True, lr=settings.muon_lr, lr_ratio=settings.muon_lr / settings.lr,
                momentum=settings.muon_momentum, nesterov=True, weight_decay=settings.muon_weight_decay,
                ns_steps=settings.muon_ns_steps)
    adamw = dict(muon=False, lr=settings.lr, lr_ratio=1.0, betas=(settings.beta1, settings.beta2), eps=settings.eps)
    return [
        *({**muon, "params": params, "row_blocks": list(blocks) if blocks else None} for blocks, params in hidden.items()),
        {**adamw, "params": embeddings, "weight_decay": settings.weight_decay},
        {**adamw, "params": gains, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, settings: OptimSettings, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over the parameters that train (a LoRA model's adapters alone)."""
    if settings.name == "muon":
        if lora_config(model) is not None:
            raise UserError(MUON_WITH_LORA)
        return Muon(muon_groups(model, settings))
    groups = decay_groups(model, settings.weight_decay)
    if settings.name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    extra = {"fused": True} if settings.fused and fused_adamw_available(device) else {}
    return torch.optim.AdamW(
        groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps, **extra
    )


def learning_rate(step: int, optim: OptimSettings, schedule: ScheduleSettings, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr at `decay_steps` (default: the last step), constant, or WSD: stable at lr, then a
    linear decay to min_lr over the last `decay_fraction` of the run."""
    if step < schedule.warmup_steps:
        return optim.lr * (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return optim.lr
    decay_end = schedule.decay_steps or total_steps
    if step >= decay_end:
        return optim.min_lr
    if schedule.kind == "wsd":
        decay_start = max(schedule.warmup_steps, decay_end - round(schedule.decay_fraction * decay_end))
        if step < decay_start:
            return optim.lr
        progress = (step - decay_start + 1) / max(1, decay_end - decay_start)
        return optim.lr + progress * (optim.min_lr - optim.lr)
    progress = (step - schedule.warmup_steps) / max(1, decay_end - schedule.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate on every group, scaled by the group's `lr_ratio` (Muon's matrices
    have a rate of their own)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
