"""Faults of data, checkpoints and run folders: each ends in one message and exit 2, or is
recovered from, and leaves the user's files as they were (docs/reliability.md lists them)."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2lab import UserError
from gpt2lab.cli import main
from gpt2lab.data import open_dataset
from gpt2lab.data.loader import TokenLoader
from gpt2lab.data.prepare import prepare
from gpt2lab.data.shards import HEADER_BYTES
from gpt2lab.files import LOCK_FILE, FolderLock
from gpt2lab.train.checkpoint import CHECKPOINT_FILES, prune_checkpoints

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
    "batch.micro_batch=2", "batch.seq_len=16", "eval.batches=1", "eval.final_full=false",
    "eval.sample_interval=0", "log.interval=0", "log.progress_bar=false",
]


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its sha256: what "untouched" means in these tests."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def train_args(data: Path, out: Path, *settings: str) -> list[str]:
    args = ["train", "--preset", "shakespeare-char-cpu", "--out", str(out), "--set", f"data.path={data}"]
    for setting in [*TINY, *settings]:
        args += ["--set", setting]
    return args


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def trained_run(char_data, tmp_path_factory):
    """A run folder of 4 steps with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    code = main(train_args(char_data, run, "max_steps=4", "checkpoint.interval=2", "eval.interval=2"))
    assert code == 0
    return run


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ---- output folders --------------------------------------------------------------------------


def test_convert_refuses_to_write_into_the_checkpoint_it_reads(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    checkpoint = run / "checkpoints" / "step_00000004"
    before = digests(run)
    for out in (checkpoint, run, checkpoint / "export"):
        assert main(["convert", str(checkpoint), "--out", str(out), "--force"]) == 2
        assert "is the model folder being converted" in capsys.readouterr().err
    assert digests(run) == before
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "auto",
                 "--set", "max_steps=5"]) == 0


def test_convert_refuses_a_non_empty_folder_unless_forced(trained_run, tmp_path, capsys):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"someone else's weights")
    (other / "notes.txt").write_text("mine")
    before = digests(other)
    checkpoint = trained_run / "checkpoints" / "step_00000004"
    assert main(["convert", str(checkpoint), "--out", str(other)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert digests(other) == before
    assert main(["convert", str(checkpoint), "--out", str(other), "--force"]) == 0
    assert not (other / "notes.txt").exists() and (other / "config.json").is_file()


def test_convert_message_for_non_empty_folder_names_force(trained_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(["convert", str(trained_run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--force" in err


@pytest.mark.parametrize("verb", ["convert", "train"])
def test_out_naming_an_existing_file_is_refused(verb, char_data, trained_run, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    if verb == "convert":
        args = ["convert", str(trained_run), "--out", str(target)]
    else:
        args = train_args(char_data, target, "max_steps=1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{target} is a file" in err
    assert target.read_text() == "keep me"


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train_000000.bin").write_bytes(b"the user's own file, named like a shard")
    before = digests(out)
    assert main(["prepare", "shakespeare-char", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt2lab did not write it" in err and "train_000000.bin" in err
    assert digests(out) == before


def test_prepare_refuses_to_write_beside_its_input(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text to prepare " * 50)
    before = digests(corpus)
    assert main(["prepare", "text", str(corpus / "a.txt"), "--out", str(corpus), "-q"]) == 2
    assert "gpt2lab did not write it" in capsys.readouterr().err
    assert digests(corpus) == before


def test_prepare_interrupted_before_its_first_shard_still_resumes(tmp_path, monkeypatch):
    """dataset.json comes first, so a folder prepare started is recognised as its own."""
    from gpt2lab.data import prepare as prepare_module

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_shard", die)
    with pytest.raises(KeyboardInterrupt):
        prepare("shakespeare-char", tmp_path / "d", progress=False, log=lambda m: None)
    monkeypatch.undo()
    prepare("shakespeare-char", tmp_path / "d", progress=False, log=lambda m: None)
    assert open_dataset(tmp_path / "d").split_tokens("train") > 0


# ---- disk faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_prepare_on_a_full_or_read_only_disk(tmp_path, monkeypatch, capsys, code, reason):
    real_replace = os.replace

    def fail(source, target):
        if str(target).endswith(".bin"):
            raise OSError(code, os.strerror(code), str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail)
    out = tmp_path / "d"
    assert main(["prepare", "shakespeare-char", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "train_000000.bin" in err and "free space" in err
    assert not list(out.glob("*.bin")) and not list(out.glob(".*.bin.*"))  # no half shard, no debris
    monkeypatch.undo()
    assert main(["prepare", "shakespeare-char", "--out", str(out), "-q"]) == 0  # then it continues


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_convert_on_a_full_or_read_only_disk(trained_run, tmp_path, monkeypatch, capsys, code, reason):
    real_replace = os.replace
    export = tmp_path / "export"

    def fail(source, target):
        if export in Path(target).parents:
            raise OSError(code, os.strerror(code), str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", fail)
    before = digests(trained_run)
    assert main(["convert", str(trained_run), "--out", str(export)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "--out" in err
    assert digests(trained_run) == before


def test_other_os_errors_are_still_bugs(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        main(["prepare", "shakespeare-char", "--out", str(tmp_path / "d"), "-q"])


# ---- token ids and verification --------------------------------------------------------------


def damaged_copy(char_data: Path, tmp_path: Path, token: int) -> Path:
    """A copy of the dataset whose first train shard holds `token` at position 5, same length."""
    folder = tmp_path / "damaged"
    shutil.copytree(char_data, folder)
    shard = folder / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 10 : HEADER_BYTES + 12] = np.array([token], dtype="<u2").tobytes()
    shard.write_bytes(bytes(data))
    return folder


def test_token_id_outside_the_vocabulary_is_named_on_open(char_data, tmp_path, capsys):
    folder = damaged_copy(char_data, tmp_path, 1000)
    loader = TokenLoader(open_dataset(folder), split="train", batch_size=2, seq_len=16, shuffle=False)
    with pytest.raises(UserError, match=r"token id 1000, outside the vocabulary of 65 tokens.*--verify"):
        loader.next_batch()
    assert main(train_args(folder, tmp_path / "run", "max_steps=1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token id 1000" in err and "IndexError" not in err


def test_prepare_verify_checks_the_recorded_sha256(char_data, tmp_path, capsys):
    assert main(["prepare", "--verify", "--out", str(char_data)]) == 0
    assert "shards sound" in capsys.readouterr().out
    folder = damaged_copy(char_data, tmp_path, 7)  # a valid id: only the sha256 can tell
    open_dataset(folder).tokens(open_dataset(folder).shards("train")[0])
    before = digests(folder)
    assert main(["prepare", "--verify", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_000000.bin: its sha256 differs" in err and "val_000000.bin" not in err
    assert digests(folder) == before


def test_prepare_without_source_or_verify_says_what_to_give(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "d")]) == 2
    assert "--verify" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ---- the run folder lock ---------------------------------------------------------------------


def test_second_run_on_the_same_folder_stops_naming_the_first(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from gpt2lab.files import FolderLock; "
         "lock = FolderLock(Path(sys.argv[1]), 'run folder'); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_args(char_data, run, "max_steps=2")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err and "in use" in err
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: its lock file is stale and is taken over.
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
    assert main(train_args(char_data, run, "max_steps=2")) == 0


def test_lock_is_released_when_the_run_ends(char_data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(char_data, run, "max_steps=1")) == 0
    FolderLock(run, "run folder").release()  # would raise if the run still held it


# ---- checkpoints -----------------------------------------------------------------------------


def fake_checkpoint(run: Path, step: int, val_loss, files=CHECKPOINT_FILES) -> Path:
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("{}")
    if "state.json" in files:
        (folder / "state.json").write_text(json.dumps({"step": step, "val_loss": val_loss, "loader": {}, "rng": []}))
    return folder


def test_pruning_skips_and_removes_half_deleted_checkpoints(tmp_path):
    fake_checkpoint(tmp_path, 10, 1.0)
    fake_checkpoint(tmp_path, 20, 2.0)
    # What a SIGKILL during rmtree leaves: the final name, some files gone.
    fake_checkpoint(tmp_path, 30, None, files=("model.safetensors", "gpt2lab.json"))
    fake_checkpoint(tmp_path, 40, 3.0)
    prune_checkpoints(tmp_path, keep_last=1, keep_best=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010", "step_00000040"]


def test_pruning_deletes_by_renaming_first(tmp_path, monkeypatch):
    """A kill mid-delete leaves a .tmp-* folder that nothing trusts, not a half step_* one."""
    fake_checkpoint(tmp_path, 10, None)
    fake_checkpoint(tmp_path, 20, None)

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep_last=1, keep_best=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[-1] == "step_00000020" and names[0].startswith(".tmp-") and len(names) == 2


def test_resume_skips_a_checkpoint_without_state_json(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    (run / "checkpoints" / "step_00000004" / "state.json").unlink()
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "auto",
                 "--set", "max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in out
    for folder in (run / "checkpoints").iterdir():
        assert all((folder / name).is_file() for name in CHECKPOINT_FILES), folder
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "train_loss" in r) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "content, problem",
    [("[1, 2]", "a JSON list"), ('{"step": 4, "rng": []}', "no 'loader'"), ('{"step": "4", "loader": {}, "rng": []}', "'step'")],
)
def test_state_json_of_the_wrong_shape_is_named(trained_run, tmp_path, capsys, content, problem):
    run = copy_run(trained_run, tmp_path)
    checkpoint = run / "checkpoints" / "step_00000004"
    (checkpoint / "state.json").write_text(content)
    # As a checkpoint written before digests were recorded (a recorded one names the changed file).
    record = json.loads((checkpoint / "gpt2lab.json").read_text())
    del record["sha256"]["state.json"]
    (checkpoint / "gpt2lab.json").write_text(json.dumps(record))
    before = digests(run)
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err and "resume from an earlier checkpoint" in err
    assert {k: v for k, v in digests(run).items() if k != LOCK_FILE} == {
        k: v for k, v in before.items() if k != LOCK_FILE
    }


def test_garbage_line_in_metrics_is_skipped_with_a_warning(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "train_lo\n[]\n')
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "auto",
                 "--set", "max_steps=6"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl line" in err and "dropped" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "train_loss" in r) == [1, 2, 3, 4, 5, 6]


def test_without_periodic_evaluation_checkpoints_claim_no_val_loss(char_data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(char_data, run, "max_steps=6", "checkpoint.interval=2", "eval.interval=0",
                           "eval.at_start=true", "checkpoint.keep_last=1", "checkpoint.keep_best=true")) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0]  # the start's evaluation ran
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000006"]
    state = json.loads((run / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["val_loss"] is None


# ---- a text corpus without --val-tokens ------------------------------------------------------


def test_text_without_val_tokens_keeps_its_progress_on_disk(tmp_path, monkeypatch):
    """The split sizes wait for the end of the stream, the tokens do not: a kill keeps every
    shard-sized piece already written, and the resumed folder equals an uninterrupted one."""
    from gpt2lab.data import shards as shards_module
    from gpt2lab.data.sources import packaged_shakespeare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(packaged_shakespeare())
    options = dict(inputs=[str(corpus)], shard_tokens=40_000, workers=1, progress=False, log=lambda m: None)
    prepare("text", tmp_path / "clean", **options)
    clean = json.loads((tmp_path / "clean" / "dataset.json").read_text())
    assert clean["splits"]["val"]["tokens"] == (clean["splits"]["val"]["tokens"] + clean["splits"]["train"]["tokens"]) // 10

    real, calls = shards_module.write_atomic, []

    def write_atomic(path, write):
        calls.append(path.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(shards_module, "write_atomic", write_atomic)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        prepare("text", out, **options)
    monkeypatch.undo()
    progress = json.loads((out / "dataset.json").read_text())["progress"]
    assert progress["tokens"] == 4 * 40_000 and len(progress["pending"]) == 4
    assert sorted(p.name for p in out.glob("*.bin")) == [f"pending_{i:06d}.bin" for i in range(4)]

    messages = []
    prepare("text", out, **{**options, "log": messages.append})
    assert messages[0].startswith("resuming after 160,000 tokens")
    resumed = json.loads((out / "dataset.json").read_text())
    assert resumed["splits"] == clean["splits"] and "progress" not in resumed
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    for name in (p.name for p in out.glob("*.bin")):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_text_stream_settles_when_killed_while_cutting_the_pending_files(tmp_path, monkeypatch):
    from gpt2lab.data import shards as shards_module
    from gpt2lab.data.sources import packaged_shakespeare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(packaged_shakespeare())
    options = dict(inputs=[str(corpus)], shard_tokens=40_000, workers=1, progress=False, log=lambda m: None)
    prepare("text", tmp_path / "clean", **options)
    real, calls = shards_module.write_atomic, []

    def write_atomic(path, write):
        calls.append(path.name)
        if path.name == "train_000001.bin":  # the second real shard, cut from the pending files
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(shards_module, "write_atomic", write_atomic)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        prepare("text", out, **options)
    monkeypatch.undo()
    assert any(name.startswith("pending_") for name in calls) and (out / "val_000000.bin").is_file()
    prepare("text", out, **options)
    assert json.loads((out / "dataset.json").read_text())["splits"] == json.loads(
        (tmp_path / "clean" / "dataset.json").read_text())["splits"]
    assert not list(out.glob("pending_*"))
