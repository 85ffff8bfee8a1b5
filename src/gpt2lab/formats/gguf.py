"""GGUF files for llama.cpp (and ollama, LM Studio, everything built on it): what `gpt2lab convert
--format gguf` writes, with the `gguf` package (llama.cpp's own Python writer).

A model is written as the llama.cpp architecture that computes what it computes, the same decision
as the transformers export (`formats.transformers_layout`): GPT-2's options as `gpt2`, Llama's as
`llama`, Llama's with QK-norm as `qwen3`. Tensors get llama.cpp's names and layouts:

- `gpt2`: gpt2lab's own matrices as they are (nn.Linear's (out, in) is ggml's {in, out}), q/k/v
  fused in `attn_qkv`; llama.cpp requires every bias, so a model without them gets zeros.
- `llama`, `qwen3`: q/k/v and SwiGLU's gate/up split as transformers splits them. llama.cpp's
  Llama rotates adjacent pairs of a head (rope "normal") where gpt2lab rotates its two halves
  (transformers' rotate_half), so q and k rows are reordered into pairs; its Qwen3 rotates halves
  (rope "neox") and takes them as they are.

The vocabulary is the tokenizer's (padded rows cut: gpt2lab never samples them), with the BPE
inside, GPT-2's or a trained one (byte-level tokens, merges, the llama.cpp pre-tokenizer of its
pattern), and a chat model's template in Jinja form, its end of turn as eos.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from ..chat.template import jinja_chat_template
from ..config import GPTConfig
from ..errors import UserError
from ..files import write_atomic
from ..tokenizer import BPETokenizer, GPT2Tokenizer, Tokenizer, byte_symbols, packaged_vocabulary, tokenizer_from_spec
from . import native, options_without_transformers_equivalent, transformers_gpt2, transformers_layout
from .transformers_llama import LLAMA_LAYOUT, QWEN3_LAYOUT

ARCHITECTURE_OF_LAYOUT = {transformers_gpt2.LAYOUT: "gpt2", LLAMA_LAYOUT: "llama", QWEN3_LAYOUT: "qwen3"}
ARCHITECTURES = (
    "gpt2 (GPT-2's options), llama (position=rope, norm=rmsnorm, activation=swiglu, bias=false, "
    "logit_softcap=0) and qwen3 (the same with qk_norm=true)"
)

Q = gguf.GGMLQuantizationType
# --type -> (general.file_type, the type of the matrices)
FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
DEFAULT_FILE_TYPE = "f16"  # as llama.cpp's own converter

T = gguf.MODEL_TENSOR
# gpt2lab's names -> llama.cpp's, outside the blocks and inside block i (`blk.{i}.`).
OUTSIDE_BLOCKS = {
    "transformer.wte.weight": (T.TOKEN_EMBD, "weight"),
    "transformer.wpe.weight": (T.POS_EMBD, "weight"),
    "transformer.ln_f.weight": (T.OUTPUT_NORM, "weight"),
    "transformer.ln_f.bias": (T.OUTPUT_NORM, "bias"),
    "lm_head.weight": (T.OUTPUT, "weight"),
}
GPT2_BLOCK = {
    "ln_1": T.ATTN_NORM, "attn.c_attn": T.ATTN_QKV, "attn.c_proj": T.ATTN_OUT,
    "ln_2": T.FFN_NORM, "mlp.c_fc": T.FFN_UP, "mlp.c_proj": T.FFN_DOWN,
}
LLAMA_BLOCK = {
    "ln_1": T.ATTN_NORM, "attn.c_proj": T.ATTN_OUT, "attn.q_norm": T.ATTN_Q_NORM, "attn.k_norm": T.ATTN_K_NORM,
    "ln_2": T.FFN_NORM, "mlp.c_proj": T.FFN_DOWN,
}
# Fused matrices of the llama/qwen3 layouts, split by rows in this order.
LLAMA_FUSED = {"attn.c_attn": (T.ATTN_Q, T.ATTN_K, T.ATTN_V), "mlp.c_fc": (T.FFN_GATE, T.FFN_UP)}
# Tensors llama.cpp reads in float32 whatever the file type, as its own converter writes them.
ALWAYS_F32 = (T.POS_EMBD,)


def architecture(config: GPTConfig) -> str:
    """The llama.cpp architecture that computes what GPT(config) computes, or a UserError naming
    each option it has no equivalent for."""
    layout = transformers_layout(config)
    if layout is None:
        options = "; ".join(options_without_transformers_equivalent(config))
        raise UserError(
            f"this model's options have no llama.cpp equivalent: {options}. "
            f"gpt2lab convert --format gguf writes {ARCHITECTURES}. Keep the model folder for gpt2lab (sample, "
            "chat, serve read it), or train with one of those sets of options to run it in llama.cpp"
        )
    return ARCHITECTURE_OF_LAYOUT[layout]


def gguf_tokenizer(tokenizer_spec: Any) -> GPT2Tokenizer | BPETokenizer:
    """The model's tokenizer, where GGUF can hold it: GPT-2's BPE or one trained by `gpt2lab
    tokenizer train` (both byte-level BPE); a character vocabulary has no such form."""
    tokenizer = tokenizer_from_spec(tokenizer_spec)
    if not isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        raise UserError(
            "this model has a character vocabulary, which llama.cpp's tokenizers cannot reproduce (GGUF holds "
            "byte-level BPE); convert a BPE model (GPT-2's or one of `gpt2lab tokenizer train`), or keep this "
            "one for gpt2lab (sample, serve)"
        )
    return tokenizer


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, block: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return f"{base.format(bid=block) if block is not None else base}.{suffix}"


def rotary_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of q or k (heads * head_dim, in) reordered from gpt2lab's rotation of a head's two
    halves (x_i with x_{i+d/2}) to llama.cpp's Llama rotation of adjacent pairs (rows 2i, 2i+1)."""
    rows, columns = weight.shape
    head_dim = rows // heads
    return weight.reshape(heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def gguf_tensors(
    model_state: dict[str, torch.Tensor], config: GPTConfig, arch: str, rows: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp's name, float32 tensor in its layout) of every tensor the `arch` file holds, the
    vocabulary cut to `rows`, a tied head once (llama.cpp reuses the embedding)."""
    block_map = GPT2_BLOCK if arch == "gpt2" else LLAMA_BLOCK
    params = dict(native.stored_parameters(model_state, tie_embeddings=config.tie_embeddings, rows=rows))
    if arch == "gpt2" and not config.bias:
        params.update(_zero_biases(params))
    for name, tensor in params.items():
        tensor = tensor.to(device="cpu", dtype=torch.float32)
        if name in OUTSIDE_BLOCKS:
            yield _name(*OUTSIDE_BLOCKS[name]), tensor
            continue
        block, rest = name.removeprefix("transformer.h.").split(".", 1)
        module, suffix = rest.rsplit(".", 1)
        if module in block_map:
            yield _name(block_map[module], suffix, int(block)), tensor
        elif arch != "gpt2" and module in LLAMA_FUSED:
            yield from _split(tensor, module, suffix, int(block), config, arch)
        else:
            raise ValueError(f"{name} has no place in llama.cpp's {arch} layout")


def _split(
    tensor: torch.Tensor, module: str, suffix: str, block: int, config: GPTConfig, arch: str
) -> Iterator[tuple[str, torch.Tensor]]:
    kv_width = config.kv_heads * config.head_dim
    sizes = [config.n_embd, kv_width, kv_width] if module == "attn.c_attn" else [config.hidden_size] * 2
    parts = dict(zip(LLAMA_FUSED[module], tensor.split(sizes, dim=0), strict=True))
    if arch == "llama" and module == "attn.c_attn":
        parts[T.ATTN_Q] = rotary_pairs(parts[T.ATTN_Q], config.n_head)
        parts[T.ATTN_K] = rotary_pairs(parts[T.ATTN_K], config.kv_heads)
    for part, piece in parts.items():
        yield _name(part, suffix, block), piece


def _zero_biases(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The biases llama.cpp's gpt2 requires, zero, for a GPT-2-shaped model trained without them."""
    zeros = {}
    for name, tensor in params.items():
        if name.endswith(".weight") and name not in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            zeros[name.removesuffix("weight") + "bias"] = torch.zeros(tensor.shape[0])
    return zeros


def tensor_type(name: str, tensor: torch.Tensor, file_type: str) -> gguf.GGMLQuantizationType:
    """What llama.cpp's converter gives each tensor: vectors (norms, biases) and the position table
    in float32, the matrices in the file's type."""
    if tensor.dim() <= 1 or any(name.startswith(gguf.TENSOR_NAMES[t] + ".") for t in ALWAYS_F32):
        return Q.F32
    return FILE_TYPES[file_type][1]


def encoded(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's bytes in `qtype`; a matrix whose rows do not split into Q8_0's blocks of 32
    falls back to float16, as llama.cpp's converter does."""
    data = tensor.numpy()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16


def add_hyperparameters(writer: gguf.GGUFWriter, config: GPTConfig, arch: str, rows: int) -> None:
    """The `{arch}.*` keys llama.cpp reads for the architecture."""
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.hidden_size)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_vocab_size(rows)


# llama.cpp's names of the pre-tokenizers whose splits are gpt2lab's patterns: GPT-2's, and
# cl100k's (llama.cpp's "dbrx": the same pattern as "llama-bpe", without its whole-word lookup).
PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "dbrx"}


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp types, merges "a b" by rank): ordinary tokens in GPT-2's
    byte symbols, as the byte-level BPE of llama.cpp (and tokenizer.json) writes them; the special
    tokens by name, as control tokens (parsed in a rendered template, never from plain text, as
    gpt2lab's `encode` never writes one, and never shown)."""
    symbol = byte_symbols()[1]
    control = set(tokenizer.control_tokens)
    tokens, types = [], []
    for token in range(tokenizer.vocab_size):
        piece = tokenizer.token_bytes(token)
        tokens.append(piece.decode("utf-8") if token in control else "".join(symbol[b] for b in piece))
        types.append(gguf.TokenType.CONTROL if token in control else gguf.TokenType.NORMAL)
    if isinstance(tokenizer, BPETokenizer):
        merges = [f"{left} {right}" for left, right in tokenizer.merges]
    else:  # OpenAI's file, whose sha256 GPT2Tokenizer checked
        merges = [line for line in packaged_vocabulary()[1].read_text(encoding="utf-8").split("\n")[1:] if line]
    return tokens, types, merges


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: GPT2Tokenizer | BPETokenizer) -> None:
    """The BPE as llama.cpp reads it, end-of-text as bos, a chat model's template and its end of
    turn as eos."""
    tokens, types, merges = vocabulary(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[getattr(tokenizer, "pattern", "gpt2")])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_token)
    # gpt2lab starts a text with nothing before it (a conversation with end-of-text, which the
    # template writes itself).
    writer.add_add_bos_token(False)
    chat = tokenizer.chat_tokens()
    if chat:
        writer.add_eos_token_id(chat["<|end|>"])
        writer.add_eot_token_id(chat["<|end|>"])
        writer.add_chat_template(jinja_chat_template(tokenizer.chat))
    else:
        writer.add_eos_token_id(tokenizer.eot_token)


@dataclasses.dataclass
class GGUFSummary:
    architecture: str
    file_type: str
    tokens: int
    chat_template: bool
    tensor_types: dict[str, str]


def write_gguf(
    model_state: dict[str, torch.Tensor], config: GPTConfig, path: Path, *, tokenizer_spec: Any,
    file_type: str = DEFAULT_FILE_TYPE, name: str | None = None,
) -> GGUFSummary:
    """Write the model (its state dict, a LoRA model's adapters already merged) as one GGUF file,
    atomically: a reader never sees half of it."""
    arch = architecture(config)
    tokenizer = gguf_tokenizer(tokenizer_spec)
    rows = tokenizer.vocab_size
    if config.vocab_size < rows:
        raise UserError(f"the model has {config.vocab_size} ids, fewer than its tokenizer's {rows}; it cannot be written")
    tensor_types: dict[str, str] = {}

    def write(temp: Path) -> None:
        writer = gguf.GGUFWriter(temp, arch)
        if name:
            writer.add_name(name)
        writer.add_file_type(FILE_TYPES[file_type][0])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config, arch, rows)
        add_tokenizer(writer, tokenizer)
        for tensor_name, tensor in gguf_tensors(model_state, config, arch, rows):
            data, qtype = encoded(tensor, tensor_type(tensor_name, tensor, file_type))
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            tensor_types[tensor_name] = qtype.name
        _finish(writer)

    write_atomic(path, write)
    return GGUFSummary(
        architecture=arch, file_type=file_type, tokens=rows, chat_template=bool(tokenizer.chat_tokens()),
        tensor_types=tensor_types,
    )


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

