"""Tiny Shakespeare by characters, by GPT-2's BPE and by a 4,096-token BPE trained on its training
split: the same model (`shakespeare-char-cpu`: 4 layers, 128 wide, a context of 64 tokens) trained
on the same number of bytes of text, compared by bits per byte over the whole validation split
(loss per token cannot be compared across tokenizers; bits per byte can). docs/recipes.md gives
the commands this script runs, and the results.

    python benchmarks/tokenizer_bpb.py --input tinyshakespeare.txt --out runs/tok-bpb
    python benchmarks/tokenizer_bpb.py --char-steps 20 --out /tmp/smoke   # a smoke run: checks the script

The character run takes the preset's steps (--char-steps, default 2000: 2000 x 12 x 64 =
1,536,000 bytes); each BPE run takes the steps that read as many bytes of its training split,
from that split's bytes per token. Every command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

PRESET = "shakespeare-char-cpu"
STEP_TOKENS = 12 * 64  # the preset's micro_batch x seq_len, one micro-batch a step
TRAIN_FRACTION = 0.9  # the shakespeare sources' split


def gpt2lab(*args: str) -> float:
    """Run `gpt2lab ARGS` as a user would; return its wall time."""
    print("$ gpt2lab " + shlex.join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gpt2lab", *args], check=True)
    return time.perf_counter() - start


def prepare_all(text_file: Path, train_chars: int, data: Path) -> dict[str, Path]:
    folders = {"characters": data / "char", "GPT-2 BPE": data / "gpt2", "trained BPE 4,096": data / "bpe-4096"}
    tokenizer = data / "tok-4096"
    for name, folder in folders.items():
        if (folder / "dataset.json").is_file():
            continue  # prepared by an earlier run (prepare would say so too)
        if name == "characters":
            gpt2lab("prepare", "shakespeare-char", "--input", str(text_file), "--out", str(folder), "-q")
        elif name == "GPT-2 BPE":
            gpt2lab("prepare", "shakespeare", "--input", str(text_file), "--out", str(folder), "-q")
        else:
            if not (tokenizer / "gpt2lab-tokenizer.json").is_file():
                gpt2lab("tokenizer", "train", str(text_file), "--max-chars", str(train_chars), "--vocab-size", "4096",
                        "--out", str(tokenizer), "-q")
            gpt2lab("prepare", "shakespeare", "--input", str(text_file), "--tokenizer", str(tokenizer),
                    "--out", str(folder), "-q")
    return folders


def final_validation(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_bpb" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="Tiny Shakespeare (default: the copy that ships with gpt2lab)")
    parser.add_argument("--out", type=Path, default=Path("runs/tok-bpb"), help="data/ and runs/ go here")
    parser.add_argument("--char-steps", type=int, default=2000, help="steps of the character run (the preset's 2000)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text_file = args.input
    if text_file is None:
        from gpt2lab.data.sources import packaged_shakespeare

        text_file = args.out / "tinyshakespeare.txt"
        text_file.write_text(packaged_shakespeare(), encoding="utf-8")
    text = text_file.read_text(encoding="utf-8")
    train_text = text[: int(len(text) * TRAIN_FRACTION)]
    budget = args.char_steps * STEP_TOKENS * len(train_text.encode("utf-8")) // len(train_text)
    rows = []
    for name, data in prepare_all(text_file, len(train_text), args.out / "data").items():
        meta = json.loads((data / "dataset.json").read_text())
        bytes_per_token = len(train_text.encode("utf-8")) / meta["splits"]["train"]["tokens"]
        steps = max(1, round(budget / bytes_per_token / STEP_TOKENS))
        run = args.out / "runs" / data.name
        seconds = gpt2lab("train", "--preset", PRESET, "--set", f"data.path={data}", "--set", f"max_steps={steps}",
                          "--out", str(run))
        final = final_validation(run)
        rows.append({"tokenizer": name, "vocab_size": meta["vocab_size"], "train_bytes_per_token": bytes_per_token,
                     "steps": steps, "train_bytes": round(steps * STEP_TOKENS * bytes_per_token),
                     "val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "wall_s": seconds})
    print("\n| tokenizer | vocabulary | train bytes/token | steps | bytes trained on | val loss | val bpb | wall time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['train_bytes_per_token']:.3f} | {r['steps']:,} | "
              f"{r['train_bytes']:,} | {r['val_loss']:.4f} | **{r['val_bpb']:.4f}** | {r['wall_s']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
