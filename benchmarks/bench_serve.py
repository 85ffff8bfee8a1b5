"""Serving under load: N concurrent streaming requests against `gpt2lab serve`, batched decoding
(--max-concurrency 64) against one request at a time (--max-concurrency 1).

Both servers run as subprocesses on 127.0.0.1 with the same small random-weight model; this
process is the load: N threads, each one streaming completion read to its [DONE]. Runs of the
two servers alternate, and the figures are the medians over the repeats.

    python benchmarks/bench_serve.py                      # 50 requests x 64 tokens, 3 repeats
    python benchmarks/bench_serve.py --requests 50 --max-tokens 64 --repeats 5 --json out.json
    python benchmarks/bench_serve.py --seeded             # every request with a seed
    python benchmarks/bench_serve.py --temperature 0      # greedy

Run it on a quiet machine: nothing else using the cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gpt2lab import GPT, GPTConfig

MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=1024, vocab_size=50257)


def start_server(folder: Path, max_concurrency: int, log: Path, device: str = "cpu") -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "serve", "--model", str(folder), "--port", "0", "--device", device,
         "--max-concurrency", str(max_concurrency), "--log-level", "warning"],
        stderr=log.open("w"),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"at (http://[\d.]+:\d+)/", log.read_text())
        if match and _get(match.group(1), "/health") == 200:
            return process, match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def _get(url: str, path: str) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def stream_one(url: str, body: dict) -> dict:
    """One streaming request: its latency, tokens (from the usage chunk) and whether it completed."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
    tokens, finish, done, first = None, None, False, None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        if first is None:
            first = time.perf_counter() - started
        if line.startswith(b"data: [DONE]"):
            done = True
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return {"error": chunk["error"]["message"]}
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            finish = choice["finish_reason"] or finish
    conn.close()
    # A request ends early only at end-of-text ("stop"); anything else must reach max_tokens.
    complete = done and tokens is not None and (finish == "stop" or (finish == "length" and tokens == body["max_tokens"]))
    return {"latency": time.perf_counter() - started, "first": first, "tokens": tokens or 0, "complete": complete}


def load(url: str, requests: int, max_tokens: int, run: int, temperature: float = 0.8, seeded: bool = False) -> dict:
    results: list[dict] = [{} for _ in range(requests)]

    def worker(i: int) -> None:
        body = {
            "prompt": f"Request {i} of run {run}: once upon a time,",
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_k": 200,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if seeded:
            body["seed"] = i
        try:
            results[i] = stream_one(url, body)
        except Exception as error:  # noqa: BLE001 - every failure is counted
            results[i] = {"error": repr(error)}

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(requests)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    latencies = sorted(r["latency"] for r in ok)
    return {
        "errors": len(results) - len(ok),
        "incomplete": sum(not r["complete"] for r in ok),
        "tokens": sum(r["tokens"] for r in ok),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))] if latencies else None,
        "first_token_p50_s": statistics.median(r["first"] for r in ok) if ok else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="concurrent streaming requests (default 50)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each server, alternating (default 3)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 greedy (default 0.8)")
    parser.add_argument(
        "--seeded", action="store_true", help="give each request a seed (the exact, `gpt2lab sample`-equal sampling path)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    modes = {"batched (--max-concurrency 64)": 64, "one at a time (--max-concurrency 1)": 1}
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save_pretrained(Path(tmp) / "model")
        servers = {name: start_server(folder, c, Path(tmp) / f"server{c}.log") for name, c in modes.items()}
        try:
            for name, (_, url) in servers.items():
                load(url, 2, 8, run=-1)  # warm-up: first-call costs out of the timings
            for run in range(args.repeats):
                for name, (_, url) in servers.items():
                    result = load(url, args.requests, args.max_tokens, run, args.temperature, args.seeded)
                    runs[name].append(result)
                    print(f"run {run + 1} {name}: {result['tokens_per_s']:.0f} tokens/s, "
                          f"p50 {result['p50_s']:.2f} s, p95 {result['p95_s']:.2f} s, "
                          f"{result['errors']} errors, {result['incomplete']} incomplete", file=sys.stderr)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)

    summary = {}
    for name, results in runs.items():
        summary[name] = {
            key: statistics.median(r[key] for r in results)
            for key in ("tokens_per_s", "p50_s", "p95_s", "first_token_p50_s", "wall_s")
        }
        summary[name]["errors"] = sum(r["errors"] for r in results)
        summary[name]["incomplete"] = sum(r["incomplete"] for r in results)
    batched, serial = (summary[name]["tokens_per_s"] for name in modes)
    print(f"\n{args.requests} concurrent streaming requests x {args.max_tokens} tokens, temperature {args.temperature}, "
          f"top-k 200, {'seeded' if args.seeded else 'no seed'}; "
          f"model {MODEL}; medians of {args.repeats} alternating runs; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| server | total tokens/s | p50 latency | p95 latency | p50 first token | errors | incomplete |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['tokens_per_s']:.0f} | {s['p50_s']:.2f} s | {s['p95_s']:.2f} s | "
              f"{s['first_token_p50_s']:.2f} s | {s['errors']} | {s['incomplete']} |")
    print(f"\nbatched / one at a time: {batched / serial:.1f}x total tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model": MODEL, "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0 if all(s["errors"] == 0 and s["incomplete"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
