import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2lab import GPT, GPTConfig, UserError
from gpt2lab.pretrained import save_pretrained
from gpt2lab.cli import main
from gpt2lab.data.prepare import prepare
from gpt2lab.train.bench import LADDER
from gpt2lab.train.config import resolve_config
from gpt2lab.train.optim import decay_groups, learning_rate
from gpt2lab.train.trainer import Trainer

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "batch.micro_batch=4", "batch.seq_len=32", "eval.interval=10", "eval.batches=2",
    "eval.sample_interval=0", "log.interval=0", "log.progress_bar=false",
]
TINY_CLI = [flag for setting in TINY for flag in ("--set", setting)]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare("shakespeare", folder, progress=False, log=lambda m: None)
    return folder


def tiny_config(data, *extra):
    return resolve_config("shakespeare-char-cpu", overrides=[f"data.path={data}", *TINY, *extra])


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_schedule_warmup_cosine_and_constant():
    config = resolve_config("shakespeare-char-cpu")
    optim, schedule = config.optim, config.schedule
    assert learning_rate(0, optim, schedule, 2000) == pytest.approx(1e-3 / 100)
    assert learning_rate(99, optim, schedule, 2000) == pytest.approx(1e-3)
    middle = 100 + (2000 - 100) // 2
    assert learning_rate(middle, optim, schedule, 2000) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-3)
    assert learning_rate(2000, optim, schedule, 2000) == pytest.approx(1e-4)
    constant = resolve_config("finetune-shakespeare")
    assert learning_rate(7, constant.optim, constant.schedule, 20) == 3e-5


def test_weight_decay_only_on_matrices():
    model = GPT(tiny_config("unused").model)
    decayed, plain = decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_is_derived_and_checked():
    config = resolve_config("gpt2-124m")
    assert config.grad_accum_steps(1) == 8 and config.grad_accum_steps(8) == 1
    with pytest.raises(UserError, match="batch.total_tokens"):
        resolve_config("gpt2-124m", overrides=["batch.micro_batch=48"]).grad_accum_steps(1)


def test_a_budget_override_replaces_the_presets_budget(tmp_path):
    notes = []
    config = resolve_config("sft", overrides=["max_steps=600"], notes=notes)
    assert (config.max_steps, config.max_tokens, config.max_epochs) == (600, 0, 0)
    assert notes == ["--set max_steps=600 replaces max_epochs=3 of preset sft"]
    toml = tmp_path / "run.toml"
    toml.write_text("max_steps = 50\n")
    config = resolve_config("sft", toml, ["max_tokens=4096"], notes)
    assert (config.max_steps, config.max_tokens, config.max_epochs) == (0, 4096, 0)
    assert notes[-1] == f"--set max_tokens=4096 replaces max_steps=50 and max_epochs=3 of preset sft and {toml}"
    config.validate()


def test_a_model_from_scratch_takes_its_vocabulary_from_the_data(char_data, bpe_data):
    notes = []
    config = resolve_config("shakespeare-char-cpu", overrides=[f"data.path={bpe_data}"], notes=notes)
    assert (config.model.vocab_size, config.model.padded_vocab_size) == (50257, 50304)
    assert notes == [f"model.vocab_size=50257, the vocabulary of the data in {bpe_data} (not 65), padded to 50304 rows"]
    notes = []
    config = resolve_config("gpt2-124m", overrides=[f"data.path={char_data}"], notes=notes)
    assert (config.model.vocab_size, config.model.padded_vocab_size) == (65, None)
    assert notes == [f"model.vocab_size=65, the vocabulary of the data in {char_data} (not 50257); "
                     "its padding to 50304 rows dropped"]
    # What the user says wins, and is checked against the data when training starts.
    notes = []
    config = resolve_config("shakespeare-char-cpu", overrides=[f"data.path={bpe_data}", "model.vocab_size=65"],
                            notes=notes)
    assert config.model.vocab_size == 65 and notes == []
    with pytest.raises(UserError, match="has a vocabulary of 50257 but model.vocab_size is 65"):
        Trainer(config, "unused", echo=lambda line: None)
    # Data not prepared yet: the preset's number stands.
    assert resolve_config("shakespeare-char-cpu", overrides=["data.path=no/such/data"]).model.vocab_size == 65


def test_a_preset_fits_its_batches_to_the_context_of_the_model_it_starts_from(bpe_data, tmp_path):
    small = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, padded_vocab_size=50304))
    save_pretrained(small, tmp_path / "small", tokenizer_spec="gpt2")
    notes = []
    config = resolve_config("sft", overrides=[f"init_from={tmp_path / 'small'}"], notes=notes)
    assert (config.batch.seq_len, config.batch.total_tokens, config.batch.micro_batch) == (128, 16384, 4)
    assert notes == [f"batch.seq_len=128, the context of {tmp_path / 'small'} (not 1024)"]
    config = resolve_config("sft", overrides=[f"init_from={tmp_path / 'small'}", "batch.micro_batch=3"])
    assert (config.batch.seq_len, config.batch.total_tokens) == (128, 16512)  # whole micro-batches of 384
    # A length the user gives is kept, and refused when training starts.
    config = resolve_config("finetune-shakespeare", overrides=[
        f"init_from={tmp_path / 'small'}", "batch.seq_len=256", "batch.total_tokens=0", f"data.path={bpe_data}"])
    assert config.batch.seq_len == 256
    with pytest.raises(UserError, match=r"batch.seq_len \(256\) is longer than the context of .* \(128 tokens\); "
                                        r"set batch.seq_len=128 or less"):
        Trainer(config, tmp_path / "run", echo=lambda line: None)


def test_two_budgets_on_the_command_line_stay_an_error(capsys):
    with pytest.raises(UserError, match="set only one of max_steps, max_tokens and max_epochs"):
        resolve_config("sft", overrides=["max_steps=600", "max_tokens=4096"]).validate()
    # Zeroing the preset's budget explicitly, the old way, still works and needs no note.
    notes = []
    config = resolve_config("sft", overrides=["max_epochs=0", "max_steps=600"], notes=notes)
    assert (config.max_steps, config.max_epochs, notes) == (600, 0, [])


def test_train_says_which_budget_its_override_replaced(capsys):
    code = main(["train", "--preset", "sft", "--set", "max_steps=600", "--print-config"])
    captured = capsys.readouterr()
    assert code == 0 and "max_steps = 600" in captured.out and "max_epochs = 0" in captured.out
    assert captured.err == "--set max_steps=600 replaces max_epochs=3 of preset sft\n"


def test_training_writes_metrics_checkpoints_and_a_usable_model(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(char_data, "max_steps=20", "checkpoint.interval=10", "checkpoint.keep_last=1",
                         "eval.sample_interval=20", "eval.sample_tokens=20")
    summary = Trainer(config, run).run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all({"tokens", "elapsed_s", "lr", "grad_norm", "step_ms", "tokens_per_s"} <= set(r) for r in train)
    assert train[-1]["tokens"] == 20 * 4 * 32
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 10, 20, 20]
    assert vals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.1)
    assert summary["val_loss_full"] == vals[-1]["val_loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020"]  # last and best
    checkpoint = run / "checkpoints" / "step_00000020"
    assert {"model.safetensors", "config.json", "gpt2lab.json", "optimizer.pt", "state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert "---- step 20 ----" in (run / "samples.txt").read_text()
    assert resolve_config(config_file=run / "config.toml") == config
    # The checkpoint and the run folder are models for `sample` and `convert`.
    capsys.readouterr()
    assert main(["sample", "--model", str(run), "--max-new-tokens", "30", "--prompt", "ROMEO:"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "_orig_mod" in k]


def test_a_resume_trains_with_the_optimizer_settings_it_is_given(char_data, tmp_path):
    """Loading a checkpoint's optimizer state must not bring back its settings: config.toml says
    beta2=0.5, so the steps after the resume use 0.5 (and say that it changed)."""
    def run(folder, *extra, resume=None):
        lines = []
        trainer = Trainer(tiny_config(char_data, "max_steps=6", "checkpoint.interval=3", *extra), folder,
                          resume=resume, echo=lines.append)
        trainer.run()
        return trainer, lines

    run(tmp_path / "a", "max_steps=3")
    run(tmp_path / "b", "max_steps=3")
    run(tmp_path / "a", resume="auto")
    changed, lines = run(tmp_path / "b", "optim.beta2=0.5", resume="auto")
    assert all(group["betas"] == (0.9, 0.5) for group in changed.optimizer.param_groups)
    assert "resuming with this run's optimizer setting betas: (0.9, 0.99) in the checkpoint, (0.9, 0.5) now" in lines
    kept, changed_losses = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [kept[s] for s in (1, 2, 3)] == [changed_losses[s] for s in (1, 2, 3)]
    assert kept[5] != changed_losses[5]


def test_pruning_keeps_the_last_and_the_best(tmp_path):
    from gpt2lab.train.checkpoint import CHECKPOINT_FILES, prune_checkpoints

    for step, loss in [(10, 2.0), (20, 1.5), (30, 1.7), (40, 1.8)]:
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            (folder / name).write_text("{}")
        (folder / "state.json").write_text(json.dumps({"step": step, "val_loss": loss, "loader": {}, "rng": []}))
    (tmp_path / "checkpoints" / ".tmp-step_00000050-999999").mkdir()
    prune_checkpoints(tmp_path, keep_last=2, keep_best=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000020", "step_00000030", "step_00000040"
    ]
    prune_checkpoints(tmp_path, keep_last=1, keep_best=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000040"]


def _run_cli(args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env,
    )


def _wait_for(path: Path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_a_kill_repeats_the_losses_bit_for_bit(char_data, tmp_path, how):
    args = ["--preset", "shakespeare-char-cpu", "--set", f"data.path={char_data}", "--set", "max_steps=60",
            "--set", "eval.interval=0", "--set", "eval.final_full=false", "--set", "eval.sample_interval=0",
            "--set", "checkpoint.interval=10", "--set", "log.progress_bar=false", "--set", "model.dropout=0.1",
            # The signal goes once the step-10 checkpoint is there: the 50 steps left give it time to
            # land mid-run on a busy machine too, since a busy machine makes each step slower.
            "--set", "batch.micro_batch=16"]
    straight = tmp_path / "straight"
    assert _run_cli([*args, "--out", str(straight)]).wait() == 0

    run = tmp_path / "killed"
    process = _run_cli([*args, "--out", str(run)])
    _wait_for(run / "checkpoints" / "step_00000010", process)
    process.send_signal(how)
    output = process.communicate(timeout=120)[0]
    if how == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + signal.SIGTERM, output
        assert "SIGTERM received" in output
        stopped_at = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
        assert 10 < stopped_at < 60, "the stop should land mid-run"
    resumed = _run_cli([*args, "--out", str(run), "--resume", "auto"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    expected, got = losses(straight), losses(run)
    assert sorted(got) == list(range(1, 61))
    assert [got[s] for s in range(11, 61)] == [expected[s] for s in range(11, 61)]


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGHUP])
def test_a_run_whose_output_is_gone_still_saves_when_stopped(char_data, tmp_path, how):
    """`gpt2lab train ... | tee log`, then Ctrl-C: the same Ctrl-C ends tee, so the run's next lines
    meet a closed pipe; a closed terminal (SIGHUP) takes the output away too. The run still saves
    its checkpoint and exits as the signal would have ended it, never 0."""
    run = tmp_path / "run"
    args = ["--preset", "shakespeare-char-cpu", "--out", str(run), "--set", f"data.path={char_data}", *TINY_CLI,
            "--set", "max_steps=100000", "--set", "log.interval=1", "--set", "eval.interval=0",
            "--set", "eval.at_start=false", "--set", "eval.sample_interval=0", "--set", "checkpoint.interval=0"]
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "gpt2lab", "train", *args], stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    try:
        while not re.match(r"step +\d+/", line := process.stdout.readline()):  # training has begun
            assert line, errors.read_text()
        process.stdout.close()  # the reader of the pipe has gone
        time.sleep(0.5)  # lines written meanwhile meet the closed pipe before the signal arrives
        process.send_signal(how)
        code = process.wait(timeout=120)
    finally:
        process.kill()
    assert code == 128 + how, errors.read_text()
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1, errors.read_text()
    assert (saved[0] / "model.safetensors").is_file()
    assert "Traceback" not in errors.read_text()


@pytest.mark.slow
def test_every_rung_of_the_ladder_trains(tmp_path, bpe_data):
    changes = []
    for rung, (name, rung_changes) in enumerate(LADDER):
        changes += [f"{k}={v}" for k, v in rung_changes.items()]
        config = resolve_config("gpt2-124m", overrides=[
            f"data.path={bpe_data}", "model.n_layer=1", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
            "model.attention=plain", "model.padded_vocab_size=none", "optim.fused=false",
            "batch.total_tokens=0", "batch.micro_batch=4", "batch.seq_len=64", "max_steps=8",
            "schedule.warmup_steps=2", "optim.lr=3e-3", "eval.interval=0", "eval.at_start=false",
            "eval.final_full=false", "eval.sample_interval=0", "checkpoint.final=false", "log.progress_bar=false",
            "system.compile=false", "system.device=cpu", "system.precision=fp32", *changes,
        ])
        run = tmp_path / f"rung{rung}"
        Trainer(config, run, echo=lambda line: None).run()
        curve = losses(run)
        assert all(math.isfinite(v) for v in curve.values()), name
        assert curve[8] < curve[1] - 0.5, f"{name}: {curve}"


@pytest.mark.slow
def test_gpt2_124m_preset_smoke_with_compile(bpe_data, tmp_path):
    run = tmp_path / "gpt2"
    code = main([
        "train", "--preset", "gpt2-124m", "--out", str(run), "--set", f"data.path={bpe_data}",
        "--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=64",
        "--set", "batch.total_tokens=2048", "--set", "batch.micro_batch=4", "--set", "batch.seq_len=256",
        "--set", "max_steps=4", "--set", "schedule.warmup_steps=1", "--set", "eval.interval=2",
        "--set", "eval.batches=1", "--set", "eval.sample_interval=4", "--set", "system.device=cpu",
        "--set", "log.progress_bar=false",
    ])
    assert code == 0
    config = resolve_config(config_file=run / "config.toml")
    assert config.system.compile and config.system.precision == "bf16" and config.model.padded_vocab_size == 50304
    assert config.grad_accum_steps() == 2
    curve = losses(run)
    assert sorted(curve) == [1, 2, 3, 4] and all(math.isfinite(v) for v in curve.values())
    assert GPT.from_pretrained(run).config.padded_vocab_size == 50304


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "invalid choice"),
        (["--preset", "shakespeare-char-cpu", "--set", "optim.lrr=1"], "optim.lrr"),
        (["--preset", "shakespeare-char-cpu", "--set", "max_steps=many"], "max_steps"),
        (["--preset", "shakespeare-char-cpu", "--set", "batch.total_tokens=1000"], "batch.total_tokens"),
        (["--preset", "shakespeare-char-cpu", "--set", "data.path=/no/such/folder"], "/no/such/folder"),
        (["--preset", "shakespeare-char-cpu", "--set", "model.vocab_size=50"], "model.vocab_size"),
        (["--preset", "shakespeare-char-cpu", "--set", "batch.micro_batch=100000"], "too short"),
        (["--preset", "shakespeare-char-cpu", "--set", "batch.seq_len=128"], "batch.seq_len"),
        (["--preset", "shakespeare-char-cpu", "--set", "optim.lr=-1"], "optim.lr"),
        (["--set", "max_steps=1"], "--preset"),
    ],
)
def test_bad_configs_are_refused_before_any_heavy_work(char_data, tmp_path, capsys, args, message):
    args = [a.replace("DATA", str(char_data)) for a in args]
    if not any(a.startswith("data.path") for a in args) and "--preset" in args:
        args += ["--set", f"data.path={char_data}"]
    try:
        code = main(["train", *args, "--out", str(tmp_path / "run")])
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_existing_run_needs_resume(char_data, tmp_path, capsys):
    args = ["train", "--preset", "shakespeare-char-cpu", "--out", str(tmp_path / "run"), "--set", f"data.path={char_data}",
            "--set", "max_steps=2", *[f"--set={o}" for o in TINY]]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main([*args, "--resume", "auto", "--set", "max_steps=4"]) == 0
    assert max(losses(tmp_path / "run")) == 4


@pytest.mark.parametrize("reuse", [True, False])
def test_cpu_training_keeps_freed_memory_unless_told_not_to(char_data, tmp_path, monkeypatch, reuse):
    import gpt2lab.kernels as kernels

    calls = []
    monkeypatch.setattr(kernels, "tune_cpu_memory", lambda reuse_freed: calls.append(("reuse", reuse_freed)) or {})
    config = tiny_config(char_data, "max_steps=1", "system.device=cpu", f"system.reuse_cpu_memory={str(reuse).lower()}")
    Trainer(config, tmp_path / "run", echo=lambda line: None)
    assert calls == ([("reuse", True)] if reuse else [])
