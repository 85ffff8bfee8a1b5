import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli import main
from gpt2lab.tokenizer import CharTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def bpe_model_dir(make_model_folder):
    return make_model_folder("bpe-model")


@pytest.fixture(scope="module")
def char_model_dir(make_model_folder):
    tokenizer = CharTokenizer.from_text("abcdefgh \n")
    return make_model_folder(
        "char-model", tokenizer_spec=tokenizer.spec(), n_layer=1, n_head=1, n_embd=16, block_size=16,
        vocab_size=tokenizer.vocab_size,
    )


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_streams_the_prompt_and_its_continuation(capsys, bpe_model_dir):
    code, out, _ = run_cli(
        capsys, "sample", "--model", str(bpe_model_dir), "--prompt", "Hello, I'm a language model,",
        "--max-new-tokens", "12", "--temperature", "0", "--no-stop-at-eot", "--device", "cpu",
    )
    assert code == 0
    assert out.startswith("Hello, I'm a language model,")
    model = GPT.from_pretrained(bpe_model_dir)
    tokenizer = load_tokenizer(bpe_model_dir)
    prompt = tokenizer.encode("Hello, I'm a language model,")
    expected = model.generate([prompt], 12, temperature=0)[0]
    assert out == tokenizer.decode(expected) + "\n"


def test_sample_seed_repeats_and_num_samples_separates(capsys, bpe_model_dir):
    args = ["sample", "--model", str(bpe_model_dir), "--prompt", "The", "--max-new-tokens", "8",
            "--num-samples", "3", "--seed", "11", "--top-p", "0.9", "--no-stop-at-eot"]
    first = run_cli(capsys, *args)
    second = run_cli(capsys, *args)
    assert first[0] == 0 and first[1] == second[1]
    assert first[1].count("---------------") == 2


def test_sample_from_a_char_model_uses_its_vocabulary(capsys, char_model_dir):
    code, out, _ = run_cli(capsys, "sample", "--model", str(char_model_dir), "--max-new-tokens", "20", "--seed", "1")
    assert code == 0
    assert set(out) <= set("abcdefgh \n")
    assert len(out) == 20 + 1  # 20 characters (after the newline it starts from), the final newline


def test_bf16_sampling_runs(capsys, bpe_model_dir):
    code, out, err = run_cli(
        capsys, "sample", "--model", str(bpe_model_dir), "--dtype", "bfloat16", "--max-new-tokens", "5", "-v"
    )
    assert code == 0 and "bfloat16" in err


def test_int4_sampling_follows_the_quantized_model(capsys, bpe_model_dir):
    from gpt2lab.kernels import accelerate
    from gpt2lab.quantize import quantize

    code, out, err = run_cli(
        capsys, "sample", "--model", str(bpe_model_dir), "--dtype", "int4", "--prompt", "Hello",
        "--max-new-tokens", "6", "--temperature", "0", "--no-stop-at-eot", "--device", "cpu", "-v",
    )
    assert code == 0 and "int4" in err
    tokenizer = load_tokenizer(bpe_model_dir)
    quantized = accelerate(quantize(GPT.from_pretrained(bpe_model_dir), "int4"))  # as the CLI loads it
    expected = quantized.generate([tokenizer.encode("Hello")], 6, temperature=0)[0]
    assert out == tokenizer.decode(expected) + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "definitely-not-a-model"], "unknown model"),
        (["--model", "./missing/folder"], "unknown model"),
    ],
)
def test_bad_model_gets_one_message_and_exit_2(capsys, args, message):
    code, out, err = run_cli(capsys, "sample", *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_incomplete_folder_is_explained(capsys, tmp_path, bpe_model_dir):
    (tmp_path / "config.json").write_text((bpe_model_dir / "config.json").read_text())
    code, _, err = run_cli(capsys, "sample", "--model", str(tmp_path))
    assert code == 2 and "model.safetensors" in err


def test_char_not_in_vocabulary_is_explained(capsys, char_model_dir):
    code, _, err = run_cli(capsys, "sample", "--model", str(char_model_dir), "--prompt", "xyz")
    assert code == 2 and "'x'" in err


@pytest.mark.parametrize(
    "args",
    [["--max-new-tokens", "-3"], ["--temperature", "-1"], ["--top-p", "2"], ["--top-k", "0"], ["--num-samples", "0"]],
)
def test_bad_numbers_are_refused_by_the_parser(capsys, bpe_model_dir, args):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(bpe_model_dir), *args])
    assert exit_info.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_offline_hub_name_says_how_to_use_a_local_folder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab", "sample", "--model", "gpt2"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "openai-community/gpt2" in result.stderr and "--model ./gpt2-weights" in result.stderr
    assert "--set init_from=./gpt2-weights` (train)" in result.stderr  # train names its model so
    assert "Traceback" not in result.stderr


def test_convert_exports_for_transformers(capsys, tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "checkpoint"
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, padded_vocab_size=50304))
    model.save_pretrained(source, keep_padded_vocab=True)
    code, out, _ = run_cli(capsys, "convert", str(source), "--out", str(tmp_path / "export"))
    assert code == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["vocab_size"] == 50257
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model.eval()(idx)[0][..., :50257], atol=1e-5)


def test_every_verb_has_a_manual(capsys):
    for verb in ("sample", "convert"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_the_command_lists_its_verbs_without_loading_pytorch():
    """`gpt2lab --help` and the verbs that run no model import only what they need."""
    probe = (
        "import sys\n"
        "from gpt2lab.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
    )
    from gpt2lab.cli import VERBS

    for argv in (["--help"], ["sample", "--help"], ["prepare", "--help"], ["serve", "--help"], ["chat", "--help"]):
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert result.stderr.strip() == "no torch", (argv, result.stderr)
        if argv == ["--help"]:
            for verb, summary in VERBS.items():
                assert verb in result.stdout and " ".join(summary.split()[:3]) in result.stdout
