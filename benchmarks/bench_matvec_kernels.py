"""Eager decoding's linear layers on a CPU: gpt2lab's matrix-vector kernels
(`gpt2lab.kernels.matvec`) against PyTorch's F.linear, for float32, bfloat16 and float16 weights of
a 124M GPT-2, alternating round by round.

    python benchmarks/bench_matvec_kernels.py                         # medians of 7 rounds
    python benchmarks/bench_matvec_kernels.py --rows 1 4 16 32 --rounds 9 --json matvec.json

Two measurements per precision:
- products: every linear layer of the model (48 in the blocks and the 50,304-row head) applied
  once to `rows` input rows, as a decoding step of that batch applies them; the weights do not fit
  in the CPU's caches, so each layer streams from memory, as in a real step;
- decoding: `generate` on random 124M weights (the model `gpt2lab.kernels.accelerate` gives the
  CPU fast paths, as `GPT.from_pretrained` does), batch 1, an 8-token prompt, 128 greedy tokens,
  with the kernels and with them switched off (`matvec.MAX_ROWS = 0`), and whether the two chose
  the same tokens.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.inference.generate import generate
from gpt2lab.kernels import accelerate, matvec, tune_cpu_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50304) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of a GPT-2, in the order a step applies them."""
    block = [(3 * n_embd, n_embd), (n_embd, n_embd), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)]
    return block * n_layer + [(vocab, n_embd)]


def time_products(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], kernels: bool) -> float:
    linear = matvec.linear if kernels else F.linear
    start = time.perf_counter()
    for weight in weights:
        linear(inputs[weight.size(1)], weight)
    return time.perf_counter() - start


def products(dtype: torch.dtype, rows: int, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(shape, generator=generator) * 0.02).to(dtype) for shape in layer_shapes()]
    inputs = {k: torch.randn(rows, k, generator=generator).to(dtype) for k in (768, 3072)}
    times = {"kernels": [], "pytorch": []}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for name in times:
                seconds = time_products(weights, inputs, name == "kernels")
                if round_:  # the first round warms up
                    times[name].append(seconds)
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    result = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"rows": rows, "ms": result, "weights_mb": megabytes,
            "kernels_gb_per_s": megabytes / result["kernels"], "pytorch_gb_per_s": megabytes / result["pytorch"]}


def decoding(dtype: torch.dtype, rounds: int, new_tokens: int = 128) -> dict:
    torch.manual_seed(0)
    model = accelerate(GPT(GPTConfig()).to(dtype).eval())  # its linear layers call the kernels
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(1))
    rates, tokens = {"kernels": [], "pytorch": []}, {}
    max_rows = matvec.MAX_ROWS
    try:
        for round_ in range(rounds + 1):
            for name in rates:
                matvec.MAX_ROWS = max_rows if name == "kernels" else 0
                start = time.perf_counter()
                tokens[name] = generate(model, prompt, new_tokens, temperature=0.0)
                if round_:
                    rates[name].append(new_tokens / (time.perf_counter() - start))
    finally:
        matvec.MAX_ROWS = max_rows
    same = int((tokens["kernels"][0, 8:] == tokens["pytorch"][0, 8:]).sum())
    return {"tokens_per_s": {name: statistics.median(r) for name, r in rates.items()},
            "same_greedy_tokens": f"{same}/{new_tokens}"}


def main() -> None:
    # Set up as the CLI sets up its process before any verb: large CPU tensors (the weights that
    # decoding streams) in huge pages, as `gpt2lab sample` has them.
    tune_cpu_memory(reuse_freed=False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds after a warm-up one (default: 7)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="input rows of the products (default: 1)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--no-decoding", action="store_true", help="time the products only")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if matvec._library() is None:
        sys.exit("gpt2lab's matrix-vector kernels do not run here (see gpt2lab.kernels.matvec.takes)")
    if max(args.rows) > matvec.MAX_ROWS:
        print(f"note: an accelerated model's linear layers give the kernels at most {matvec.MAX_ROWS} rows; "
              "more are timed all the same")
    figures = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds, "dtypes": {}}
    for name in args.dtypes:
        entry = figures["dtypes"][name] = {"products": []}
        for rows in args.rows:
            result = products(DTYPES[name], rows, args.rounds)
            entry["products"].append(result)
            print(f"{name:9} products, {rows:3} row(s): kernels {result['ms']['kernels']:8.2f} ms "
                  f"({result['kernels_gb_per_s']:5.1f} GB/s), PyTorch {result['ms']['pytorch']:8.2f} ms "
                  f"({result['pytorch_gb_per_s']:5.1f} GB/s)", flush=True)
        if not args.no_decoding:
            result = entry["decoding"] = decoding(DTYPES[name], args.rounds)
            rate = result["tokens_per_s"]
            print(f"{name:9} decoding: kernels {rate['kernels']:6.1f} tok/s, PyTorch {rate['pytorch']:6.1f} tok/s "
                  f"({rate['kernels'] / rate['pytorch']:.2f}x), same greedy tokens {result['same_greedy_tokens']}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
