"""`gpt2lab report`: figures of training runs from their metrics.jsonl, and a Markdown summary.

Train loss (raw points faint, a smoothed line over them), validation loss, HellaSwag acc_norm,
CORE and validation bits per byte against optimizer steps and against tokens seen; several runs
overlaid; the published baselines drawn as labelled horizontal lines (those of the model's size
for loss and HellaSwag; GPT-2 124M's and 1.5B's CORE for every run: CORE does not depend on the
tokenizer). The summary ends with a report card: each run's latest measures beside GPT-2's, and
the chat scores of its checkpoints (`eval chatcore` records them in the run's chatcore.jsonl)
beside nanochat's d20 model's.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import MODEL_PRESETS
from ..errors import UserError
from ..files import write_atomic

GPT2_VOCAB_SIZES = (50257, 50304)
# (n_layer, n_embd) of each size class, OpenAI's four models, and the baselines drawn for it.
SIZES = {
    size: (MODEL_PRESETS[name].n_layer, MODEL_PRESETS[name].n_embd)
    for size, name in (("124m", "gpt2"), ("350m", "gpt2-medium"), ("774m", "gpt2-large"), ("1558m", "gpt2-xl"))
}
# HellaSwag acc_norm: OpenAI's GPT-2 checkpoints (completion scoring) and the GPT-3 paper's
# model of about the same size.
HELLASWAG_BASELINES = {
    "124m": [("GPT-2 124M", 0.2945), ("GPT-3 125M", 0.337)],
    "350m": [("GPT-2 350M", 0.3752), ("GPT-3 350M", 0.436)],
    "774m": [("GPT-2 774M", 0.4320), ("GPT-3 760M", 0.510)],
    "1558m": [("GPT-2 1558M", 0.4889), ("GPT-3 1.3B", 0.547)],
}
VAL_LOSS_BASELINES = {"124m": [("GPT-2 124M checkpoint, FineWeb-EDU val", 3.2924)]}
# The data the validation-loss baselines were measured on (dataset.json's "source").
VAL_LOSS_BASELINE_DATA = "fineweb-edu"
# A run gets the baselines of the nearest size only within this factor of its non-embedding parameters.
SIZE_TOLERANCE = 2.0
# CORE of OpenAI's GPT-2 as nanochat measured it: 124M from the table of nanochat's
# dev/estimate_gpt3_core.ipynb (given to four decimals), 1.5B (gpt2-xl) from its README and
# dev/LEADERBOARD.md, where beating it makes a run "GPT-2 grade".
CORE_BASELINES = [("GPT-2 124M", 0.1139), ("GPT-2 1.5B", 0.256525)]
CARD_SOURCES = (
    "GPT-2's figures: CORE as nanochat measured OpenAI's checkpoints (124M: nanochat's "
    "dev/estimate_gpt3_core.ipynb; 1.5B: its README and dev/LEADERBOARD.md); HellaSwag acc_norm of "
    "OpenAI's checkpoints in the completion scoring (`gpt2lab eval hellaswag`); val loss of the 124M "
    "checkpoint on build-nanogpt's FineWeb-EDU validation shard, comparable only on that data with "
    "GPT-2's tokenizer; val bpb: none published for GPT-2."
)
BASELINE_CHOICES = ("auto", *SIZES, "none")
# Where `gpt2lab eval chatcore` records the chat scores of a run's checkpoints.
CHAT_SCORES_FILE = "chatcore.jsonl"
CHAT_TASKS = (("arc-easy", "ARC-Easy"), ("arc-challenge", "ARC-Challenge"), ("mmlu", "MMLU"), ("gsm8k", "GSM8K"),
              ("humaneval", "HumanEval"))
# nanochat's d20 report card: the summary table of its README at the first release (commit
# 3a5e0bc, 13 October 2025), speedrun.sh's depth-20 model after midtraining (MID) and after
# supervised fine-tuning (SFT), each scored by scripts/chat_eval.py on the full test sets.
NANOCHAT_D20 = {
    "MID": {"arc-easy": 0.3561, "arc-challenge": 0.2875, "mmlu": 0.3111, "gsm8k": 0.0250, "humaneval": 0.0671,
            "chatcore": 0.0730},
    "SFT": {"arc-easy": 0.3876, "arc-challenge": 0.2807, "mmlu": 0.3151, "gsm8k": 0.0455, "humaneval": 0.0854,
            "chatcore": 0.0884},
}
CHAT_CARD_SOURCES = (
    "nanochat d20: the report card of nanochat's README at its first release (commit 3a5e0bc, October 2025), "
    "speedrun.sh's depth-20 model after midtraining (MID) and supervised fine-tuning (SFT), scored by its "
    "scripts/chat_eval.py on the full test sets (its RL stage reached GSM8K 0.0758). Accuracies; ChatCORE is the "
    "mean of the five centered accuracies. A checkpoint scored with --max-per-task N is over the first N items."
)
X_AXES = (("step", "step"), ("tokens", "tokens seen"))


@dataclass
class Run:
    folder: Path
    name: str
    records: list[dict[str, Any]]
    config: dict[str, Any]

    def series(self, key: str, x: str) -> tuple[list[float], list[float]]:
        """(x values, values) of every record that carries a number under `key`, in file order."""
        xs, ys = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and x in record:
                xs.append(record[x])
                ys.append(value)
        return xs, ys

    def last(self, key: str) -> dict[str, Any] | None:
        matching = [r for r in self.records if isinstance(r.get(key), (int, float))]
        return matching[-1] if matching else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line without its newline is still being written
    and is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass a run folder written by `gpt2lab train`") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it is not a metrics file of gpt2lab") from None
    lines = text.split("\n")
    if lines and lines[-1]:
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not valid JSON ({error.msg}); fix or remove the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path} line {number} is not a metrics record (a JSON object with a 'step')")
        records.append(record)
    return records


def load_run(folder: str | Path, name: str | None = None) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist")
    records = read_metrics(folder / "metrics.jsonl")
    if not records:
        raise UserError(f"{folder / 'metrics.jsonl'} holds no records yet; let the run train a step first")
    config: dict[str, Any] = {}
    if (folder / "config.toml").is_file():
        try:
            config = tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{folder / 'config.toml'} is not valid TOML ({error}); it is damaged") from None
    return Run(folder, name or folder.resolve().name, records, config)


def read_chat_scores(folder: str | Path) -> list[dict[str, Any]]:
    """The records `eval chatcore` appended to a run's chatcore.jsonl (none when it has not been
    scored); lines that are not records are left out."""
    path = Path(folder) / CHAT_SCORES_FILE
    if not path.is_file():
        return []
    records = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("tasks"), dict):
            records.append(record)
    return records


def _chat_cell(record: dict[str, Any], key: str) -> str:
    value = record.get("chatcore") if key == "chatcore" else record["tasks"].get(key, {}).get("accuracy")
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def chat_card(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: the chat scores of each run's checkpoints (the latest record of each step)
    beside nanochat's d20 card; none when no run was scored."""
    columns = []
    for run in runs:
        latest = {record["step"]: record for record in read_chat_scores(run.folder)}
        for step in sorted(latest):
            items = latest[step].get("max_per_task")
            columns.append((f"{run.name} step {step:,}" + (f" ({items} per task)" if items else ""), latest[step]))
    if not columns:
        return []
    lines = ["", "## Chat scores", "",
             "| | " + " | ".join(name for name, _ in columns) + " | nanochat d20 MID | nanochat d20 SFT |",
             "|---|" + "---:|" * (len(columns) + 2)]
    for key, label in (*CHAT_TASKS, ("chatcore", "ChatCORE")):
        cells = [_chat_cell(record, key) for _, record in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {NANOCHAT_D20['MID'][key]} | {NANOCHAT_D20['SFT'][key]} |")
    return lines + ["", CHAT_CARD_SOURCES]


def load_runs(folders: Sequence[str | Path]) -> list[Run]:
    names = [Path(f).resolve().name for f in folders]
    # Runs with the same folder name are told apart by their paths.
    return [load_run(f, n if names.count(n) == 1 else str(f)) for f, n in zip(folders, names)]


def size_class(run: Run) -> str | None:
    """The GPT-2 size whose baselines apply to `run`: none for other tokenizers; else the exact
    shape, or the size nearest in non-embedding parameters if within SIZE_TOLERANCE of it (a
    7M-parameter model has none)."""
    model = run.config.get("model", {})
    if model.get("vocab_size") not in GPT2_VOCAB_SIZES and model.get("padded_vocab_size") not in GPT2_VOCAB_SIZES:
        return None
    shape = (model.get("n_layer"), model.get("n_embd"))
    for name, size in SIZES.items():
        if shape == size:
            return name
    if not all(isinstance(v, int) and v > 0 for v in shape):
        return None
    params = 12 * shape[0] * shape[1] ** 2

    def distance(name: str) -> float:
        return abs(math.log(params / (12 * SIZES[name][0] * SIZES[name][1] ** 2)))

    nearest = min(SIZES, key=distance)
    return nearest if distance(nearest) <= math.log(SIZE_TOLERANCE) else None


def data_source(run: Run) -> str | None:
    """What the run trained on, as its dataset.json says (None: the folder is not at hand)."""
    path = run.config.get("data", {}).get("path")
    try:
        source = json.loads((Path(str(path)) / "dataset.json").read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def val_loss_baselines(run: Run, size: str | None, chosen: bool) -> list[tuple[str, float]]:
    """The validation losses to draw: measured on one dataset, so for a run on other data only
    when the user chose the size (`--baselines SIZE`)."""
    if size is None or not (chosen or data_source(run) == VAL_LOSS_BASELINE_DATA):
        return []
    return VAL_LOSS_BASELINES.get(size, [])


def smooth(values: Sequence[float]) -> list[float]:
    """A centered moving average over about a fiftieth of the points (fewer at the ends), which,
    unlike an exponential one, does not lag behind a falling loss."""
    half = min(50, len(values) // 100)
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def _token_tick(value: float, _position=None) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _draw_loss(ax, runs: Sequence[Run], colors: Sequence[str], x: str, size: str | None, chosen: bool) -> None:
    for run, color in zip(runs, colors):
        xs, ys = run.series("train_loss", x)
        if xs:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, gid=f"{run.name}:train_loss:{x}")
            ax.plot(xs, smooth(ys), color=color, linewidth=1.6, label=f"{run.name} train (smoothed)",
                    gid=f"{run.name}:train_loss_smoothed:{x}")
        xs, ys = run.series("val_loss", x)
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{run.name} val",
                    gid=f"{run.name}:val_loss:{x}")
    for label, value in val_loss_baselines(runs[0], size, chosen):
        ax.axhline(value, color="black", linestyle=":", linewidth=1.2, label=f"{label}: {value}",
                   gid=f"baseline:val_loss:{label}")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("loss")


def _draw_hellaswag(ax, runs: Sequence[Run], colors: Sequence[str], x: str, size: str | None) -> None:
    for run, color in zip(runs, colors):
        for key, style, kind in (("hellaswag_acc_norm", "-", "completion"),
                                 ("hellaswag_acc_norm_harness", ":", "harness")):
            xs, ys = run.series(key, x)
            if xs:
                ax.plot(xs, ys, color=color, linestyle=style, marker="o", markersize=3,
                        label=f"{run.name} acc_norm ({kind})", gid=f"{run.name}:{key}:{x}")
    for (label, value), color in zip(HELLASWAG_BASELINES.get(size, []), ("tab:red", "tab:green")):
        ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{label}: {value}",
                   gid=f"baseline:hellaswag_acc_norm:{label}")
    ax.axhline(0.25, color="gray", linewidth=0.8, linestyle=":", label="chance: 0.25",
               gid="baseline:hellaswag_acc_norm:chance")
    ax.set_ylabel("HellaSwag acc_norm")
    ax.set_title("HellaSwag")


def _draw_core(ax, runs: Sequence[Run], colors: Sequence[str], x: str, baselines: bool) -> None:
    for run, color in zip(runs, colors):
        xs, ys = run.series("core", x)
        if xs:
            ax.plot(xs, ys, color=color, marker="o", markersize=3, label=f"{run.name} CORE", gid=f"{run.name}:core:{x}")
    for (label, value), color in zip(CORE_BASELINES if baselines else [], ("tab:red", "tab:purple")):
        ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{label}: {value}",
                   gid=f"baseline:core:{label}")
    ax.set_ylabel("CORE (mean centered accuracy)")
    ax.set_title("CORE")


def _draw_bpb(ax, runs: Sequence[Run], colors: Sequence[str], x: str) -> None:
    for run, color in zip(runs, colors):
        xs, ys = run.series("val_bpb", x)
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{run.name} val",
                    gid=f"{run.name}:val_bpb:{x}")
    ax.set_ylabel("bits per byte")
    ax.set_title("validation bits per byte")


def build_figure(runs: Sequence[Run], baselines: str = "auto"):
    """The report's figure (matplotlib Figure, Agg): a row of panels per measure the runs hold,
    against steps (left) and tokens (right). Every line carries a gid `RUN:MEASURE:X` (X is step
    or tokens; baselines `baseline:MEASURE:LABEL`) so that its data can be found again."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if baselines not in BASELINE_CHOICES:
        raise UserError(f"unknown baselines {baselines!r}; use one of {', '.join(BASELINE_CHOICES)}")
    size = size_class(runs[0]) if baselines == "auto" else (None if baselines == "none" else baselines)
    panels = [lambda ax, x: _draw_loss(ax, runs, colors, x, size, chosen=baselines != "auto")]
    if any(run.last("hellaswag_acc_norm") or run.last("hellaswag_acc_norm_harness") for run in runs):
        panels.append(lambda ax, x: _draw_hellaswag(ax, runs, colors, x, size))
    if any(run.last("core") for run in runs):
        panels.append(lambda ax, x: _draw_core(ax, runs, colors, x, baselines != "none"))
    if any(run.last("val_bpb") for run in runs):
        panels.append(lambda ax, x: _draw_bpb(ax, runs, colors, x))
    figure = Figure(figsize=(13, 4.6 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 2, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for row, draw in zip(axes, panels):
        for ax, (x, x_label) in zip(row, X_AXES):
            draw(ax, x)
            ax.set_title(f"{ax.get_title()} against {x_label}")
            ax.set_xlabel(x_label)
            ax.grid(True, alpha=0.3)
            if x == "tokens":
                ax.xaxis.set_major_formatter(FuncFormatter(_token_tick))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    return figure


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def _tokens(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def summary_markdown(runs: Sequence[Run], baselines: str = "auto", image: str | None = None) -> str:
    """A Markdown table per run: steps, tokens seen, wall time, last train loss, best val loss,
    last HellaSwag."""
    lines = [
        "# Training report",
        "",
        "| run | steps | tokens seen | wall time | last train loss | best val loss | "
        "last HellaSwag acc / acc_norm (completion) | (harness) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        step = max(r["step"] for r in run.records)
        tokens = max((r.get("tokens") or 0) for r in run.records)
        elapsed = max((r.get("elapsed_s") or 0.0) for r in run.records)
        train = run.last("train_loss")
        vals = [r for r in run.records if isinstance(r.get("val_loss"), (int, float))]
        best = min(vals, key=lambda r: r["val_loss"]) if vals else None
        hellaswag = run.last("hellaswag_acc_norm")
        harness = run.last("hellaswag_acc_norm_harness")
        cells = [
            run.name,
            f"{step:,}",
            _tokens(tokens),
            _duration(elapsed),
            f"{train['train_loss']:.4f}" if train else "-",
            f"{best['val_loss']:.4f} (step {best['step']:,})" if best else "-",
            f"{hellaswag.get('hellaswag_acc', float('nan')):.4f} / {hellaswag['hellaswag_acc_norm']:.4f} "
            f"(step {hellaswag['step']:,})" if hellaswag else "-",
            f"{harness.get('hellaswag_acc_harness', float('nan')):.4f} / {harness['hellaswag_acc_norm_harness']:.4f}"
            if harness else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    size = size_class(runs[0]) if baselines == "auto" else (None if baselines == "none" else baselines)
    if size is not None:
        lines.append("")
        chosen = baselines != "auto"
        parts = [f"val loss: {label} {value}" for label, value in val_loss_baselines(runs[0], size, chosen)]
        hellaswag = ", ".join(f"{label} {value}" for label, value in HELLASWAG_BASELINES[size])
        parts.append(f"HellaSwag acc_norm: {hellaswag}")
        lines.append(f"Baselines for {size.upper()}: " + "; ".join(parts) + ".")
    lines += report_card(runs)
    lines += chat_card(runs)
    if image is not None:
        lines += ["", f"![training curves]({image})"]
    return "\n".join(lines) + "\n"


def _latest(run: Run, key: str, digits: int = 4) -> str:
    record = run.last(key)
    return f"{record[key]:.{digits}f} (step {record['step']:,})" if record else "-"


def report_card(runs: Sequence[Run]) -> list[str]:
    """Markdown lines: each run's latest val loss, val bpb, HellaSwag acc_norm and CORE beside
    those of OpenAI's GPT-2 124M and 1.5B, with where GPT-2's come from."""
    small_hellaswag, large_hellaswag = HELLASWAG_BASELINES["124m"][0][1], HELLASWAG_BASELINES["1558m"][0][1]
    core = dict(CORE_BASELINES)
    rows = [
        ("val loss (nats per token)", "val_loss", str(VAL_LOSS_BASELINES["124m"][0][1]), "-"),
        ("val bpb (bits per byte)", "val_bpb", "-", "-"),
        ("HellaSwag acc_norm (completion)", "hellaswag_acc_norm", str(small_hellaswag), str(large_hellaswag)),
        ("CORE", "core", str(core["GPT-2 124M"]), str(core["GPT-2 1.5B"])),
    ]
    lines = [
        "", "## Report card", "",
        "| latest | " + " | ".join(run.name for run in runs) + " | GPT-2 124M | GPT-2 1.5B |",
        "|---|" + "---:|" * (len(runs) + 2),
    ]
    for label, key, gpt2_small, gpt2_large in rows:
        lines.append(f"| {label} | " + " | ".join(_latest(run, key) for run in runs) + f" | {gpt2_small} | {gpt2_large} |")
    return lines + ["", CARD_SOURCES]


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, baselines: str = "auto"
) -> tuple[Path, Path]:
    """Write the figure as a PNG and the summary as Markdown beside it (same name, .md); both
    appear complete or not at all. Returns their paths."""
    if not run_dirs:
        raise UserError("give at least one run folder")
    runs = load_runs(run_dirs)
    if out is None:
        out = Path(run_dirs[0]) / "report.png" if len(run_dirs) == 1 else Path("report.png")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} should name a .png file")
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out, {out.parent}, does not exist; create it first")
    figure = build_figure(runs, baselines)
    markdown = summary_markdown(runs, baselines, image=out.name)
    write_atomic(out, lambda p: figure.savefig(p, format="png", dpi=110))
    summary = out.with_suffix(".md")
    write_atomic(summary, lambda p: p.write_text(markdown, encoding="utf-8"))
    return out, summary

