"""Checks that need a CUDA GPU (`pytest -m cuda`; benchmarks/gpu_check.sh runs them): the chunked
head + loss on the GPU, its peak memory against the full logits, compile, and the profiler's
GPU kernels. Skipped where there is no GPU."""

import gc
import json

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT, GPTConfig
from gpt2lab.data.prepare import prepare
from gpt2lab.train.config import resolve_config
from gpt2lab.train.trainer import Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def full_logits_loss(model, idx, targets):
    """The model's loss before chunking: cross-entropy over every row of the head, in float32."""
    logits = model._head(model.hidden_states(idx))
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_chunked_loss_matches_the_full_logits_on_the_gpu(softcap, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 as float32
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=1000, padded_vocab_size=1024,
                       logit_softcap=softcap)
    model = GPT(config).cuda()
    idx = torch.randint(0, 1000, (4, 64), device="cuda")
    targets = torch.randint(0, 1000, (4, 64), device="cuda")
    targets[:, :10] = -1
    want_loss = full_logits_loss(model, idx, targets)
    want = grads_of(model, want_loss)
    got_loss = model(idx, targets)[1]
    got = grads_of(model, got_loss)
    assert abs(got_loss.item() - want_loss.item()) < 1e-5
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_bf16, got_bf16 = full_logits_loss(model, idx, targets), model(idx, targets)[1]
    assert abs(got_bf16.item() - want_bf16.item()) < 2e-2


def peak_of_step(model, optimizer, loss_fn, idx, targets) -> int:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, idx, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def test_a_bf16_124m_step_at_b8_t1024_peaks_at_most_0_7_of_the_full_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", padded_vocab_size=50304, dropout=0.0)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, 50257, (8, 1024), device="cuda")
    targets = torch.randint(0, 50257, (8, 1024), device="cuda")

    def chunked(model, idx, targets):
        return model(idx, targets)[1]

    peak_of_step(model, optimizer, chunked, idx, targets)  # the optimizer's state, allocated once
    full = peak_of_step(model, optimizer, full_logits_loss, idx, targets)
    ours = peak_of_step(model, optimizer, chunked, idx, targets)
    print(f"peak of one bf16 step: full logits {full / 2**30:.2f} GiB, chunked {ours / 2**30:.2f} GiB")
    assert ours <= 0.7 * full


def test_compiled_chunked_loss_matches_eager():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=1000,
                          padded_vocab_size=1024)).cuda()
    idx = torch.randint(0, 1000, (4, 128), device="cuda")
    targets = torch.randint(0, 1000, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_loss = model(idx, targets)[1]
    eager = grads_of(model, eager_loss)
    compiled_model = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled_loss = compiled_model(idx, targets)[1]
    compiled = grads_of(model, compiled_loss)
    assert abs(compiled_loss.item() - eager_loss.item()) < 1e-2
    for name in eager:
        scale = eager[name].abs().max().item() + 1e-6
        assert (compiled[name] - eager[name]).abs().max().item() < 0.05 * scale, name


def test_profile_steps_on_the_gpu_record_kernels(tmp_path):
    data = tmp_path / "data"
    prepare("shakespeare-char", data, progress=False, log=lambda m: None)
    lines = []
    config = resolve_config("shakespeare-char-cpu", overrides=[
        f"data.path={data}", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "batch.micro_batch=2", "batch.seq_len=16", "eval.interval=0", "eval.at_start=false",
        "eval.final_full=false", "checkpoint.final=false", "log.progress_bar=false", "system.device=cuda",
        "system.precision=bf16", "max_steps=3", "system.profile_steps=2",
    ])
    Trainer(config, tmp_path / "run", echo=lines.append).run()
    events = json.loads((tmp_path / "run" / "profile" / "trace.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    assert "Self CUDA" in "\n".join(lines)
