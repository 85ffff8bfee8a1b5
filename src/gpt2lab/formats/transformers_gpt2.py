"""The transformers GPT-2 layout (`GPT2LMHeadModel`): OpenAI's weights on the hub, what `convert`
exports, and the weights of checkpoints of GPT-2-shaped models.

`config.json` + `model.safetensors` as transformers writes them: Conv1D matrices stored (in, out),
keys with or without the `transformer.` prefix, causal-mask buffers in the original files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import GPTConfig
from ..errors import UserError
from ..files import write_atomic
from . import hub_files, native

LAYOUT = "transformers-gpt2"
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers the original GPT-2 files carry; they hold no learned values.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def supports(config: GPTConfig) -> bool:
    """Whether transformers' GPT2LMHeadModel computes what GPT(config) computes: every option
    GPT-2's (a model without biases is one with zero biases; initialisation does not matter)."""
    return config.is_gpt2


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a transformers GPT2Config dict, refusing options this model lacks."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{source} describes a {model_type!r} model; gpt2lab loads GPT-2, Llama and Qwen3 models only")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{source}: activation {activation!r} is not GPT-2's tanh GELU")
    n_embd = hf.get("n_embd")
    if hf.get("n_inner") not in (None, 4 * (n_embd or 0)):
        raise UserError(f"{source}: n_inner={hf['n_inner']} is not 4*n_embd, which gpt2lab requires")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        raise UserError(f"{source}: attention scaling options other than GPT-2's are not supported")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}; the folder is incomplete")
    return GPTConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf["vocab_size"],
        bias=True,
        dropout=0.0,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(config: GPTConfig, rows: int, *, dtype: torch.dtype, tokenizer_spec: Any) -> dict[str, Any]:
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_inner": None,
        "vocab_size": rows,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        **hub_files.special_token_ids(tokenizer_spec),
        **hub_files.dtype_entries(dtype),
    }
    return hf


def to_native(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose transformers GPT-2 tensors into GPT.named_parameters()' layout. Every
    learned tensor is kept, a tied head and the biases of a model without them included, so that
    the check against the configuration uses or refuses each (`pretrained.checked_state_dict`)."""
    state = {}
    for key, tensor in hf_tensors.items():
        if key.endswith(BUFFER_SUFFIXES):
            continue
        name = key.removeprefix("transformer.")
        if name != "lm_head.weight":
            name = "transformer." + name
        if name.endswith(CONV1D_SUFFIXES):
            # Contiguous, because a broadcast to other ranks sends the storage as it lies in memory.
            tensor = tensor.t().contiguous()
        state[name] = tensor
    return state


def from_native(model_state: dict[str, torch.Tensor], config: GPTConfig, rows: int) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as transformers' GPT2LMHeadModel stores them, `rows` vocabulary rows."""
    state = {}
    for name, tensor in native.stored_parameters(model_state, tie_embeddings=config.tie_embeddings, rows=rows):
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.to("cpu").contiguous().clone()
    if not config.bias:
        # transformers' GPT-2 always has biases: a model without them is one with zero biases.
        for name, tensor in list(state.items()):
            if name.endswith(".weight") and "wte" not in name and "wpe" not in name and name != "lm_head.weight":
                out_features = tensor.shape[-1] if name.endswith(CONV1D_SUFFIXES) else tensor.shape[0]
                state[name.removesuffix("weight") + "bias"] = torch.zeros(out_features, dtype=tensor.dtype)
    return state


def write(
    model_state: dict[str, torch.Tensor], config: GPTConfig, directory: Path, *, rows: int, tokenizer_spec: Any
) -> None:
    """`model.safetensors` + `config.json` that transformers loads as GPT2LMHeadModel."""
    dtype = model_state["transformer.wte.weight"].dtype
    hf_config = config_to_hf(config, rows, dtype=dtype, tokenizer_spec=tokenizer_spec)
    write_folder(directory, from_native(model_state, config, rows), hf_config, config, tokenizer_spec=tokenizer_spec)


def write_folder(
    directory: Path, tensors: dict[str, torch.Tensor], hf_config: dict[str, Any], config: GPTConfig, *,
    tokenizer_spec: Any,
) -> None:
    """A transformers model folder of any architecture: the tensors, `config.json`,
    `generation_config.json` and the model's tokenizer files, so that AutoTokenizer, `pipeline`
    and lm-eval find everything."""
    write_atomic(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_atomic(directory / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=2) + "\n"))
    hub_files.write_generation_config(directory, config, tokenizer_spec)
    hub_files.write_tokenizer_files(directory, tokenizer_spec, config.block_size)
