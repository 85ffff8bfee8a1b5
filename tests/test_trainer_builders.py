"""The builders Trainer.__init__ is made of, each called on its own: what it returns is what the
Trainer holds."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import GPTConfig, UserError
from gpt2lab.data.dataset import open_dataset
from gpt2lab.data.loader import TokenLoader
from gpt2lab.data.prepare import prepare
from gpt2lab.lora import parameter_counts
from gpt2lab.model import Transformer
from gpt2lab.pretrained import save_pretrained
from gpt2lab.train.config import resolve_config
from gpt2lab.train.distributed import DistInfo
from gpt2lab.train.trainer import (
    Progress,
    Trainer,
    add_adapters,
    build_evaluators,
    build_model,
    build_optimizer_and_scaler,
    count_steps,
    lock_run_dir,
    open_data,
    open_process_group,
    place_on_ranks,
    resume_training,
    wrap_for_step,
)

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "batch.micro_batch=4", "batch.seq_len=32", "eval.interval=10", "eval.batches=2",
    "eval.sample_interval=0", "log.interval=0", "log.progress_bar=false",
]
ALONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


def tiny_config(data, *extra):
    return resolve_config(
        "shakespeare-char-cpu", overrides=[f"data.path={data}", *TINY, "system.device=cpu", *extra]
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[name], right[name]) for name in left)


def test_the_process_group_of_one_process_checks_the_settings(char_data, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert open_process_group(tiny_config(char_data)) == ALONE
    with pytest.raises(UserError, match="optim.lr"):
        open_process_group(tiny_config(char_data, "optim.lr=-1"))


def test_the_data_builder_gives_the_batches_a_token_loader_gives(char_data):
    config = tiny_config(char_data)
    lines = []
    dataset, train_loader, val_loader = open_data(config, ALONE, lines.append)
    assert dataset.vocab_size == 65 and lines == []
    expected = TokenLoader(
        open_dataset(char_data), split=config.data.train_split, batch_size=4, seq_len=32, rank=0, world_size=1,
        seed=config.system.seed, shuffle=config.data.shuffle, random_offset=config.data.random_offset,
        pin_memory=False,
    )
    for _ in range(2):
        got, want = train_loader.next_batch(), expected.next_batch()
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert val_loader is not None and val_loader.split == config.data.val_split and not val_loader.shuffle


def test_the_data_builder_opens_no_validation_without_evaluation_and_refuses_short_splits(char_data):
    quiet = tiny_config(char_data, "eval.interval=0", "eval.at_start=false", "eval.final_full=false")
    assert open_data(quiet, ALONE, print)[2] is None
    with pytest.raises(UserError, match="too short for one batch"):
        open_data(tiny_config(char_data, "batch.micro_batch=100000"), ALONE, print)


def test_steps_are_counted_from_the_budget_and_the_loader(char_data):
    config = tiny_config(char_data, "max_steps=7")
    _, train_loader, _ = open_data(config, ALONE, print)
    assert count_steps(config, 1, train_loader) == (1, 4 * 32, 7)
    epoch = tiny_config(char_data, "max_epochs=2")
    assert count_steps(epoch, 1, train_loader) == (1, 4 * 32, 2 * train_loader.steps_per_epoch)


def test_the_evaluators_are_the_datas_tokenizer_hellaswag_and_core_when_asked(char_data):
    config = tiny_config(char_data)
    tokenizer, hellaswag, core = build_evaluators(config.eval, open_dataset(char_data))
    assert tokenizer.decode(tokenizer.encode("ROMEO:")) == "ROMEO:" and hellaswag is None and core is None


def test_the_model_builder_draws_the_seeds_weights_in_the_configs_shape(char_data, tmp_path):
    config = tiny_config(char_data, "max_steps=1")
    model, built_config = build_model(config, ALONE, 65)
    assert built_config == config and isinstance(model, Transformer) and model.config == config.model
    assert (len(model.transformer.h), model.config.n_embd) == (2, 32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.manual_seed(config.system.seed)
    assert_same_weights(model, Transformer(config.model))
    trainer = Trainer(config, tmp_path / "run", echo=lambda line: None)
    try:
        assert_same_weights(model, trainer.raw_model)
        assert trainer.config == built_config
    finally:
        trainer.release()


def test_the_model_builder_refuses_a_model_too_large_for_memory(char_data):
    with pytest.raises(UserError, match="make it smaller"):
        build_model(tiny_config(char_data, "model.n_embd=1048576", "model.n_head=1"), ALONE, 65)


def test_a_loaded_model_brings_its_shape_into_the_settings(char_data, tmp_path):
    torch.manual_seed(3)
    base = Transformer(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=65))
    folder = save_pretrained(base, tmp_path / "base", tokenizer_spec=None)
    config = tiny_config(char_data, f"init_from={folder}")
    model, built_config = build_model(config, ALONE, 65)
    assert built_config.model.n_layer == 1 and model.config == built_config.model
    assert_same_weights(model, base)
    with pytest.raises(UserError, match="prepare the data with the model's tokenizer"):
        build_model(config, ALONE, 10_000)


def test_adapters_freeze_the_model_and_say_so(char_data):
    config = tiny_config(char_data, "finetune.lora_rank=4")
    model, _ = build_model(config, ALONE, 65)
    lines = []
    add_adapters(model, config.finetune, lines.append)
    trainable, total = parameter_counts(model)
    assert 0 < trainable < total
    assert lines == [
        f"LoRA rank 4 on c_attn, c_proj, c_fc: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})"
    ]
    plain, _ = build_model(tiny_config(char_data), ALONE, 65)
    add_adapters(plain, tiny_config(char_data).finetune, lines.append)
    assert len(lines) == 1 and all(p.requires_grad for p in plain.parameters())


def test_placing_one_rank_seeds_its_dropout_and_picks_the_autocast_dtype(char_data):
    config = tiny_config(char_data, "system.seed=5", "system.precision=bf16")
    model, _ = build_model(config, ALONE, 65)
    assert place_on_ranks(model, config.system, ALONE) == (False, torch.bfloat16)
    drawn = torch.rand(4)
    torch.manual_seed(5 + ALONE.rank)
    assert torch.equal(drawn, torch.rand(4))
    fp32 = tiny_config(char_data, "system.precision=fp32")
    assert place_on_ranks(model, fp32.system, ALONE) == (False, None)


def test_the_optimizer_builder_decays_matrices_only_and_scales_fp16_alone(char_data):
    config = tiny_config(char_data)
    model, _ = build_model(config, ALONE, 65)
    optimizer, scaler = build_optimizer_and_scaler(model, config, ALONE.device, fsdp=False)
    decayed, plain = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW) and scaler is None
    assert decayed["weight_decay"] == config.optim.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    fp16 = tiny_config(char_data, "system.precision=fp16")
    assert isinstance(build_optimizer_and_scaler(model, fp16, ALONE.device, fsdp=False)[1], torch.amp.GradScaler)
    assert build_optimizer_and_scaler(model, fp16, ALONE.device, fsdp=True)[1] is None


def test_one_process_steps_the_model_itself_unless_compiled(char_data):
    model, _ = build_model(tiny_config(char_data), ALONE, 65)
    assert wrap_for_step(model, compile_model=False, ddp=False, device=ALONE.device) is model


def test_a_held_run_folder_is_refused(tmp_path):
    lock = lock_run_dir(tmp_path / "run", True, ALONE.device)
    try:
        with pytest.raises(UserError, match="in use by another gpt2lab process"):
            lock_run_dir(tmp_path / "run", True, ALONE.device)
    finally:
        lock.release()
    assert lock_run_dir(tmp_path / "other", False, ALONE.device) is None


def test_resume_restores_the_step_weights_optimizer_and_loader(char_data, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(char_data, "max_steps=3", "checkpoint.interval=3", "eval.interval=0",
                         "eval.final_full=false", "eval.at_start=false")
    trained = Trainer(config, run, echo=lambda line: None)
    trained.run()

    _, train_loader, _ = open_data(config, ALONE, print)
    model, _ = build_model(config, ALONE, 65)
    optimizer, scaler = build_optimizer_and_scaler(model, config, ALONE.device, fsdp=False)
    lines = []
    progress = resume_training(
        run, "auto", model=model, optimizer=optimizer, scaler=scaler, train_loader=train_loader, group=ALONE,
        seed=config.system.seed, echo=lines.append,
    )
    assert progress.step == 3 and progress.elapsed_s > 0 and progress.last_val_loss is None
    assert lines == [f"resumed from {run / 'checkpoints' / 'step_00000003'} at step 3"]
    assert_same_weights(model, trained.raw_model)
    assert train_loader.state_dict() == trained.train_loader.state_dict()
    assert float(optimizer.state_dict()["state"][0]["step"]) == 3
    fresh = resume_training(
        run, None, model=model, optimizer=optimizer, scaler=scaler, train_loader=train_loader, group=ALONE,
        seed=config.system.seed, echo=lines.append,
    )
    assert fresh == Progress() and len(lines) == 1
