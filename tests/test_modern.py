"""The modern recipe: model options, Muon, the WSD schedule, and every command with them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig, UserError, load_model
from gpt2lab.cli import main
from gpt2lab.data.prepare import prepare
from gpt2lab.inference.kv_cache import KVCache
from gpt2lab.layers import apply_rope, rope_tables
from gpt2lab.train.config import resolve_config
from gpt2lab.train.muon import Muon, orthogonalize
from gpt2lab.train.optim import build_optimizer, learning_rate, muon_groups
from gpt2lab.train.trainer import Trainer


MODERN = dict(position="rope", norm="rmsnorm", qk_norm=True, activation="swiglu", logit_softcap=15.0,
              n_kv_head=1, bias=False, tie_embeddings=False)
OPTIONS = {
    "rope": dict(position="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "swiglu": dict(activation="swiglu"),
    "softcap": dict(logit_softcap=10.0),
    "gqa": dict(n_kv_head=2),
    "all": MODERN,
}


def peaked(make_model, **options) -> GPT:
    return make_model(n_head=4, n_embd=64, block_size=48, vocab_size=97, peaked=True, **options)


@pytest.mark.parametrize("name", OPTIONS)
def test_cache_padding_and_sliding_window_equal_a_plain_forward(make_model, name):
    """With each option: the cached decode equals decoding without a cache (which crops to the
    block, as nanoGPT does), and left-padded rows decode as they do alone: per-row positions
    reach RoPE."""
    model = peaked(make_model, **OPTIONS[name])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8]]
    cached = model.generate(prompts, 60, temperature=0)  # past the 48-token block
    assert cached == model.generate(prompts, 60, temperature=0, use_cache=False)
    assert cached == [model.generate([p], 60, temperature=0)[0] for p in prompts]
    assert len(set(cached[0][7:])) > 3


@pytest.mark.parametrize("name", ["rope", "gqa", "all"])
def test_cache_slots_at_their_own_positions_equal_decoding_alone(make_model, name):
    model = peaked(make_model, **OPTIONS[name])
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    cache = KVCache(model.config, 4, 48, device="cpu", dtype=torch.float32)
    tokens = [list(p) for p in prompts]
    with torch.no_grad():
        for slot, row in enumerate(tokens):
            hidden = model.hidden_states(torch.tensor([row]), kv_cache=cache.rows([slot], [0]))
            row.append(int(model.logits(hidden[:, -1]).argmax(-1)))
        for _ in range(20):
            idx = torch.tensor([[row[-1]] for row in tokens])
            hidden = model.hidden_states(idx, kv_cache=cache.rows([0, 1, 2], [len(r) - 1 for r in tokens]))
            for row, token in zip(tokens, model.logits(hidden[:, -1]).argmax(-1).tolist()):
                row.append(token)
    assert tokens == [model.generate([p], 21, temperature=0)[0] for p in prompts]


def test_rope_scores_depend_on_the_offset_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q, *rope_tables(torch.tensor([i]), 16, 10000.0, torch.float64))
        kj = apply_rope(k, *rope_tables(torch.tensor([j]), 16, 10000.0, torch.float64))
        return float((qi * kj).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-6)  # float32 tables
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    rotated = apply_rope(q, *rope_tables(torch.tensor([5]), 16, 10000.0, torch.float64))
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), abs=1e-6)


def test_options_change_the_parameters_as_described():
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=100)
    gpt2 = GPT(GPTConfig(**base))
    rope = GPT(GPTConfig(**base, position="rope"))
    assert "transformer.wpe.weight" in dict(gpt2.named_parameters())
    assert "transformer.wpe.weight" not in dict(rope.named_parameters())
    gqa = GPT(GPTConfig(**base, n_kv_head=1))
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (64 + 2 * 16, 64)
    swiglu = GPTConfig(**base, activation="swiglu")
    assert swiglu.hidden_size == 192  # 8/3 * 64 = 170.7, rounded up to a multiple of 64
    assert GPT(swiglu).transformer.h[0].mlp.c_fc.weight.shape == (2 * 192, 64)
    zero = GPT(GPTConfig(**base, zero_init_proj=True, tie_embeddings=False))
    assert all(float(p.abs().max()) == 0 for n, p in zero.named_parameters() if n.endswith("c_proj.weight"))
    assert float(zero.lm_head.weight.abs().max()) == 0
    softcap = GPT(GPTConfig(**base, logit_softcap=2.0, zero_init_proj=False)).eval()
    with torch.no_grad():
        softcap.lm_head.weight.mul_(1000)
        logits, _ = softcap(torch.tensor([[1, 2, 3]]))
    assert float(logits.abs().max()) <= 2.0 and float(logits.abs().max()) > 1.9


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(position="alibi"), "model.position must be one of learned, rope"),
        (dict(n_embd=36, n_head=4, position="rope"), "head dimension .* must be even"),
        (dict(n_kv_head=3), "n_kv_head .* must be a positive integer dividing model.n_head"),
        (dict(activation="gelu"), "model.activation must be one of"),
        (dict(norm="batchnorm"), "model.norm must be one of"),
        (dict(logit_softcap=-1.0), "logit_softcap must be"),
        (dict(mlp_hidden=0), "mlp_hidden must be a positive integer"),
    ],
)
def test_bad_model_options_name_the_setting(options, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**{"n_head": 4, "n_embd": 64, **options})


def test_a_model_transformers_has_no_class_for_is_kept_in_gpt2labs_layout(tmp_path, make_model):
    model = peaked(make_model, **MODERN)
    model.save_pretrained(tmp_path / "modern")
    assert not (tmp_path / "modern" / "config.json").exists()
    assert json.loads((tmp_path / "modern" / "gpt2lab.json").read_text())["weights"] == "gpt2lab"
    loaded = load_model(tmp_path / "modern", accelerate=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert main(["convert", str(tmp_path / "modern"), "--out", str(tmp_path / "out")]) == 2


# ---- Muon ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (192, 48)])
def test_orthogonalized_matrices_have_singular_values_near_one(shape):
    """Whatever the spectrum (here spread over a factor of 50), the update's singular values
    land in Newton-Schulz's band around 1."""
    generator = torch.Generator().manual_seed(0)
    rank = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], rank, generator=generator))
    spectrum = torch.logspace(0, math.log10(0.02), rank)
    singular = torch.linalg.svdvals(orthogonalize(u @ torch.diag(spectrum) @ v.T).float())
    assert singular.min() > 0.6 and singular.max() < 1.25, singular


def reference_newton_schulz(matrix: torch.Tensor) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration, written out plainly (in float32, as on a CPU)."""
    x = matrix.float()
    transposed = matrix.size(0) > matrix.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        a = x @ x.T
        b = -4.7750 * a + 2.0315 * a @ a
        x = 3.4445 * x + b @ x
    if transposed:
        x = x.T
    return x.float()


def test_muon_matches_a_plain_reference(make_model):
    """Three steps of Muon + AdamW on a tiny model against Muon written out by hand here (each
    fused matrix split into its blocks, momentum, Nesterov, shape scale, decoupled decay) and
    torch's own AdamW for the other parameters."""
    config = resolve_config("shakespeare-char-cpu", overrides=[
        "optim.name=muon", "optim.muon_lr=0.05", "optim.lr=0.01", "optim.weight_decay=0.1",
        "optim.muon_weight_decay=0.01"])
    ours = make_model(activation="swiglu", n_kv_head=1, vocab_size=50, bias=True).train()
    theirs = make_model(activation="swiglu", n_kv_head=1, vocab_size=50, bias=True).train()
    optimizer = build_optimizer(ours, config.optim, torch.device("cpu"))
    assert isinstance(optimizer, Muon)
    groups = muon_groups(theirs, config.optim)
    matrices = [(p, g["row_blocks"]) for g in groups if g["muon"] for p in g["params"]]
    assert len(matrices) == 2 * 4  # q/k/v, the attention projection, the MLP's two matrices
    adamw = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups
                               if not g["muon"]], lr=0.01, betas=(config.optim.beta1, config.optim.beta2),
                              eps=config.optim.eps, foreach=False)
    buffers = {id(p): torch.zeros_like(p) for p, _ in matrices}
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        # The same gradients for both: Newton-Schulz amplifies the last-bit differences of two
        # trajectories, and this compares the update rule, not the trajectory.
        ours.zero_grad()
        ours(ids, ids)[1].backward()
        for mine, reference in zip(ours.parameters(), theirs.parameters()):
            reference.grad = mine.grad.clone()
        optimizer.step()
        adamw.step()
        with torch.no_grad():
            for param, blocks in matrices:
                buffer = buffers[id(param)]
                buffer.lerp_(param.grad, 0.05)  # momentum 0.95, as an exponential average
                nesterov = param.grad.lerp(buffer, 0.95)
                pieces = nesterov.split(blocks) if blocks else [nesterov]
                update = torch.cat([reference_newton_schulz(b) * max(1, b.size(0) / b.size(1)) ** 0.5 for b in pieces])
                param.mul_(1 - 0.05 * 0.01).sub_(0.05 * update)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name


def test_wsd_is_flat_then_decays_linearly_to_min_lr():
    config = resolve_config("shakespeare-char-cpu", overrides=[
        "schedule.kind=wsd", "schedule.warmup_steps=10", "schedule.decay_fraction=0.25"])
    optim, schedule = config.optim, config.schedule
    rates = [learning_rate(step, optim, schedule, 100) for step in range(101)]
    assert rates[0] == pytest.approx(optim.lr / 10) and rates[9] == optim.lr
    assert rates[10:75] == [optim.lr] * 65
    assert rates[99] == pytest.approx(optim.min_lr) and rates[100] == optim.min_lr
    decay = rates[75:100]
    steps = [b - a for a, b in zip(decay, decay[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps) and steps[0] < 0


@pytest.mark.parametrize("bad, message", [
    ("optim.muon_lr=0", "optim.muon_lr must be"),
    ("optim.momentum=0.5", "optim.momentum is SGD's setting"),
    ("schedule.decay_fraction=0", "schedule.decay_fraction must be in"),
])
def test_bad_optimizer_settings_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        resolve_config("shakespeare-char-cpu", overrides=["optim.name=muon", bad]).validate()


# ---- every command with the options ---------------------------------------------------------


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", folder, progress=False, log=lambda m: None)
    return folder


MODERN_SETTINGS = [
    "model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=32", "batch.micro_batch=4",
    "batch.seq_len=32", "eval.interval=10", "eval.batches=2", "log.interval=0", "log.progress_bar=false",
    "model.position=rope", "model.norm=rmsnorm", "model.qk_norm=true", "model.activation=relu2",
    "model.logit_softcap=15", "model.n_kv_head=2", "model.zero_init_proj=true", "model.tie_embeddings=false",
    "optim.name=muon", "schedule.kind=wsd", "checkpoint.interval=10",
]


def test_a_modern_run_trains_resumes_exactly_and_works_with_every_command(char_data, tmp_path, capsys):
    settings = [f"data.path={char_data}", *MODERN_SETTINGS]
    straight = tmp_path / "straight"
    Trainer(resolve_config("shakespeare-char-cpu", overrides=[*settings, "max_steps=20"]), straight).run()
    halted = tmp_path / "halted"
    Trainer(resolve_config("shakespeare-char-cpu", overrides=[*settings, "max_steps=10"]), halted).run()
    Trainer(resolve_config("shakespeare-char-cpu", overrides=[*settings, "max_steps=20"]), halted, resume="auto").run()

    def train_losses(run: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}

    expected, resumed = train_losses(straight), train_losses(halted)
    assert [resumed[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]
    assert expected[20] < expected[1] and all(math.isfinite(v) for v in expected.values())
    capsys.readouterr()
    assert main(["sample", "--model", str(straight), "--prompt", "ROMEO:", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", "loss", "--model", str(straight), "--data", str(char_data), "--batches", "2"]) == 0
    assert "loss" in capsys.readouterr().out
    assert main(["report", str(straight)]) == 0


def test_speedrun_124m_shrunken_smoke(tmp_path):
    data = tmp_path / "shakespeare"
    prepare("shakespeare", data, progress=False, log=lambda m: None)
    config = resolve_config("speedrun-124m", overrides=[
        f"data.path={data}", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
        "batch.total_tokens=0", "batch.micro_batch=2", "batch.seq_len=64", "max_tokens=0", "max_steps=3",
        "system.compile=false", "system.device=cpu", "eval.interval=0", "eval.hellaswag_interval=0",
        "eval.sample_interval=0", "eval.final_full=false", "log.progress_bar=false"])
    Trainer(config, tmp_path / "run").run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
