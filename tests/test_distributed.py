"""Distributed training on CPU with gloo: 2 processes through torchrun (gpt2lab train --nproc 2)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.cli import main
from gpt2lab.data.prepare import prepare

pytestmark = pytest.mark.slow

# 4 x 32 tokens per micro-batch and 256 per step: one process accumulates 2 micro-batches, each of
# two processes does 1.
SETTINGS = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
    "batch.micro_batch=4", "batch.seq_len=32", "batch.total_tokens=256", "max_steps=20",
    "eval.interval=0", "eval.at_start=false", "eval.final_full=false", "eval.sample_interval=0",
    "log.interval=0", "log.progress_bar=false", "optim.lr=3e-3", "schedule.warmup_steps=2",
]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


def train(out: Path, data: Path, nproc: int, *extra: str, resume: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "gpt2lab", "train", "--preset", "shakespeare-char-cpu", "--out", str(out),
            "--nproc", str(nproc), "--set", f"data.path={data}", *[f"--set={s}" for s in [*SETTINGS, *extra]]]
    if resume:
        args += ["--resume", resume]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def val_losses(run: Path, key: str = "val_loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def assert_close_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        relative = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
        assert relative < tolerance, f"{name}: {relative}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_twice_the_accumulation(char_data, tmp_path, parallel):
    # eval.batches counts over all ranks: 1 and 2 processes score the same validation windows.
    evaluations = ["eval.interval=10", "eval.batches=6"]
    train(tmp_path / "one", char_data, 1, *evaluations)
    train(tmp_path / "two", char_data, 2, f"system.parallel={parallel}", *evaluations)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 21))
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    val_one, val_two = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert sorted(val_one) == sorted(val_two) == [10, 20]
    assert all(abs(val_one[s] - val_two[s]) < 1e-5 for s in val_one), (val_one, val_two)
    # Bits per byte takes its own path through the model (hidden states, then the loss): under
    # FSDP too, with the root's weights gathered for it.
    bpb_one, bpb_two = val_losses(tmp_path / "one", "val_bpb"), val_losses(tmp_path / "two", "val_bpb")
    assert sorted(bpb_two) == [10, 20] and all(abs(bpb_one[s] - bpb_two[s]) < 1e-5 for s in bpb_one)
    assert_close_relative(weights(tmp_path / "one", 20), weights(tmp_path / "two", 20))
    # The weights moved: the comparison is not between two untouched initialisations.
    first = losses(tmp_path / "one")
    assert first[20] < first[1] - 0.5


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_a_checkpoint_moves_between_world_sizes(char_data, tmp_path, saved_on, resumed_on):
    straight = tmp_path / "straight"
    train(straight, char_data, saved_on, "checkpoint.interval=10")
    resumed = tmp_path / "resumed"
    train(resumed, char_data, resumed_on, resume=str(straight / "checkpoints" / "step_00000010"))
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(11, 21))
    assert all(abs(expected[s] - got[s]) < 1e-5 for s in got), (expected, got)


def _worker_pids(parent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the training workers below `parent`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if variables.get(b"GPT2LAB_TEST_JOB") == str(parent).encode() and b"LOCAL_RANK" in variables:
            if "gpt2lab" in (entry / "cmdline").read_bytes().decode(errors="replace") and " Z " not in stat:
                found[int(variables[b"LOCAL_RANK"])] = int(entry.name)
    return found


def test_killing_one_rank_ends_the_job_naming_it(char_data, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "gpt2lab", "train", "--preset", "shakespeare-char-cpu", "--out", str(run),
            "--nproc", "2", "--set", f"data.path={char_data}", *[f"--set={s}" for s in SETTINGS],
            "--set", "max_steps=100000"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["GPT2LAB_TEST_JOB"] = str(os.getpid())
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline
            time.sleep(0.2)
        workers = _worker_pids(os.getpid())
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        output = process.communicate(timeout=120)[0]
        assert time.time() - killed_at < 120
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in output and "SIGKILL" in output


def test_world_size_without_torchrun_is_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = main(["train", "--preset", "shakespeare-char-cpu", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "torchrun" in capsys.readouterr().err


MUON = ["optim.name=muon", "optim.muon_lr=0.02", "model.position=rope", "model.norm=rmsnorm", "model.qk_norm=true",
        "model.activation=relu2", "model.tie_embeddings=false", "model.zero_init_proj=true", "schedule.kind=wsd"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_on_two_processes_follows_one(char_data, tmp_path, parallel):
    """Every rank takes the same Muon step (DDP), or orthogonalizes each gathered matrix whole and
    keeps its own rows (FSDP2). Averaged gradients differ from one process's in the last bits,
    which bf16 Newton-Schulz does not preserve, so the runs agree closely rather than exactly."""
    train(tmp_path / "one", char_data, 1, *MUON)
    train(tmp_path / "two", char_data, 2, f"system.parallel={parallel}", *MUON)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 21))
    assert all(abs(one[s] - two[s]) < 5e-3 for s in one), (one, two)
    assert_close_relative(weights(tmp_path / "one", 20), weights(tmp_path / "two", 20), tolerance=5e-2)
    assert one[20] < one[1] - 0.5
