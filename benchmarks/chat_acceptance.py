"""Issue 12's acceptance, measured: SFT of a tiny model from random weights on the synthetic
instruction set of tests/chat_tasks.py, exact match on held-out prompts through `gpt2lab eval
chat`, `gpt2lab chat --prompt` and the openai client against `gpt2lab serve` (streamed and not),
the untrained model's score, and LoRA on the same task.

    python benchmarks/chat_acceptance.py --out /tmp/chat-acceptance

Every step runs the CLI as a user would; the figures go to OUT/results.json and are printed.
Run it on a quiet machine: the training's wall time is one of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from chat_tasks import split_tasks, write_jsonl  # noqa: E402

MODEL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=128", "model.block_size=128"]
SFT = [
    "init_from=scratch", *MODEL, "batch.seq_len=128", "batch.micro_batch=16", "batch.total_tokens=0",
    "max_epochs=0", "optim.lr=3e-3", "optim.min_lr=3e-4", "schedule.warmup_steps=20", "eval.interval=250",
    "eval.batches=0", "checkpoint.interval=0", "system.device=cpu", "log.interval=100", "log.progress_bar=false",
]


def gpt2lab(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2lab", *map(str, args)], check=True, text=True,
                          capture_output=True, **kwargs)


def timed_train(out: Path, settings: list[str]) -> dict:
    started = time.perf_counter()
    args = ["train", "--preset", "sft", "--out", out]
    for setting in settings:
        args += ["--set", setting]
    result = gpt2lab(*args)
    seconds = time.perf_counter() - started
    (out / "train.log").write_text(result.stdout + result.stderr)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    lora = [line for line in result.stdout.splitlines() if line.startswith("LoRA rank")]
    return {"wall_s": round(seconds, 1), "steps": max(r["step"] for r in records), "final_val_loss": vals[-1],
            "median_tokens_per_s": round(statistics.median(speeds)), "lora": lora[0] if lora else None}


def eval_chat(model: Path, held_out: Path, out: Path) -> float:
    gpt2lab("eval", "chat", "--model", model, "--data", held_out, "--max-new-tokens", 16, "--json", out,
            "--device", "cpu")
    return json.loads(out.read_text())["chat_exact_match"]


def chat_cli(model: Path, tests: list[list[dict]], folder: Path) -> float:
    right = 0
    for index, messages in enumerate(tests):
        history = folder / f"history_{index}.json"
        history.write_text(json.dumps(messages[:-2]))
        reply = gpt2lab("chat", "--model", model, "--prompt", messages[-2]["content"], "--history", history,
                        "--temperature", 0, "--max-new-tokens", 16, "--device", "cpu")
        right += reply.stdout.strip() == messages[-1]["content"].strip()
    return right / len(tests)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openai_client(model: Path, tests: list[list[dict]]) -> dict:
    from openai import OpenAI

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", "--model", str(model), "--port", str(port),
                               "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(120):
            try:
                client.models.list()
                break
            except Exception:  # not listening yet
                time.sleep(1)
        name = client.models.list().data[0].id
        plain = streamed = 0
        for messages in tests:
            prompt, expected = messages[:-1], messages[-1]["content"].strip()
            reply = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=16)
            plain += reply.choices[0].message.content.strip() == expected
            chunks = client.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=16,
                                                    stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            streamed += text.strip() == expected
        return {"exact_match": plain / len(tests), "exact_match_streamed": streamed / len(tests)}
    finally:
        server.terminate()
        server.wait(30)


def untrained_model(folder: Path) -> Path:
    import torch

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.pretrained import save_pretrained

    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=50261, padded_vocab_size=50304))
    return save_pretrained(model, folder, tokenizer_spec={"type": "gpt2", "chat": "gpt2lab-chat-v1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=20_000, help="training conversations")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--cli-examples", type=int, default=50, help="held-out prompts sent through `gpt2lab chat`")
    parser.add_argument("--steps", type=int, default=1200, help="SFT steps")
    parser.add_argument("--lora-steps", type=int, default=1200)
    parser.add_argument("--lora", default="finetune.lora_rank=16", help="LoRA settings, comma-separated --set items")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sft", "lora", "cli", "openai"])
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    training, tests = split_tasks(args.train, args.held_out, seed=0)
    write_jsonl(out / "train.jsonl", training)
    held_out = write_jsonl(out / "held_out.jsonl", tests, with_answers=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not (out / "data" / "dataset.json").is_file():
        gpt2lab("prepare", "chat", out / "train.jsonl", "--out", out / "data", "-q")
    results["untrained_exact_match"] = eval_chat(untrained_model(out / "untrained"), held_out, out / "untrained.json")
    common = [f"data.path={out / 'data'}", f"system.precision={args.precision}"]
    if "sft" not in args.skip:
        results["sft"] = timed_train(out / "sft", [*SFT, *common, f"max_steps={args.steps}"])
        results["sft"]["exact_match"] = eval_chat(out / "sft", held_out, out / "sft_eval.json")
    if "cli" not in args.skip:
        results["sft"]["chat_cli_exact_match"] = chat_cli(out / "sft", tests[: args.cli_examples], out)
        results["sft"]["chat_cli_examples"] = args.cli_examples
    if "openai" not in args.skip:
        results["sft"]["openai_client"] = openai_client(out / "sft", tests)
    if "lora" not in args.skip:
        lora = [*SFT, *common, f"max_steps={args.lora_steps}", *args.lora.split(",")]
        results["lora"] = timed_train(out / "lora", lora)
        results["lora"]["exact_match"] = eval_chat(out / "lora", held_out, out / "lora_eval.json")
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
