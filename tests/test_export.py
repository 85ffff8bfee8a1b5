"""Export of the modern options: Llama- and Qwen3-shaped models are transformers' LlamaForCausalLM /
Qwen3ForCausalLM (`convert`, checkpoint folders, and back); anything else is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gpt2lab import GPT, UserError, load_model, load_tokenizer  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.pretrained import write_model_folder  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)

TOL = 1e-5
CHARS = {"type": "char", "chars": "".join(chr(32 + i) for i in range(97))}  # a vocabulary of SHAPE's size
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False)
SHAPE = dict(n_head=4, n_embd=64, block_size=48, vocab_size=97)
EXPORTS = {
    "llama, tied": (dict(), "LlamaForCausalLM"),
    "llama, untied, one k/v head": (dict(tie_embeddings=False, n_kv_head=1), "LlamaForCausalLM"),
    "llama, two k/v heads, own widths": (dict(n_kv_head=2, mlp_hidden=96, rope_base=500.0, layer_norm_epsilon=1e-6),
                                         "LlamaForCausalLM"),
    "qwen3, untied, two k/v heads": (dict(qk_norm=True, tie_embeddings=False, n_kv_head=2), "Qwen3ForCausalLM"),
    "qwen3, tied": (dict(qk_norm=True), "Qwen3ForCausalLM"),
}


def llama_shaped(make_model, seed: int = 0, **options) -> GPT:
    """A peaked model of Llama's options; the norms' gains are drawn too, so that a gain put in
    the wrong place (q_norm for k_norm, one block's for another's) shows in the logits."""
    model = make_model(seed, peaked=True, **{**SHAPE, **LLAMA, **options})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return model


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(ids)
    return output.logits if hasattr(output, "logits") else output[0]


def assert_same_logits(ours: GPT, theirs, vocab: int = 97) -> None:
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits_of(theirs, ids)[..., :vocab], logits_of(ours, ids)[..., :vocab], atol=TOL, rtol=0)


def convert(source: Path, out: Path) -> int:
    return main(["convert", str(source), "--out", str(out)])


@pytest.mark.parametrize("name", EXPORTS)
def test_transformers_computes_what_gpt2lab_computes(tmp_path, make_model, name):
    options, architecture = EXPORTS[name]
    model = llama_shaped(make_model, **options)
    model.save_pretrained(tmp_path / "model", tokenizer_spec=CHARS)
    assert convert(tmp_path / "model", tmp_path / "export") == 0
    hf_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf_config["architectures"] == [architecture] and hf_config["vocab_size"] == 97
    assert hf_config["bos_token_id"] is None and not (tmp_path / "export" / "vocab.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(hf).__name__ == architecture
    assert_same_logits(model, hf)
    prompts = [[5, 17, 42, 8], [60, 3, 3, 91]]
    ours = model.generate(prompts, 40, temperature=0)
    theirs = hf.generate(torch.tensor(prompts), max_new_tokens=40, do_sample=False).tolist()
    assert ours == theirs
    assert len(set(ours[0][4:])) > 5  # peaked weights: greedy decoding does not settle on one token


@pytest.mark.parametrize("qk_norm, layout", [(False, "transformers-llama"), (True, "transformers-qwen3")])
def test_a_checkpoint_folder_is_a_model_for_gpt2lab_and_transformers(tmp_path, make_model, qk_norm, layout):
    model = llama_shaped(make_model, padded_vocab_size=128, qk_norm=qk_norm, n_kv_head=2, tie_embeddings=False)
    write_model_folder(model.state_dict(), model.config, tmp_path, keep_padded_vocab=True, tokenizer_spec=CHARS,
                       extra_record={"train_config": {}})
    assert json.loads((tmp_path / "gpt2lab.json").read_text())["weights"] == layout
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 128  # padded rows kept
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    for (name, ours), (_, theirs) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    assert_same_logits(model, AutoModelForCausalLM.from_pretrained(tmp_path).eval())


def test_gpt2_vocabulary_brings_its_tokenizer_and_end_of_text(tmp_path, make_model):
    model = llama_shaped(make_model, qk_norm=True, vocab_size=50257)
    model.save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["bos_token_id"] == hf_config["eos_token_id"] == 50256
    text = "Hello, I'm a language model,"
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == load_tokenizer(tmp_path).encode(text)
    assert_same_logits(model, AutoModelForCausalLM.from_pretrained(tmp_path).eval(), vocab=50257)


@pytest.mark.parametrize("name", ["llama, untied, one k/v head", "qwen3, tied"])
def test_a_folder_transformers_wrote_loads_back(tmp_path, make_model, name):
    model = llama_shaped(make_model, **EXPORTS[name][0])
    model.save_pretrained(tmp_path / "ours", tokenizer_spec=CHARS)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    assert not (tmp_path / "theirs" / "gpt2lab.json").exists()
    loaded = load_model(tmp_path / "theirs")
    assert loaded.config.qk_norm == model.config.qk_norm and loaded.config.kv_heads == model.config.kv_heads
    ids = torch.randint(0, 97, (2, 48))
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}), "rope_type='llama3'"),
        (dict(head_dim=8), "head_dim=8"),
    ],
)
def test_a_transformers_llama_gpt2lab_computes_differently_is_refused(tmp_path, make_model, change, named):
    llama_shaped(make_model).save_pretrained(tmp_path)
    (tmp_path / "gpt2lab.json").unlink()
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, **change}))
    with pytest.raises(UserError, match=f"uses {named}.*load this model with transformers"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "options, named",
    [
        ({**LLAMA, "activation": "relu2"}, ["activation=relu2"]),
        ({**LLAMA, "logit_softcap": 15.0}, ["logit_softcap=15"]),
        (dict(norm="rmsnorm"), ["learned positions with norm=rmsnorm"]),
        (dict(activation="swiglu", n_kv_head=1), ["learned positions with activation=swiglu",
                                                  "learned positions with n_kv_head=1"]),
        (dict(mlp_hidden=96), ["learned positions with mlp_hidden=96"]),
        ({**LLAMA, "bias": True}, ["rope with bias=true"]),
        ({**LLAMA, "norm": "layernorm", "qk_norm": True}, ["rope with norm=layernorm"]),
        (dict(position="rope"), ["rope with norm=layernorm", "rope with activation=gelu_tanh", "rope with bias=true"]),
        (dict(norm="rmsnorm", activation="relu2", logit_softcap=30.0),
         ["activation=relu2", "logit_softcap=30", "learned positions with norm=rmsnorm"]),
    ],
)
def test_convert_refuses_options_without_a_transformers_equivalent(tmp_path, make_model, capsys, options, named):
    model = make_model(peaked=True, **{**SHAPE, **options})
    model.save_pretrained(tmp_path / "model", tokenizer_spec=CHARS)
    assert json.loads((tmp_path / "model" / "gpt2lab.json").read_text())["weights"] == "gpt2lab"
    assert convert(tmp_path / "model", tmp_path / "out") == 2
    message = capsys.readouterr().err
    assert all(option in message for option in named), message
    assert "LlamaForCausalLM" in message and "Keep the model folder for gpt2lab" in message
    assert not (tmp_path / "out").exists()
    ids = torch.randint(0, 97, (1, 16))
    assert torch.equal(logits_of(load_model(tmp_path / "model", accelerate=False), ids), logits_of(model, ids))


def test_convert_help_names_the_architectures_it_writes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    manual = " ".join(capsys.readouterr().out.split())
    assert all(name in manual for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM"))


def test_a_damaged_fused_matrix_is_named(tmp_path, make_model):
    llama_shaped(make_model).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="model.safetensors: its sha256 differs"):
        load_model(tmp_path)
    record = json.loads((tmp_path / "gpt2lab.json").read_text())
    del record["sha256"]  # as a folder written before digests were recorded: the tensors still count
    (tmp_path / "gpt2lab.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"lack transformer\.h\.1\.attn\.c_attn\.weight"):
        load_model(tmp_path)
