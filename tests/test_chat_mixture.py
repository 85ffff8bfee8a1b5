"""`prepare chat` mixtures: sources read a number of times each, shuffled together as nanochat's SFT
mixes them, the benchmarks' training splits among them."""

from __future__ import annotations

import collections
import json

import numpy as np

from chatcore_data import GSM8K_ROWS, GSM8K_SCHEMA, animal_split, write_jsonl, write_mmlu_training, write_parquet
from gpt2lab.chat.template import ChatTemplate
from gpt2lab.cli import main
from gpt2lab.data.chat_mixture import MixSource, mixture_order, split_weight
from gpt2lab.data.dataset import open_dataset
from gpt2lab.tokenizer import GPT2Tokenizer

TEMPLATE = ChatTemplate(GPT2Tokenizer(chat="gpt2lab-chat-v1"))


def conversation(k: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {k}"}, {"role": "assistant", "content": f"answer {k}"}]}


def test_each_source_comes_as_many_times_as_its_epochs_all_mixed():
    sources = [MixSource("a", 3, 10, None), MixSource("b", 1, 7, None), MixSource("c", 0.5, 8, None)]
    order = mixture_order(sources)
    counts = collections.Counter(order)
    assert all(counts[(0, row)] == 3 for row in range(10)) and all(counts[(1, row)] == 1 for row in range(7))
    half = sorted(row for source, row in counts if source == 2)
    assert len(half) == 4 and all(counts[(2, row)] == 1 for row in half)
    assert order == mixture_order(sources)  # seeded: a rerun resumes the same stream
    assert [source for source, _ in order] != sorted(source for source, _ in order)  # mixed, not one after another
    assert split_weight("task:mmlu@3") == ("task:mmlu", 3.0) and split_weight("data/x.jsonl") == ("data/x.jsonl", 1.0)


def test_a_mixture_of_a_file_and_two_training_splits_prepares_their_conversations(tmp_path, capsys):
    train, _ = animal_split(6, 0, seed=1)
    write_mmlu_training(tmp_path, train)
    write_parquet(tmp_path / "openai/gsm8k/main", GSM8K_ROWS, GSM8K_SCHEMA, split="train")
    chats = write_jsonl(tmp_path / "chats.jsonl", [conversation(k) for k in range(5)])
    args = ["prepare", "chat", "task:mmlu@2", "task:gsm8k@0.34", str(chats), "--data-dir", str(tmp_path),
            "--out", str(tmp_path / "mix"), "--val-every", "0", "--context", "256", "-q"]
    assert main(args) == 0
    dataset = open_dataset(tmp_path / "mix")
    (shard,) = dataset.shards("train")
    tokens = dataset.tokens(shard).tolist()
    starts = [i for i, t in enumerate(tokens) if t == TEMPLATE.start_token] + [len(tokens)]
    texts = [TEMPLATE.tokenizer.decode([t for t in tokens[a:b] if t < TEMPLATE.start_token]) for a, b in zip(starts, starts[1:])]
    assert len(texts) == 6 * 2 + 1 + 5
    assert sum("Which one is an animal?" in t and t.endswith("Respond only with the letter of the correct answer."
                                                              + "ABCD"[train[0][2]]) for t in texts) >= 2
    gsm8k = [t for t in texts if "####" in t]
    assert len(gsm8k) == 1 and "<<" not in gsm8k[0]  # the calculator notes are left out
    assert sum(t.startswith("question") for t in texts) == 5
    record = json.loads((tmp_path / "mix" / "dataset.json").read_text())["recipe"]
    assert record["mixture"] == [["task:mmlu@2", 6], ["task:gsm8k@0.34", 3], [str(chats), 5]]
    assert main(args) == 0  # done already: nothing to do
    assert main(["prepare", "chat", "task:humaneval", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'humaneval'; the tasks with a training split are" in capsys.readouterr().err
    assert main(["prepare", "chat", "task:mmlu@0", "--out", str(tmp_path / "y")]) == 2
    assert "give more than 0" in capsys.readouterr().err
    assert np.all(dataset.mask(shard)[np.array(starts[:-1])] == 0)
