"""The matrix-vector products of one decoding step of a quantized 124M GPT-2, alone: every linear
layer of the model (48 in the blocks and the 50,304-row head) applied once to one input row, as a
step applies them, for gpt2lab's int8 and int4 kernels (the layers `gpt2lab.kernels.accelerate`
gives a quantized model), the same arithmetic in PyTorch (where the kernels cannot run), and
torch.ao's dynamically quantized int8 layer (fbgemm, what gpt2lab used before), alternating round
by round.

    python benchmarks/bench_quantized_kernels.py                  # medians of 9 rounds
    python benchmarks/bench_quantized_kernels.py --rounds 15 --json kernels.json

The weights (124 MB in int8) do not fit in the CPU's caches, so each layer streams from memory,
as in a real step. Also printed: the time to read a float32 tensor of the int8 weights' size
(the memory bandwidth bound). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

from gpt2lab.kernels import quantized as kernels
from gpt2lab.kernels import tune_cpu_memory
from gpt2lab.kernels.quantized import CPUInt4Linear, CPUInt8Linear
from gpt2lab.quantize import GROUP

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization.qconfig import default_dynamic_qconfig


def layer_shapes(n_layer: int, n_embd: int, vocab: int) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of a GPT-2, in the order a step applies them."""
    block = [(3 * n_embd, n_embd), (n_embd, n_embd), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)]
    return block * n_layer + [(vocab, n_embd)]


def fbgemm_int8(layer: nn.Linear) -> DynamicInt8Linear:
    observer = default_dynamic_qconfig.weight()
    observer(layer.weight.detach())
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch.quantize_per_tensor(layer.weight.detach(), float(scale), int(zero_point), torch.qint8)
    quantized = DynamicInt8Linear(layer.in_features, layer.out_features, dtype=torch.qint8)
    quantized.set_weight_bias(weight, layer.bias.detach())
    return quantized


def stacks(shapes: list[tuple[int, int]]) -> dict[str, list]:
    torch.manual_seed(0)
    floats = []
    for out_features, in_features in shapes:
        layer = nn.Linear(in_features, out_features)
        nn.init.normal_(layer.weight, std=0.02)
        floats.append(layer)
    int8 = [CPUInt8Linear(layer) for layer in floats]
    built = {
        "gpt2lab int8": int8, "gpt2lab int8, PyTorch path": int8,
        "torch.ao int8 (fbgemm)": [fbgemm_int8(layer) for layer in floats],
    }
    if all(layer.in_features % GROUP == 0 for layer in floats):
        int4 = [CPUInt4Linear(layer) for layer in floats]
        built.update({"gpt2lab int4": int4, "gpt2lab int4, PyTorch path": int4})
    return built


def time_stack(layers: list, inputs: dict[int, torch.Tensor], pytorch_path: bool) -> float:
    library = kernels._library
    if pytorch_path:
        kernels._library = lambda: (None, "timing the PyTorch path")
    try:
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        return time.perf_counter() - start
    finally:
        kernels._library = library


def main() -> None:
    # Set up as the CLI sets up its process before any verb: large CPU tensors (the weights that
    # decoding streams) in huge pages, as `gpt2lab sample` has them.
    tune_cpu_memory(reuse_freed=False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    shapes = layer_shapes(args.n_layer, args.n_embd, args.vocab)
    weights = sum(out_features * in_features for out_features, in_features in shapes)
    inputs = {width: torch.randn(1, width) for width in {args.n_embd, 4 * args.n_embd}}
    built = stacks(shapes)
    times: dict[str, list[float]] = {name: [] for name in built}
    reads: list[float] = []
    bandwidth_probe = torch.ones(weights // 4)
    with torch.no_grad():
        for name, layers in built.items():  # warm-up: builds the kernels, touches every page
            time_stack(layers, inputs, "PyTorch path" in name)
        for _ in range(args.rounds):
            for name, layers in built.items():
                times[name].append(time_stack(layers, inputs, "PyTorch path" in name))
            start = time.perf_counter()
            bandwidth_probe.sum()
            reads.append(time.perf_counter() - start)
    read_ms = statistics.median(reads) * 1e3
    results = {
        "machine": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "kernels": kernels.kernels_unavailable_reason() or "built", "layers": len(shapes), "weights": weights,
        "rounds": args.rounds, "read_int8_bytes_ms": round(read_ms, 2),
        "stack_ms": {name: round(statistics.median(samples) * 1e3, 2) for name, samples in times.items()},
    }
    print(f"{len(shapes)} layers, {weights / 1e6:.1f}M weights, batch 1, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} (kernels: {results['kernels']})")
    for name, ms in results["stack_ms"].items():
        print(f"  {name:<28} {ms:8.2f} ms")
    print(f"  reading {weights / 1e6:.0f} MB (the int8 weights' size): {read_ms:.2f} ms, "
          f"{weights / read_ms / 1e6:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
