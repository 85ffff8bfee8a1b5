"""Compiled decoding (`generate(..., compile=True)`, `gpt2lab sample --compile`): the same tokens as
eager decoding. Each compile of a tiny model takes 10-40 s on a 2-core CPU, hence `slow`."""

import copy
import re

import pytest
import torch

from gpt2lab import GPT, UserError
from gpt2lab.cli import main
from gpt2lab.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(n_head=4, n_embd=64, block_size=64, vocab_size=97, padded_vocab_size=128, peaked=True)


PROMPTS = [[5, 17, 3, 60, 2, 9, 41, 8, 8, 30], [11, 12, 13], [70]]


@pytest.mark.slow
def test_compiled_greedy_and_seeded_sampling_equal_eager_with_padded_rows_past_the_block(model):
    # 10 + 70 tokens: the rows are left-padded, and the last 16 steps lie past the block size.
    eager = model.generate(PROMPTS, 70, temperature=0)
    compiled = model.generate(PROMPTS, 70, temperature=0, compile=True)
    assert compiled == eager
    assert len(set(eager[1])) > 5  # the check is not vacuous
    # Sampling draws from the probabilities themselves: equal draws need equal logits, not only
    # the same largest one.
    sampled = model.generate(PROMPTS, 70, temperature=1.0, seed=3)
    assert model.generate(PROMPTS, 70, temperature=1.0, seed=3, compile=True) == sampled


@pytest.mark.slow
def test_compiled_modern_model_equals_eager(make_model):
    # RoPE positions from the step's position tensor, grouped-query keys read from the cache.
    modern = make_model(
        n_head=4, n_kv_head=2, n_embd=64, block_size=64, vocab_size=97, peaked=True, position="rope",
        norm="rmsnorm", qk_norm=True, activation="swiglu", logit_softcap=15.0, tie_embeddings=False,
    )
    eager = modern.generate(PROMPTS, 30, temperature=0)
    assert modern.generate(PROMPTS, 30, temperature=0, compile=True) == eager
    assert len(set(eager[0])) > 5


@pytest.mark.slow
def test_compiled_step_follows_weights_changed_in_place(model):
    # The compiled graph holds the weights as constants: an in-place change must compile afresh.
    model = copy.deepcopy(model)
    before = model.generate(PROMPTS, 12, temperature=0, compile=True)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(-1.3)
    eager = model.generate(PROMPTS, 12, temperature=0)
    assert eager != before
    assert model.generate(PROMPTS, 12, temperature=0, compile=True) == eager


def test_compiling_without_the_cache_is_refused(model):
    with pytest.raises(UserError, match="KV cache"):
        model.generate([[1, 2]], 3, compile=True, use_cache=False)


@pytest.mark.slow
def test_one_compiled_graph_serves_every_generation_length(model):
    # A chat turn or a sample of another length must not compile again: the cache's length is
    # dynamic in the graph, and the step's input is laid out the same whatever the buffer's width.
    from torch._dynamo.utils import counters

    model.generate(PROMPTS, 7, temperature=0, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for prompts, steps in ((PROMPTS, 3), (PROMPTS, 25), ([[4, 4, 9, 1, 2], [7], [8, 8]], 40)):
        assert model.generate(prompts, steps, temperature=0, compile=True) == model.generate(prompts, steps, temperature=0)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_sample_compile_prints_what_sample_prints(capsys, make_model_folder):
    folder = make_model_folder("compiled-sample")
    args = ["sample", "--model", str(folder), "--prompt", "Hello, I'm", "--max-new-tokens", "12",
            "--temperature", "0", "--no-stop-at-eot", "--device", "cpu"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--compile", "-v"]) == 0
    captured = capsys.readouterr()
    assert captured.out == eager
    assert "AUTOTUNE" not in captured.err  # the autotuner's tables are kept out of the terminal
    # -v's tokens/s leaves the compile out (it is timed apart, before the samples).
    assert re.fullmatch(r"\[compiled in [\d.]+ s, then 12 tokens in [\d.]+ s, [\d.]+ tokens/s, cpu, float32\]\n",
                        captured.err)
    tokenizer = load_tokenizer(folder)
    expected = GPT.from_pretrained(folder).generate([tokenizer.encode("Hello, I'm")], 12, temperature=0)[0]
    assert eager == tokenizer.decode(expected) + "\n"


def test_sample_verbose_claims_no_compile_where_no_step_is_compiled(capsys, make_model_folder):
    # One new token comes from the prompt's eager forward alone: nothing is compiled or timed.
    folder = make_model_folder("compiled-one-token")
    assert main(["sample", "--model", str(folder), "--max-new-tokens", "1", "--compile", "-v", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert re.fullmatch(r"\[1 tokens in [\d.]+ s, [\d.]+ tokens/s, cpu, float32\]\n", err)


def test_sample_compile_with_no_cache_exits_2(capsys, make_model_folder):
    folder = make_model_folder("compiled-no-cache")
    code = main(["sample", "--model", str(folder), "--compile", "--no-cache", "--max-new-tokens", "3"])
    assert code == 2
    assert "KV cache" in capsys.readouterr().err


def test_a_compiler_that_fails_is_one_clear_error(model, monkeypatch):
    from gpt2lab.inference import generate as generate_module

    def no_compiler(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(
            no_compiler, RuntimeError("Compiler: cc is not found\nmore detail"), None
        )

    monkeypatch.setattr(generate_module, "compiled_step", lambda model: no_compiler)
    with pytest.raises(UserError, match=r"could not build the decoding step here \(RuntimeError: Compiler: cc is not found\)"):
        model.generate([[1, 2]], 3, compile=True)


@pytest.mark.slow
def test_compiled_int8_equals_eager(model):
    from gpt2lab.kernels import accelerate
    from gpt2lab.quantize import quantize

    int8 = accelerate(quantize(model, "int8"))
    eager = int8.generate(PROMPTS, 20, temperature=0)
    assert int8.generate(PROMPTS, 20, temperature=0, compile=True) == eager
    assert len(set(eager[0])) > 5


@pytest.mark.slow
def test_compiled_int4_equals_eager_and_follows_its_buffers_changed_in_place(model):
    from gpt2lab.kernels import accelerate
    from gpt2lab.quantize import quantize

    int4 = accelerate(quantize(model, "int4"))
    eager = int4.generate(PROMPTS, 12, temperature=0)
    assert int4.generate(PROMPTS, 12, temperature=0, compile=True) == eager
    # int4's weights and biases are buffers, not parameters: changed in place, they must reach the
    # compiled step as changed parameters do.
    with torch.no_grad():
        for name, buffer in int4.named_buffers():
            if name.endswith("packed"):
                buffer[..., :64].bitwise_xor_(0x35)  # other levels
            elif name.endswith("bias"):
                buffer.normal_(0, 0.5)
    changed = int4.generate(PROMPTS, 12, temperature=0)
    assert changed != eager
    assert int4.generate(PROMPTS, 12, temperature=0, compile=True) == changed
