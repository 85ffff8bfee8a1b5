"""Weights in the transformers GPT-2 format: parity with transformers, saving, hub layout, errors.

Everything is built offline with transformers' GPT2Config/GPT2LMHeadModel and saved to tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gpt2lab import GPT, GPTConfig, UserError, load_model, load_tokenizer, resolve_model_path  # noqa: E402
from gpt2lab.pretrained import newest_checkpoint, save_pretrained  # noqa: E402
from gpt2lab.tokenizer import CharTokenizer  # noqa: E402

TOL = 1e-5

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


# ---- helpers -----------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Give every parameter (biases and LayerNorms included) non-trivial random values, so that a
    wrong transpose, a dropped bias or a mixed-up LayerNorm shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            if "ln_" in name and name.endswith("weight"):
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)


def hf_model(seed: int = 0, **kwargs) -> GPT2LMHeadModel:
    kwargs.setdefault("resid_pdrop", 0.0)
    kwargs.setdefault("embd_pdrop", 0.0)
    kwargs.setdefault("attn_pdrop", 0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**kwargs))
    randomize_(model, seed)
    return model.eval()


def hf_logits(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model.eval()(ids)
    return logits


def random_ids(vocab_size: int, length: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def small_gpt(seed: int = 0, **overrides) -> GPT:
    values = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)
    values.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**values))
    randomize_(model, seed)
    return model.eval()


# ---- parity with transformers ----------------------------------------------------------------------

CONFIGS = [
    dict(n_layer=1, n_head=1, n_embd=32, n_positions=16, vocab_size=100),
    dict(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=257),
    dict(n_layer=3, n_head=3, n_embd=48, n_positions=24, vocab_size=500, layer_norm_epsilon=1e-6),
    dict(n_layer=4, n_head=4, n_embd=96, n_positions=64, vocab_size=333),
    dict(n_layer=2, n_head=4, n_embd=64, n_positions=40, vocab_size=211, tie_word_embeddings=False),
    dict(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100, activation_function="gelu_pytorch_tanh"),
]


@pytest.mark.parametrize(
    "seed, hf_kwargs", list(enumerate(CONFIGS)), ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS]
)
def test_parity_with_transformers_both_directions(tmp_path, seed, hf_kwargs):
    reference = hf_model(seed=seed, **hf_kwargs)
    folder = tmp_path / "hf"
    reference.save_pretrained(folder)
    ids = random_ids(hf_kwargs["vocab_size"], hf_kwargs["n_positions"])
    expected = hf_logits(reference, ids)
    assert expected.abs().max() > 0.5  # the random weights give logits well above the tolerance

    ours = GPT.from_pretrained(folder)
    config = ours.config
    assert (config.n_layer, config.n_head, config.n_embd) == (
        hf_kwargs["n_layer"], hf_kwargs["n_head"], hf_kwargs["n_embd"])
    assert config.block_size == hf_kwargs["n_positions"]
    assert config.vocab_size == hf_kwargs["vocab_size"]
    assert config.tie_embeddings == hf_kwargs.get("tie_word_embeddings", True)
    assert config.layer_norm_epsilon == hf_kwargs.get("layer_norm_epsilon", 1e-5)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == config.tie_embeddings
    logits = our_logits(ours, ids)
    assert max_diff(logits, expected) < TOL

    # the plain (step by step) attention path agrees with SDPA
    plain = GPT.from_pretrained(folder, attention="plain")
    assert plain.config.attention == "plain"
    assert max_diff(our_logits(plain, ids), logits) < TOL

    # and back: our save_pretrained is read by transformers with the same logits
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    assert reloaded.config.n_positions == hf_kwargs["n_positions"]
    assert reloaded.config.tie_word_embeddings == hf_kwargs.get("tie_word_embeddings", True)
    assert max_diff(hf_logits(reloaded, ids), expected) < TOL
    assert max_diff(hf_logits(reloaded, ids), logits) < TOL

    # and our own loader reads our files bit-exactly
    again = GPT.from_pretrained(out)
    assert again.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_parity_with_shorter_input_and_loss(tmp_path):
    reference = hf_model(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=120)
    reference.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    ids = random_ids(120, 7, seed=3)
    with torch.no_grad():
        out = reference(ids, labels=ids)
        logits, _ = ours.eval()(ids[:, :-1])
        _, loss = ours(ids[:, :-1], ids[:, 1:])
    assert max_diff(logits, out.logits[:, :-1]) < TOL
    assert abs(loss.item() - out.loss.item()) < TOL


def test_from_pretrained_dtype_and_unknown_option(tmp_path):
    hf_model(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100).save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with pytest.raises(UserError, match="unknown model option"):
        GPT.from_pretrained(tmp_path, not_an_option=1)
    with pytest.raises(UserError, match="model.attention"):
        GPT.from_pretrained(tmp_path, attention="flash")


# ---- the hub's original key layout -----------------------------------------------------------------


@pytest.mark.parametrize("with_masked_bias", [False, True])
def test_original_hub_layout(tmp_path, with_masked_bias):
    n_layer, n_positions, vocab = 2, 24, 150
    reference = hf_model(n_layer=n_layer, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=vocab)
    tensors = {}
    for name, tensor in reference.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: the original file has no lm_head
        tensors[name.removeprefix("transformer.")] = tensor.clone().contiguous()
    mask = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
    for i in range(n_layer):
        tensors[f"h.{i}.attn.bias"] = mask.clone()
        if with_masked_bias:
            tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "h.0.attn.c_attn.weight" in tensors and "transformer.wte.weight" not in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    # config.json as openai-community/gpt2 has it (scaled down)
    (tmp_path / "config.json").write_text(json.dumps({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": n_positions, "n_embd": 32,
        "n_head": 2, "n_layer": n_layer, "n_positions": n_positions, "resid_pdrop": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": vocab,
    }))
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.block_size == n_positions
    ids = random_ids(vocab, n_positions)
    assert max_diff(our_logits(ours, ids), hf_logits(reference, ids)) < TOL


def test_sharded_transformers_folder(tmp_path):
    reference = hf_model(n_layer=3, n_head=2, n_embd=64, n_positions=16, vocab_size=300)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids(300, 16)
    assert max_diff(our_logits(GPT.from_pretrained(tmp_path), ids), hf_logits(reference, ids)) < TOL
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(tmp_path)
    assert shard.name in str(info.value) and "missing" in str(info.value)


# ---- padded vocabulary -----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_padded_vocab_is_cut_on_export(tmp_path, tie):
    model = small_gpt(vocab_size=100, padded_vocab_size=128, tie_embeddings=tie)
    assert model.transformer.wte.weight.shape == (128, 32)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["transformer.wte.weight"].shape == (100, 32)
    assert torch.equal(tensors["transformer.wte.weight"], model.transformer.wte.weight[:100])
    if tie:
        assert "lm_head.weight" not in tensors
    else:
        assert tensors["lm_head.weight"].shape == (100, 32)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 100
    record = json.loads((tmp_path / "gpt2lab.json").read_text())
    assert record["model"]["padded_vocab_size"] is None

    ids = random_ids(100, 16)
    ours = our_logits(model, ids)
    assert ours.shape[-1] == 128
    reference = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_diff(hf_logits(reference, ids), ours[..., :100]) < TOL

    # loaded back unpadded, or padded again with an override (extra rows zero)
    plain = GPT.from_pretrained(tmp_path)
    assert plain.config.padded_vocab_size is None
    assert max_diff(our_logits(plain, ids), ours[..., :100]) < TOL
    padded = GPT.from_pretrained(tmp_path, padded_vocab_size=112)
    assert padded.transformer.wte.weight.shape == (112, 32)
    assert torch.count_nonzero(padded.transformer.wte.weight[100:]) == 0
    assert torch.count_nonzero(padded.lm_head.weight[100:]) == 0
    assert max_diff(our_logits(padded, ids)[..., :100], ours[..., :100]) < TOL


@pytest.mark.parametrize("tie", [True, False])
def test_keep_padded_vocab_round_trips_exactly(tmp_path, tie):
    model = small_gpt(vocab_size=100, padded_vocab_size=128, tie_embeddings=tie)
    model.save_pretrained(tmp_path, keep_padded_vocab=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["transformer.wte.weight"].shape == (128, 32)
    if not tie:
        assert tensors["lm_head.weight"].shape == (128, 32)
    record = json.loads((tmp_path / "gpt2lab.json").read_text())
    assert record["format"] == 1
    assert record["model"]["padded_vocab_size"] == 128
    assert record["model"]["vocab_size"] == 100

    again = GPT.from_pretrained(tmp_path, accelerate=False)  # bit for bit: the same kernels as `model`
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    ids = random_ids(100, 16)
    assert torch.equal(our_logits(again, ids), our_logits(model, ids))


# ---- bias=False ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_no_bias_model_exports_zero_biases(tmp_path, tie):
    model = small_gpt(bias=False, tie_embeddings=tie, n_layer=2, n_embd=48, n_head=3)
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for i in range(2):
        for name, size in [("attn.c_attn", 144), ("attn.c_proj", 48), ("mlp.c_fc", 192),
                           ("mlp.c_proj", 48), ("ln_1", 48), ("ln_2", 48)]:
            bias = tensors[f"transformer.h.{i}.{name}.bias"]
            assert bias.shape == (size,) and torch.count_nonzero(bias) == 0
    assert torch.count_nonzero(tensors["transformer.ln_f.bias"]) == 0
    assert "lm_head.bias" not in tensors and "transformer.wte.bias" not in tensors

    ids = random_ids(100, 16)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_diff(hf_logits(reference, ids), our_logits(model, ids)) < TOL
    again = GPT.from_pretrained(tmp_path, accelerate=False)
    assert again.config.bias is False
    assert torch.equal(our_logits(again, ids), our_logits(model, ids))


# ---- files written -------------------------------------------------------------------------------


def test_save_pretrained_files(tmp_path):
    model = small_gpt()
    model.save_pretrained(tmp_path / "a" / "b")
    folder = tmp_path / "a" / "b"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "gpt2lab.json", "model.safetensors"
    ]
    hf = json.loads((folder / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["n_positions"] == 16 and hf["n_ctx"] == 16
    assert hf["vocab_size"] == 100 and hf["n_layer"] == 2 and hf["tie_word_embeddings"] is True
    assert hf["bos_token_id"] is None and hf["eos_token_id"] is None  # not GPT-2's tokenizer
    assert hf["dtype"] == hf["torch_dtype"] == "float32" and hf["transformers_version"]
    record = json.loads((folder / "gpt2lab.json").read_text())
    assert GPTConfig.from_dict(record["model"]) == model.config
    assert "tokenizer" not in record
    assert not list(folder.glob(".*"))  # no temporary files left


def test_save_pretrained_with_char_tokenizer_records_it(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    model = small_gpt(vocab_size=tok.vocab_size)
    save_pretrained(model, tmp_path, tokenizer_spec=tok.spec(), extra_record={"step": 7})
    record = json.loads((tmp_path / "gpt2lab.json").read_text())
    assert record["tokenizer"] == tok.spec() and record["step"] == 7
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars


def test_save_pretrained_gpt2_vocabulary_writes_tokenizer_files(tmp_path):
    model = small_gpt(vocab_size=50257, padded_vocab_size=50304, n_layer=1, n_embd=16, n_head=1)
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["bos_token_id"] == hf["eos_token_id"] == 50256 and hf["vocab_size"] == 50257
    assert json.loads((tmp_path / "gpt2lab.json").read_text())["tokenizer"] == "gpt2"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).is_file()
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == 50257
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto("Hello, I'm a language model,")["input_ids"] == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert load_tokenizer(tmp_path).encode("Hello") == [15496]


def test_saved_json_files_honour_umask(tmp_path):
    old = os.umask(0o022)
    try:
        small_gpt().save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("config.json", "gpt2lab.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "hf"
    hf_model(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=100).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["not-a-model", "gpt2-tiny", "./nope/dir", "../nope/dir", "/nope/dir/x"])
def test_unknown_model_names(name):
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(name)
    assert f"unknown model {name!r}" in str(info.value)
    assert "gpt2" in str(info.value)


def test_missing_relative_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import gpt2lab.pretrained as pretrained

    def no_network(repo_id):
        raise AssertionError(f"tried to download {repo_id}")

    monkeypatch.setattr(pretrained, "_download_from_hub", no_network)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unknown model"):
        load_model("./nope/dir")


def test_hub_names_are_sent_to_the_hub(monkeypatch, hf_folder):
    import gpt2lab.pretrained as pretrained

    asked = []
    monkeypatch.setattr(pretrained, "_download_from_hub", lambda repo_id: asked.append(repo_id) or hf_folder)
    assert resolve_model_path("gpt2-medium") == hf_folder
    assert resolve_model_path("someone/my-model") == hf_folder
    assert asked == ["openai-community/gpt2-medium", "someone/my-model"]


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)


def test_folder_without_weights(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(hf_folder)
    assert "model.safetensors" in str(info.value) and str(hf_folder) in str(info.value)


@pytest.mark.parametrize("keep", [0, 4, 8, 100, 0.5, -1])
def test_truncated_safetensors(hf_folder, keep):
    path = hf_folder / "model.safetensors"
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:cut])
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(hf_folder)
    assert str(path) in str(info.value) and "damaged" in str(info.value)


def test_shapes_that_do_not_fit_config(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["n_embd"] = 64
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(hf_folder)
    message = str(info.value)
    assert "shape" in message and "config.json" in message


def test_more_layers_in_config_than_in_weights(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["n_layer"] = 3
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="transformer.h.2"):
        GPT.from_pretrained(hf_folder)


def test_fewer_layers_in_config_than_in_weights(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["n_layer"] = 1
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="transformer.h.1"):
        GPT.from_pretrained(hf_folder)


def test_file_instead_of_folder(hf_folder):
    path = hf_folder / "model.safetensors"
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(path)
    assert "is a file" in str(info.value) and str(path) in str(info.value)


def test_invalid_config_json(hf_folder):
    (hf_folder / "config.json").write_text("{oops")
    with pytest.raises(UserError) as info:
        GPT.from_pretrained(hf_folder)
    assert str(hf_folder / "config.json") in str(info.value) and "JSON" in str(info.value)
    (hf_folder / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        GPT.from_pretrained(hf_folder)


def test_binary_config_json(hf_folder):
    (hf_folder / "config.json").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(UserError):
        GPT.from_pretrained(hf_folder)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "mistral"}, "mistral.*GPT-2, Llama and Qwen3"),
        ({"activation_function": "relu"}, "relu"),
        ({"n_inner": 10}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scaling"),
        ({"n_head": 3}, "n_head"),
    ],
)
def test_unsupported_config_options(hf_folder, change, needle):
    config = json.loads((hf_folder / "config.json").read_text())
    config.update(change)
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=needle):
        GPT.from_pretrained(hf_folder)


def test_config_missing_keys(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    del config["vocab_size"]
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="vocab_size"):
        GPT.from_pretrained(hf_folder)


def test_weights_missing_a_tensor(hf_folder):
    path = hf_folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(path))
    with pytest.raises(UserError, match="transformer.h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(hf_folder)


def test_gpt2lab_record_without_model_entry(tmp_path):
    small_gpt().save_pretrained(tmp_path)
    (tmp_path / "gpt2lab.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(UserError, match="'model'"):
        GPT.from_pretrained(tmp_path)


# ---- run folders ---------------------------------------------------------------------------------


def test_load_model_picks_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    models = {step: small_gpt(seed=step) for step in (10, 20, 30, 40)}
    models[10].save_pretrained(checkpoints / "step_00000010")
    models[20].save_pretrained(checkpoints / "step_00000020")
    # stray temporary folders of checkpoints still being written (or abandoned): never picked
    models[30].save_pretrained(checkpoints / "step_00000030.tmp")
    models[40].save_pretrained(checkpoints / ".tmp-step_00000040")
    (checkpoints / "step_00000050").write_text("a file, not a checkpoint")

    assert newest_checkpoint(run) == checkpoints / "step_00000020"
    assert resolve_model_path(run) == checkpoints / "step_00000020"
    loaded = load_model(run, accelerate=False)
    assert not torch.equal(models[10].transformer.wte.weight, models[20].transformer.wte.weight)
    state = loaded.state_dict()
    for name, tensor in models[20].state_dict().items():
        assert torch.equal(state[name], tensor), name
    ids = random_ids(100, 16)
    assert torch.equal(our_logits(loaded, ids), our_logits(models[20], ids))
    # a checkpoint folder itself loads directly
    assert torch.equal(load_model(checkpoints / "step_00000010").transformer.wte.weight,
                       models[10].transformer.wte.weight)


def test_run_folder_without_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000010.tmp").mkdir()
    assert newest_checkpoint(tmp_path) is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_model(tmp_path)
    assert newest_checkpoint(tmp_path / "elsewhere") is None


def test_load_model_options(tmp_path):
    model = small_gpt()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float64, attention="plain", dropout=0.1)
    assert loaded.config.attention == "plain" and loaded.config.dropout == 0.1
    assert loaded.transformer.wte.weight.dtype == torch.float64
    shutil.rmtree(tmp_path)
    with pytest.raises(UserError):
        load_model(tmp_path)


# ---- weight layouts ----------------------------------------------------------------------------


def test_gpt2_shaped_folders_record_the_transformers_layout(tmp_path):
    small_gpt().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "gpt2lab.json").read_text())["weights"] == "transformers-gpt2"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


@pytest.mark.parametrize("tie", [True, False])
def test_native_layout_round_trips_exactly(tmp_path, tie):
    from gpt2lab.pretrained import write_model_folder

    model = small_gpt(vocab_size=100, padded_vocab_size=128, tie_embeddings=tie)
    write_model_folder(model.state_dict(), model.config, tmp_path, keep_padded_vocab=True, layout="gpt2lab")
    assert not (tmp_path / "config.json").exists()  # transformers cannot load this layout
    assert json.loads((tmp_path / "gpt2lab.json").read_text())["weights"] == "gpt2lab"
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # nn.Linear's (out, in)
    assert ("lm_head.weight" in tensors) is not tie
    loaded = load_model(tmp_path, accelerate=False)
    assert loaded.config == model.config
    for (name, ours), (_, theirs) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(ours, theirs), name
    ids = random_ids(100, 16)
    assert torch.equal(our_logits(model, ids), our_logits(loaded, ids))


def test_folder_of_an_older_gpt2lab_without_a_recorded_layout_loads(tmp_path):
    model = small_gpt()
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "gpt2lab.json").read_text())
    del record["weights"]
    (tmp_path / "gpt2lab.json").write_text(json.dumps(record))
    ids = random_ids(100, 16)
    assert max_diff(our_logits(model, ids), our_logits(load_model(tmp_path, accelerate=False), ids)) == 0


def test_unknown_layout_is_refused(tmp_path):
    small_gpt().save_pretrained(tmp_path)
    record = json.loads((tmp_path / "gpt2lab.json").read_text())
    (tmp_path / "gpt2lab.json").write_text(json.dumps({**record, "weights": "gguf"}))
    with pytest.raises(UserError, match="layout 'gguf'.*update gpt2lab"):
        load_model(tmp_path)


def test_convert_refuses_a_model_transformers_has_no_class_for(tmp_path, capsys):
    from gpt2lab.cli import main

    small_gpt(activation="relu2").save_pretrained(tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), "--out", str(tmp_path / "out")]) == 2
    assert "no transformers equivalent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gpt_from_pretrained_and_load_model_give_the_package_class(tmp_path):
    import gpt2lab.model
    from gpt2lab.pretrained import load_model as load_transformer

    small_gpt().save_pretrained(tmp_path)
    assert type(GPT.from_pretrained(tmp_path)) is GPT and type(load_model(tmp_path)) is GPT
    assert type(load_transformer(tmp_path)) is gpt2lab.model.Transformer
