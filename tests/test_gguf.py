"""`gpt2lab convert --format gguf`, read back with gguf's own GGUFReader: every tensor against the
model's weights in llama.cpp's layout (written here from llama.cpp's loaders), every metadata key,
the tokenizer, and the chat template rendered by jinja2 against gpt2lab's renderer; the refusals.
Running the files in llama.cpp itself: benchmarks/gguf_llama_cpp.py."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from gpt2lab import GPT, GPTConfig
from gpt2lab.chat.template import ChatTemplate
from gpt2lab.cli import main
from gpt2lab.formats.gguf import tensor_type
from gpt2lab.lora import apply_lora, lora_config, split_adapters
from gpt2lab.pretrained import plain_state_dict, save_pretrained, write_adapters, write_model_folder
from gpt2lab.data.sources import packaged_shakespeare
from gpt2lab.data.tokenizer_train import learn_merges
from gpt2lab.tokenizer import BPETokenizer, GPT2Tokenizer

CHAT = {"type": "gpt2", "chat": "gpt2lab-chat-v1"}
CHAT_TOKENS = {"<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}
SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=40, vocab_size=50304)
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False)
SHAPES = {
    "gpt2, tied": (dict(), "gpt2"),
    "gpt2, untied, no biases": (dict(tie_embeddings=False, bias=False, layer_norm_epsilon=1e-6), "gpt2"),
    "llama, untied, two k/v heads, own widths": (
        dict(LLAMA, tie_embeddings=False, n_kv_head=2, mlp_hidden=96, rope_base=500.0), "llama"),
    "qwen3, untied, one k/v head": (dict(LLAMA, qk_norm=True, tie_embeddings=False, n_kv_head=1), "qwen3"),
}


def random_model(seed: int = 0, **options) -> GPT:
    """Every parameter drawn, the norms' gains and biases included, so that a tensor put in
    another's place shows."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **options})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.3)
    return model


def to_gguf(folder: Path, out: Path, *extra: str) -> int:
    return main(["convert", str(folder), "--format", "gguf", "--out", str(out), *extra])


# ---- llama.cpp's layout, written here from its loaders (src/models/{gpt2,llama,qwen3}.cpp) ---------


def pairs_order(heads: int, head_dim: int) -> list[int]:
    """Row j of a head in llama.cpp's Llama (adjacent pairs rotate together) is row j // 2 of
    gpt2lab's first half for even j, of its second half for odd j."""
    return [h * head_dim + j // 2 + (j % 2) * (head_dim // 2) for h in range(heads) for j in range(head_dim)]


def expected_tensors(state: dict[str, torch.Tensor], config: GPTConfig, arch: str, rows: int) -> dict[str, torch.Tensor]:
    expected = {"token_embd.weight": state["transformer.wte.weight"][:rows], "output_norm.weight": state["transformer.ln_f.weight"]}
    if not config.tie_embeddings:
        expected["output.weight"] = state["lm_head.weight"][:rows]
    d, kv = config.head_dim, config.kv_heads * config.head_dim
    for i in range(config.n_layer):
        ours = {name.removeprefix(f"transformer.h.{i}."): t for name, t in state.items() if name.startswith(f"transformer.h.{i}.")}
        blk = f"blk.{i}."
        if arch == "gpt2":
            zero = torch.zeros
            names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                     "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
            for module, theirs in names.items():
                weight = ours[f"{module}.weight"]
                expected[blk + theirs + ".weight"] = weight
                expected[blk + theirs + ".bias"] = ours.get(f"{module}.bias", zero(weight.shape[0]))
            continue
        qkv, gate_up = ours["attn.c_attn.weight"], ours["mlp.c_fc.weight"]
        q, k, v = qkv[: config.n_embd], qkv[config.n_embd : config.n_embd + kv], qkv[config.n_embd + kv :]
        if arch == "llama":
            q, k = q[pairs_order(config.n_head, d)], k[pairs_order(config.kv_heads, d)]
        expected.update({
            blk + "attn_norm.weight": ours["ln_1.weight"], blk + "attn_q.weight": q, blk + "attn_k.weight": k,
            blk + "attn_v.weight": v, blk + "attn_output.weight": ours["attn.c_proj.weight"],
            blk + "ffn_norm.weight": ours["ln_2.weight"], blk + "ffn_gate.weight": gate_up[: config.hidden_size],
            blk + "ffn_up.weight": gate_up[config.hidden_size :], blk + "ffn_down.weight": ours["mlp.c_proj.weight"],
        })
        if arch == "qwen3":
            expected[blk + "attn_q_norm.weight"] = ours["attn.q_norm.weight"]
            expected[blk + "attn_k_norm.weight"] = ours["attn.k_norm.weight"]
    if arch == "gpt2":
        expected["position_embd.weight"] = state["transformer.wpe.weight"]
        expected["output_norm.bias"] = state.get("transformer.ln_f.bias", torch.zeros(config.n_embd))
    return {name: t.float() for name, t in expected.items()}


def decoded(tensor) -> np.ndarray:
    """A tensor of the file as float32, decoded here (GGML's F32, F16, BF16 and Q8_0 layouts)."""
    kind, data = tensor.tensor_type, np.asarray(tensor.data)
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.astype(np.float32)
    if kind == GGMLQuantizationType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    assert kind == GGMLQuantizationType.Q8_0, kind
    blocks = data.reshape(-1, 34)  # per 32 values: a float16 scale, then 32 int8
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    values = blocks[:, 2:].copy().view(np.int8).astype(np.float32) * scales
    return values.reshape(data.shape[0], -1)


def read(path: Path) -> tuple[dict, dict]:
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def expected_metadata(config: GPTConfig, arch: str, name: str, file_type: int, chat: bool) -> dict:
    rows = 50261 if chat else 50257
    meta = {
        "general.architecture": arch, "general.name": name, "general.file_type": file_type,
        "general.quantization_version": 2,
        f"{arch}.context_length": config.block_size, f"{arch}.embedding_length": config.n_embd,
        f"{arch}.feed_forward_length": config.hidden_size, f"{arch}.block_count": config.n_layer,
        f"{arch}.attention.head_count": config.n_head, f"{arch}.attention.head_count_kv": config.kv_heads,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50260 if chat else 50256, "tokenizer.ggml.add_bos_token": False,
    }
    if arch == "gpt2":
        meta["gpt2.attention.layer_norm_epsilon"] = pytest.approx(config.layer_norm_epsilon)
    else:
        meta.update({
            f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(config.layer_norm_epsilon),
            f"{arch}.rope.freq_base": config.rope_base, f"{arch}.rope.dimension_count": config.head_dim,
            f"{arch}.attention.key_length": config.head_dim, f"{arch}.attention.value_length": config.head_dim,
            f"{arch}.vocab_size": rows,
        })
    if chat:
        meta["tokenizer.ggml.eot_token_id"] = 50260
    return meta


def check_tokenizer(fields: dict, chat: bool) -> None:
    """Tokens are GPT-2's bytes in its printable byte-level alphabet, merge r builds token 256 + r,
    end-of-text and the chat tokens are control tokens."""
    tokens, types, merges = (fields.pop(key) for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                         "tokenizer.ggml.merges"))
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    gpt2 = GPT2Tokenizer()
    assert len(tokens) == (50261 if chat else 50257) and len(merges) == 50000
    for token_id in [*range(0, 50256, 7), 50255]:
        assert bytes(alphabet[c] for c in tokens[token_id]) == gpt2.token_bytes(token_id)
    for rank in [*range(0, 50000, 11), 49999]:
        first, second = merges[rank].split(" ")
        assert first + second == tokens[256 + rank]
    specials = {"<|endoftext|>": 50256, **(CHAT_TOKENS if chat else {})}
    assert {tokens[i]: i for i in specials.values()} == specials
    assert [i for i, kind in enumerate(types) if kind != 1] == sorted(specials.values())
    assert all(types[i] == 3 for i in specials.values())  # llama.cpp's CONTROL


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_every_tensor_and_key_is_llama_cpps(tmp_path, shape):
    options, arch = SHAPES[shape]
    model = random_model(**options)
    save_pretrained(model, tmp_path / "model", tokenizer_spec="gpt2")
    assert to_gguf(tmp_path / "model", tmp_path / "model.gguf", "--type", "f32") == 0
    fields, tensors = read(tmp_path / "model.gguf")
    check_tokenizer(fields, chat=False)
    assert fields == expected_metadata(model.config, arch, "model", 0, chat=False)
    expected = expected_tensors(model.state_dict(), model.config, arch, rows=50257)
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert tensor.tensor_type == GGMLQuantizationType.F32, name
        assert np.array_equal(decoded(tensor), expected[name].numpy()), name


@pytest.mark.slow
@pytest.mark.parametrize("file_type, code", [("f16", 1), ("bf16", 32), ("q8_0", 7)])
def test_file_types_round_the_matrices_and_keep_vectors_in_float32(tmp_path, file_type, code):
    model = random_model(**LLAMA, mlp_hidden=40)  # ffn_down's rows are 40 wide: no whole Q8_0 blocks
    save_pretrained(model, tmp_path / "model", tokenizer_spec="gpt2")
    assert to_gguf(tmp_path / "model", tmp_path / "model.gguf", "--type", file_type) == 0
    fields, tensors = read(tmp_path / "model.gguf")
    assert fields["general.file_type"] == code
    expected = expected_tensors(model.state_dict(), model.config, "llama", rows=50257)
    matrix = {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
    for name, tensor in tensors.items():
        want, got = expected[name], decoded(tensor)
        if want.dim() == 1:
            assert tensor.tensor_type == GGMLQuantizationType.F32 and np.array_equal(got, want.numpy()), name
            continue
        if file_type == "q8_0" and want.shape[1] % 32:
            # llama.cpp's converter writes such a matrix in float16
            assert tensor.tensor_type == GGMLQuantizationType.F16 and name.endswith("ffn_down.weight"), name
            assert np.array_equal(got, want.half().float().numpy()), name
            continue
        assert tensor.tensor_type == matrix[file_type], name
        if file_type == "q8_0":
            blocks = want.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127  # one quantum per block
            error = (torch.from_numpy(got).reshape(-1, 32) - blocks).abs()
            # half a quantum, plus the largest value times the quantum's float16 rounding
            assert bool((error <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), name
        else:
            rounded = want.to(torch.float16 if file_type == "f16" else torch.bfloat16).float()
            assert np.array_equal(got, rounded.numpy()), name


def test_the_position_table_stays_in_float32_whatever_the_type():
    table = torch.zeros(40, 64)
    assert tensor_type("position_embd.weight", table, "q8_0") == GGMLQuantizationType.F32
    assert tensor_type("token_embd.weight", table, "q8_0") == GGMLQuantizationType.Q8_0


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Answer in French.\nBe brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": " Quatre, café ☕"}, {"role": "user", "content": "  and 3+3?  "}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "<nothing>"}],
]


def template_ids(text: str, tokenizer=None) -> list[int]:
    """A rendered template's ids as llama.cpp takes them: the special tokens parsed, the text
    between them the BPE's (GPT-2's with the chat tokens unless given)."""
    gpt2, ids, rest = tokenizer or GPT2Tokenizer(chat="gpt2lab-chat-v1"), [], text
    specials = {gpt2.token_bytes(token).decode(): token for token in gpt2.control_tokens}
    while rest:
        at = min(((rest.find(s), s) for s in specials if s in rest), default=(len(rest), None))
        ids += gpt2.encode(rest[: at[0]])
        if at[1] is None:
            break
        ids.append(specials[at[1]])
        rest = rest[at[0] + len(at[1]) :]
    return ids


def lora_checkpoint(folder: Path) -> GPT:
    """A LoRA checkpoint of a Llama-shaped chat model in `folder`, its adapters drawn away from
    zero; returns the model, adapters unmerged."""
    model = apply_lora(random_model(**LLAMA), rank=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.3)
    base, adapters = split_adapters(model.state_dict())
    folder.mkdir()
    write_adapters(adapters, folder)
    write_model_folder(base, model.config, folder, tokenizer_spec=CHAT, layout="gpt2lab",
                       extra_record={"lora": lora_config(model).to_dict()}, digested=("adapters.safetensors",))
    return model


def raise_exception(message):
    raise jinja2.TemplateError(message)


@pytest.mark.slow
def test_a_lora_chat_checkpoint_is_written_merged_with_its_template(tmp_path):
    model = lora_checkpoint(tmp_path / "sft")
    assert to_gguf(tmp_path / "sft", tmp_path / "sft.gguf", "--type", "f32") == 0
    fields, tensors = read(tmp_path / "sft.gguf")
    check_tokenizer(fields, chat=True)
    template = fields.pop("tokenizer.chat_template")
    assert fields == expected_metadata(model.config, "llama", "sft", 0, chat=True)
    merged = expected_tensors(plain_state_dict(model), model.config, "llama", rows=50261)
    unmerged = expected_tensors(split_adapters(model.state_dict())[0], model.config, "llama", rows=50261)
    assert not torch.allclose(merged["blk.1.attn_v.weight"], unmerged["blk.1.attn_v.weight"])  # the adapters matter
    assert set(tensors) == set(merged) and tensors["token_embd.weight"].data.shape == (50261, 64)
    for name, tensor in tensors.items():
        assert np.allclose(decoded(tensor), merged[name].numpy(), atol=1e-6, rtol=0), name

    ours = ChatTemplate.from_spec(CHAT)
    jinja = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            text = jinja.render(messages=messages, add_generation_prompt=prompt, raise_exception=raise_exception)
            assert template_ids(text) == ours.render(messages, add_generation_prompt=prompt)[0]
    with pytest.raises(jinja2.TemplateError, match="only the first message"):
        jinja.render(messages=[CONVERSATIONS[0][0], {"role": "system", "content": "x"}], raise_exception=raise_exception)


@pytest.mark.parametrize("pattern, pre", [("gpt4", "dbrx"), ("gpt2", "gpt-2")])
def test_a_trained_bpe_goes_in_with_its_merges_special_tokens_and_pattern(tmp_path, pattern, pre):
    merges, _ = learn_merges([packaged_shakespeare()[:100_000]], 400, pattern, progress=False)
    bpe = BPETokenizer(merges, pattern=pattern, chat="gpt2lab-chat-v1")
    model = random_model(**LLAMA, vocab_size=768)
    save_pretrained(model, tmp_path / "bpe", tokenizer_spec=bpe.spec())
    assert to_gguf(tmp_path / "bpe", tmp_path / "bpe.gguf", "--type", "f32") == 0
    fields, tensors = read(tmp_path / "bpe.gguf")
    vocab = {token: i for i, token in enumerate(fields.pop("tokenizer.ggml.tokens"))}
    assert vocab == bpe.to_tokenizers().get_vocab()  # tokenizer.json's tokens, as transformers reads them
    assert fields.pop("tokenizer.ggml.merges") == [f"{a} {b}" for a, b in merges]
    assert fields.pop("tokenizer.ggml.token_type") == [3] * 5 + [1] * (bpe.vocab_size - 5)
    template = fields.pop("tokenizer.chat_template")
    meta = {**expected_metadata(model.config, "llama", "bpe", 0, chat=True), "llama.vocab_size": bpe.vocab_size,
            "tokenizer.ggml.pre": pre, "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 4,
            "tokenizer.ggml.eot_token_id": 4}
    assert fields == meta
    assert np.array_equal(decoded(tensors["token_embd.weight"]), model.transformer.wte.weight[: bpe.vocab_size].detach().numpy())
    jinja = jinja2.Environment().from_string(template)
    for messages in CONVERSATIONS:
        text = jinja.render(messages=messages, add_generation_prompt=True, raise_exception=raise_exception)
        assert template_ids(text, bpe) == ChatTemplate(bpe).render(messages, add_generation_prompt=True)[0]


# ---- refusals: exit 2, one message, nothing written or lost -----------------------------------


@pytest.mark.parametrize(
    "options, named",
    [
        ({**LLAMA, "activation": "relu2"}, ["activation=relu2"]),
        ({**LLAMA, "logit_softcap": 15.0}, ["logit_softcap=15"]),
        (dict(norm="rmsnorm", qk_norm=True), ["learned positions with norm=rmsnorm", "learned positions with qk_norm=true"]),
        ({**LLAMA, "bias": True}, ["rope with bias=true"]),
    ],
)
def test_options_llama_cpp_cannot_compute_are_refused_by_name(tmp_path, capsys, options, named):
    save_pretrained(random_model(**options), tmp_path / "model", tokenizer_spec="gpt2")
    assert to_gguf(tmp_path / "model", tmp_path / "model.gguf") == 2
    message = capsys.readouterr().err
    assert all(option in message for option in named), message
    assert "no llama.cpp equivalent" in message and "qwen3" in message and "Traceback" not in message
    assert not (tmp_path / "model.gguf").exists()


def test_a_character_model_is_refused(tmp_path, capsys):
    chars = {"type": "char", "chars": "".join(chr(32 + i) for i in range(90))}
    save_pretrained(random_model(vocab_size=90), tmp_path / "model", tokenizer_spec=chars)
    assert to_gguf(tmp_path / "model", tmp_path / "model.gguf") == 2
    assert "character vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "model.gguf").exists()


def test_no_file_is_replaced_without_force_nor_a_model_file_ever(tmp_path, capsys):
    save_pretrained(random_model(), tmp_path / "model", tokenizer_spec="gpt2")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone else's file")
    assert to_gguf(tmp_path / "model", out) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"someone else's file"
    weights = tmp_path / "model" / "model.safetensors"
    before = weights.read_bytes()
    assert to_gguf(tmp_path / "model", weights, "--force") == 2
    assert "a file of the model being converted" in capsys.readouterr().err and weights.read_bytes() == before
    assert to_gguf(tmp_path / "model", tmp_path / "model") == 2
    assert "is a folder" in capsys.readouterr().err
    assert to_gguf(tmp_path / "model", out / "x.gguf") == 2
    assert "lies under a file" in capsys.readouterr().err
    assert to_gguf(tmp_path / "model", out, "--dtype", "float16") == 2
    assert "--type" in capsys.readouterr().err and out.read_bytes() == b"someone else's file"
    assert main(["convert", str(tmp_path / "model"), "--out", str(tmp_path / "folder"), "--type", "f16"]) == 2
    assert "--format gguf" in capsys.readouterr().err and not (tmp_path / "folder").exists()
    assert to_gguf(tmp_path / "model", out, "--force") == 0
    assert out.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".model.gguf*"))
    assert json.loads((tmp_path / "model" / "gpt2lab.json").read_text())["format"] == 1
