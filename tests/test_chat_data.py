"""`prepare chat`, the chat loader (packing, masks, resume) and SFT training on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chat_tasks import conversation, split_tasks, write_jsonl
from gpt2lab import GPT, GPTConfig, UserError
from gpt2lab.chat.template import ChatTemplate
from gpt2lab.cli import main
from gpt2lab.data import open_dataset
from gpt2lab.data.chat_loader import ChatLoader
from gpt2lab.data.chat_prepare import fit_to_context, prepare_chat
from gpt2lab.chat.records import hub_conversations
from gpt2lab.eval.loss import evaluate_loss
from gpt2lab.pretrained import load_model, save_pretrained
from gpt2lab.tokenizer import GPT2Tokenizer
from gpt2lab.train.config import resolve_config
from gpt2lab.train.trainer import Trainer

QUIET = dict(progress=False, log=lambda message: None)
TEMPLATE = ChatTemplate(GPT2Tokenizer())
CHAT_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50261, padded_vocab_size=50304)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    training, _ = split_tasks(400, 20, seed=1)
    return write_jsonl(tmp_path_factory.mktemp("chat") / "train.jsonl", training)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, chat_file) -> Path:
    folder = tmp_path_factory.mktemp("chat-data") / "data"
    prepare_chat([str(chat_file)], folder, val_every=10, **QUIET)
    return folder


def _render_all(path: Path) -> list[tuple[list[int], list[int]]]:
    return [TEMPLATE.render(json.loads(line)["messages"]) for line in path.read_text().splitlines()]


def test_prepare_chat_writes_each_conversation_with_its_mask(chat_file, chat_data):
    meta = json.loads((chat_data / "dataset.json").read_text())
    assert meta["kind"] == "chat" and meta["complete"] and meta["tokenizer"] == {"type": "gpt2", "chat": "gpt2lab-chat-v1"}
    assert meta["chat"]["conversations"] == {"train": 360, "val": 40}
    rendered = _render_all(chat_file)
    dataset = open_dataset(chat_data)
    val = [pair for i, pair in enumerate(rendered) if i % 10 == 9]
    train = [pair for i, pair in enumerate(rendered) if i % 10 != 9]
    for split, expected in (("train", train), ("val", val)):
        (shard,) = dataset.shards(split)
        assert dataset.tokens(shard).tolist() == [t for ids, _ in expected for t in ids]
        assert dataset.mask(shard).tolist() == [m for _, mask in expected for m in mask]
    assert dataset.verify() == []


def test_a_file_named_twice_is_read_once(tmp_path, chat_file, chat_data):
    """`a.jsonl a.jsonl`, or globs that overlap: each conversation once, none in both splits."""
    messages: list[str] = []
    glob = str(chat_file.parent / "*.jsonl")
    meta = prepare_chat([str(chat_file), glob, f"{chat_file.parent}/../{chat_file.parent.name}/{chat_file.name}"],
                        tmp_path / "twice", val_every=10, progress=False, log=messages.append)
    assert meta["chat"]["conversations"] == {"train": 360, "val": 40}
    assert [m for m in messages if m.startswith("note: each file is read once")]
    dataset, once = open_dataset(tmp_path / "twice"), open_dataset(chat_data)
    for split in ("train", "val"):
        assert dataset.tokens(dataset.shards(split)[0]).tolist() == once.tokens(once.shards(split)[0]).tolist()


def test_bad_records_are_named_by_line_and_skipped(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}), json.dumps({"messages": [{"role": "user", "content": 3}]}),
             json.dumps({"instruction": "Say yes", "input": "", "output": "yes"})]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n")
    messages: list[str] = []
    meta = prepare_chat([str(source)], tmp_path / "out", val_every=0, progress=False, log=messages.append)
    assert meta["chat"]["conversations"] == {"train": 2, "val": 0} and meta["chat"]["bad_records"] == 4
    problems = [m for m in messages if m.startswith("skipped")]
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5"]
    assert "no assistant turn" in problems[1] and "robot" in problems[2] and "content" in problems[3]
    # Nothing usable: a clear failure, exit 2.
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[1:5]) + "\n")
    assert main(["prepare", "chat", str(bad), "--out", str(tmp_path / "none"), "-q"]) == 2
    assert "nothing usable" in capsys.readouterr().err


def test_long_conversations_are_cut_on_a_turn_boundary_or_dropped():
    messages = [{"role": "user", "content": "a " * 10}, {"role": "assistant", "content": "b " * 10},
                {"role": "user", "content": "c " * 50}, {"role": "assistant", "content": "d"}]
    full, _ = TEMPLATE.render(messages)
    first, first_mask = TEMPLATE.render(messages[:2])
    assert fit_to_context(TEMPLATE, messages, len(full)) == (full, TEMPLATE.render(messages)[1], False)
    assert fit_to_context(TEMPLATE, messages, len(full) - 1) == (first, first_mask, True)
    assert fit_to_context(TEMPLATE, messages, len(first) - 1) is None


def test_an_interrupted_prepare_continues_to_the_same_files(tmp_path, chat_file, monkeypatch):
    whole = tmp_path / "whole"
    prepare_chat([str(chat_file)], whole, shard_tokens=2000, **QUIET)
    import gpt2lab.data.chat_prepare as chat_prepare

    real = chat_prepare.jsonl_conversations

    def dies_after_250(path):
        for number, item in enumerate(real(path)):
            if number == 250:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(chat_prepare, "jsonl_conversations", dies_after_250)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        prepare_chat([str(chat_file)], part, shard_tokens=2000, **QUIET)
    saved = json.loads((part / "dataset.json").read_text())
    assert not saved["complete"] and 0 < saved["progress"]["records"] <= 250
    monkeypatch.setattr(chat_prepare, "jsonl_conversations", real)
    prepare_chat([str(chat_file)], part, shard_tokens=2000, **QUIET)
    listing = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "dataset.json"}
    assert listing(part) == listing(whole) and len(listing(whole)) > 4
    strip = lambda meta: {k: v for k, v in meta.items() if k not in ("created", "command")}
    assert strip(json.loads((part / "dataset.json").read_text())) == strip(json.loads((whole / "dataset.json").read_text()))


def test_hub_datasets_of_messages_and_of_alpaca_records(tmp_path):
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"messages": conversation(random.Random(0)), "source": "x"}) + "\n")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3", "text": "..."}) + "\n")
    (got, problem), = hub_conversations("json", data_files=[str(messages)], streaming=False)
    assert problem is None and got == conversation(random.Random(0))
    (got, problem), = hub_conversations("json", data_files=[str(alpaca)])
    assert got == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    with pytest.raises(UserError, match="no column 'turns'"):
        list(hub_conversations("json", data_files=[str(messages)], field="turns", streaming=False))


def test_packed_rows_compute_each_conversation_as_if_alone(chat_data):
    loader = ChatLoader(chat_data, batch_size=2, seq_len=64, shuffle=False)
    x, y, positions, attn_mask = loader.next_batch()
    assert x.shape == y.shape == positions.shape == (2, 64) and attn_mask.shape == (2, 1, 64, 64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CHAT_MODEL)).eval()
    packed = model.logits(model.hidden_states(x, position_ids=positions, attn_mask=attn_mask))
    starts = (x[0] == TEMPLATE.start_token).nonzero().flatten().tolist()
    assert len(starts) >= 2  # a row holds several conversations
    for begin, end in zip(starts, starts[1:]):
        alone = model.logits(model.hidden_states(x[:1, begin:end]))
        torch.testing.assert_close(packed[0, begin:end], alone[0], atol=1e-5, rtol=0)
        assert positions[0, begin:end].tolist() == list(range(end - begin))
    # Targets are the next token where it is trained on, -1 elsewhere (prompts, padding, the
    # step into the next conversation).
    dataset = open_dataset(chat_data)
    (shard,) = dataset.shards("train")
    tokens, mask = dataset.tokens(shard), dataset.mask(shard)
    length = starts[-1]
    expected = np.where(mask[1 : length + 1], tokens[1 : length + 1].astype(np.int64), -1)
    assert y[0, :length].tolist() == expected.tolist()


def test_tokens_off_the_mask_contribute_no_gradient(chat_data):
    loader = ChatLoader(chat_data, batch_size=2, seq_len=64, shuffle=False)
    x, y, positions, attn_mask = loader.next_batch()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CHAT_MODEL))
    hidden = model.hidden_states(x, position_ids=positions, attn_mask=attn_mask)
    hidden.retain_grad()
    model.loss(hidden, y).backward()
    off = y == -1
    assert off.any() and (~off).any()
    assert hidden.grad[off].abs().max() == 0 and hidden.grad[~off].abs().max() > 0
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    # The same gradients as a cross-entropy over the on-mask positions alone.
    model.zero_grad()
    logits, _ = model(x, position_ids=positions, attn_mask=attn_mask)  # every row, as the loss sees them
    F.cross_entropy(logits[~off], y[~off]).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_the_loader_resumes_exactly_and_moves_between_world_sizes(chat_data):
    first = ChatLoader(chat_data, batch_size=2, seq_len=64, seed=3)
    for _ in range(first.steps_per_epoch + 2):  # into the second epoch
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    second = ChatLoader(chat_data, batch_size=2, seq_len=64, seed=3)
    second.load_state_dict(state)
    for _ in range(3):
        for a, b in zip(first.next_batch(), second.next_batch()):
            assert torch.equal(a, b)
    with pytest.raises(UserError, match="seed 3"):
        ChatLoader(chat_data, batch_size=2, seq_len=64, seed=4).load_state_dict(state)


def test_conversations_longer_than_a_row_are_cut_or_dropped(tmp_path):
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes " * 100}]
    two_turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "r " * 100}, {"role": "assistant", "content": "b"}]
    source = write_jsonl(tmp_path / "long.jsonl", [long_answer, two_turns, two_turns[:2]])
    prepare_chat([str(source)], tmp_path / "data", val_every=0, **QUIET)
    loader = ChatLoader(tmp_path / "data", batch_size=1, seq_len=32, shuffle=False)
    assert (loader.truncated, loader.dropped) == (1, 1)
    assert loader.lengths.tolist() == [len(TEMPLATE.render(two_turns[:2])[0])] * 2


def _sft_config(data, *extra):
    return resolve_config("sft", overrides=[
        f"data.path={data}", "init_from=scratch", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "batch.seq_len=64", "batch.micro_batch=4", "batch.total_tokens=0",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "eval.interval=5", "eval.batches=0", "system.precision=fp32",
        "system.device=cpu", "log.interval=0", "log.progress_bar=false", *extra,
    ])


def test_sft_trains_on_the_assistant_tokens_and_resumes_exactly(chat_data, tmp_path, capsys):
    config = _sft_config(chat_data, "max_epochs=1", "checkpoint.interval=10", "checkpoint.keep_last=5")
    run = tmp_path / "run"
    summary = Trainer(config, run).run()
    loader = ChatLoader(chat_data, batch_size=4, seq_len=64)
    assert summary["step"] == loader.steps_per_epoch  # max_epochs=1: one pass
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 2
    model = load_model(str(run))
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert json.loads((checkpoint / "gpt2lab.json").read_text())["tokenizer"]["chat"] == "gpt2lab-chat-v1"
    # `eval loss` of a chat folder scores the assistant's tokens, as the training's last evaluation.
    result = evaluate_loss(model, chat_data, batch_size=4, seq_len=64)
    assert result.loss == pytest.approx(summary["val_loss_full"], abs=1e-5)
    assert result.tokens == sum(int((ChatLoader(chat_data, "val", 4, 64, shuffle=False)._gather(np.arange(r, r + 1))[1] != -1).sum())
                                for r in range(ChatLoader(chat_data, "val", 4, 64, shuffle=False).total_windows))
    # ... and so does `eval chat` of the folder (rows of the model's 64 tokens, as in training).
    capsys.readouterr()
    assert main(["eval", "chat", "--model", str(run), "--data", str(chat_data), "--device", "cpu"]) == 0
    assert f"val loss {summary['val_loss_full']:.4f} over {result.tokens:,} assistant tokens" in capsys.readouterr().out
    # Resume from step 10 repeats the later losses bit for bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(run / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    Trainer(config, resumed, resume="auto").run()
    train = lambda folder: {r["step"]: r["train_loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r}
    later = {step: loss for step, loss in train(run).items() if step > 10}
    assert train(resumed) == later


def test_sft_from_a_gpt2_vocabulary_gives_the_chat_tokens_rows_of_their_own(chat_data, tmp_path):
    torch.manual_seed(0)
    base = GPT(GPTConfig(**{**CHAT_MODEL, "vocab_size": 50257}))
    with torch.no_grad():
        base.transformer.wte.weight[50257:] = 0  # what a padded GPT-2 checkpoint holds there
    folder = save_pretrained(base, tmp_path / "base")
    config = _sft_config(chat_data, f"init_from={folder}", "max_epochs=0", "max_steps=2", "eval.interval=0")
    trainer = Trainer(config, tmp_path / "run")
    rows = trainer.raw_model.transformer.wte.weight.detach()
    assert trainer.raw_model.config.vocab_size == 50261
    chat_rows = rows[50257:50261]
    assert torch.cdist(chat_rows, chat_rows).triu(1)[torch.ones(4, 4).triu(1).bool()].min() > 0.05
    assert float(chat_rows.norm(dim=1).mean()) == pytest.approx(rows[:50257].norm(dim=1).mean().item(), rel=0.3)
    trainer.run()


def test_a_token_stream_is_not_a_chat_dataset(tmp_path):
    from gpt2lab.data.prepare import prepare

    prepare("shakespeare-char", tmp_path / "char", **QUIET)
    with pytest.raises(UserError, match="prepare chat"):
        ChatLoader(tmp_path / "char")


def test_prepare_chat_options_are_checked(tmp_path, chat_file, capsys):
    for args, message in (
        (["--val-every", "1"], "--val-every"),
        (["--context", "2"], "--context"),
        (["--val-tokens", "10"], "does not apply to the chat source"),
    ):
        assert main(["prepare", "chat", str(chat_file), "--out", str(tmp_path / "x"), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["prepare", "shakespeare", "--out", str(tmp_path / "y"), "--context", "10"]) == 2
    assert "chat source only" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_on_two_processes_follows_one_with_twice_the_accumulation(chat_data, tmp_path):
    # Packed rows count different numbers of targets: the step must weigh each by its targets
    # (the mean over all of the step's targets) for two ranks to equal one, as here.
    import os
    import subprocess
    import sys

    settings = [
        f"data.path={chat_data}", "init_from=scratch", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "model.dropout=0.0", "batch.seq_len=64", "batch.micro_batch=4",
        "batch.total_tokens=512", "max_epochs=0", "max_steps=8", "optim.lr=3e-3", "eval.interval=4",
        "eval.batches=0", "system.precision=fp32", "log.interval=0", "log.progress_bar=false",
        "checkpoint.interval=0",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def run(out: Path, nproc: int) -> dict[str, dict[int, float]]:
        args = [sys.executable, "-m", "gpt2lab", "train", "--preset", "sft", "--out", str(out), "--nproc", str(nproc),
                "--set", "system.parallel=ddp", *[f"--set={s}" for s in settings]]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {key: {r["step"]: r[key] for r in records if key in r} for key in ("train_loss", "val_loss")}

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert sorted(two["train_loss"]) == list(range(1, 9)) and sorted(two["val_loss"]) == [0, 4, 8]
    for key in one:
        for step, loss in one[key].items():
            assert two[key][step] == pytest.approx(loss, abs=1e-5), (key, step)


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, '{"messages": ' + "9" * 5000 + "}"])
def test_json_the_parser_cannot_take_is_a_bad_record_everywhere(tmp_path, capsys, line):
    """Nested 100,000 deep, or an integer of 5,000 digits: Python's json raises RecursionError or
    ValueError; every reader of users' JSON names the line and goes on (or refuses the file)."""
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    source = tmp_path / "chats.jsonl"
    source.write_text(f"{good}\n{line}\n{good}\n")
    messages: list[str] = []
    meta = prepare_chat([str(source)], tmp_path / "out", val_every=0, progress=False, log=messages.append)
    assert meta["chat"]["conversations"] == {"train": 2, "val": 0} and meta["chat"]["bad_records"] == 1
    assert [m for m in messages if m.startswith(f"skipped {source}:2: invalid JSON")]
    history = tmp_path / "history.json"
    history.write_text(line)
    assert main(["chat", "--model", "gpt2", "--history", str(history), "--prompt", "x"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    text = tmp_path / "docs.jsonl"
    text.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    assert main(["prepare", "text", str(text), "--out", str(tmp_path / "text"), "-q"]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line + "\n")
    assert main(["eval", "chat", "--model", "gpt2", "--data", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "line 1 is not valid JSON" in err and "Traceback" not in err


def test_unclear_inputs_get_clear_messages(tmp_path, capsys, chat_file):
    """A folder or a device named as a file, a count of 0 conversations, a byte-order mark."""
    out = str(tmp_path / "out")
    assert main(["prepare", "chat", str(tmp_path), "--out", out]) == 2
    assert f"input {tmp_path} is a folder; name its files, or a glob such as {tmp_path / '*'}" in capsys.readouterr().err
    assert main(["prepare", "chat", "/dev/null", "--out", out]) == 2
    assert "input /dev/null is not a regular file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "chat", str(chat_file), "--out", out, "--max-conversations", "0"])
    assert "'0' must be a whole number of conversations, 1 or more" in capsys.readouterr().err
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + chat_file.read_bytes())
    meta = prepare_chat([str(with_bom)], tmp_path / "bom", val_every=0, **QUIET)
    assert meta["chat"]["bad_records"] == 0 and meta["chat"]["conversations"]["train"] == 400
