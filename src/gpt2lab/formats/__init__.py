"""How model weights are laid out on disk: gpt2lab's own layout and the transformers exports,
and which transformers architecture, if any, computes what a configuration computes."""

from __future__ import annotations

from ..config import GPTConfig
from . import transformers_gpt2, transformers_llama

# What `convert` writes, for the messages that name them.
ARCHITECTURES = (
    "GPT2LMHeadModel (GPT-2's options), LlamaForCausalLM (position=rope, norm=rmsnorm, activation=swiglu, "
    "bias=false, logit_softcap=0) and Qwen3ForCausalLM (the same with qk_norm=true)"
)


def transformers_layout(config: GPTConfig) -> str | None:
    """The transformers layout whose class computes exactly what GPT(config) computes, if any."""
    if transformers_gpt2.supports(config):
        return transformers_gpt2.LAYOUT
    if transformers_llama.supports(config):
        return transformers_llama.layout_of(config)
    return None


def options_without_transformers_equivalent(config: GPTConfig) -> list[str]:
    """The options (or pairs of them) that keep every architecture of ARCHITECTURES from
    computing what GPT(config) computes: judged against GPT-2 for learned positions, against
    Llama/Qwen3 for RoPE, since those are the only ones with each."""
    found = []
    if config.activation == "relu2":
        found.append("activation=relu2")
    if config.logit_softcap:
        found.append(f"logit_softcap={config.logit_softcap:g}")
    if config.position == "learned":
        pairs = {
            "norm=rmsnorm": config.norm == "rmsnorm",
            "qk_norm=true": config.qk_norm,
            "activation=swiglu": config.activation == "swiglu",
            f"n_kv_head={config.n_kv_head}": config.kv_heads != config.n_head,
            f"mlp_hidden={config.mlp_hidden}": (
                config.activation == "gelu_tanh" and config.hidden_size != 4 * config.n_embd
            ),
        }
        found += [f"learned positions with {option}" for option, present in pairs.items() if present]
    else:
        pairs = {
            "norm=layernorm": config.norm == "layernorm",
            "activation=gelu_tanh": config.activation == "gelu_tanh",
            "bias=true": config.bias,
        }
        found += [f"rope with {option}" for option, present in pairs.items() if present]
    return found
