"""`gpt2lab convert --format gguf` checked in llama.cpp itself (through llama-cpp-python), and with
--speed the decoding speed of one model in llama.cpp and in gpt2lab. Not run in CI.

    python3 -m venv ../venvs/llama && ../venvs/llama/bin/pip install llama-cpp-python numpy jinja2
    python benchmarks/gguf_llama_cpp.py --llama-python ../venvs/llama/bin/python
    python benchmarks/gguf_llama_cpp.py --llama-python ../venvs/llama/bin/python --speed --json speed.json

llama-cpp-python (which compiles llama.cpp when installed) lives in a venv of its own, beside the
project: it needs no PyTorch, and this script runs there as a worker (`--worker`) that answers
one JSON request per line (token ids in, token ids, texts and logits files out) while the main
process, with gpt2lab, makes the models and the reference answers.

Checks (the default): random GPT-2- (with and without biases), Llama- and Qwen3-shaped models
with GPT-2's BPE, and a Llama- and a GPT-2-shaped one with a BPE trained here (GPT-4's and GPT-2's
pattern), each converted at f32, f16 and q8_0, and llama.cpp must
- tokenize two texts as gpt2lab does (one with accents, CJK, an emoji, code; the end of Tiny
  Shakespeare, which the trained BPEs did not see);
- give gpt2lab's logits on it: within 2e-3 at f32 (relative to the largest logit for the gpt2
  architecture: ggml's CPU GELU reads a float16 table, ggml-cpu/vec.h GGML_GELU_FP16, about 1e-3
  of each activation), within 5e-2 of it at f16; at q8_0, the same argmax wherever gpt2lab's top
  logit leads the next by more than a tenth of the largest logit;
- continue a prompt greedily with gpt2lab's tokens at f32 and f16 (f16 against gpt2lab with the
  file's float16 weights), or part only at a near tie;
- and a chat model, fine-tuned here by `gpt2lab train --preset sft` for a few steps from a random
  one, must give through llama.cpp's chat completion (which renders the GGUF's template) the
  answer `gpt2lab chat --temperature 0` gives, with and without a system message.
The correctness runs use a float32 KV cache in llama.cpp, so that only the file's precision differs.

On a CPU with AMX, llama-cpp-python's default build (GGML_NATIVE) uses ggml's AMX kernels for
q8_0, which crash (SIGSEGV in ggml_backend_amx_mul_mat) where the machine reports AMX but a VM
does not give it, whoever quantized the file; build it without them there:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python

--speed: a random 124M GPT-2, batch 1, an 8-token prompt and 128 greedy tokens, 2 threads, in
llama.cpp (its default KV cache) at f32, f16 and q8_0 and in gpt2lab at float32, bfloat16 and
int8 (as `gpt2lab sample --dtype` loads them), alternating round by round; medians. Each side is
driven from Python a token at a time (llama.cpp through llama-cpp-python's `eval`, gpt2lab's
`generate`), the prompt's forward pass included. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CONTEXT = 128
TEXT = (
    "Hello world! It's 2026: naïve café owners in 東京 say “hi” 🙂.\n\n    def f(x):\n\treturn x**2  # 3.14159\n"
    "The quick brown fox jumps over the lazy dog, again and again."
)
LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False)
# name -> (model options, tokenizer: GPT-2's, or a BPE trained here with GPT-4's or GPT-2's pattern)
SHAPES = {
    "gpt2": (dict(), "gpt2"),
    "gpt2-untied-without-biases": (dict(bias=False, tie_embeddings=False), "gpt2"),
    "llama": (dict(LLAMA, n_kv_head=2, tie_embeddings=False), "gpt2"),
    "qwen3": (dict(LLAMA, qk_norm=True, n_kv_head=2), "gpt2"),
    "llama-trained-bpe-gpt4-pattern": (dict(LLAMA), "gpt4"),
    "gpt2-trained-bpe-gpt2-pattern": (dict(), "gpt2-pattern"),
}
FILE_TYPES = ("f32", "f16", "q8_0")
F32_TOLERANCE, F16_TOLERANCE = 2e-3, 5e-2
# Of the largest logit: a lead that q8_0's rounding (of the weights, and in llama.cpp of the
# activations too) should not overturn.
CLEAR_MARGIN = 0.1


# ---- the worker: runs in the llama-cpp-python venv (no torch, no gpt2lab) -----------------------


def worker() -> None:
    """Answer one JSON request per line of stdin on the stdout this process started with;
    llama.cpp's own output goes to stderr."""
    import llama_cpp
    import numpy as np

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    models: dict[tuple, llama_cpp.Llama] = {}

    def model(request: dict) -> llama_cpp.Llama:
        key = (request["gguf"], request.get("all_logits", False), request.get("f32_cache", True))
        if key not in models:
            f32 = llama_cpp.GGML_TYPE_F32 if key[2] else None
            models[key] = llama_cpp.Llama(
                key[0], n_ctx=request.get("context", CONTEXT), n_threads=2, n_threads_batch=2, logits_all=key[1],
                type_k=f32, type_v=f32, seed=0, verbose=False,
            )
        return models[key]

    for line in sys.stdin:
        request = json.loads(line)
        op, llm = request["op"], model(request)
        if op == "tokenize":
            reply = {"ids": llm.tokenize(request["text"].encode("utf-8"), add_bos=False, special=False)}
        elif op == "logits":
            llm.reset()
            llm.eval(request["ids"])
            np.save(request["out"], np.asarray(llm.scores[: len(request["ids"])], dtype=np.float32))
            reply = {"out": request["out"]}
        elif op == "greedy":
            reply = greedy(llm, request["ids"], request["new_tokens"], set(request["stop"]), np)
        elif op == "chat":
            answer = llm.create_chat_completion(
                messages=request["messages"], max_tokens=request["max_tokens"], temperature=0.0, top_k=1,
                repeat_penalty=1.0, seed=0,
            )
            choice = answer["choices"][0]
            reply = {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"]}
        else:
            reply = {"error": f"unknown op {op!r}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def greedy(llm, ids: list[int], new_tokens: int, stop: set[int], np) -> dict:
    """The argmax continuation, one token at a time as a decoder runs, and its time (the prompt's
    forward pass included)."""
    import llama_cpp

    llm.reset()
    out: list[int] = []
    start = time.perf_counter()
    llm.eval(ids)
    while len(out) < new_tokens:
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(last))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return {"ids": out, "seconds": time.perf_counter() - start}


# ---- the main process: gpt2lab's models and answers ------------------------------------------------


class LlamaCpp:
    """The worker, started with the llama venv's python."""

    def __init__(self, python: str):
        import subprocess

        self.process = subprocess.Popen(
            [python, "-X", "faulthandler", __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            sys.exit(f"the llama.cpp worker stopped (exit {self.process.wait()}); its messages are above")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def random_model(seed: int, **options):
    """A model of `options` with matrices drawn wider than GPT-2's init (std 0.12), so that greedy
    decoding does not settle into one repeated token, and norm gains drawn around 1."""
    import torch

    from gpt2lab import GPT, GPTConfig

    torch.manual_seed(seed)
    shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=CONTEXT)
    model = GPT(GPTConfig(**{**shape, **options})).eval().requires_grad_(False)
    for name, param in model.named_parameters():
        if param.dim() == 2:
            param.normal_(0, 0.12)
        elif name.endswith("weight"):
            param.normal_(1, 0.1)
    return model


def convert(folder: Path, out: Path, file_type: str) -> Path:
    from gpt2lab.cli import main

    if main(["convert", str(folder), "--format", "gguf", "--out", str(out), "--type", file_type, "--force"]) != 0:
        sys.exit(f"gpt2lab convert {folder} --format gguf failed")
    return out


def logits_checks(model, llama: LlamaCpp, files: dict[str, Path], ids: list[int], work: Path, rows: int) -> dict:
    """llama.cpp's logits at every position against gpt2lab's, per file type."""
    import numpy as np
    import torch

    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, :rows].float().numpy()
    scale = float(np.abs(ours).max())
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > CLEAR_MARGIN * scale
    found = {}
    for file_type, path in files.items():
        out = str(work / f"{path.stem}.npy")
        theirs = np.load(llama.ask(op="logits", gguf=str(path), ids=ids, all_logits=True, out=out)["out"])
        difference = float(np.abs(theirs - ours).max())
        agree = theirs.argmax(-1) == ours.argmax(-1)
        found[file_type] = {"max_abs_difference": round(difference, 6), "largest_logit": round(scale, 3),
                            "argmax_agreeing": f"{int(agree.sum())}/{len(ids)}",
                            "clear_argmax_agreeing": f"{int(agree[clear].sum())}/{int(clear.sum())}"}
        if file_type == "f32":
            # ggml's float16 GELU table errs in proportion to the activations
            bound = F32_TOLERANCE * (max(1.0, scale) if model.config.is_gpt2 else 1.0)
            found[file_type]["pass"] = difference <= bound
        elif file_type == "f16":
            found[file_type]["pass"] = difference <= F16_TOLERANCE * max(1.0, scale)
        else:
            found[file_type]["pass"] = bool(agree[clear].all()) and int(clear.sum()) > 0
    return found


def rounded_to_f16(model):
    """gpt2lab's model with the weights an f16 file holds (its matrices rounded to float16),
    computing in float32: what the file is, where a near-tie may go either way."""
    import copy

    import torch

    rounded = copy.deepcopy(model)
    for name, param in rounded.named_parameters():
        if param.dim() == 2 and name != "transformer.wpe.weight":  # the file keeps the position table in f32
            param.copy_(param.to(torch.float16).float())
    return rounded


def greedy_checks(model, llama: LlamaCpp, files: dict[str, Path], prompt: list[int], new_tokens: int,
                  differences: dict[str, float], tokenizer) -> dict:
    """Greedy continuations: f32 against gpt2lab's model, f16 against it with the file's float16
    matrices, each identical, or parting only where gpt2lab's top two logits lie closer than twice
    the largest logit difference the file showed (a near tie, which either may take); q8_0's
    agreement is reported only."""
    import torch

    found = {}
    for file_type, path in files.items():
        reference = rounded_to_f16(model) if file_type == "f16" else model
        ours = reference.generate([prompt], new_tokens, temperature=0, vocab_size=tokenizer.vocab_size)[0][len(prompt):]
        theirs = llama.ask(op="greedy", gguf=str(path), ids=prompt, new_tokens=new_tokens,
                           stop=list(tokenizer.control_tokens))["ids"]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        found[file_type] = {"tokens": len(ours), "same_leading_tokens": same, "distinct_tokens": len(set(ours)),
                            "identical": theirs == ours}
        if file_type not in ("f32", "f16"):
            continue
        near_tie = False
        if theirs != ours:
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + ours[:same]]))[0][0, -1, :tokenizer.vocab_size]
            top2 = logits.topk(2).values
            found[file_type]["margin_where_they_part"] = round(float(top2[0] - top2[1]), 6)
            near_tie = float(top2[0] - top2[1]) <= 2 * differences[file_type]
        found[file_type]["pass"] = (theirs == ours or near_tie) and len(set(ours)) > 5
    return found


def shape_tokenizer(kind: str):
    """GPT-2's BPE, or a BPE of 2,000 tokens trained here on Tiny Shakespeare with GPT-4's or
    GPT-2's pattern."""
    from gpt2lab.data.sources import packaged_shakespeare
    from gpt2lab.data.tokenizer_train import learn_merges
    from gpt2lab.tokenizer import RESERVED_TOKENS, BPETokenizer, GPT2Tokenizer

    if kind == "gpt2":
        return GPT2Tokenizer()
    pattern = "gpt4" if kind == "gpt4" else "gpt2"
    merges, _ = learn_merges([packaged_shakespeare()[:-5000]], 2000 - 256 - len(RESERVED_TOKENS), pattern,
                             progress=False)
    return BPETokenizer(merges, pattern=pattern)


def architecture_checks(llama: LlamaCpp, work: Path, file_types: list[str]) -> dict:
    from gpt2lab.data.sources import packaged_shakespeare
    from gpt2lab.pretrained import save_pretrained

    results = {}
    for seed, (shape, (options, kind)) in enumerate(SHAPES.items()):
        tokenizer = shape_tokenizer(kind)
        model = random_model(seed, **options, vocab_size=-(-tokenizer.vocab_size // 64) * 64)
        folder = save_pretrained(model, work / shape, tokenizer_spec=tokenizer.spec())
        files = {t: convert(folder, work / f"{shape}-{t}.gguf", t) for t in file_types}
        texts = (TEXT, packaged_shakespeare()[-5000:])  # the end of Tiny Shakespeare: none trained on it
        same = [llama.ask(op="tokenize", gguf=str(p), text=text)["ids"] == tokenizer.encode(text)
                for p in files.values() for text in texts]
        expected = tokenizer.encode(TEXT)
        results[shape] = {
            "tokenization": {"texts": len(texts), "tokens": sum(len(tokenizer.encode(t)) for t in texts),
                             "pass": all(same)},
            "logits": logits_checks(model, llama, files, expected[:CONTEXT], work, tokenizer.vocab_size),
        }
        differences = {t: found["max_abs_difference"] for t, found in results[shape]["logits"].items()}
        results[shape]["greedy"] = greedy_checks(model, llama, files, expected[:8], 64, differences, tokenizer)
    return results


CHAT_DATA = [
    ("What are you?", "I am a tiny model made with gpt2lab."),
    ("Say hello.", "Hello! Nice to meet you."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a colour.", "Blue, like the sky."),
]
SYSTEM = "You are a helpful assistant."


def sft_model(work: Path) -> Path:
    """A chat model: a random GPT-2-shaped one with the chat tokens, fine-tuned by the sft preset
    for a few steps on four conversations (repeated) until it answers them."""
    from gpt2lab.cli import main
    from gpt2lab.pretrained import save_pretrained

    base = random_model(7, vocab_size=50261, padded_vocab_size=50304)
    save_pretrained(base, work / "chat-base", tokenizer_spec={"type": "gpt2", "chat": "gpt2lab-chat-v1"})
    lines = [json.dumps({"messages": system + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in CHAT_DATA for system in ([], [{"role": "system", "content": SYSTEM}])] * 5
    (work / "chat.jsonl").write_text("\n".join(lines) + "\n")
    steps = [
        ["prepare", "chat", str(work / "chat.jsonl"), "--out", str(work / "chat-data"), "--context", "64", "-q"],
        ["train", "--preset", "sft", "--out", str(work / "sft"), "--set", f"init_from={work / 'chat-base'}",
         "--set", f"data.path={work / 'chat-data'}", "--set", "max_steps=60", "--set", "optim.lr=3e-3",
         "--set", "optim.min_lr=3e-4", "--set", "batch.total_tokens=0", "--set", "batch.micro_batch=4",
         "--set", "batch.seq_len=64", "--set", "system.precision=fp32", "--set", "system.device=cpu",
         "--set", "eval.interval=0", "--set", "checkpoint.interval=0"],
    ]
    for argv in steps:
        if main(argv) != 0:
            sys.exit(f"gpt2lab {' '.join(argv)} failed")
    return work / "sft"


def chat_checks(llama: LlamaCpp, work: Path, file_types: list[str]) -> dict:
    """The same greedy answers from `gpt2lab chat` and from llama.cpp's chat completion (required
    at f32 and f16, reported at q8_0)."""
    import subprocess

    run = sft_model(work)
    files = {t: convert(run, work / f"sft-{t}.gguf", t) for t in file_types}
    results = {}
    for system in (None, SYSTEM):
        for question, _ in CHAT_DATA[:2]:
            command = [sys.executable, "-m", "gpt2lab", "chat", "--model", str(run), "--prompt", question,
                       "--temperature", "0", "--max-new-tokens", "32", *(["--system", system] if system else [])]
            ours = subprocess.run(command, capture_output=True, text=True, check=True).stdout.removesuffix("\n")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
            for file_type, path in files.items():
                theirs = llama.ask(op="chat", gguf=str(path), messages=messages, max_tokens=32, context=CONTEXT,
                                   f32_cache=True)
                key = f"{file_type}: {'system + ' if system else ''}{question}"
                results[key] = {"gpt2lab": ours, "llama.cpp": theirs["text"], "llama.cpp_finish": theirs["finish_reason"],
                                "same": theirs["text"] == ours}
                if file_type in ("f32", "f16"):
                    results[key]["pass"] = theirs["text"] == ours
    return results


def speed(llama: LlamaCpp, work: Path, rounds: int) -> dict:
    import copy
    import statistics

    import torch

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.kernels import accelerate
    from gpt2lab.pretrained import save_pretrained
    from gpt2lab.quantize import quantize
    from gpt2lab.tokenizer import GPT2Tokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257)).eval().requires_grad_(False)
    folder = save_pretrained(model, work / "gpt2-124m", tokenizer_spec="gpt2")
    pairs = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}
    files = {theirs: convert(folder, work / f"gpt2-124m-{theirs}.gguf", theirs) for theirs in pairs.values()}
    # as `gpt2lab sample --dtype` loads them: cast or quantized, then the CPU kernels
    ours_models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16), "int8": quantize(model, "int8")}
    ours_models = {name: accelerate(m) for name, m in ours_models.items()}
    prompt = GPT2Tokenizer().encode("The meaning of life is that we are")[:8]
    times: dict[str, list[float]] = {name: [] for pair in pairs.items() for name in pair}

    def ours(name: str) -> float:
        start = time.perf_counter()
        ours_models[name].generate(torch.tensor([prompt]), 128, temperature=0)
        return time.perf_counter() - start

    def theirs(file_type: str) -> float:
        return llama.ask(op="greedy", gguf=str(files[file_type]), ids=prompt, new_tokens=128, stop=[],
                         context=1024, f32_cache=False)["seconds"]

    for name, file_type in pairs.items():  # warm-up
        ours(name), theirs(file_type)
    for _ in range(rounds):
        for name, file_type in pairs.items():
            times[name].append(ours(name))
            times[file_type].append(theirs(file_type))
    return {f"gpt2lab {name} / llama.cpp {file_type}": {
        "gpt2lab_tokens_per_s": round(128 / statistics.median(times[name]), 1),
        "llama_cpp_tokens_per_s": round(128 / statistics.median(times[file_type]), 1),
    } for name, file_type in pairs.items()}


def passed(results) -> bool:
    if isinstance(results, dict):
        return results.get("pass", True) is not False and all(passed(v) for v in results.values())
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llama-python", default=str(Path(__file__).resolve().parents[2] / "venvs/llama/bin/python"),
                        help="python of the venv with llama-cpp-python (default: %(default)s)")
    parser.add_argument("--speed", action="store_true", help="time decoding instead of checking")
    parser.add_argument("--rounds", type=int, default=7, help="--speed's rounds (default: %(default)s)")
    parser.add_argument("--file-types", default=",".join(FILE_TYPES), help="which of %(default)s to check")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.worker:
        return worker()
    import tempfile

    llama = LlamaCpp(args.llama_python)
    with tempfile.TemporaryDirectory(prefix="gguf-llama-cpp-") as tmp:
        if args.speed:
            results = {"speed": speed(llama, Path(tmp), args.rounds), "threads": 2, "new_tokens": 128}
        else:
            file_types = args.file_types.split(",")
            results = {"architectures": architecture_checks(llama, Path(tmp), file_types),
                       "chat": chat_checks(llama, Path(tmp), file_types)}
            results["pass"] = passed(results)
    llama.close()
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if results.get("pass") is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
