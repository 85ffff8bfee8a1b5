"""`report`: the figure's points are metrics.jsonl's, the PNG opens, the summary is right."""

import json
from pathlib import Path

import pytest

from gpt2lab import UserError
from gpt2lab.cli import main
from gpt2lab.eval.report import build_figure, load_run, load_runs, read_metrics, size_class, write_report

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "batch.micro_batch=4",
    "batch.seq_len=32", "max_steps=12", "eval.interval=4", "eval.batches=2", "eval.sample_interval=0",
    "log.interval=0", "log.progress_bar=false", "checkpoint.final=false", "eval.final_full=false",
]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A run folder made by a short CPU training run."""
    from gpt2lab.data.prepare import prepare
    from gpt2lab.train.config import resolve_config
    from gpt2lab.train.trainer import Trainer

    root = tmp_path_factory.mktemp("report")
    prepare("shakespeare-char", root / "data", progress=False, log=lambda m: None)
    config = resolve_config("shakespeare-char-cpu", overrides=[f"data.path={root / 'data'}", *TINY])
    Trainer(config, root / "char-run", echo=lambda line: None).run()
    return root / "char-run"


@pytest.fixture
def gpt2_run(tmp_path):
    """A 124M-shaped run's folder with HellaSwag measures, written by hand."""
    folder = tmp_path / "gpt2-run"
    folder.mkdir()
    data = tmp_path / "edu"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"source": "fineweb-edu"}))
    (folder / "config.toml").write_text(
        f"[model]\nn_layer = 12\nn_embd = 768\nn_head = 12\nvocab_size = 50257\n\n[data]\npath = {json.dumps(str(data))}\n"
    )
    records = []
    for step in range(1, 21):
        records.append({"step": step, "tokens": step * 524288, "elapsed_s": step * 0.5, "train_loss": 10 - step * 0.3})
        if step % 10 == 0:
            records.append({"step": step, "tokens": step * 524288, "elapsed_s": step * 0.5, "val_loss": 9 - step * 0.2})
            records.append({"step": step, "tokens": step * 524288, "elapsed_s": step * 0.5 + 0.1,
                            "hellaswag_acc": 0.25 + step / 1000, "hellaswag_acc_norm": 0.26 + step / 1000,
                            "hellaswag_acc_harness": 0.24 + step / 1000, "hellaswag_acc_norm_harness": 0.27 + step / 1000,
                            "hellaswag_examples": 10042})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def lines_by_gid(figure):
    return {line.get_gid(): line for ax in figure.axes for line in ax.get_lines() if line.get_gid()}


def metric_points(folder, key, x):
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r[x] for r in records if key in r], [r[key] for r in records if key in r]


def test_plotted_points_equal_metrics_jsonl(char_run, gpt2_run):
    runs = load_runs([char_run, gpt2_run])
    lines = lines_by_gid(build_figure(runs))
    checked = 0
    for folder, keys in [(char_run, ["train_loss", "val_loss"]),
                         (gpt2_run, ["train_loss", "val_loss", "hellaswag_acc_norm", "hellaswag_acc_norm_harness"])]:
        for key in keys:
            for x in ("step", "tokens"):
                xs, ys = metric_points(folder, key, x)
                line = lines[f"{folder.name}:{key}:{x}"]
                assert list(line.get_xdata()) == xs and list(line.get_ydata()) == ys
                checked += 1
    assert checked == 12
    train_steps, _ = metric_points(char_run, "train_loss", "step")
    assert train_steps == list(range(1, 13))
    # The smoothed line follows the raw points; baselines come from the first run (a char model: none).
    assert len(lines["char-run:train_loss_smoothed:step"].get_ydata()) == 12
    assert not [gid for gid in lines if gid.startswith("baseline:") and "chance" not in gid]


def test_baselines_of_the_model_size(gpt2_run):
    run = load_run(gpt2_run)
    assert size_class(run) == "124m"
    lines = lines_by_gid(build_figure([run]))
    assert list(lines["baseline:val_loss:GPT-2 124M checkpoint, FineWeb-EDU val"].get_ydata()) == [3.2924] * 2
    assert list(lines["baseline:hellaswag_acc_norm:GPT-2 124M"].get_ydata()) == [0.2945] * 2
    assert list(lines["baseline:hellaswag_acc_norm:GPT-3 125M"].get_ydata()) == [0.337] * 2
    larger = lines_by_gid(build_figure([run], baselines="774m"))
    assert list(larger["baseline:hellaswag_acc_norm:GPT-3 760M"].get_ydata()) == [0.510] * 2
    assert not any(gid.startswith("baseline:val_loss") for gid in larger)
    none = lines_by_gid(build_figure([run], baselines="none"))
    assert {gid for gid in none if gid.startswith("baseline:")} == {"baseline:hellaswag_acc_norm:chance"}


def test_a_small_model_on_other_data_gets_no_gpt2_baselines(gpt2_run, tmp_path):
    """A 7M-parameter code model with GPT-2's tokenizer is no GPT-2 124M, and its data is no FineWeb-EDU."""
    config = (gpt2_run / "config.toml").read_text()
    (gpt2_run / "config.toml").write_text(config.replace("n_layer = 12", "n_layer = 4").replace("n_embd = 768", "n_embd = 384"))
    assert size_class(load_run(gpt2_run)) is None
    assert not [gid for gid in lines_by_gid(build_figure([load_run(gpt2_run)])) if "GPT" in gid]
    code = tmp_path / "code"
    code.mkdir()
    (code / "dataset.json").write_text(json.dumps({"source": "text"}))
    (gpt2_run / "config.toml").write_text(config.replace(str(tmp_path / "edu"), str(code)))
    lines = lines_by_gid(build_figure([load_run(gpt2_run)]))
    assert "baseline:hellaswag_acc_norm:GPT-2 124M" in lines  # the size's benchmark scores apply to any data
    assert not [gid for gid in lines if gid.startswith("baseline:val_loss")]
    chosen = lines_by_gid(build_figure([load_run(gpt2_run)], baselines="124m"))
    assert "baseline:val_loss:GPT-2 124M checkpoint, FineWeb-EDU val" in chosen


def test_report_writes_a_png_and_a_summary(char_run, gpt2_run, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "both.png"
    assert main(["report", str(char_run), str(gpt2_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # not a blank canvas
    summary = (tmp_path / "both.md").read_text()
    assert summary in printed
    _, vals = metric_points(char_run, "val_loss", "step")
    assert f"{min(vals):.4f}" in summary
    assert "| gpt2-run | 20 | 10.49M | 0m 10s | 4.0000 | 5.0000 (step 20) | 0.2700 / 0.2800 (step 20) | 0.2600 / 0.2900 |" in summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # One run: the report goes into its folder by default.
    assert main(["report", str(gpt2_run)]) == 0
    assert imread(gpt2_run / "report.png").ndim == 3
    assert (gpt2_run / "report.md").read_text().startswith("# Training report")


def test_metrics_lines_are_checked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_metrics(path)
    # A last line still being written is left out.
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo')
    assert read_metrics(path) == [{"step": 1, "train_loss": 2.0}]
    with pytest.raises(UserError, match="does not exist"):
        write_report([tmp_path / "missing"])
    with pytest.raises(UserError, match="should name a .png file"):
        write_report([tmp_path], tmp_path / "report.jpg")


def test_the_report_shows_the_chat_scores_of_the_runs_checkpoints_beside_nanochats_d20(tmp_path):
    folder = tmp_path / "sft-run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 300, "tokens": 1000, "elapsed_s": 5.0, "train_loss": 1.0}) + "\n")
    tasks = {name: {"accuracy": value, "centered": value, "examples": 10} for name, value in
             (("arc-easy", 0.5), ("arc-challenge", 0.25), ("mmlu", 0.375), ("gsm8k", 0.1), ("humaneval", 0.05))}
    records = [
        {"step": 100, "checkpoint": "step_00000100", "chatcore": 0.1, "tasks": {"mmlu": tasks["mmlu"]}, "max_per_task": 10},
        {"step": 300, "checkpoint": "step_00000300", "chatcore": None, "tasks": {"mmlu": {**tasks["mmlu"], "accuracy": 0.3}}},
        {"step": 300, "checkpoint": "step_00000300", "chatcore": 0.2345, "tasks": tasks, "max_per_task": None},
    ]
    (folder / "chatcore.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "not a record\n")
    _, summary = write_report([folder], tmp_path / "report.png")
    text = summary.read_text()
    assert "| | sft-run step 100 (10 per task) | sft-run step 300 | nanochat d20 MID | nanochat d20 SFT |" in text
    assert "| MMLU | 0.3750 | 0.3750 | 0.3111 | 0.3151 |" in text  # step 300's latest record
    assert "| ARC-Easy | - | 0.5000 | 0.3561 | 0.3876 |" in text
    assert "| ChatCORE | 0.1000 | 0.2345 | 0.073 | 0.0884 |" in text
    assert "commit 3a5e0bc" in text
    # A run never scored has no such section.
    (folder / "chatcore.jsonl").unlink()
    _, summary = write_report([folder], tmp_path / "report.png")
    assert "Chat scores" not in summary.read_text()
