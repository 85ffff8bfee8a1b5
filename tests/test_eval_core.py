"""`eval core`: the CORE metric, example by example equal to nanochat's `core_eval` on a fixture
bundle of all three task types (few-shot and cropped prompts included), the bundle's reading and
download, and one clear message for each kind of bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import pytest
import torch

from core_reference import BUNDLE, CONFIG, REFERENCE, fixture_model
from gpt2lab import GPT, GPTConfig, UserError
from gpt2lab.cli import main
from gpt2lab.eval import core_bundle
from gpt2lab.eval.core import CoreEvaluation, crop, score_rows
from gpt2lab.eval.core_bundle import cached_bundle, load_bundle
from gpt2lab.pretrained import save_pretrained
from gpt2lab.tokenizer import CharTokenizer, GPT2Tokenizer

REFERENCE_RUNS = json.loads(REFERENCE.read_text())["runs"]


@pytest.fixture(scope="module")
def model():
    return fixture_model()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_pretrained(fixture_model(), tmp_path_factory.mktemp("core") / "model", tokenizer_spec="gpt2")


def copy_bundle(tmp_path):
    return shutil.copytree(BUNDLE, tmp_path / "bundle")


# ---- fidelity --------------------------------------------------------------------------------------


def test_the_fixture_covers_what_it_should():
    tasks = load_bundle(BUNDLE).tasks
    assert {t.task_type for t in tasks} == {"multiple_choice", "schema", "language_modeling"}
    assert {t.task_type for t in tasks if t.num_fewshot} == {"multiple_choice", "schema", "language_modeling"}
    full = REFERENCE_RUNS[0]["tasks"]
    for label, task in full.items():
        rights = {e["correct"] for e in task["examples"]}
        assert rights == {True, False}, f"{label}: the reference should hold right and wrong examples"
    cropped = [label for label, task in full.items()
               if any(e["ends"][0] == CONFIG["block_size"] and e["starts"][0] < e["ends"][0] for e in task["examples"])]
    assert {"mc_fewshot", "lm_fewshot"} <= set(cropped)
    empty_spans = [e for task in full.values() for e in task["examples"] if None in e["mean_losses"]]
    assert len(empty_spans) >= 2  # a choice that is another's prefix: its mean over no tokens is NaN


@pytest.mark.parametrize("run", REFERENCE_RUNS, ids=lambda run: f"max_per_task={run['max_per_task']}")
def test_every_example_is_right_or_wrong_as_in_nanochat(model, run):
    limit = run["max_per_task"] if run["max_per_task"] > 0 else None
    result = CoreEvaluation(load_bundle(BUNDLE), GPT2Tokenizer(), max_per_task=limit).evaluate(model, batch_size=5)
    for label, expected in run["tasks"].items():
        got = [right for _, _, right in sorted(result.outcomes[label])]
        assert got == [e["correct"] for e in expected["examples"]], label
        assert result.tasks[label].accuracy == pytest.approx(expected["accuracy"], abs=1e-6)
        assert result.tasks[label].centered == pytest.approx(expected["centered"], abs=1e-6)
        assert result.tasks[label].examples == len(expected["examples"])
    assert result.core == pytest.approx(run["core"], abs=1e-6)


def test_tokens_spans_and_losses_equal_nanochat(model):
    """The prompts, as tokens after cropping, and each sequence's mean loss over its span."""
    evaluation = CoreEvaluation(load_bundle(BUNDLE), GPT2Tokenizer())
    examples = [e for task in evaluation.examples for e in task]
    scores = score_rows(
        model, lambda i: evaluation._row(i, examples[i], CONFIG["block_size"], CONFIG["vocab_size"]),
        [e.row_length(CONFIG["block_size"]) for e in examples], [len(e.rests) for e in examples], batch_size=3,
        autocast_dtype=None, progress=False,
    )
    expected = [e for task in REFERENCE_RUNS[0]["tasks"].values() for e in task["examples"]]
    for example, (sums, counts, _), reference in zip(examples, scores, expected):
        sequences, starts, ends = crop(example, CONFIG["block_size"], "fixture")
        digest = hashlib.sha256(json.dumps([list(s) for s in sequences]).encode()).hexdigest()
        assert (digest, starts, ends) == (reference["tokens_sha256"], reference["starts"], reference["ends"])
        for s, c, mean in zip(sums, counts, reference["mean_losses"]):
            assert (c == 0) == (mean is None)
            if c:
                assert s / c == pytest.approx(mean, abs=2e-4)


def test_ranks_share_the_examples(model):
    evaluation = CoreEvaluation(load_bundle(BUNDLE), GPT2Tokenizer())
    whole = evaluation.evaluate(model)
    halves = [evaluation.evaluate(model, rank=r, world_size=2) for r in (0, 1)]
    for label in whole.outcomes:
        shared = sorted(halves[0].outcomes[label] + halves[1].outcomes[label])
        assert shared == sorted(whole.outcomes[label])
        assert halves[0].tasks[label].examples + halves[1].tasks[label].examples == whole.tasks[label].examples


# ---- the command -----------------------------------------------------------------------------------


def test_eval_core_prints_json_and_a_table(capsys, model_folder):
    assert main(["eval", "core", "--model", str(model_folder), "--bundle", str(BUNDLE), "--json", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["core"] == pytest.approx(REFERENCE_RUNS[0]["core"], abs=1e-6)
    assert set(record["tasks"]) == set(REFERENCE_RUNS[0]["tasks"])
    assert set(record["tasks"]["mc_zeroshot"]) == {"accuracy", "centered", "examples"}
    assert main(["eval", "core", "--model", str(model_folder), "--bundle", str(BUNDLE), "--tasks",
                 "schema_fewshot,lm_zeroshot", "--max-per-task", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "schema_fewshot" in out and "lm_zeroshot" in out and "mc_zeroshot" not in out
    assert f"{REFERENCE_RUNS[1]['tasks']['lm_zeroshot']['accuracy']:.4f}" in out


@pytest.mark.parametrize("edit, message", [
    (lambda b: None, "unknown CORE task 'nope'"),
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace(
        "icl_task_type: schema", "icl_task_type: generation_task_with_answers", 1)),
     "icl_task_type 'generation_task_with_answers', which CORE does not know"),
    (lambda b: (b / "eval_data" / "lm_zeroshot.jsonl").write_text('{"context": "a", "continuation": "b"}\n'
                                                                    '{"context": "a"}\n'),
     "lm_zeroshot.jsonl line 2 has no 'continuation' field"),
    (lambda b: (b / "eval_data" / "mc_zeroshot.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n'),
     "mc_zeroshot.jsonl line 1: gold 2 is not the index of one of its 2 options"),
    (lambda b: (b / "core.yaml").write_text("icl_tasks:\n  - label: [unclosed\n"), "core.yaml line 3 is not valid YAML"),
    (lambda b: (b / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_zeroshot,25\n"),
     "eval_meta_data.csv has no row for task 'mc_fewshot'"),
    (lambda b: (b / "eval_data" / "schema_fewshot.jsonl").unlink(), "schema_fewshot.jsonl, the data of task"),
    (lambda b: (b / "core.yaml").unlink(), "core.yaml does not exist"),
])
def test_bad_bundles_get_one_message_and_exit_2(capsys, tmp_path, model_folder, edit, message):
    bundle = copy_bundle(tmp_path)
    edit(bundle)
    tasks = ["--tasks", "nope"] if "nope" in message else []
    assert main(["eval", "core", "--model", str(model_folder), "--bundle", str(bundle), *tasks]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_context_too_short_for_the_continuation_is_refused(tmp_path, model):
    small = fixture_model()
    small.config.block_size = 2  # the wpe rows are not used: crop refuses before any forward
    evaluation = CoreEvaluation(load_bundle(BUNDLE), GPT2Tokenizer(), ["lm_zeroshot"])
    with pytest.raises(UserError, match="do not fit this model's context of 2 tokens"):
        evaluation.evaluate(small)


def test_a_character_model_is_refused():
    with pytest.raises(UserError, match="character-level model, which CORE does not support"):
        CoreEvaluation(load_bundle(BUNDLE), CharTokenizer(list("abc ")))


def test_more_shots_than_items_names_the_fix():
    with pytest.raises(UserError, match="raise --max-per-task above 3"):
        CoreEvaluation(load_bundle(BUNDLE), GPT2Tokenizer(), ["mc_fewshot"], max_per_task=3)


# ---- the download ----------------------------------------------------------------------------------


def zipped_bundle(tmp_path):
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(BUNDLE.rglob("*")):
            if path.is_file():
                out.write(path, "eval_bundle/" + str(path.relative_to(BUNDLE)))
    return archive


def test_the_bundle_is_downloaded_once_checked_and_unpacked(tmp_path, monkeypatch):
    archive = zipped_bundle(tmp_path)
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(core_bundle, "BUNDLE_URL", archive.as_uri())
    folder = cached_bundle()
    assert [t.label for t in load_bundle(folder).tasks] == [t.label for t in load_bundle(BUNDLE).tasks]
    sidecar = tmp_path / "cache" / "core" / "eval_bundle.zip.sha256"
    assert sidecar.read_text().strip() == hashlib.sha256(archive.read_bytes()).hexdigest()
    archive.unlink()  # unpacked once, the folder is used without the address
    assert cached_bundle() == folder


def test_a_download_that_does_not_match_its_record_is_refused(tmp_path, monkeypatch):
    archive = zipped_bundle(tmp_path)
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(core_bundle, "BUNDLE_URL", archive.as_uri())
    (tmp_path / "cache" / "core").mkdir(parents=True)
    (tmp_path / "cache" / "core" / "eval_bundle.zip.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(UserError, match="is not the expected one; download .* --bundle DIR"):
        cached_bundle()


def test_an_archive_that_is_not_the_bundle_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "eval_bundle.zip"
    archive.write_bytes(b"not a zip")
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(core_bundle, "BUNDLE_URL", archive.as_uri())
    with pytest.raises(UserError, match="is not a zip file"):
        cached_bundle()
    # Not kept, nor its checksum: the next run downloads again and records what it gets.
    assert not (tmp_path / "cache" / "core" / "eval_bundle.zip").exists()
    assert not (tmp_path / "cache" / "core" / "eval_bundle.zip.sha256").exists()


def test_offline_the_message_names_the_bundle_option(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(core_bundle, "BUNDLE_URL", (tmp_path / "absent.zip").as_uri())
    with pytest.raises(UserError, match="cannot download .* pass its eval_bundle folder with --bundle DIR"):
        cached_bundle()


def test_bf16_autocast_gives_results(model):
    result = CoreEvaluation(load_bundle(BUNDLE), GPT2Tokenizer(), ["mc_zeroshot"]).evaluate(
        model, autocast_dtype=torch.bfloat16)
    assert result.tasks["mc_zeroshot"].examples == 16


# ---- during training, and in the report -------------------------------------------------------------


def test_training_logs_core_and_val_bpb_and_the_report_draws_them(tmp_path, capsys):
    from gpt2lab.data.prepare import prepare
    from gpt2lab.eval.report import build_figure, load_run
    from gpt2lab.train.config import resolve_config
    from gpt2lab.train.trainer import Trainer

    data = tmp_path / "shakespeare"
    prepare("shakespeare", data, progress=False, log=lambda m: None)
    overrides = [
        f"data.path={data}", "model.vocab_size=50257", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "batch.micro_batch=2", "batch.seq_len=32", "max_steps=7", "eval.interval=3",
        "eval.batches=2", "eval.at_start=false", "eval.final_full=false", "eval.sample_interval=0", "log.interval=0",
        "log.progress_bar=false", "checkpoint.final=false", "eval.core_interval=3", "eval.core_max_per_task=8",
        f"eval.core_bundle={BUNDLE}",
    ]
    Trainer(resolve_config("shakespeare-char-cpu", overrides=overrides), tmp_path / "run", echo=lambda line: None).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    core = [r for r in records if "core" in r]
    assert [r["step"] for r in core] == [3, 6, 7]
    labels = [t.label for t in load_bundle(BUNDLE).tasks]
    for record in core:
        centered = [record[f"core_{label}"] for label in labels]
        assert record["core"] == pytest.approx(sum(centered) / len(centered))
        assert record["core_examples"] == 8 * len(labels) and record["tokens"] == record["step"] * 2 * 32
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6] and all(0 < r["val_bpb"] < 20 for r in val)

    lines = {line.get_gid(): line for ax in build_figure([load_run(tmp_path / "run")]).axes
             for line in ax.get_lines() if line.get_gid()}
    for key in ("core", "val_bpb"):
        for x in ("step", "tokens"):
            assert list(lines[f"run:{key}:{x}"].get_ydata()) == [r[key] for r in records if key in r]
    assert list(lines["baseline:core:GPT-2 1.5B"].get_ydata()) == [0.256525] * 2
    assert list(lines["baseline:core:GPT-2 124M"].get_ydata()) == [0.1139] * 2
    assert main(["report", str(tmp_path / "run")]) == 0
    card = capsys.readouterr().out
    assert f"| CORE | {core[-1]['core']:.4f} (step 7) | 0.1139 | 0.256525 |" in card
    assert f"| val bpb (bits per byte) | {val[-1]['val_bpb']:.4f} (step 6) | - | - |" in card


def test_training_refuses_core_for_a_character_model_before_it_starts(tmp_path):
    from gpt2lab.data.prepare import prepare
    from gpt2lab.train.config import resolve_config
    from gpt2lab.train.trainer import Trainer

    data = tmp_path / "chars"
    prepare("shakespeare-char", data, progress=False, log=lambda m: None)
    config = resolve_config("shakespeare-char-cpu", overrides=[
        f"data.path={data}", "max_steps=2", "eval.core_interval=1", f"eval.core_bundle={BUNDLE}"])
    with pytest.raises(UserError, match="character-level model"):
        Trainer(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_one_process_figures(tmp_path, model_folder):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab",
            "eval", "core", "--model", str(model_folder), "--bundle", str(BUNDLE), "--json", "--device", "cpu"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert record["ranks"] == 2
    assert record["core"] == pytest.approx(REFERENCE_RUNS[0]["core"], abs=1e-6)
    for label, task in REFERENCE_RUNS[0]["tasks"].items():
        assert record["tasks"][label]["examples"] == len(task["examples"])
        assert record["tasks"][label]["accuracy"] == pytest.approx(task["accuracy"], abs=1e-6)


def test_a_character_model_and_a_short_context_get_one_message_and_exit_2(capsys, tmp_path):
    char = save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=4)),
                           tmp_path / "char", tokenizer_spec={"type": "char", "chars": "abc "})
    short = save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=3)), tmp_path / "short",
                            tokenizer_spec="gpt2")
    for folder, message in ((char, "character-level model, which CORE does not support"),
                            (short, "do not fit this model's context of 3 tokens")):
        assert main(["eval", "core", "--model", str(folder), "--bundle", str(BUNDLE), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
