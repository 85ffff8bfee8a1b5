"""LoRA (Hu et al. 2021): low-rank adapters beside frozen linear layers.

A targeted layer computes W x + b + (alpha / rank) * B A dropout(x), with W and b frozen, A
(rank x in) Kaiming-uniform and B (out x rank) zero, so that training starts from the base model
exactly. Only A and B train: a rank-8 adapter on GPT-2 (124M)'s attention and MLP matrices is
about 1% of its parameters, and the optimizer holds state for those alone.

The wrapper owns the base layer's weight and bias under their own names, so a LoRA model's
state dict is the base model's plus `<layer>.lora_A` / `<layer>.lora_B`: the base half is an
ordinary model folder, the adapters a file beside it. `merge_lora` folds B A into W and gives back
plain linear layers, for inference and export.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .config import DEFAULT_ALPHA, DEFAULT_TARGETS, LoRAConfig, check_lora_settings

ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. `weight` and `bias` are the base
    layer's own parameters; its class computes the frozen part, so whatever kernel it picked
    (`gpt2lab.kernels.accelerate`'s CPU layer, nn.Linear's BLAS) still runs."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_class = type(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        # nn.Linear's own initialization, as PEFT does: B = 0 keeps the start exact.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.base_class.forward(self, x)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return frozen + update * self.scale

    def merged(self) -> nn.Linear:
        """A layer of the base class whose weight is W + scale * B A."""
        with torch.device("meta"):
            layer = self.base_class(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(folded(self.weight, self.lora_A, self.lora_B, self.scale))
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.size(0)}, scale={self.scale:g}"


def folded(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, summed in float32 and stored in W's dtype."""
    with torch.no_grad():
        delta = (lora_B.float() @ lora_A.float()) * scale
        return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    return ".h." in f".{name}" and any(f".{name}".endswith(f".{target}") for target in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float = DEFAULT_ALPHA, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS) -> nn.Module:
    """Wrap each targeted linear layer of the transformer blocks in `LoRALinear` and freeze every
    other parameter, in place; returns `model`. Call it before torch.compile, DDP or FSDP wrap
    the model, and before the optimizer is built over its trainable parameters."""
    targets = tuple(targets)
    check_lora_settings(rank, alpha, dropout, targets)
    if rank == 0:
        raise UserError("finetune.lora_rank is 0 (LoRA off); give a rank such as 8 to add adapters")
    if lora_config(model) is not None:
        raise UserError("this model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    chosen = [(name, m) for name, m in model.named_modules() if _targeted(name, targets)]
    plain = [name for name, m in chosen if not isinstance(m, nn.Linear) or not m.weight.is_floating_point()]
    if plain:
        raise UserError(f"LoRA needs floating-point linear layers; {plain[0]} is a {type(model.get_submodule(plain[0])).__name__}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha, dropout))
    model.lora = LoRAConfig(rank, float(alpha), float(dropout), targets)
    return model


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRA settings `apply_lora` gave `model` (None: a plain model)."""
    return getattr(model, "lora", None)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain layers of the base's class back, in
    place; every parameter trains again, as in a model just built. Returns `model`."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.merged())
    for param in model.parameters():
        param.requires_grad_(True)
    if "lora" in vars(model):
        del model.lora
    return model


def is_adapter_key(name: str) -> bool:
    return name.rpartition(".")[2] in ADAPTER_KEYS


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, named as in `model.state_dict()` (`transformer.h.0.attn.c_attn.lora_A`, ...)."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_key(name)}


def split_adapters(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the base model's state, the adapters') of a LoRA model's state dict."""
    base = {k: v for k, v in state.items() if not is_adapter_key(k)}
    return base, {k: v for k, v in state.items() if is_adapter_key(k)}


def merge_adapters(
    state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], config: LoRAConfig
) -> dict[str, torch.Tensor]:
    """A base model's state dict with `adapters` (as `lora_state_dict` names them) folded into
    their weights: what `merge_lora` gives, without building the adapted model."""
    merged = dict(state)
    scale = config.alpha / config.rank
    for key in adapters:
        layer, _, kind = key.rpartition(".")
        if kind == "lora_A":
            weight = f"{layer}.weight"
            merged[weight] = folded(state[weight], adapters[key], adapters[f"{layer}.lora_B"], scale)
    return merged


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters), tied matrices counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
