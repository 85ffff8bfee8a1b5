"""What other tools get from `gpt2lab convert`: transformers' AutoTokenizer and `pipeline` with
their defaults, for GPT-2's BPE and for a character vocabulary; the files transformers' own
save_pretrained writes; a model card with what trained the model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, pipeline  # noqa: E402

from gpt2lab import GPT, GPTConfig  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.pretrained import save_pretrained, write_model_folder  # noqa: E402
from gpt2lab.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.  <|endoftext|> naïve café 123"
HUB_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "README.md"}


def short_context_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size)).eval()


def export(source: Path, out: Path) -> None:
    assert main(["convert", str(source), "--out", str(out)]) == 0


def test_gpt2_export_is_complete_for_auto_tokenizer_and_pipeline(tmp_path):
    source = save_pretrained(short_context_model(50257), tmp_path / "model", tokenizer_spec="gpt2")
    export(source, tmp_path / "hf")
    folder = tmp_path / "hf"
    assert HUB_FILES | {"vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast
    ours = GPT2Tokenizer()
    assert tokenizer(TEXT.replace("<|endoftext|>", ""))["input_ids"] == ours.encode(TEXT.replace("<|endoftext|>", ""))
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    assert json.loads((folder / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"

    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == 50256 and config["dtype"] == "float32"
    assert config["transformers_version"] == transformers.__version__
    assert json.loads((folder / "generation_config.json").read_text())["max_length"] == 64

    # pipeline's own default is 256 new tokens; a 64-position model must stop at its context.
    out = pipeline("text-generation", model=str(folder))("Hello there", return_tensors=True)
    assert 2 < len(out[0]["generated_token_ids"]) <= 64


def test_char_export_tokenizes_characters_and_has_no_gpt2_specials(tmp_path):
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n:,.!?'"))
    spec = {"type": "char", "chars": "".join(chars)}
    source = save_pretrained(short_context_model(len(chars)), tmp_path / "model", tokenizer_spec=spec)
    export(source, tmp_path / "hf")
    folder = tmp_path / "hf"
    assert HUB_FILES <= {p.name for p in folder.iterdir()}
    assert not (folder / "vocab.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "First Citizen:\nBefore we proceed, hear me  speak!"
    ids = tokenizer(text)["input_ids"]
    assert ids == CharTokenizer(chars).encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    config = json.loads((folder / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None

    out = pipeline("text-generation", model=str(folder))("ROMEO:")
    assert out[0]["generated_text"].startswith("ROMEO:") and len(out[0]["generated_text"]) <= 64


def test_model_card_names_the_data_steps_and_scores_of_a_checkpoint(tmp_path):
    data = tmp_path / "data" / "shakespeare"
    data.mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"source": "tinyshakespeare"}))
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_00000040"
    write_model_folder(
        short_context_model(50257).state_dict(), short_context_model(50257).config, checkpoint,
        keep_padded_vocab=True, tokenizer_spec="gpt2", extra_record={"train_config": {"data": {"path": str(data)}}},
    )
    (checkpoint / "state.json").write_text(json.dumps({"step": 40, "tokens": 20480, "val_loss": 4.123456}))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [
            {"step": 20, "hellaswag_acc_norm": 0.25}, {"step": 40, "hellaswag_acc_norm": 0.2625},
            {"step": 60, "hellaswag_acc_norm": 0.3},
        ])
    )
    export(run, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# run" in card and "GPT2LMHeadModel of 1 layers" in card
    for row in ("| training data | tinyshakespeare (shakespeare) |", "| optimizer steps | 40 |",
                "| tokens seen | 20480 |", "| validation loss | 4.1235 |", "| HellaSwag (acc_norm) | 0.2625 |"):
        assert row in card


@pytest.mark.parametrize("option, module, extra", [
    ({"tensorboard": True}, "torch.utils.tensorboard", "tensorboard"),
    ({"wandb_project": "runs"}, "wandb", "wandb"),
])
def test_a_missing_logger_names_its_extra_and_the_extra_is_declared(tmp_path, monkeypatch, option, module, extra):
    import tomllib

    from gpt2lab.errors import UserError
    from gpt2lab.train.metrics import MetricsLog

    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    with pytest.raises(UserError, match=rf'pip install "gpt2lab\[{extra}\]"'):
        MetricsLog(tmp_path, **option)
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith(extra) for req in extras[extra])
    assert {"lm-eval", "accelerate"} <= {req.split(">")[0] for req in extras["eval"]}


def test_shakespeare_shards_are_one_stream_without_end_of_text_as_documented(tmp_path, capsys):
    from gpt2lab.data import open_dataset

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "no end-of-text token" in " ".join(capsys.readouterr().out.split())
    assert main(["prepare", "shakespeare", "--out", str(tmp_path / "bpe")]) == 0
    dataset = open_dataset(tmp_path / "bpe")
    shards = dataset.shards("train") + dataset.shards("val")
    assert sum(len(dataset.tokens(shard)) for shard in shards) == 338025
    assert not any((dataset.tokens(shard) == 50256).any() for shard in shards)


def test_a_chat_models_export_carries_its_role_tokens_at_their_ids(tmp_path):
    from gpt2lab.tokenizer import CHAT_FORMATS

    spec = {"type": "gpt2", "chat": "gpt2lab-chat-v1"}
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50261)).eval()
    export(save_pretrained(model, tmp_path / "model", tokenizer_spec=spec), tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for name, token_id in CHAT_FORMATS["gpt2lab-chat-v1"].items():
        assert tokenizer.convert_ids_to_tokens(token_id) == name
    # An answer ends at the end of turn: the chat model's eos.
    assert tokenizer.eos_token_id == 50260 and (tmp_path / "hf" / "vocab.json").is_file()
    assert "| tokenizer | GPT-2 BPE |" in (tmp_path / "hf" / "README.md").read_text()


CHAT_END_AT = 40
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": " Another one?\n"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "naïve café 123\n\n  x"},
     {"role": "user", "content": "日本語 and emoji 🙂 <b>tags</b> | pipes |"}],
]


@pytest.fixture(scope="module")
def chat_export(make_chat_model_folder, tmp_path_factory):
    source = make_chat_model_folder("interop-chat", end_at=CHAT_END_AT, block_size=1024)
    out = tmp_path_factory.mktemp("chat-export") / "hf"
    export(source, out)
    return source, out


def test_a_chat_export_renders_its_conversations_as_gpt2lab_does(chat_export):
    from gpt2lab.chat.template import ChatTemplate

    _, folder = chat_export
    template = ChatTemplate(GPT2Tokenizer(chat="gpt2lab-chat-v1"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            exported = tokenizer.apply_chat_template(conversation, add_generation_prompt=prompt, return_dict=False)
            assert exported == template.render(conversation, add_generation_prompt=prompt)[0], conversation
    assert tokenizer.eos_token == "<|end|>" and tokenizer.bos_token == "<|endoftext|>"
    with pytest.raises(Exception, match="only the first message may be the system message"):
        tokenizer.apply_chat_template([*CONVERSATIONS[0], {"role": "system", "content": "late"}])
    with pytest.raises(Exception, match="role tool is not one of"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_a_chat_export_stops_at_the_end_of_turn_in_transformers(chat_export):
    from transformers import AutoModelForCausalLM

    from gpt2lab import load_model
    from gpt2lab.chat.template import ChatTemplate

    source, folder = chat_export
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [50260, 50256] and "max_length" not in generation
    template = ChatTemplate(GPT2Tokenizer(chat="gpt2lab-chat-v1"))
    prompt = template.render_prompt(CONVERSATIONS[1])
    ours = load_model(source).generate([prompt], 200, temperature=0.0)[0]
    assert ours[CHAT_END_AT] == 50260
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("transformers").addHandler(handler)
    transformers.logging.set_verbosity_warning()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=200, do_sample=False)[0].tolist()
    finally:
        transformers.logging.set_verbosity_error()
        logging.getLogger("transformers").removeHandler(handler)
    assert not [w.getMessage() for w in warnings if "max_length" in w.getMessage()]
    assert theirs == ours[: CHAT_END_AT + 1]  # the same answer, ended at <|end|>
    answer = GPT2Tokenizer().decode(ours[len(prompt):CHAT_END_AT])
    reply = pipeline("text-generation", model=str(folder))(CONVERSATIONS[1], do_sample=False)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": answer}
