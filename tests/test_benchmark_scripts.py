"""The benchmark scripts the lead runs elsewhere still run: benchmarks/gpu_check.py in its CPU smoke
mode, and benchmarks/bench_vs_plain.py and benchmarks/bench_modern.py at a tiny shape (no timings are
checked); and the models they time are gpt2lab's as gpt2lab runs them (accelerated on a CPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.kernels.attention import CPUSelfAttention
from gpt2lab.kernels.fused import FusedGELU
from gpt2lab.kernels.linear import CPULinear
from gpt2lab.kernels.loss import HEAD_KERNELS
from gpt2lab.kernels.memory import THP_SWITCH, kernel_offers_huge_pages
from gpt2lab.kernels.quantized import CPUInt4Linear, CPUInt8Linear

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """benchmarks/`name`.py as a module, its main not run."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m).__module__.startswith("gpt2lab.kernels")]


def run_script(args, tmp_path, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GPT2LAB_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_asked_piece(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_script(["benchmarks/gpu_check.py", "--out", str(out), "--only", "tests", "decode", "hellaswag", "core"],
                      tmp_path, GPU_CHECK_SMOKE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["smoke"] is True and sorted(results["pieces"]) == ["core", "decode", "hellaswag", "tests"]
    assert results["pieces"]["tests"]["rc"] == 0 and "tests/test_cuda.py" in results["pieces"]["tests"]["files"]
    assert results["pieces"]["decode"]["batch_64_tokens_per_s"] > 0
    assert results["pieces"]["hellaswag"]["examples"] == 16
    assert results["pieces"]["core"]["examples"] == 80 and -1 <= results["pieces"]["core"]["core"] <= 1


def test_gpu_check_refuses_to_run_without_a_gpu_unless_smoke(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_script(["benchmarks/gpu_check.py", "--out", str(tmp_path / "x.json")], tmp_path)
    assert proc.returncode == 2 and "GPU_CHECK_SMOKE=1" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_bench_vs_plain_runs_at_a_tiny_shape_and_both_models_agree(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(["benchmarks/bench_vs_plain.py", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                       "--batch", "2", "--seq-len", "16", "--rounds", "1", "--steps", "1", "--warmup", "1",
                       "--modes", "fp32", "bf16", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fp32", "bf16"]
    for row in rows:
        assert abs(row["plain_first_loss"] - row["gpt2lab_first_loss"]) < 1e-3
        # As shipped: gpt2lab's process as gpt2lab sets it up, the plain one as a script of its own.
        assert row["plain_huge_pages"] is False
        assert row["gpt2lab_huge_pages"] is kernel_offers_huge_pages()


def test_bench_vs_plain_steps_gpt2lab_as_its_trainer_does_and_the_plain_model_as_it_is(monkeypatch):
    bench = load_script("bench_vs_plain")
    args = bench.parse_args(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--batch", "2", "--seq-len", "16",
                             "--vocab", "128"])
    cpu = torch.device("cpu")
    ours, plain = bench.build("gpt2lab", args, cpu), bench.build("plain", args, cpu)
    assert ours.training and plain.training
    block = ours.transformer.h[0]
    assert type(block.attn) is CPUSelfAttention and type(block.mlp.gelu) is FusedGELU
    assert type(block.mlp.c_fc) is CPULinear and type(ours.lm_head) is CPULinear
    assert ours.head_kernels is HEAD_KERNELS
    assert not kernel_modules(plain)
    # Set up as gpt2lab's process: the switch left to tune_cpu_memory, as the CLI; the others' off.
    monkeypatch.setenv(THP_SWITCH, "1")
    assert THP_SWITCH not in bench.child_environment("gpt2lab", "as-shipped")
    assert bench.child_environment("plain", "as-shipped")[THP_SWITCH] == "0"
    assert THP_SWITCH not in bench.child_environment("plain", "gpt2lab")
    assert bench.child_environment("gpt2lab", "default")[THP_SWITCH] == "0"


def test_bench_ggml_times_accelerated_models_from_one_plain_one():
    bench = load_script("bench_ggml")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=100, padded_vocab_size=128))
    ours = bench.gpt2lab_models(model.eval())
    assert sorted(ours) == ["bfloat16", "float32", "int4", "int8"]
    assert ours["bfloat16"].lm_head.weight.dtype == torch.bfloat16
    for name in ("float32", "bfloat16"):
        assert type(ours[name].lm_head) is CPULinear and ours[name].head_kernels is HEAD_KERNELS
    assert type(ours["int8"].lm_head) is CPUInt8Linear and type(ours["int4"].lm_head) is CPUInt4Linear
    assert all(type(m.mlp.gelu) is FusedGELU for models in ours.values() for m in models.transformer.h)


@pytest.mark.slow
def test_bench_modern_runs_at_a_tiny_shape_and_times_both_optimizers(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(["benchmarks/bench_modern.py", "--n-layer", "1", "--n-embd", "128", "--vocab", "256",
                       "--batch", "2", "--seq-len", "16", "--rounds", "1", "--warmup", "1", "--json", str(out)],
                      tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["shapes"] == {"gpt2": "1x128, n_head 2, vocab 256", "modern": "1x128, n_head 1, vocab 256"}
    assert [r["mode"] for r in results["rows"]] == ["fp32", "bf16"]
    for row in results["rows"]:
        assert 0 < row["gpt2_optimizer_ms"] < row["gpt2_ms"] and 0 < row["modern_optimizer_ms"] < row["modern_ms"]
        assert row["micro_batches_per_preset_step"] == 524_288 // (2 * 16)
        fb_ms = {shape: row[f"{shape}_ms"] - row[f"{shape}_optimizer_ms"] for shape in ("gpt2", "modern")}
        expected = ((16384 * fb_ms["modern"] + row["modern_optimizer_ms"])
                    / (16384 * fb_ms["gpt2"] + row["gpt2_optimizer_ms"]))
        assert row["ratio_at_preset_step"] == pytest.approx(expected)
        assert row["met"] == (row["ratio_at_preset_step"] <= 1.25)


def test_bench_quantized_kernels_runs_at_a_tiny_shape(tmp_path):
    out = tmp_path / "kernels.json"
    proc = run_script(["benchmarks/bench_quantized_kernels.py", "--n-layer", "1", "--n-embd", "64", "--vocab", "100",
                       "--rounds", "1", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["layers"] == 5 and results["weights"] == 4 * 64 * 64 * 3 + 100 * 64
    assert sorted(results["stack_ms"]) == sorted([
        "gpt2lab int8", "gpt2lab int8, PyTorch path", "gpt2lab int4", "gpt2lab int4, PyTorch path", "torch.ao int8 (fbgemm)",
    ])
    assert all(ms > 0 for ms in results["stack_ms"].values())


def test_bench_core_metric_agrees_with_its_one_example_per_forward_reference(tmp_path):
    from core_reference import BUNDLE, fixture_model
    from gpt2lab.eval.core_bundle import load_bundle

    bench = load_script("bench_core_metric")
    model = fixture_model()
    bundle = load_bundle(BUNDLE)
    assert bench.run_one_per_forward(model, bundle, 50) == bench.run_gpt2lab(model, bundle, 50, 7)
    synthetic = load_bundle(bench.write_bundle(tmp_path / "bundle", items=12))
    assert {t.task_type for t in synthetic.tasks} == {"multiple_choice", "schema", "language_modeling"}
    assert all(len(synthetic.items(t)) == 12 for t in synthetic.tasks)


def test_bench_tokenizer_runs_on_a_tiny_corpus_and_its_encoders_agree(tmp_path):
    out = tmp_path / "tokenizer.json"
    proc = run_script(["benchmarks/bench_tokenizer.py", "--corpus-mb", "0.2", "--vocab-sizes", "300", "--repeats", "1",
                       "--workers", "2", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["train"]["300"]["mb_per_s"] > 0 and results["train"]["300"]["encoder"] == "tiktoken"
    tokens = {name: row["tokens"] for name, row in results["encode"].items()}
    assert tokens["prepare, GPT-2"] == tokens["tiktoken GPT-2 encode_ordinary_batch"]
    assert tokens["prepare, trained BPE via tiktoken"] == tokens["prepare, trained BPE via tokenizers"] == \
        tokens["tokenizers encode_batch, trained BPE"]


def test_bench_chatcore_smoke_runs_and_its_two_ways_agree(tmp_path):
    out = tmp_path / "chatcore.json"
    proc = run_script(["benchmarks/bench_chatcore.py", "--smoke", "--batch-size", "3", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["examples"] == 8
    assert set(results["examples_per_s"]) == {"one example per forward", "gpt2lab batched (3)"}
