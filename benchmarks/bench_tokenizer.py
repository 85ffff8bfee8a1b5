"""Tokenizer benchmarks: how fast `gpt2lab tokenizer train` learns a BPE (MB of text a second, end
to end: reading a .jsonl file, counting, merging, checking tiktoken, writing the folder), and how
fast `prepare` encodes with the trained BPE, through each engine, against GPT-2's BPE and
tiktoken's own batch encoder on the same documents.

    python benchmarks/bench_tokenizer.py                      # 20 MB, vocabularies 4,096 and 16,384
    python benchmarks/bench_tokenizer.py --only train --corpus FILE.jsonl --vocab-sizes 8192 65536
    python benchmarks/bench_tokenizer.py --only encode --workers 2 --json out.json
    python benchmarks/bench_tokenizer.py --corpus FILE.jsonl  # your own documents (a "text" field)

The default corpus is Tiny Shakespeare (it ships with gpt2lab), its paragraphs drawn into
web-page-sized documents up to --corpus-mb; its words hold about 22,000 tokens at most, so larger
vocabularies need --corpus. Run it on a quiet machine: nothing else using the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2lab.data.prepare import prepare
from gpt2lab.data.sources import default_workers, packaged_shakespeare
from gpt2lab.data.tokenizer_train import train_tokenizer
from gpt2lab.tokenizer import BPETokenizer, gpt2_encoding

QUIET = dict(progress=False, log=lambda message: None)


def make_documents(megabytes: float, seed: int = 0) -> list[str]:
    """Web-page-sized documents of Shakespeare's paragraphs in a random order."""
    paragraphs = packaged_shakespeare().split("\n\n")
    rng = np.random.default_rng(seed)
    documents, size = [], 0
    while size < megabytes * 1e6:
        document = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), rng.integers(5, 40)))
        documents.append(document)
        size += len(document.encode("utf-8"))
    return documents


def read_documents(path: Path, megabytes: float) -> list[str]:
    documents, size = [], 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            documents.append(json.loads(line)["text"])
            size += len(documents[-1].encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    return documents


def timed(function, repeats: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls, the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_train(corpus: Path, megabytes: float, vocab_sizes: list[int], repeats: int, scratch: Path) -> dict:
    rows = {}
    for vocab_size in vocab_sizes:
        runs = iter(range(repeats))
        seconds, tokenizer = timed(
            lambda: train_tokenizer([str(corpus)], scratch / f"tok-{vocab_size}-{next(runs)}", vocab_size=vocab_size, **QUIET),
            repeats,
        )
        rows[vocab_size] = {"seconds": seconds, "mb_per_s": megabytes / seconds, "encoder": tokenizer.encoder}
    return rows


def bench_encode(corpus: Path, documents: list[str], tokenizer: BPETokenizer, workers: int, repeats: int,
                 scratch: Path) -> dict:
    """Tokens a second of each way to encode the documents: `prepare` end to end (file in, shards
    out) with GPT-2's BPE and with the trained one through each engine, and the libraries' own
    batch encoders over the documents in memory."""
    engines = {name: BPETokenizer(tokenizer.merges, pattern=tokenizer.pattern, special=tokenizer.special, encoder=name)
               for name in ("tiktoken", "tokenizers")}
    runs = iter(range(10**9))

    def prepared(with_tokenizer) -> int:
        meta = prepare("text", scratch / f"data-{next(runs)}", inputs=[str(corpus)], workers=workers,
                       tokenizer=with_tokenizer, **QUIET)
        return sum(split["tokens"] for split in meta["splits"].values()) - len(documents)

    gpt2 = gpt2_encoding()
    ways = {
        "tiktoken GPT-2 encode_ordinary_batch": lambda: sum(map(len, gpt2.encode_ordinary_batch(documents, num_threads=workers))),
        "prepare, GPT-2": lambda: prepared(None),
        "prepare, trained BPE via tiktoken": lambda: prepared(engines["tiktoken"]),
        "prepare, trained BPE via tokenizers": lambda: prepared(engines["tokenizers"]),
        "tokenizers encode_batch, trained BPE": lambda: sum(map(len, engines["tokenizers"].encode_batch(documents))),
    }
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    rows = {}
    for name, way in ways.items():
        seconds, tokens = timed(way, repeats)
        rows[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "mb_per_s": megabytes / seconds}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "encode"])
    parser.add_argument("--corpus", type=Path, help="a .jsonl file of documents in a 'text' field (default: Tiny Shakespeare)")
    parser.add_argument("--corpus-mb", type=float, default=20.0, help="megabytes of text (default 20)")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 16384], help="tokenizers to train")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes or threads of the encoders")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    documents = read_documents(args.corpus, args.corpus_mb) if args.corpus else make_documents(args.corpus_mb)
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    results = {"machine": f"{platform.processor() or platform.machine()}, {default_workers()} cores available",
               "corpus_mb": megabytes, "documents": len(documents), "workers": args.workers}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
        sizes = args.vocab_sizes if args.only != "encode" else args.vocab_sizes[-1:]
        trained = bench_train(corpus, megabytes, sizes, 1 if args.only == "encode" else args.repeats, scratch)
        if args.only != "encode":
            results["train"] = trained
            print(f"tokenizer train on {megabytes:.1f} MB ({len(documents):,} documents), median of {args.repeats}:")
            for size, row in trained.items():
                print(f"  vocabulary {size:>7,}: {row['mb_per_s']:7.2f} MB/s ({row['seconds']:.2f} s), encoder {row['encoder']}")
        if args.only != "train":
            tokenizer = BPETokenizer.from_spec(json.loads((scratch / f"tok-{sizes[-1]}-0" / "gpt2lab-tokenizer.json").read_text())["tokenizer"])
            encoded = results["encode"] = bench_encode(corpus, documents, tokenizer, args.workers, args.repeats, scratch)
            print(f"encoding {megabytes:.1f} MB with {args.workers} workers, the trained BPE of {sizes[-1]:,}, median of {args.repeats}:")
            for name, row in encoded.items():
                print(f"  {name:40s} {row['tokens_per_s'] / 1e6:6.2f} M tokens/s {row['mb_per_s']:7.2f} MB/s  ({row['seconds']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
