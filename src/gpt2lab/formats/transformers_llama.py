"""transformers' Llama and Qwen3 layouts (`LlamaForCausalLM`, `Qwen3ForCausalLM`): what `convert`
exports for a model with RoPE, RMSNorm and SwiGLU and no biases (Qwen3's when q and k are
normalized too), and the weights of such a model's checkpoints, so that those are transformers
models as well.

gpt2lab fuses q, k and v into one matrix (`attn.c_attn`, stacked by rows) and SwiGLU's gate and
value into another (`mlp.c_fc`); transformers keeps them apart. The rest is renaming: gpt2lab's
RoPE already is transformers' (rotate_half over a head's two halves), its QK-norm is Qwen3's
(RMSNorm over head_dim, per head, before RoPE), and its GQA groups heads as transformers'
repeat_kv does (query head h reads k/v head h // group).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import GPTConfig
from ..errors import UserError
from . import hub_files, native, transformers_gpt2

LLAMA_LAYOUT = "transformers-llama"
QWEN3_LAYOUT = "transformers-qwen3"
# layout -> (transformers class, config.json's model_type)
ARCHITECTURES = {LLAMA_LAYOUT: ("LlamaForCausalLM", "llama"), QWEN3_LAYOUT: ("Qwen3ForCausalLM", "qwen3")}
LAYOUT_OF_MODEL_TYPE = {model_type: layout for layout, (_, model_type) in ARCHITECTURES.items()}

OUTSIDE_BLOCKS = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Names inside one block (gpt2lab's `transformer.h.{i}.`, transformers' `model.layers.{i}.`).
IN_BLOCKS = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
FUSED = {
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
OUTSIDE_BLOCKS_NATIVE = {hf: ours for ours, hf in OUTSIDE_BLOCKS.items()}
IN_BLOCKS_NATIVE = {hf: ours for ours, hf in IN_BLOCKS.items()}
PART_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
NATIVE_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")
HF_BLOCK_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def supports(config: GPTConfig) -> bool:
    """Whether LlamaForCausalLM (or, with qk_norm, Qwen3ForCausalLM) computes what GPT(config)
    computes: Llama's options, each of them (initialisation and dropout do not matter)."""
    return (
        config.position == "rope" and config.norm == "rmsnorm" and config.activation == "swiglu"
        and not config.bias and config.logit_softcap == 0
    )


def layout_of(config: GPTConfig) -> str:
    """The layout of a model `supports` accepts: Qwen3's where q and k are normalized, else Llama's."""
    return QWEN3_LAYOUT if config.qk_norm else LLAMA_LAYOUT


def config_to_hf(config: GPTConfig, rows: int, *, layout: str, dtype: torch.dtype, tokenizer_spec: Any) -> dict[str, Any]:
    architecture, model_type = ARCHITECTURES[layout]
    hf = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": rows,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.layer_norm_epsilon,
        # transformers 5 reads rope_parameters; older releases (and vLLM on them) read rope_theta.
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        # Without GPT-2's tokenizer there is no end-of-text id; null also overrides Llama's
        # defaults (1 and 2), which would stop transformers' generate at an ordinary token.
        **hub_files.special_token_ids(tokenizer_spec),
        **hub_files.dtype_entries(dtype),
    }
    if layout == LLAMA_LAYOUT:
        hf.update(mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=False, max_window_layers=config.n_layer)
    return hf


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a transformers Llama / Qwen3 config dict, refusing what gpt2lab's model
    computes differently."""
    needed = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
              "max_position_embeddings")
    missing = [k for k in needed if k not in hf]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; the folder is incomplete")
    n_head, n_embd = hf["num_attention_heads"], hf["hidden_size"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unlike = {
        f"hidden_act={hf.get('hidden_act')!r}": hf.get("hidden_act", "silu") != "silu",
        f"head_dim={hf.get('head_dim')}": (hf.get("head_dim") or n_embd // n_head) * n_head != n_embd,
        "attention_bias or mlp_bias": bool(hf.get("attention_bias") or hf.get("mlp_bias")),
        f"rope_type={rope_type!r}": rope_type != "default",
        "partial_rotary_factor": rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1)) != 1,
        "use_sliding_window": bool(hf.get("use_sliding_window")),
    }
    found = [option for option, present in unlike.items() if present]
    if found:
        raise UserError(
            f"{source} uses {', '.join(found)}, which gpt2lab's model does not have; load this model with transformers"
        )
    n_kv_head = hf.get("num_key_value_heads") or n_head
    return GPTConfig(
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
        block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False), layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        position="rope", rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
        qk_norm=hf["model_type"] == "qwen3", activation="swiglu", mlp_hidden=hf["intermediate_size"],
        n_kv_head=None if n_kv_head == n_head else n_kv_head,
    )


def from_native(model_state: dict[str, torch.Tensor], config: GPTConfig, rows: int) -> dict[str, torch.Tensor]:
    """Tensors named and split as transformers' Llama / Qwen3 stores them, `rows` vocabulary rows."""
    kv_width = config.kv_heads * config.head_dim
    splits = {"attn.c_attn.weight": [config.n_embd, kv_width, kv_width], "mlp.c_fc.weight": [config.hidden_size] * 2}
    state = {}
    for name, tensor in native.stored_parameters(model_state, tie_embeddings=config.tie_embeddings, rows=rows):
        if name in OUTSIDE_BLOCKS:
            state[OUTSIDE_BLOCKS[name]] = tensor
            continue
        match = NATIVE_BLOCK_KEY.fullmatch(name)
        if match is None or match[2] not in IN_BLOCKS | FUSED:
            raise ValueError(f"{name} has no place in transformers' Llama layout")
        prefix, inner = f"model.layers.{match[1]}.", match[2]
        if inner in FUSED:
            for part, piece in zip(FUSED[inner], tensor.split(splits[inner], dim=0), strict=True):
                state[prefix + part] = piece
        else:
            state[prefix + IN_BLOCKS[inner]] = tensor
    return {name: tensor.to("cpu").contiguous().clone() for name, tensor in state.items()}


def to_native(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers' Llama / Qwen3 tensors into GPT.named_parameters()' names, q/k/v and
    gate/up fused again. Names it does not know, and a tied head, are kept, so that the check
    against the configuration uses or refuses each (`pretrained.checked_state_dict`)."""
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in hf_tensors.items():
        match = HF_BLOCK_KEY.fullmatch(key)
        inner = match[2] if match else None
        if key in OUTSIDE_BLOCKS_NATIVE:
            state[OUTSIDE_BLOCKS_NATIVE[key]] = tensor
        elif match and inner in PART_OF:
            parts.setdefault(f"transformer.h.{match[1]}.{PART_OF[inner]}", {})[inner] = tensor
        elif match and inner in IN_BLOCKS_NATIVE:
            state[f"transformer.h.{match[1]}.{IN_BLOCKS_NATIVE[inner]}"] = tensor
        else:
            state[key] = tensor
    for name, found in parts.items():
        names = FUSED[name.split(".", 3)[3]]
        if all(part in found for part in names):
            state[name] = torch.cat([found[part] for part in names])
    return state


def write(
    model_state: dict[str, torch.Tensor], config: GPTConfig, directory: Path, *, layout: str, rows: int,
    tokenizer_spec: Any,
) -> None:
    """`model.safetensors` + `config.json` that transformers loads as the `layout`'s class
    (LlamaForCausalLM or Qwen3ForCausalLM), GPT-2's tokenizer files beside where it is the model's."""
    dtype = model_state["transformer.wte.weight"].dtype
    hf_config = config_to_hf(config, rows, layout=layout, dtype=dtype, tokenizer_spec=tokenizer_spec)
    transformers_gpt2.write_folder(directory, from_native(model_state, config, rows), hf_config, config,
                                   tokenizer_spec=tokenizer_spec)
