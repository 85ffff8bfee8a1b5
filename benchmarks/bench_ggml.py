"""Greedy decoding of a 124M GPT-2, gpt2lab against ggml's examples/gpt-2 (the C implementation a
user would pick to run GPT-2 on a CPU), with the same random weights, at each matching precision,
alternating round by round.

    python benchmarks/bench_ggml.py                             # clones and builds ggml in ../ggml-bench
    python benchmarks/bench_ggml.py --ggml-src /path/to/ggml    # a local clone (or mirror) instead
    python benchmarks/bench_ggml.py --rounds 7 --json out.json
    python benchmarks/bench_ggml.py --compile                   # also gpt2lab's compiled decoding

ggml is built beside the project (in --work, by default `ggml-bench` next to the repository), never
inside it and never in CI. Each round runs every pair once, in turn: ggml's `gpt-2-ctx` on a model
file this script writes (f32, f16, and q8_0 / q4_0 made by ggml's own `gpt-2-quantize`), and
gpt2lab's `GPT.generate` on the same weights (float32, bfloat16, int8, int4), each model with the
CPU fast paths (`gpt2lab.kernels.accelerate`), as gpt2lab loads a model onto a CPU. Both read the
same 8-token prompt and make 128 greedy tokens (one prefill and 127 single-token steps); tokens/s
is 128 over the time of that, ggml's from its own `predict` and `sample` timers, gpt2lab's from the
wall clock around `generate` (with --compile, also `generate(..., compile=True)`, compiled in the
warm-up round). Greedy tokens are compared with gpt2lab float32's. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.kernels import accelerate, tune_cpu_memory
from gpt2lab.quantize import quantize
from gpt2lab.tokenizer import GPT2Tokenizer

GGML_URL = "https://github.com/ggml-org/ggml"
GGML_FILE_MAGIC = 0x67676D6C  # "ggml"
# (gpt2lab precision, ggml type): the pairs compared.
PAIRS = [("float32", "f32"), ("bfloat16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")]
PROMPT = "The meaning of life is that we are"  # 8 GPT-2 tokens


def build_ggml(source: str, work: Path) -> Path:
    """ggml's gpt-2 binaries, cloned from `source` and built (Release, native) in work/ggml once."""
    repo = work / "ggml"
    binaries = repo / "build" / "bin"
    if (binaries / "gpt-2-ctx").exists() and (binaries / "gpt-2-quantize").exists():
        return binaries
    work.mkdir(parents=True, exist_ok=True)
    if not repo.exists():
        subprocess.run(["git", "clone", "--quiet", source, str(repo)], check=True)
    subprocess.run(
        ["cmake", "-S", str(repo), "-B", str(repo / "build"), "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DGGML_BUILD_EXAMPLES=ON"],
        check=True, stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["cmake", "--build", str(repo / "build"), "-j", str(os.cpu_count() or 1),
         "--target", "gpt-2-ctx", "gpt-2-quantize"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return binaries


def ggml_tensors(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """The model's weights under ggml's gpt-2 names, in gpt2lab's (out, in) layout, which is ggml's
    row-major (ne0 = in) layout of the same matrices."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = [("model/ln_f/g", sd["transformer.ln_f.weight"]), ("model/ln_f/b", sd["transformer.ln_f.bias"]),
           ("model/wte", sd["transformer.wte.weight"]), ("model/wpe", sd["transformer.wpe.weight"])]
    names = {"ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias", "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
             "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
             "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
             "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
             "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias"}
    for i in range(model.config.n_layer):
        out += [(f"model/h{i}/{ggml}", sd[f"transformer.h.{i}.{ours}"]) for ggml, ours in names.items()]
    return out


def write_ggml_model(model: GPT, tokenizer: GPT2Tokenizer, path: Path, half: bool) -> None:
    """ggml's gpt-2 model file: magic, hyper-parameters, the vocabulary as raw bytes, then each
    tensor (dims, name length, type, shape innermost first, name, data). With `half`, the 2-D
    matrices but the position table are float16, as the f16 models of ggml's converters."""
    c = model.config
    with open(path, "wb") as f:
        f.write(struct.pack("<I", GGML_FILE_MAGIC))
        f.write(struct.pack("<6i", c.vocab_size, c.block_size, c.n_embd, c.n_head, c.n_layer, int(half)))
        f.write(struct.pack("<i", c.vocab_size))
        for token_id in range(c.vocab_size):
            piece = tokenizer.token_bytes(token_id)
            f.write(struct.pack("<I", len(piece)) + piece)
        for name, tensor in ggml_tensors(model):
            as_half = half and tensor.dim() == 2 and name != "model/wpe"
            data = tensor.numpy().astype(np.float16 if as_half else np.float32)
            f.write(struct.pack("<3i", tensor.dim(), len(name), int(as_half)))
            f.write(struct.pack(f"<{tensor.dim()}i", *reversed(tensor.shape)))
            f.write(name.encode())
            f.write(data.tobytes())


def ggml_files(model: GPT, tokenizer: GPT2Tokenizer, binaries: Path, folder: Path) -> dict[str, Path]:
    files = {"f32": folder / "gpt2-f32.bin", "f16": folder / "gpt2-f16.bin"}
    write_ggml_model(model, tokenizer, files["f32"], half=False)
    write_ggml_model(model, tokenizer, files["f16"], half=True)
    for kind in ("q8_0", "q4_0"):
        files[kind] = folder / f"gpt2-{kind}.bin"
        subprocess.run([str(binaries / "gpt-2-quantize"), str(files["f16"]), str(files[kind]), kind],
                       check=True, stdout=subprocess.DEVNULL)
    return files


def run_ggml(binary: Path, model_file: Path, threads: int, new_tokens: int) -> tuple[float, list[int] | None, bytes]:
    """(seconds for the prefill and steps, the prompt ids ggml used, the generated bytes)."""
    result = subprocess.run(
        [str(binary), "-m", str(model_file), "-t", str(threads), "-p", PROMPT, "-n", str(new_tokens),
         "--top_k", "1", "-s", "1"],
        check=True, capture_output=True,
    )
    out = result.stdout
    predict = float(re.search(rb"predict time =\s*([\d.]+) ms", out).group(1))
    sample = float(re.search(rb"sample time =\s*([\d.]+) ms", out).group(1))
    ids = re.search(rb"number of tokens in prompt = (\d+), first 8 tokens: ([\d ]*)\n", out)
    prompt_ids = [int(t) for t in ids.group(2).split()] if int(ids.group(1)) <= 8 else None
    text = out[ids.end():].split(b"\n\nmain: mem per token")[0].lstrip(b"\n")
    return (predict + sample) / 1000, prompt_ids, text


def gpt2lab_models(model: GPT) -> dict[str, GPT]:
    """The float32 `model` (accelerated in place) at each precision, as gpt2lab loads a model onto a
    CPU (`pretrained.load_for_inference`: cast or quantized, then `accelerate`)."""
    models = {
        "float32": model,
        "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
        "int8": quantize(model, "int8"),
        "int4": quantize(model, "int4"),
    }
    return {name: accelerate(ours) for name, ours in models.items()}


def main() -> None:
    # Set up as the CLI sets up its process before any verb: large CPU tensors (the weights that
    # decoding streams) in huge pages, as `gpt2lab sample` has them.
    tune_cpu_memory(reuse_freed=False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_work = Path(__file__).resolve().parents[2] / "ggml-bench"
    parser.add_argument("--ggml-src", default=GGML_URL, help="git URL or path of ggml (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=default_work, help="where ggml is built (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--pairs", default=",".join(ours for ours, _ in PAIRS), help="which of %(default)s")
    parser.add_argument("--compile", action="store_true", help="also time gpt2lab's compiled decoding")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if Path(args.work).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        sys.exit("--work must lie outside the project: ggml is built beside it, not in it")
    torch.set_num_threads(args.threads)
    binaries = build_ggml(args.ggml_src, args.work)
    wanted = args.pairs.split(",")
    pairs = [(ours, theirs) for ours, theirs in PAIRS if ours in wanted]

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257)).eval().requires_grad_(False)
    tokenizer = GPT2Tokenizer()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        files = ggml_files(model, tokenizer, binaries, Path(tmp))
        _, prompt_ids, _ = run_ggml(binaries / "gpt-2-ctx", files["f32"], args.threads, 4)
        prompt = torch.tensor([prompt_ids or tokenizer.encode(PROMPT)])
        ours = gpt2lab_models(model)

        def run_ours(name, compiled=False):
            start = time.perf_counter()
            out = ours[name].generate(prompt, args.new_tokens, temperature=0, compile=compiled)
            return time.perf_counter() - start, out[0, prompt.size(1):].tolist()

        modes = [("", False), (" compiled", True)] if args.compile else [("", False)]

        reference = run_ours("float32")[1]
        reference_text = b"".join(tokenizer.token_bytes(t) for t in prompt[0].tolist() + reference)
        times = {f"ggml {theirs}": [] for _, theirs in pairs}
        times.update({f"gpt2lab {ours_name}{mode}": [] for ours_name, _ in pairs for mode, _ in modes})
        agree = {}
        for ours_name, theirs in pairs:  # warm-up (and compiling), and the tokens
            for mode, compiled in modes:
                tokens = run_ours(ours_name, compiled)[1]
                agree[f"gpt2lab {ours_name}{mode}"] = sum(a == b for a, b in zip(tokens, reference))
            text = run_ggml(binaries / "gpt-2-ctx", files[theirs], args.threads, args.new_tokens)[2]
            agree[f"ggml {theirs}"] = "same text as gpt2lab float32" if text == reference_text else "different text"
        for _ in range(args.rounds):
            for ours_name, theirs in pairs:
                for mode, compiled in modes:
                    times[f"gpt2lab {ours_name}{mode}"].append(run_ours(ours_name, compiled)[0])
                times[f"ggml {theirs}"].append(run_ggml(binaries / "gpt-2-ctx", files[theirs], args.threads,
                                                        args.new_tokens)[0])
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "prompt_tokens": prompt.size(1),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
    }
    for ours_name, theirs in pairs:
        for mode, _ in modes:
            ours_rate = args.new_tokens / statistics.median(times[f"gpt2lab {ours_name}{mode}"])
            theirs_rate = args.new_tokens / statistics.median(times[f"ggml {theirs}"])
            results[f"{ours_name}{mode} vs {theirs}"] = {
                "gpt2lab_tokens_per_s": round(ours_rate, 1),
                "ggml_tokens_per_s": round(theirs_rate, 1),
                "ratio": round(ours_rate / theirs_rate, 3),
                "gpt2lab_greedy_tokens_agreeing_with_float32": agree[f"gpt2lab {ours_name}{mode}"],
                "ggml_output": agree[f"ggml {theirs}"],
            }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
