"""Multiple-choice chat scoring speed (ARC, MMLU in `eval chatcore`): gpt2lab's batched scoring
against one example per forward pass.

A 124M-shaped GPT-2 with the chat vocabulary and random weights answers the same synthetic
MMLU-shaped questions (question and choices of MMLU-like lengths, four lettered choices, in the
chat format), two ways, alternately in one run; the medians are reported as examples/s:

- one example per forward pass, as nanochat's run_categorical_eval with batch size 1: the
  whole prompt through the model, logits at every position, the last one's letters compared;
- gpt2lab batched (`eval.chatcore.categorical_answers`, --batch-size questions per forward
  pass, right-padded, the head at each question's last position alone).

Both are checked to give the same answers before timing.

    python benchmarks/bench_chatcore.py                          # 128 questions, batch 32, 3 rounds
    python benchmarks/bench_chatcore.py --examples 256 --batch-size 64 --json out.json
    python benchmarks/bench_chatcore.py --smoke                  # a tiny model, for the test suite
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.chat.session import Chat
from gpt2lab.chat.tasks import MMLU_LETTERS, Example, multiple_choice_prompt
from gpt2lab.eval.chatcore import categorical_answers
from gpt2lab.kernels import accelerate, tune_cpu_memory
from gpt2lab.tokenizer import GPT2Tokenizer

WORDS = ("the of a to in is which what energy cell plant water light force mass reaction acid temperature law "
         "court president economy market price theory number function equation value system process").split()
TOKENIZER = GPT2Tokenizer(chat="gpt2lab-chat-v1")


def synthetic_questions(count: int, seed: int = 0) -> list[Example]:
    """MMLU-like: a question of 10 to 60 words, four choices of 1 to 12 words."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    examples = []
    for k in range(count):
        prompt = multiple_choice_prompt(words(10, 60) + "?", MMLU_LETTERS, [words(1, 12) for _ in MMLU_LETTERS])
        examples.append(Example("mmlu", str(k), "", prompt, rng.choice(MMLU_LETTERS), MMLU_LETTERS))
    return examples


def build_model(smoke: bool) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=256) if smoke else {}
    return accelerate(GPT(GPTConfig.from_preset("gpt2", vocab_size=50261, padded_vocab_size=50304, **shape))).eval()


@torch.no_grad()
def one_per_forward(model, chat: Chat, examples: list[Example]) -> list[str]:
    letters = [TOKENIZER.encode(letter)[0] for letter in MMLU_LETTERS]
    answers = []
    for example in examples:
        ids = chat.template.render_prompt([{"role": "user", "content": example.prompt}])
        logits, _ = model(torch.tensor([ids]))
        answers.append(MMLU_LETTERS[int(logits[0, -1, letters].argmax())])
    return answers


def batched(model, chat: Chat, examples: list[Example], batch_size: int) -> list[str]:
    return categorical_answers(model, chat.template, examples, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few questions: checks, not timings")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    tune_cpu_memory()
    model = build_model(args.smoke)
    chat = Chat(model, TOKENIZER)
    examples = synthetic_questions(8 if args.smoke else args.examples)
    if one_per_forward(model, chat, examples) != batched(model, chat, examples, args.batch_size):
        raise SystemExit("the two ways disagree; nothing timed")
    ways = {"one example per forward": lambda: one_per_forward(model, chat, examples),
            f"gpt2lab batched ({args.batch_size})": lambda: batched(model, chat, examples, args.batch_size)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(1 if args.smoke else args.rounds):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    results = {name: len(examples) / statistics.median(seconds) for name, seconds in times.items()}
    for name, rate in results.items():
        print(f"{name:<32} {rate:8.1f} examples/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"examples_per_s": results, "examples": len(examples), "batch_size": args.batch_size,
                       "smoke": args.smoke, "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads()}, handle, indent=1)


if __name__ == "__main__":
    main()
