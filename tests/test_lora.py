"""LoRA: adapters beside frozen layers, what trains, checkpoints that resume exactly, merging for
inference and export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from gpt2lab import GPTConfig, UserError
from gpt2lab.cli import main
from gpt2lab.data.prepare import prepare
from gpt2lab.kernels import accelerate
from gpt2lab.lora import (
    LoRALinear,
    apply_lora,
    lora_config,
    lora_state_dict,
    merge_lora,
    parameter_counts,
)
from gpt2lab.model import Transformer
from gpt2lab.pretrained import (
    ADAPTERS_FILE,
    checkpoint_folders,
    load_model,
    newest_checkpoint,
    read_state_dict,
    save_pretrained,
)
from gpt2lab.train.checkpoint import CHECKPOINT_FILES
from gpt2lab.train.config import resolve_config
from gpt2lab.train.optim import build_optimizer
from gpt2lab.train.trainer import Trainer

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
QUIET = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "batch.micro_batch=4", "batch.seq_len=32", "eval.interval=0", "eval.at_start=false",
    "eval.final_full=false", "eval.sample_interval=0", "log.interval=0", "log.progress_bar=false",
]
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False)


def tiny(seed: int = 0, **options) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(GPTConfig(**{**TINY, "vocab_size": 65, **options})).eval()


def with_random_adapters(model: Transformer, seed: int = 1) -> Transformer:
    """B drawn away from zero, so that the adapters change what the model computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The model's logits in eval mode (no dropout)."""
    with torch.no_grad():
        return model.eval()(idx)[0]


IDX = torch.randint(0, 65, (3, 24), generator=torch.Generator().manual_seed(7))


# ---- the adapters ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, LLAMA], ids=["gpt2", "llama"])
def test_adapters_start_at_the_base_and_merge_to_the_same_logits(options):
    model = tiny(**options)
    base = logits(model, IDX)
    apply_lora(model, rank=4, alpha=8.0)
    assert torch.equal(logits(model, IDX), base)  # B = 0: training starts from the base exactly
    with_random_adapters(model)
    unmerged = logits(model, IDX)
    assert (unmerged - base).abs().max() > 1e-2
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and lora_config(model) is None
    assert (logits(model, IDX) - unmerged).abs().max() < 1e-5
    assert all(p.requires_grad for p in model.parameters())


def test_the_wrapper_keeps_the_class_of_the_layer_it_wraps():
    from gpt2lab.kernels import accelerate

    model = accelerate(tiny())
    block = model.transformer.h[0]
    plain = nn.Linear(32, 96)
    with torch.no_grad():
        plain.weight.copy_(block.attn.c_attn.weight)
        plain.bias.copy_(block.attn.c_attn.bias)
    block.attn.c_attn = plain  # a model built from torch's own Linear rather than kernels.linear.CPULinear
    apply_lora(model, rank=2, targets=["attn.c_attn"])
    with_random_adapters(model)
    unmerged = logits(model, IDX)
    merge_lora(model)
    assert type(block.attn.c_attn) is nn.Linear and type(block.mlp.c_fc).__name__ == "CPULinear"
    assert (logits(model, IDX) - unmerged).abs().max() < 1e-5


def test_targets_pick_the_layers_and_the_counts_add_up():
    model = apply_lora(tiny(), rank=4, targets=["attn.c_proj", "c_fc"])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"transformer.h.{i}.{name}" for i in (0, 1) for name in ("attn.c_proj", "mlp.c_fc")]
    # rank * (in + out) per layer: attention's 32 -> 32 and the MLP's 32 -> 128.
    per_layer = 4 * (32 + 32) + 4 * (32 + 128)
    base = Transformer(GPTConfig(**{**TINY, "vocab_size": 65})).num_params(non_embedding=False)
    assert parameter_counts(model) == (2 * per_layer, base + 2 * per_layer)
    assert sorted(lora_state_dict(model)) == sorted(f"{n}.{k}" for n in wrapped for k in ("lora_A", "lora_B"))
    both = apply_lora(tiny(), rank=4, targets=["c_proj"])
    assert sum(isinstance(m, LoRALinear) for m in both.modules()) == 4  # attention's and the MLP's


def test_only_the_adapters_get_gradients_and_the_optimizer_holds_only_them():
    model = apply_lora(tiny(), rank=4, dropout=0.1).train()
    _, loss = model(IDX, IDX)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_state_dict(model))
    lora_B = model.transformer.h[0].attn.c_attn.lora_B
    assert lora_B.grad.abs().sum() > 0
    settings = resolve_config("shakespeare-char-cpu").optim
    optimizer = build_optimizer(model, settings, torch.device("cpu"))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in with_grad}
    muon = resolve_config("speedrun-char-cpu").optim
    with pytest.raises(UserError, match="optim.name=adamw"):
        build_optimizer(model, muon, torch.device("cpu"))


# ---- settings ----------------------------------------------------------------------------------


def test_settings_parse_from_set_and_toml(tmp_path):
    config = resolve_config("shakespeare-char-cpu", overrides=[
        "finetune.lora_rank=8", "finetune.lora_alpha=32", "finetune.lora_targets=c_attn, mlp.c_proj",
    ])
    assert config.finetune.lora_rank == 8 and config.finetune.lora_alpha == 32.0
    assert config.finetune.lora_targets == ["c_attn", "mlp.c_proj"]
    config.validate()
    (tmp_path / "config.toml").write_text(config.to_toml())
    assert resolve_config(config_file=tmp_path / "config.toml") == config
    assert resolve_config("shakespeare-char-cpu").finetune.lora_targets == ["c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("finetune.lora_rank=-1", "finetune.lora_rank must be >= 0"),
        ("finetune.lora_alpha=0", "finetune.lora_alpha must be a finite number > 0"),
        ("finetune.lora_alpha=-2", "finetune.lora_alpha must be a finite number > 0"),
        ("finetune.lora_dropout=1", r"finetune.lora_dropout must be in \[0, 1\)"),
        ("finetune.lora_targets=c_attn,wte", "unknown LoRA target 'wte'.*c_attn, c_proj, c_fc, attn.c_attn"),
        ("finetune.lora_targets=", "finetune.lora_targets is empty"),
        ("finetune.lora_rank=two", "finetune.lora_rank must be an integer"),
    ],
)
def test_bad_settings_are_user_errors(setting, message, tmp_path, capsys):
    with pytest.raises(UserError, match=message):
        resolve_config("shakespeare-char-cpu", overrides=["finetune.lora_rank=4", setting]).validate()
    code = main(["train", "--preset", "shakespeare-char-cpu", "--set", "finetune.lora_rank=4", "--set", setting,
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1


def test_muon_with_lora_is_refused_and_apply_lora_checks_its_arguments():
    with pytest.raises(UserError, match="optim.name=muon does not train LoRA adapters"):
        resolve_config("speedrun-char-cpu", overrides=["finetune.lora_rank=4"]).validate()
    with pytest.raises(UserError, match="finetune.lora_rank is 0"):
        apply_lora(tiny(), rank=0)
    with pytest.raises(UserError, match="unknown LoRA target 'lm_head'"):
        apply_lora(tiny(), rank=2, targets=["lm_head"])
    model = apply_lora(tiny(), rank=2)
    with pytest.raises(UserError, match="already has LoRA adapters"):
        apply_lora(model, rank=2)


# ---- training, checkpoints, resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


LORA_RUN = ["max_steps=8", "checkpoint.interval=4", "checkpoint.keep_last=5", "optim.lr=2e-2",
            "schedule.warmup_steps=0", "model.dropout=0.1", "finetune.lora_rank=4", "finetune.lora_dropout=0.1"]


def lora_settings(data: Path, base: Path, *extra: str):
    return resolve_config("shakespeare-char-cpu", overrides=[
        f"data.path={data}", f"init_from={base}", *QUIET, *LORA_RUN, *extra,
    ])


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


@pytest.fixture(scope="module")
def lora_run(char_data, tmp_path_factory):
    """A LoRA run of 8 steps from a saved base model, checkpoints at 4 and 8: (run folder, base
    folder, the trainer's console lines, the trainer)."""
    root = tmp_path_factory.mktemp("lora")
    base = save_pretrained(tiny(seed=3, bias=False), root / "base", tokenizer_spec=None)
    lines: list[str] = []
    trainer = Trainer(lora_settings(char_data, base), root / "run", echo=lines.append)
    trainer.run()
    return root / "run", base, lines, trainer


def test_the_trainable_share_is_reported(lora_run):
    _, _, lines, trainer = lora_run
    per_layer = 4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32)
    total = Transformer(trainer.config.model).num_params(non_embedding=False) + 2 * per_layer
    share = 100 * 2 * per_layer / total
    assert lines[0] == (
        f"LoRA rank 4 on c_attn, c_proj, c_fc: {2 * per_layer:,} of {total:,} parameters train ({share:.2f}%)"
    )


def test_only_the_adapters_change_and_the_base_stays_bit_identical(lora_run):
    run, base, _, trainer = lora_run
    checkpoint = run / "checkpoints" / "step_00000008"
    before = read_state_dict(base, trainer.config.model)
    after = read_state_dict(checkpoint, trainer.config.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    live = dict(trainer.raw_model.named_parameters())
    assert all(torch.equal(live[k], before[k]) for k in before)
    adapters = load_file(str(checkpoint / ADAPTERS_FILE))
    assert sorted(adapters) == sorted(lora_state_dict(trainer.raw_model))
    assert all(adapters[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))
    first = load_file(str(run / "checkpoints" / "step_00000004" / ADAPTERS_FILE))
    assert any(not torch.equal(first[k], adapters[k]) for k in adapters)


def test_a_lora_checkpoint_holds_base_adapters_and_settings(lora_run, tmp_path):
    run, _, _, _ = lora_run
    checkpoint = run / "checkpoints" / "step_00000008"
    names = {p.name for p in checkpoint.iterdir()}
    assert {*CHECKPOINT_FILES, ADAPTERS_FILE} <= names
    assert "config.json" not in names  # transformers would load the base alone
    record = json.loads((checkpoint / "gpt2lab.json").read_text())
    assert record["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": ["c_attn", "c_proj", "c_fc"]}
    assert record["weights"] == "gpt2lab"
    assert record["train_config"]["finetune"]["lora_rank"] == 4
    # Without its adapters the folder is incomplete: not listed, not resumed, not loaded.
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step_00000008" / ADAPTERS_FILE).unlink()
    assert [p.name for p in checkpoint_folders(copy, CHECKPOINT_FILES)] == ["step_00000004"]
    assert newest_checkpoint(copy).name == "step_00000004"
    with pytest.raises(UserError, match=f"has no {ADAPTERS_FILE}"):
        load_model(copy / "checkpoints" / "step_00000008")


def test_resume_repeats_the_losses_bit_for_bit(lora_run, char_data, tmp_path):
    run, base, _, _ = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    Trainer(lora_settings(char_data, base), resumed, resume="auto", echo=lambda line: None).run()
    expected, got = train_losses(run), train_losses(resumed)
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]
    a = load_file(str(run / "checkpoints" / "step_00000008" / ADAPTERS_FILE))
    b = load_file(str(resumed / "checkpoints" / "step_00000008" / ADAPTERS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_lora_settings_is_refused(lora_run, char_data, tmp_path):
    run, base, _, _ = lora_run
    resumed = tmp_path / "other"
    shutil.copytree(run, resumed)
    settings = lora_settings(char_data, base, "finetune.lora_rank=2")
    with pytest.raises(UserError, match="trained with LoRA rank 4.*this run has LoRA rank 2.*finetune"):
        Trainer(settings, resumed, resume="auto", echo=lambda line: None)
    plain = lora_settings(char_data, base, "finetune.lora_rank=0")
    with pytest.raises(UserError, match="this run has no LoRA"):
        Trainer(plain, resumed, resume="auto", echo=lambda line: None)


def unmerged_model(checkpoint: Path, config: GPTConfig) -> Transformer:
    """The LoRA model of a checkpoint as training ran it: base (with the CPU kernels, as the
    trainer's), wrappers, adapters."""
    model = accelerate(Transformer(config))
    model.load_state_dict(read_state_dict(checkpoint, config), strict=False)  # the tied head shares wte
    apply_lora(model, rank=4, alpha=16.0, dropout=0.1)
    model.load_state_dict(load_file(str(checkpoint / ADAPTERS_FILE)), strict=False)
    return model.eval()


def test_load_model_and_convert_merge_the_adapters(lora_run, tmp_path, capsys):
    run, base, _, trainer = lora_run
    checkpoint = run / "checkpoints" / "step_00000008"
    expected = logits(unmerged_model(checkpoint, trainer.config.model), IDX)
    assert torch.equal(expected, logits(trainer.raw_model, IDX))
    assert (expected - logits(load_model(base), IDX)).abs().max() > 1e-3  # the adapters matter
    loaded = load_model(run)  # the run folder: its newest checkpoint, merged
    assert lora_config(loaded) is None and not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert (logits(loaded, IDX) - expected).abs().max() < 1e-5
    capsys.readouterr()
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    assert "LoRA rank 4 adapters merged" in capsys.readouterr().out
    export = tmp_path / "export"
    assert not (export / ADAPTERS_FILE).exists() and "lora" not in json.loads((export / "gpt2lab.json").read_text())
    assert "LoRA rank 4 (alpha 16.0) on c_attn, c_proj, c_fc, merged" in (export / "README.md").read_text()
    converted = load_model(export)
    assert (logits(converted, IDX) - expected[..., :65]).abs().max() < 1e-5
    assert main(["sample", "--model", str(run), "--max-new-tokens", "10", "--prompt", "ROMEO:"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


@pytest.mark.parametrize("cut", [0, 100, 2000, "OSError"])
def test_a_truncated_optimizer_state_is_a_damaged_file_on_resume(lora_run, char_data, tmp_path, cut, monkeypatch):
    """Cut anywhere, torch.load raises RuntimeError or EOFError, or (as the audit met it) OSError."""
    if cut == "OSError":
        def unreadable(*args, **kwargs):
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr("gpt2lab.train.checkpoint.torch.load", unreadable)
        cut = 100
    run, base, _, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = copy / "checkpoints" / "step_00000008"
    state = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(state[:cut])
    record = json.loads((checkpoint / "gpt2lab.json").read_text())
    del record["sha256"]  # a folder from before digests: torch.load itself meets the truncated file
    (checkpoint / "gpt2lab.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"optimizer.pt is damaged \([^)]+\); resume from another checkpoint"):
        Trainer(lora_settings(char_data, base), copy, resume=str(checkpoint), echo=lambda line: None)


def test_damaged_adapters_are_refused(lora_run, tmp_path):
    run, _, _, _ = lora_run
    folder = tmp_path / "step"
    shutil.copytree(run / "checkpoints" / "step_00000008", folder)
    adapters = load_file(str(folder / ADAPTERS_FILE))
    adapters["transformer.h.0.attn.c_attn.lora_A"] = torch.zeros(3, 32)
    save_file(adapters, str(folder / ADAPTERS_FILE))
    with pytest.raises(UserError, match=f"{ADAPTERS_FILE}: its sha256 differs"):
        load_model(folder)
    record = json.loads((folder / "gpt2lab.json").read_text())
    del record["sha256"]  # as a folder written before digests were recorded: the shapes still count
    (folder / "gpt2lab.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="does not hold the adapters.*lora_A.*damaged"):
        load_model(folder)
    for damaged, reason in [({"rank": "four"}, "no 'targets'"), ({**record["lora"], "rank": 0}, "rank 0"),
                            ({**record["lora"], "targets": "c_attn"}, "targets .c_attn. is not a list")]:
        (folder / "gpt2lab.json").write_text(json.dumps({**record, "lora": damaged}))
        with pytest.raises(UserError, match=f"the LoRA record is damaged \\({reason}"):
            load_model(folder)


# ---- torch.compile and several processes ------------------------------------------------------------


@pytest.mark.slow
def test_compiled_lora_model_computes_the_same_loss_and_gradients():
    model = apply_lora(tiny(), rank=4)
    with_random_adapters(model)
    _, eager = model(IDX, IDX)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _, compiled = torch.compile(model)(IDX, IDX)
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-5
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    assert all((model.get_parameter(n).grad - g).abs().max() < 1e-5 for n, g in grads.items())


def torchrun_train(out: Path, data: Path, base: Path, nproc: int, *extra: str) -> None:
    settings = [f"data.path={data}", f"init_from={base}", *QUIET, "max_steps=6", "batch.total_tokens=256",
                "optim.lr=1e-2", "model.dropout=0.0", "finetune.lora_rank=4", "log.interval=1", *extra]
    args = [sys.executable, "-m", "gpt2lab", "train", "--preset", "shakespeare-char-cpu", "--out", str(out),
            "--nproc", str(nproc), *[f"--set={s}" for s in settings]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_adapters_as_one_does(char_data, tmp_path, parallel):
    base = save_pretrained(tiny(seed=5, bias=False), tmp_path / "base")
    torchrun_train(tmp_path / "one", char_data, base, 1)
    torchrun_train(tmp_path / "two", char_data, base, 2, f"system.parallel={parallel}")
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000006" / ADAPTERS_FILE))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step_00000006" / ADAPTERS_FILE))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    base_weights = load_file(str(base / "model.safetensors"))
    trained = load_file(str(tmp_path / "two" / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert trained["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)
    assert torch.equal(trained["transformer.h.1.mlp.c_fc.weight"], base_weights["transformer.h.1.mlp.c_fc.weight"].t())


def test_save_pretrained_of_a_lora_model_writes_it_merged(tmp_path):
    model = with_random_adapters(apply_lora(tiny(), rank=4))
    unmerged = logits(model, IDX)
    folder = save_pretrained(model, tmp_path / "merged")
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)  # the model keeps its adapters
    assert not (folder / ADAPTERS_FILE).exists()
    assert (logits(load_model(folder), IDX) - unmerged).abs().max() < 1e-5
