"""Core benchmarks: greedy decoding and forward+backward of a 124M-shaped GPT-2, gpt2lab against
transformers' GPT2LMHeadModel with the same random weights, measured alternately in one run.

    python benchmarks/bench_core.py                 # everything
    python benchmarks/bench_core.py --only decode   # or: train
    python benchmarks/bench_core.py --repeats 5 --json out.json

Run it on a quiet machine: nothing else using the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time

import torch

from gpt2lab import GPT
from gpt2lab.kernels import accelerate, tune_cpu_memory
from gpt2lab.quantize import quantize


def build_pair(n_layer: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = GPT.from_pretrained(folder).eval()
    return hf, ours


def time_call(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_decode(hf, ours, repeats: int, new_tokens: int) -> dict:
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(1))
    candidates = {
        "transformers float32": lambda: hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=50256,
        )[0, prompt.size(1) :].tolist(),
        "gpt2lab float32": lambda m=ours: m.generate(prompt, new_tokens, temperature=0)[0, prompt.size(1) :].tolist(),
    }
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    candidates["gpt2lab bfloat16 weights"] = lambda: bf16.generate(prompt, new_tokens, temperature=0)[
        0, prompt.size(1) :
    ].tolist()
    quantized = {precision: accelerate(quantize(ours, precision)) for precision in ("int8", "int4")}
    for precision, model in quantized.items():
        candidates[f"gpt2lab {precision} weights"] = lambda m=model: m.generate(
            prompt, new_tokens, temperature=0
        )[0, prompt.size(1) :].tolist()

    outputs = {name: fn() for name, fn in candidates.items()}  # warm-up, and the tokens
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].extend(time_call(fn, 1))
    reference = outputs["gpt2lab float32"]
    with torch.no_grad():
        ref_logits, _ = ours(prompt)
        logit_diff = {
            "gpt2lab bfloat16 weights": (bf16(prompt)[0].float() - ref_logits).abs().max().item(),
            "gpt2lab int8 weights": (quantized["int8"](prompt)[0].float() - ref_logits).abs().max().item(),
        }
    base = statistics.median(times["transformers float32"])
    result = {}
    for name in candidates:
        median = statistics.median(times[name])
        result[name] = {
            "median_s": median,
            "tokens_per_s": new_tokens / median,
            "vs_transformers_float32": base / median,
            "greedy_tokens_agreeing_with_float32": sum(a == b for a, b in zip(outputs[name], reference)),
            "max_logit_diff_vs_float32": logit_diff.get(name, 0.0),
        }
    return result


def bench_train(hf, ours, repeats: int, batch: int, seq: int, with_optimizer: bool = False) -> dict:
    """Forward+backward (and, with_optimizer, a fused AdamW step for both models) per batch."""
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 50257, (batch, seq), generator=g)
    targets = torch.randint(0, 50257, (batch, seq), generator=g)
    hf.train()
    ours.train()
    optimizers = {}
    if with_optimizer:
        optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for m in (hf, ours)}

    def finish(model):
        if with_optimizer:
            optimizers[id(model)].step()
        model.zero_grad(set_to_none=True)

    def step_hf(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = hf(idx, labels=None).logits
            loss = torch.nn.functional.cross_entropy(loss.float().view(-1, loss.size(-1)), targets.view(-1))
        loss.backward()
        finish(hf)

    def step_ours(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, loss = ours(idx, targets)
        loss.backward()
        finish(ours)

    candidates = {
        "transformers float32": lambda: step_hf(torch.float32),
        "gpt2lab float32": lambda: step_ours(torch.float32),
        "transformers bf16 autocast": lambda: step_hf(torch.bfloat16),
        "gpt2lab bf16 autocast": lambda: step_ours(torch.bfloat16),
    }
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].extend(time_call(fn, 1))
    base = statistics.median(times["transformers float32"])
    return {
        name: {
            "median_s": statistics.median(t),
            "tokens_per_s": batch * seq / statistics.median(t),
            "vs_transformers_float32": base / statistics.median(t),
        }
        for name, t in times.items()
    }


def quality_on_trained(run: str, data: str) -> dict:
    """Validation loss over the whole split of a trained model, in float32, bf16, int8 and int4 weights."""
    from gpt2lab.data import TokenLoader

    model = GPT.from_pretrained(run).eval()
    variants = {"float32": model, "bfloat16 weights": copy.deepcopy(model).to(torch.bfloat16),
                "int8 weights": accelerate(quantize(model, "int8")), "int4 weights": accelerate(quantize(model, "int4"))}
    loader = TokenLoader(data, split="val", batch_size=16, seq_len=model.config.block_size, shuffle=False)
    result = {}
    for name, variant in variants.items():
        total = count = 0
        with torch.no_grad():
            for x, y in loader.iter_batches():
                logits, _ = variant(x)
                total += torch.nn.functional.cross_entropy(
                    logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum"
                ).item()
                count += y.numel()
        result[name] = total / count
    return result


def main() -> None:
    # Set up as the CLI sets up its process before any verb: large CPU tensors (the weights that
    # decoding streams) in huge pages, as `gpt2lab sample` has them.
    tune_cpu_memory(reuse_freed=False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["decode", "train", "train_step", "quality"])
    parser.add_argument("--trained", help="quality: a trained run folder (e.g. of shakespeare-char-cpu)")
    parser.add_argument("--data", help="quality: its prepared dataset folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    hf, ours = build_pair(args.layers)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers_attention": hf.config._attn_implementation,
    }
    if args.only in (None, "decode"):
        results["decode"] = bench_decode(hf, ours, args.repeats, args.new_tokens)
    if args.only in (None, "train"):
        results["train"] = bench_train(hf, ours, args.repeats, 4, 256)
    if args.only in (None, "train_step"):
        results["train_step"] = bench_train(hf, ours, args.repeats, 4, 256, with_optimizer=True)
    if args.only == "quality" or (args.only is None and args.trained):
        results["quality"] = quality_on_trained(args.trained, args.data)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
