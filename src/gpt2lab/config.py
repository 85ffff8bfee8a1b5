"""Typed configuration: dataclasses with named presets, TOML files and `key=value` overrides.

Values from files and the command line are coerced to the declared field types and
checked; nothing is ever passed through `eval`, `exec` or pickle.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")

GPT2_VOCAB_SIZE = 50257
GPT2_PADDED_VOCAB_SIZE = 50304  # next multiple of 128: friendlier shapes for matmul kernels
ATTENTION_IMPLEMENTATIONS = ("sdpa", "plain")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_tanh", "relu2", "swiglu")


def check_finite_settings(obj: Any, where: str = "") -> None:
    """A UserError for the first float setting of dataclass `obj` (nested ones included) that is
    NaN or infinite: no setting of gpt2lab means anything at either, and a comparison such as
    `lr > 0` lets inf through."""
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        name = f"{where}.{item.name}" if where else item.name
        if dataclasses.is_dataclass(value):
            check_finite_settings(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}; give a finite value")


@dataclass
class GPTConfig:
    """Shape and options of a GPT-2 style decoder."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE
    # Rows of the embedding/output matrices; ids in [vocab_size, padded_vocab_size) are never
    # produced. None means no padding.
    padded_vocab_size: int | None = None
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    layer_norm_epsilon: float = 1e-5
    attention: str = "sdpa"
    # The modern recipe (modded-nanogpt, nanochat, Llama); each off by default, so the defaults
    # are GPT-2 exactly.
    position: str = "learned"  # "rope": rotary embeddings of q and k, no position table
    rope_base: float = 10000.0
    norm: str = "layernorm"  # "rmsnorm": no mean subtraction, no bias
    qk_norm: bool = False  # RMS-normalize q and k per head before attention
    activation: str = "gelu_tanh"  # "relu2" (squared ReLU) or "swiglu" (gated SiLU)
    mlp_hidden: int | None = None  # default 4*n_embd; for swiglu 8/3*n_embd rounded up to 64
    logit_softcap: float = 0.0  # c*tanh(z/c) on the logits; 0 is off
    zero_init_proj: bool = False  # output projections (and an untied head) start at zero
    n_kv_head: int | None = None  # grouped-query attention: heads of k and v; None is n_head

    def __post_init__(self) -> None:
        self.validate()

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        """Width of the MLP's hidden layer (of each of swiglu's two branches)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.activation == "swiglu":
            return -(-8 * self.n_embd // 3 // 64) * 64
        return 4 * self.n_embd

    def validate(self) -> None:
        check_finite_settings(self, "model")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise UserError(
                f"model.padded_vocab_size ({self.padded_vocab_size}) is smaller than "
                f"model.vocab_size ({self.vocab_size}); use a value >= vocab_size or leave it unset"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_epsilon > 0:
            raise UserError(f"model.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon}")
        for name, choices in (("attention", ATTENTION_IMPLEMENTATIONS), ("position", POSITIONS),
                              ("norm", NORMS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise UserError(f"model.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        self._validate_modern_options()

    def _validate_modern_options(self) -> None:
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(
                f"model.position=rope rotates pairs of dimensions, so the head dimension "
                f"(n_embd / n_head = {self.head_dim}) must be even; change model.n_embd or model.n_head"
            )
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise UserError(f"model.rope_base must be a finite number > 1, got {self.rope_base}")
        if self.n_kv_head is not None and (
            isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int)
            or self.n_kv_head <= 0 or self.n_head % self.n_kv_head
        ):
            raise UserError(
                f"model.n_kv_head ({self.n_kv_head!r}) must be a positive integer dividing model.n_head "
                f"({self.n_head}); leave it unset for one k/v head per query head"
            )
        if self.mlp_hidden is not None and (
            isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden <= 0
        ):
            raise UserError(f"model.mlp_hidden must be a positive integer (or unset), got {self.mlp_hidden!r}")
        if not (math.isfinite(self.logit_softcap) and self.logit_softcap >= 0):
            raise UserError(f"model.logit_softcap must be a finite number >= 0 (0 is off), got {self.logit_softcap}")

    @property
    def is_gpt2(self) -> bool:
        """Whether every option is GPT-2's (so transformers' GPT2LMHeadModel computes the same)."""
        return (
            self.position == "learned" and self.norm == "layernorm" and not self.qk_norm
            and self.activation == "gelu_tanh" and self.hidden_size == 4 * self.n_embd
            and self.logit_softcap == 0 and self.kv_heads == self.n_head
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        if name not in MODEL_PRESETS:
            raise UserError(
                f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}"
            )
        return dataclasses.replace(MODEL_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "model") -> GPTConfig:
        return from_dict(cls, values, where=where)


MODEL_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, tp: Any, *, where: str) -> Any:
    """Convert `value` (from TOML or a command-line string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, typing.get_args(tp), where)
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, where)
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where} must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, where=where)
        raise UserError(f"{where} must be a table of settings, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"{where} must be a table, got {value!r}")
    raise TypeError(f"unsupported config field type {_type_name(tp)} at {where}")


def _coerce_union(value: Any, options: tuple[Any, ...], where: str) -> Any:
    """The first option that `value` converts to; a none/null string or None is None if allowed."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(value, option, where=where)
        except UserError as error:
            errors.append(str(error))
    raise UserError(errors[0] if errors else f"{where}: cannot be {value!r}")


def _coerce_sequence(value: Any, origin: type, args: tuple[Any, ...], where: str) -> list | tuple:
    """A list, a tuple of fixed length, or a tuple of any length; a string is split at commas."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")] if value.strip() else []
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where} must be a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise UserError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(coerce(v, a, where=f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item_type = args[0] if args else Any
    items = [coerce(v, item_type, where=f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise UserError(f"{where} must be true or false, got {value!r}")


def _coerce_int(value: Any, where: str) -> int:
    """An integer, a float without a fraction, or such a string (underscores and 1e3 allowed)."""
    if isinstance(value, bool):
        raise UserError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
    raise UserError(f"{where} must be an integer, got {value!r}")


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise UserError(f"{where} must be a number, got {value!r}")


def from_dict(cls: type[T], values: dict[str, Any], *, where: str) -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"unknown setting {where}.{unknown[0]}; known settings of {where}: {', '.join(sorted(known))}"
        )
    kwargs = {key: coerce(value, hints[key], where=f"{where}.{key}") for key, value in values.items()}
    return cls(**kwargs)


def merge_values(obj: T, values: dict[str, Any], *, where: str = "") -> T:
    """A copy of dataclass `obj` with the (possibly partial, nested) `values` laid over it.

    Each dataclass is rebuilt once with all its changes, so settings that must agree (n_embd and
    n_head) can change together.
    """
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in hints:
            raise UserError(
                f"unknown setting {name!r}; known settings{(' of ' + where) if where else ''}: "
                f"{', '.join(sorted(hints))}"
            )
        current = getattr(obj, key)
        if isinstance(value, dict) and not dataclasses.is_dataclass(current) and typing.get_origin(hints[key]) is not dict:
            raise UserError(f"setting {name!r} is a single value, not a table of settings")
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge_values(current, value, where=name)
        else:
            changes[key] = coerce(value, hints[key], where=name)
    return dataclasses.replace(obj, **changes)


def _nest(dotted_key: str, value: Any, into: dict[str, Any]) -> None:
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = into.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"setting {part!r} is given both a value and sub-settings")
        into = child
    into[leaf] = value


def apply_overrides(obj: T, overrides: list[str]) -> T:
    """Apply command-line `key=value` strings to a dataclass (a later one wins over an earlier)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise UserError(f"override {item!r} is not of the form key=value (e.g. model.n_layer=4)")
        _nest(key, value.strip(), nested)
    return merge_values(obj, nested)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the path given to --config")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"config file {path} is not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None


def to_toml(values: dict[str, Any]) -> str:
    """Write a nested dict of plain values (as produced by dataclasses.asdict) as TOML."""
    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    lines = [f"{key} = {_toml_value(value)}" for key, value in scalars.items() if value is not None]
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(
            f"{key} = {_toml_value(value)}" for key, value in table.items() if value is not None
        )
    return "\n".join(lines) + "\n"


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _toml_char(char: str) -> str:
    if char in _TOML_ESCAPES:
        return _TOML_ESCAPES[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04x}"
    return char


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# ---- LoRA settings (the layers are in gpt2lab.lora) ------------------------------------------------

# Names of the targetable matrices in model.py: `c_proj` is both attention's output and the
# MLP's; `attn.c_proj` / `mlp.c_proj` name one of them.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# The defaults of `apply_lora` and of training's finetune.lora_* settings.
DEFAULT_ALPHA = 16.0
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class LoRAConfig:
    """What a LoRA model was built with; recorded in gpt2lab.json so a reader rebuilds it."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @classmethod
    def from_dict(cls, values: dict, *, where: str) -> LoRAConfig:
        try:
            targets = values["targets"]
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise TypeError(f"targets {targets!r} is not a list of names")
            config = cls(int(values["rank"]), float(values["alpha"]), float(values["dropout"]), tuple(targets))
            check_lora_settings(config.rank, config.alpha, config.dropout, config.targets)
            if config.rank < 1:
                raise ValueError(f"rank {config.rank}")
        except KeyError as error:
            raise UserError(f"{where}: the LoRA record is damaged (no {error}); the folder is not one gpt2lab wrote") from None
        except (TypeError, ValueError, UserError) as error:
            raise UserError(f"{where}: the LoRA record is damaged ({error}); the folder is not one gpt2lab wrote") from None
        return config

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def check_lora_settings(rank: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...]) -> None:
    """A UserError naming the first bad setting (as `finetune.*` spells it) and the fix."""
    if rank < 0:
        raise UserError(f"finetune.lora_rank must be >= 0 (0 = full fine-tuning), got {rank}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"finetune.lora_alpha must be a finite number > 0, got {alpha}; 16 is the usual choice")
    if not 0 <= dropout < 1:
        raise UserError(f"finetune.lora_dropout must be in [0, 1), got {dropout}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise UserError(
            f"unknown LoRA target {unknown[0]!r} in finetune.lora_targets; the targets are {', '.join(LORA_TARGETS)}"
        )
    if rank and not targets:
        raise UserError(f"finetune.lora_targets is empty; name at least one of {', '.join(LORA_TARGETS)}")


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_TARGETS",
    "LORA_TARGETS",
    "LoRAConfig",
    "check_lora_settings",
    "GPTConfig",
    "MODEL_PRESETS",
    "GPT2_VOCAB_SIZE",
    "GPT2_PADDED_VOCAB_SIZE",
    "apply_overrides",
    "check_finite_settings",
    "coerce",
    "from_dict",
    "load_toml",
    "merge_values",
    "to_toml",
]
