"""`system.profile_steps` and `gpt2lab bench --profile`: a torch.profiler trace in the run folder
and the top operators printed."""

import json

import pytest

from gpt2lab import UserError
from gpt2lab.cli import main
from gpt2lab.data.prepare import prepare
from gpt2lab.train.config import resolve_config
from gpt2lab.train.trainer import Trainer

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "batch.micro_batch=2",
    "batch.seq_len=16", "eval.interval=0", "eval.at_start=false", "eval.final_full=false",
    "checkpoint.final=false", "log.progress_bar=false", "system.device=cpu",
]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


def trace_events(path):
    events = json.loads(path.read_text())["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def test_profile_steps_write_a_trace_and_print_the_top_operators(char_data, tmp_path):
    lines = []
    config = resolve_config("shakespeare-char-cpu", overrides=[
        f"data.path={char_data}", *TINY, "max_steps=4", "system.profile_steps=2",
    ])
    Trainer(config, tmp_path / "run", echo=lines.append).run()
    events = trace_events(tmp_path / "run" / "profile" / "trace.json")
    names = {e["name"] for e in events}
    assert "aten::mm" in names or "aten::addmm" in names or "mkldnn::_linear_pointwise" in names
    # Two profiler steps after the skipped first one: the trace marks each step it recorded.
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#1", "ProfilerStep#2"]
    printed = "\n".join(lines)
    assert "profile of 2 steps" in printed and "aten::" in printed and "Self CPU" in printed
    assert (tmp_path / "run" / "profile" / "top_ops.txt").read_text().strip() in printed


def test_no_profile_by_default_and_a_negative_count_is_refused(char_data, tmp_path):
    config = resolve_config("shakespeare-char-cpu", overrides=[f"data.path={char_data}", *TINY, "max_steps=1"])
    Trainer(config, tmp_path / "run", echo=lambda line: None).run()
    assert not (tmp_path / "run" / "profile").exists()
    with pytest.raises(UserError, match="system.profile_steps"):
        resolve_config("shakespeare-char-cpu", overrides=[f"data.path={char_data}", "system.profile_steps=-1"]).validate()


def test_bench_profile_writes_a_trace_per_rung(tmp_path, capsys):
    out = tmp_path / "prof"
    code = main([
        "bench", "--device", "cpu", "--micro-batch", "1", "--seq-len", "16", "--steps", "2", "--warmup", "1",
        "--rungs", "1", "3", "--profile", str(out), "--set", "model.n_layer=1", "--set", "model.n_head=2",
        "--set", "model.n_embd=32",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for rung in (1, 3):
        assert trace_events(out / f"rung{rung}" / "trace.json")
        assert f"rung {rung}" in printed
    assert not (out / "rung2").exists()
    assert "aten::" in printed
