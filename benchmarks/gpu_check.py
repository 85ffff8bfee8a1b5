"""One prepared GPU check: every figure the project owes a GPU, from one command on one lent GPU
(H100/H200 class) in under 8 minutes, written to one JSON file after each piece (a piece that
fails records its error and the rest still run).

    bash benchmarks/gpu_check.sh                        # on the GPU machine: $OUT/gpu_check.json
    GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh      # every piece at a tiny size on the CPU

The pieces, in order:
  tests     the CUDA-marked tests (pytest -m cuda over the files that carry the mark)
  preset    gpt2-124m (B=64, T=1024, 0.5M tokens a step, bf16, compile) for 50 steps on synthetic
            shards: tokens/s, MFU (target >= 50%, llm.c's level), peak memory, compile time
  decode    124M greedy decoding tokens/s at batch 1 and 64 (random weights, bf16), and at
            batch 1 compiled (`generate(compile=True)`, with its compile time)
  hellaswag 10,042 HellaSwag-shaped examples scored (target: under 60 s); synthetic examples
            of the real lengths unless GPU_CHECK_HELLASWAG names the validation .jsonl
  serve     `gpt2lab serve` under 50 concurrent streaming requests of 64 tokens (124M)
  core      CORE (`gpt2lab eval core`): with GPU_CHECK_CORE_BUNDLE (the unpacked eval bundle)
            and GPU_CHECK_CORE_MODEL (OpenAI's GPT-2 124M, e.g. `hf download
            openai-community/gpt2`), the full CORE score against nanochat's published 0.1139
            (GPU_CHECK_CORE_MAX caps the items per task); otherwise examples/s of a random 124M
            over benchmarks/bench_core_metric.py's synthetic bundle, 50 items per task
  ladder    `gpt2lab bench`'s speed ladder at B=16, T=1024, with MFU

Weights are random (speed does not depend on them); GPU_CHECK_MODEL may name a model folder for
decode, hellaswag and serve instead. A piece that would start past GPU_CHECK_BUDGET_S seconds
(default 480) is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "480"))
ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)
TINY_SETTINGS = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]


def device() -> torch.device:
    return torch.device("cpu" if SMOKE else "cuda")


def sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib() -> dict:
    if device().type == "cuda":
        return {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def model_124m():
    """GPT-2 (124M) with random weights, or GPU_CHECK_MODEL's, in bf16 on the GPU (float32 on a CPU)."""
    from gpt2lab import GPT, GPTConfig, load_model

    torch.manual_seed(0)
    if os.environ.get("GPU_CHECK_MODEL"):
        model = load_model(os.environ["GPU_CHECK_MODEL"])
    else:
        model = GPT(GPTConfig(**TINY) if SMOKE else GPTConfig.from_preset("gpt2"))
    model = model.to(device()).eval()
    return model.to(torch.bfloat16) if device().type == "cuda" else model


# ---- the pieces ------------------------------------------------------------------------------------


def piece_tests() -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    result = {"files": files, "rc": proc.returncode, "counts": counts, "summary": summary.strip("= ")}
    if proc.returncode not in (0, 5):
        result["output_tail"] = output[-4000:]
    return result


def piece_preset() -> dict:
    from gpt2lab.config import apply_overrides
    from gpt2lab.train.bench import synthetic_dataset
    from gpt2lab.train.config import resolve_config
    from gpt2lab.train.trainer import Trainer

    steps = 5 if SMOKE else 50
    overrides = [f"max_steps={steps}", "eval.interval=0", "eval.at_start=false", "eval.final_full=false",
                 "eval.sample_interval=0", "eval.hellaswag_interval=0", "checkpoint.final=false",
                 "checkpoint.interval=0", "log.progress_bar=false", "log.interval=10",
                 f"system.device={device().type}", "schedule.warmup_steps=10"]
    if SMOKE:
        overrides += TINY_SETTINGS + ["batch.total_tokens=0", "batch.micro_batch=2", "batch.seq_len=32"]
    config = resolve_config("gpt2-124m", overrides=overrides)
    with tempfile.TemporaryDirectory() as scratch:
        tokens = config.tokens_per_step() * (steps + 1) + 1
        data = synthetic_dataset(Path(scratch) / "data", tokens, config.system.seed)
        config = apply_overrides(config, [f"data.path={data}"])
        if device().type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(config, Path(scratch) / "run", echo=lambda line: print(f"  [preset] {line}", flush=True))
        started = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
    step_ms = [r["step_ms"] for r in records if "step_ms" in r]
    steady = statistics.median(step_ms[len(step_ms) // 5:])  # past compile and the first steps
    tokens_per_s = trainer.tokens_per_step / (steady / 1e3)
    mfu = trainer.flops_per_token * tokens_per_s / trainer.peak_flops if trainer.peak_flops else None
    batch = config.batch
    return {
        "micro_batch": batch.micro_batch, "seq_len": batch.seq_len, "tokens_per_step": trainer.tokens_per_step,
        "grad_accum": trainer.grad_accum, "steps": len(step_ms), "median_step_ms": steady,
        "tokens_per_s": tokens_per_s, "mfu": mfu, "mfu_target": 0.5,
        "mfu_target_met": None if mfu is None else mfu >= 0.5,
        "first_step_ms": step_ms[0], "compile_s_estimate": (step_ms[0] - steady) / 1e3, "wall_s": wall,
        "first_loss": records[0].get("train_loss"), "last_loss": [r for r in records if "train_loss" in r][-1]["train_loss"],
        **peak_memory_gib(),
    }


def piece_decode() -> dict:
    model = model_124m()
    new_tokens = 8 if SMOKE else 128
    result = {"new_tokens": new_tokens, "prompt_tokens": 16, "dtype": str(next(model.parameters()).dtype)}
    # The compiled step costs a compile of its own; the CPU smoke run leaves it to its tests.
    runs = [(1, False), (64, False)] + ([] if SMOKE else [(1, True)])
    for batch, compiled in runs:
        name = f"batch_{batch}_compiled" if compiled else f"batch_{batch}"
        try:
            result.update(_decode_rate(model, name, batch, new_tokens, compiled))
        except Exception as error:  # noqa: BLE001 - compiled decoding has not run on CUDA before: keep the eager figures
            if not compiled:
                raise
            result[f"{name}_error"] = f"{type(error).__name__}: {error}"[:2000]
    return result


def _decode_rate(model, name: str, batch: int, new_tokens: int, compiled: bool) -> dict:
    from gpt2lab.inference.generate import generate

    figures = {}
    prompts = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device())
    sync()
    started = time.perf_counter()
    # Warm-up: kernels chosen, caches allocated; compiled, the whole timed length once.
    generate(model, prompts, new_tokens if compiled else 4, temperature=0, compile=compiled)
    sync()
    if compiled:
        figures[f"{name}_compile_s"] = time.perf_counter() - started
    times = []
    for _ in range(3):
        sync()
        started = time.perf_counter()
        generate(model, prompts, new_tokens, temperature=0, compile=compiled)
        sync()
        times.append(time.perf_counter() - started)
    figures[f"{name}_tokens_per_s"] = batch * new_tokens / statistics.median(times)
    return figures


def hellaswag_examples():
    from gpt2lab.eval.hellaswag import load_examples

    if os.environ.get("GPU_CHECK_HELLASWAG"):
        return load_examples("val", os.environ["GPU_CHECK_HELLASWAG"]), os.environ["GPU_CHECK_HELLASWAG"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_hellaswag import synthetic_examples

    return synthetic_examples(16 if SMOKE else 10_042), "synthetic, HellaSwag's lengths"


def piece_hellaswag() -> dict:
    from gpt2lab.eval.hellaswag import HellaSwag
    from gpt2lab.tokenizer import GPT2Tokenizer

    examples, source = hellaswag_examples()
    started = time.perf_counter()
    task = HellaSwag(examples, GPT2Tokenizer())
    result = {"examples": len(examples), "data": source, "tokenize_s": time.perf_counter() - started}
    model = model_124m()
    HellaSwag(examples[:8], GPT2Tokenizer()).evaluate(model, batch_size=16)  # warm-up
    for batch_size in (32, 128):  # the CLI's default, then a larger one where time allows
        if batch_size != 32 and result["batch_32"]["seconds"] > 30 and not SMOKE:
            break
        sync()
        started = time.perf_counter()
        task.evaluate(model, batch_size=batch_size)
        sync()
        seconds = time.perf_counter() - started
        result[f"batch_{batch_size}"] = {"seconds": seconds, "examples_per_s": len(examples) / seconds}
    result["target_s"] = 60
    result["target_met"] = min(v["seconds"] for k, v in result.items() if k.startswith("batch_")) < 60
    return result


def piece_core() -> dict:
    from gpt2lab.eval.core import GPT2_CORE, CoreEvaluation
    from gpt2lab.eval.core_bundle import load_bundle
    from gpt2lab.pretrained import load_for_inference
    from gpt2lab.tokenizer import GPT2Tokenizer

    bundle_dir, model_dir = os.environ.get("GPU_CHECK_CORE_BUNDLE"), os.environ.get("GPU_CHECK_CORE_MODEL")
    real = bool(bundle_dir and model_dir) and not SMOKE
    limit = int(os.environ.get("GPU_CHECK_CORE_MAX", "0")) or None if real else 50
    if real:
        _, model, _, _ = load_for_inference(model_dir, "cuda", "auto")
        bundle = load_bundle(bundle_dir)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_core_metric import write_bundle

        model = model_124m()
        folder = ROOT / "tests" / "fixtures" / "core_bundle" if SMOKE else write_bundle(
            Path(tempfile.mkdtemp(prefix="core-bundle-")), items=60)
        bundle, limit = load_bundle(folder), None if SMOKE else limit
    started = time.perf_counter()
    evaluation = CoreEvaluation(bundle, GPT2Tokenizer(), max_per_task=limit)
    figures = {"bundle": str(bundle.folder), "max_per_task": limit, "tokenize_s": time.perf_counter() - started}
    sync()
    started = time.perf_counter()
    result = evaluation.evaluate(model, batch_size=64)
    sync()
    seconds = time.perf_counter() - started
    figures.update(examples=result.examples, seconds=seconds, examples_per_s=result.examples / seconds,
                   core=result.core, tasks={label: t.centered for label, t in result.tasks.items()})
    if real:
        figures.update(model=model_dir, nanochat_gpt2_124m=GPT2_CORE["GPT-2 124M"],
                       difference=result.core - GPT2_CORE["GPT-2 124M"])
    return figures


def piece_serve() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_serve import load, start_server

    requests, max_tokens = (4, 8) if SMOKE else (50, 64)
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.environ.get("GPU_CHECK_MODEL") or model_124m().float().cpu().save_pretrained(Path(scratch) / "model")
        process, url = start_server(folder, 64, Path(scratch) / "server.log", device=device().type)
        try:
            load(url, 2, 8, run=-1)  # warm-up
            runs = [load(url, requests, max_tokens, run) for run in range(2)]
        finally:
            process.terminate()
            process.wait(timeout=30)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"requests": requests, "max_tokens": max_tokens, "max_concurrency": 64, "runs": runs,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs), "p50_s": best["p50_s"],
            "errors": sum(r["errors"] for r in runs), "incomplete": sum(r["incomplete"] for r in runs)}


def piece_ladder() -> dict:
    from gpt2lab.train.bench import run_ladder

    args = argparse.Namespace(micro_batch=2 if SMOKE else 16, seq_len=32 if SMOKE else 1024,
                              steps=2 if SMOKE else 3, warmup=1, device=device().type, rungs=None,
                              overrides=TINY_SETTINGS if SMOKE else [], profile=None)
    rows = run_ladder(args)
    return {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "rows": rows}


PIECES = {"tests": piece_tests, "preset": piece_preset, "decode": piece_decode, "hellaswag": piece_hellaswag,
          "core": piece_core, "serve": piece_serve, "ladder": piece_ladder}


# ---- the run ---------------------------------------------------------------------------------------


def write_json(path: Path, results: dict) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file to write (default gpu_check.json)")
    parser.add_argument("--only", nargs="+", choices=list(PIECES), help="run only these pieces")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        print("no CUDA GPU here: run it on the GPU machine, or GPU_CHECK_SMOKE=1 for the CPU smoke run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "smoke": SMOKE, "device": torch.cuda.get_device_name() if not SMOKE else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "budget_s": BUDGET_S, "pieces": {},
    }
    started = time.perf_counter()
    results["total_s"] = 0.0
    for name, piece in PIECES.items():
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - started
        if elapsed > BUDGET_S:
            results["pieces"][name] = {"skipped": f"out of time: {elapsed:.0f} s used of {BUDGET_S:.0f}"}
            continue
        print(f"== {name} ({elapsed:.0f} s in)", flush=True)
        piece_started = time.perf_counter()
        try:
            figures = piece()
        except Exception as error:  # noqa: BLE001 - one piece's failure is recorded, the rest still run
            figures = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
        figures["seconds"] = time.perf_counter() - piece_started
        results["pieces"][name] = figures
        results["total_s"] = time.perf_counter() - started
        write_json(out, results)
        print(f"   {name}: {json.dumps({k: v for k, v in figures.items() if k not in ('traceback', 'runs', 'rows', 'output_tail')})}",
              flush=True)
        if device().type == "cuda":
            torch.cuda.empty_cache()
    write_json(out, results)
    failed = [name for name, figures in results["pieces"].items()
              if "error" in figures or figures.get("rc", 0) not in (0, 5)]
    print(f"wrote {out} in {results['total_s']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
