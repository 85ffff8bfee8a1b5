"""Issue 35, groups 1, 2, 3 and 6: one request poisoning a batch, checkpoints without checksums,
a `gpt2lab.json` that lies, and a damaged kernel cache. Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

from conftest import Collector
from gpt2lab.cli import main
from gpt2lab.inference.generate import generate
from gpt2lab.pretrained import save_pretrained
from gpt2lab.inference.sampling import sample_next_token
from gpt2lab.serve.engine import Engine, SamplingParams
from gpt2lab.tokenizer import GPT2Tokenizer

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=32)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- 1. one request poisons the batch -------------------------------------------------------------

# Settings that round to 0 in float32: they made the probabilities NaN.
VANISHING = [dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=0.8, top_p=1e-50)]


def padded_model(make_model):
    """A model of 50304 ids on GPT-2's 50257 whose padded ids always win: the final norm sends
    every position to one vector, which the untied head's rows 50257.. follow."""
    model = make_model(peaked=True, vocab_size=50304, tie_embeddings=False, **TINY)
    with torch.no_grad():
        direction = torch.randn(TINY["n_embd"])
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.lm_head.weight[50257:] = 10 * direction
    return model


@pytest.mark.parametrize("options", VANISHING, ids=["t=1e-45", "t=5e-324", "top_p=1e-50"])
@pytest.mark.parametrize("seed", [None, 5])
def test_vanishing_temperature_or_top_p_samples_greedily(make_model, options, seed):
    model = make_model(peaked=True, **TINY)
    greedy = generate(model, [[1, 2, 3]], 12, temperature=0)
    assert generate(model, [[1, 2, 3]], 12, seed=seed, **options) == greedy


def test_sampling_never_draws_an_id_beyond_the_tokenizers_vocabulary(make_model):
    logits = torch.zeros(4, 50304)
    logits[:, 50257:] = 50.0
    for temperature in (0, 1.0):
        assert (sample_next_token(logits, temperature=temperature, vocab_size=50257) < 50257).all()
    model = padded_model(make_model)
    free = generate(model, [[1, 2]], 8, temperature=0)[0][2:]
    assert min(free) >= 50257  # the model left alone prefers ids no GPT-2 token decodes to
    for options in (dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=1.0)):
        assert max(generate(model, [[1, 2]], 8, vocab_size=50257, **options)[0]) < 50257


@pytest.fixture
def engine_of():
    engines = []

    def start(model):
        engine = Engine(model, GPT2Tokenizer())
        collector = Collector()
        engine.start(collector)
        engines.append(engine)
        return engine, collector

    yield start
    for engine in engines:
        engine.close()


@pytest.mark.parametrize("seed", [None, 7])
def test_a_vanishing_temperature_in_the_batch_spoils_no_one(make_model, engine_of, seed):
    model = make_model(peaked=True, **TINY)
    engine, collector = engine_of(model)
    expected = GPT2Tokenizer().decode(generate(model, [[1, 2]], 10, temperature=0)[0][2:])
    requests = [SamplingParams(max_tokens=10, seed=seed, **options) for options in VANISHING]
    requests.append(SamplingParams(max_tokens=10, temperature=0))
    sequences = [engine.submit([1, 2], params) for params in requests]
    assert collector.results(sequences) == [(expected, "length")] * len(requests)


def test_the_server_never_draws_a_padded_id(make_model, engine_of):
    engine, collector = engine_of(padded_model(make_model))
    sequences = [engine.submit([1, 2], SamplingParams(max_tokens=6, temperature=t)) for t in (0, 1.0, 1.0)]
    assert [reason for _, reason in collector.results(sequences)] == ["length"] * 3


def test_one_failing_sequence_ends_alone(make_model, engine_of):
    model = make_model(peaked=True, **TINY)
    engine, collector = engine_of(model)
    expected = GPT2Tokenizer().decode(generate(model, [[1, 2]], 10, temperature=0)[0][2:])
    healthy = engine.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))
    doomed = engine.submit([1, 2], SamplingParams(max_tokens=10, temperature=0))

    def broken(token):
        raise RuntimeError("this sequence's decoder broke")

    doomed.decoder.push = broken
    (text, reason), (_, doomed_reason) = collector.results([healthy, doomed])
    assert (text, reason) == (expected, "length")
    assert doomed_reason == "error"
    assert engine.active_count == 0


@pytest.mark.parametrize("options", [["--temperature", "1e-45"], ["--temperature", "5e-324"], ["--top-p", "1e-50"]])
def test_sample_with_vanishing_settings_is_greedy(capsys, make_model, tmp_path, options):
    folder = save_pretrained(make_model(peaked=True, vocab_size=50257, **TINY), tmp_path / "m")
    common = ["sample", "--model", folder, "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", 8]
    code, greedy, err = run_cli(capsys, *common, "--temperature", "0")
    assert code == 0, err
    code, out, err = run_cli(capsys, *common, *options)
    assert code == 0 and "Traceback" not in err, err
    assert out == greedy


def test_sample_of_a_padded_model_stays_in_the_tokenizers_vocabulary(capsys, make_model, tmp_path):
    folder = save_pretrained(padded_model(make_model), tmp_path / "m", tokenizer_spec="gpt2")
    code, out, err = run_cli(capsys, "sample", "--model", folder, "--device", "cpu", "--prompt", "Hi",
                             "--max-new-tokens", 8, "--seed", 1)
    assert code == 0 and "Traceback" not in err, err


# ---- 2. checkpoints carry their checksums ---------------------------------------------------------


def flip_bytes(path, count=64):
    """Invert `count` bytes in the middle of the file: inside a tensor's data, so that the file
    still parses (safetensors, torch.save's zip) with other values."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0x5A for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def checkpoint_of(make_model, run_dir, lora=False):
    from gpt2lab.lora import apply_lora
    from gpt2lab.train.checkpoint import save_checkpoint

    model = make_model(vocab_size=50257, **TINY)
    if lora:
        apply_lora(model, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))[1].backward()
    optimizer.step()
    state = {"step": 1, "tokens": 3, "elapsed_s": 0.0, "loader": {}, "val_loss": None, "best_val_loss": None}
    folder = save_checkpoint(run_dir, model=model, optimizer=optimizer, scaler=None, state=state,
                             tokenizer_spec="gpt2", train_config={})
    return folder, model, optimizer


@pytest.mark.parametrize("name, lora", [("model.safetensors", False), ("adapters.safetensors", True)])
def test_damaged_weights_are_refused_naming_the_file(make_model, tmp_path, capsys, name, lora):
    from gpt2lab import load_model
    from gpt2lab.errors import UserError

    folder, _, _ = checkpoint_of(make_model, tmp_path / "run", lora=lora)
    load_model(folder)  # sound: loads
    flip_bytes(folder / name)
    with pytest.raises(UserError, match=f"{name}: its sha256 differs from the one gpt2lab.json records"):
        load_model(folder)
    for verb in (["sample", "--model", folder, "--device", "cpu", "--max-new-tokens", 2],
                 ["convert", folder, "--out", tmp_path / "hf"]):
        code, out, err = run_cli(capsys, *verb)
        assert code == 2 and "Traceback" not in err and f"{folder / name}: its sha256 differs" in err, err


@pytest.mark.parametrize("name", ["optimizer.pt", "state.json"])
def test_damaged_training_state_is_refused_on_resume_naming_the_file(make_model, tmp_path, name):
    from gpt2lab.errors import UserError
    from gpt2lab.train.checkpoint import load_checkpoint

    folder, model, optimizer = checkpoint_of(make_model, tmp_path / "run")
    load_checkpoint(folder, model=model, optimizer=optimizer, scaler=None)
    path = folder / name
    if name == "state.json":  # still valid JSON of the right shape, with another step
        path.write_text(path.read_text().replace('"step": 1', '"step": 7'))
    else:
        flip_bytes(path)
    with pytest.raises(UserError, match=f"{name}: its sha256 differs .*use an earlier checkpoint"):
        load_checkpoint(folder, model=model, optimizer=optimizer, scaler=None)


def test_folders_written_before_digests_still_load(make_model, tmp_path):
    import json

    from gpt2lab import load_model
    from gpt2lab.train.checkpoint import load_checkpoint

    folder, model, optimizer = checkpoint_of(make_model, tmp_path / "run")
    record = json.loads((folder / "gpt2lab.json").read_text())
    assert set(record.pop("sha256")) == {"model.safetensors", "optimizer.pt", "state.json"}
    (folder / "gpt2lab.json").write_text(json.dumps(record))
    load_model(folder)
    load_checkpoint(folder, model=model, optimizer=optimizer, scaler=None)


# ---- 3. a lying gpt2lab.json ------------------------------------------------------------------------


def edit_record(folder, change):
    import json

    path = folder / "gpt2lab.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def biased_folder(make_model, tmp_path, **options):
    model = make_model(peaked=True, vocab_size=50257, **{**TINY, **options})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return save_pretrained(model, tmp_path / "m", tokenizer_spec="gpt2")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["model"].update(bias=False), r"hold transformer\.h\.0\.\S*bias, but it is not zero while the record says bias=false"),
        (lambda r: r.update(format=99), r"is of format 99, and this gpt2lab reads format 1"),
        (lambda r: r["model"].update(vocab_size=50000, padded_vocab_size=50257),
         r"vocab_size 50000 is less than the 50257 ids of its tokenizer \(GPT-2's BPE\)"),
        (lambda r: r.update(tokenizer={"type": "gpt2", "chat": "gpt2lab-chat-v1"}),
         r"vocab_size 50257 is less than the 50261 ids of its tokenizer \(GPT-2's BPE with chat format gpt2lab-chat-v1\)"),
    ],
    ids=["bias-false", "format-99", "vocab-short", "chat-on-base"],
)
def test_a_record_that_disagrees_with_the_weights_or_tokenizer_is_refused(make_model, tmp_path, capsys, change, message):
    from gpt2lab import load_model
    from gpt2lab.errors import UserError

    folder = biased_folder(make_model, tmp_path)
    load_model(folder)
    edit_record(folder, change)
    with pytest.raises(UserError, match=message):
        load_model(folder)
    code, out, err = run_cli(capsys, "convert", folder, "--out", tmp_path / "hf")
    assert code == 2 and "Traceback" not in err and not (tmp_path / "hf").exists(), err


@pytest.mark.parametrize(
    "claimed, named",
    [("gpt2", r"GPT-2's BPE"), ({"type": "char", "chars": "ab"}, "a character vocabulary"), (None, "no tokenizer")],
    ids=["plain-gpt2", "char", "dropped"],
)
def test_a_chat_models_record_claiming_another_tokenizer_is_refused(tmp_path, capsys, claimed, named):
    """The chat model's 50261 ids in 50304 rows fit GPT-2's 50257 and two characters alike, so no
    shape tells the lie; the tokenizer digest written with the record does."""
    from conftest import CHAT_TOKENIZER, chat_gpt

    from gpt2lab import load_model, load_tokenizer
    from gpt2lab.errors import UserError

    folder = save_pretrained(chat_gpt(), tmp_path / "m", tokenizer_spec=CHAT_TOKENIZER)
    assert load_tokenizer(folder).chat == "gpt2lab-chat-v1"
    edit_record(folder, lambda r: r.pop("tokenizer") if claimed is None else r.update(tokenizer=claimed))
    with pytest.raises(UserError, match=rf"its tokenizer record \({named}\) is not the one the weights were written with"):
        load_model(folder)
    code, out, err = run_cli(capsys, "convert", folder, "--out", tmp_path / "hf")
    assert code == 2 and "tokenizer_sha256 differs" in err and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()


def test_a_record_of_a_tied_head_for_an_untied_model_is_refused(make_model, tmp_path):
    from gpt2lab import load_model
    from gpt2lab.errors import UserError

    folder = biased_folder(make_model, tmp_path, tie_embeddings=False)
    edit_record(folder, lambda r: r["model"].update(tie_embeddings=True))
    with pytest.raises(UserError, match="hold lm_head.weight, but it differs from the embedding while the record says tie_embeddings=true"):
        load_model(folder)


def test_zero_biases_of_a_model_without_biases_still_load(make_model, tmp_path):
    """transformers' GPT-2 layout stores zero biases for a model without them: they say nothing."""
    from gpt2lab import load_model

    model = make_model(peaked=True, vocab_size=50257, bias=False, **TINY)
    folder = save_pretrained(model, tmp_path / "m")
    torch.testing.assert_close(load_model(folder)(torch.tensor([[1, 2]]))[0], model(torch.tensor([[1, 2]]))[0])


def test_a_lora_checkpoint_whose_record_drops_lora_is_refused(make_model, tmp_path):
    from gpt2lab import load_model
    from gpt2lab.errors import UserError

    folder, _, _ = checkpoint_of(make_model, tmp_path / "run", lora=True)
    edit_record(folder, lambda r: r.update(lora=None))
    with pytest.raises(UserError, match="holds adapters.safetensors but .* records no LoRA settings"):
        load_model(folder)


# ---- 6. the kernel cache ----------------------------------------------------------------------------

LOAD_KERNELS = (
    "from gpt2lab.kernels import build\n"
    "library, reason = build._load()\n"
    "assert reason is None, reason\n"
    "assert library.gpt2lab_gelu_tanh_forward and library.gpt2lab_matvec\n"
)


def kernels_build_here():
    from gpt2lab.kernels import build

    return build.why_not_here("GPT2LAB_FUSED_KERNELS") is None


needs_a_compiler = pytest.mark.skipif(not kernels_build_here(), reason="the C kernels do not build here")


@needs_a_compiler
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_cached_library_is_built_again_before_it_is_loaded(tmp_path, damage):
    """Loading happens in a child process: before the fix the damaged file killed it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GPT2LAB_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.run([sys.executable, "-c", LOAD_KERNELS], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    [library] = tmp_path.rglob("libgpt2lab_kernels.so")
    built = library.read_bytes()
    if damage == "flipped":
        flip_bytes(library, 4096)
    else:
        library.write_bytes(built[: len(built) // 2])
    again = subprocess.run([sys.executable, "-c", LOAD_KERNELS], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert library.read_bytes() == built


@needs_a_compiler
def test_a_cached_library_without_an_entry_point_falls_back_like_a_failed_load(tmp_path, monkeypatch):
    import subprocess

    from gpt2lab.kernels import build

    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    command = build.compiler()
    library = build.build(command)
    empty = tmp_path / "empty.c"
    empty.write_text("int gpt2lab_nothing(void) { return 0; }\n")
    subprocess.run([*command, "-shared", "-fPIC", str(empty), "-o", str(library)], check=True)
    # Its digest recorded as a build's: a sound library of the wrong contents.
    (library.parent / (library.name + ".sha256")).write_text(build.file_sha256(library) + "\n")
    monkeypatch.setattr(build, "build", lambda command, again=False: library)
    build.forget()
    try:
        loaded, reason = build._load()
        assert loaded is None and "has no gpt2lab_" in reason
    finally:
        build.forget()


def test_a_hanging_compiler_is_stopped_at_the_time_limit(tmp_path, monkeypatch):
    import time

    from gpt2lab.kernels import build

    compiler = tmp_path / "stuck-cc"
    compiler.write_text("#!/bin/sh\nsleep 30\n")  # the child keeps the compiler's output open
    compiler.chmod(0o755)
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setattr(build, "BUILD_TIMEOUT_S", 1)
    build.forget()
    started = time.monotonic()
    try:
        loaded, reason = build._load()
    finally:
        build.forget()
    assert time.monotonic() - started < 15
    assert loaded is None and "did not finish within 1 s and was stopped" in reason


def test_a_build_is_announced_on_a_terminal(tmp_path, monkeypatch, capsys):
    from gpt2lab.kernels import build

    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(build.sys.stderr, "isatty", lambda: True, raising=False)
    with pytest.raises(RuntimeError, match="false failed"):
        build.build(["false"])
    assert "gpt2lab: building its C kernels into" in capsys.readouterr().err
