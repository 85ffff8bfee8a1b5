"""The files transformers' own `save_pretrained` writes beside the weights, so that AutoTokenizer,
`pipeline`, lm-eval and the hub see a complete folder: the tokenizer (`tokenizer.json` built by the
`tokenizers` library, for GPT-2's BPE, a trained BPE and a character vocabulary), `special_tokens_map.json`,
`generation_config.json`, and a `README.md` model card."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..chat.template import jinja_chat_template
from ..config import GPTConfig
from ..files import write_atomic
from ..tokenizer import CHAT_FORMATS, GPT2_EOT_TOKEN, BPETokenizer, is_gpt2_spec, packaged_vocabulary, tokenizer_from_spec

GPT2_EOT_TEXT = "<|endoftext|>"
# Written as `transformers_version` where transformers is not installed: the oldest release the
# exported folders are tested against (pyproject's dev extra).
OLDEST_TESTED_TRANSFORMERS = "4.44.0"


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return OLDEST_TESTED_TRANSFORMERS


def _chat_tokens(tokenizer_spec: Any) -> dict[str, int]:
    """The chat format's tokens of a GPT-2 tokenizer record ({} for plain GPT-2)."""
    chat = tokenizer_spec.get("chat") if isinstance(tokenizer_spec, dict) else None
    return CHAT_FORMATS[chat] if chat else {}


def _is_trained_bpe(tokenizer_spec: Any) -> bool:
    return isinstance(tokenizer_spec, dict) and tokenizer_spec.get("type") == "bpe"


def special_token_ids(tokenizer_spec: Any) -> dict[str, Any]:
    """bos/eos ids for config.json and generation_config.json: the BPE's end-of-text, and for a chat
    model its end of turn first (an answer ends there); a character vocabulary has no such token,
    so none (transformers' GPT-2 default of 50256 would be wrong)."""
    if _is_trained_bpe(tokenizer_spec):
        tokenizer = tokenizer_from_spec(tokenizer_spec)
        end_of_text, chat = tokenizer.eot_token, tokenizer.chat_tokens()
    elif is_gpt2_spec(tokenizer_spec):
        end_of_text, chat = GPT2_EOT_TOKEN, _chat_tokens(tokenizer_spec)
    else:
        return {"bos_token_id": None, "eos_token_id": None}
    eos = [chat["<|end|>"], end_of_text] if chat else end_of_text
    return {"bos_token_id": end_of_text, "eos_token_id": eos}


def _gpt2_tokenizer(chat_tokens: dict[str, int]) -> Tokenizer:
    encoder_json, vocab_bpe = packaged_vocabulary()
    tokenizer = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(GPT2_EOT_TEXT, special=True)])
    # A chat format's tokens follow end-of-text in the padded rows; added in id order, they get
    # exactly their ids.
    for name, token_id in sorted(chat_tokens.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([AddedToken(name, special=True)])
        assert tokenizer.token_to_id(name) == token_id, (name, token_id)
    return tokenizer


def _char_tokenizer(chars: str) -> Tokenizer:
    # One token per character, any character (newlines included) its own piece; decoding joins
    # the pieces with nothing between them.
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def dtype_entries(dtype: Any) -> dict[str, str]:
    """config.json's precision and the transformers release it is written for; transformers 5
    reads `dtype`, older releases `torch_dtype`."""
    name = str(dtype).removeprefix("torch.")
    return {"dtype": name, "torch_dtype": name, "transformers_version": transformers_version()}


def write_tokenizer_files(directory: Path, tokenizer_spec: Any, block_size: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (and GPT-2's
    vocab.json / merges.txt, which the slow tokenizer reads) for the model's own tokenizer."""
    if _is_trained_bpe(tokenizer_spec):
        from ..data.tokenizer_train import write_transformers_tokenizer

        tokenizer = tokenizer_from_spec(tokenizer_spec)
        assert isinstance(tokenizer, BPETokenizer)
        write_transformers_tokenizer(directory, tokenizer, model_max_length=block_size)
        return
    if is_gpt2_spec(tokenizer_spec):
        tokenizer = _gpt2_tokenizer(_chat_tokens(tokenizer_spec))
        encoder_json, vocab_bpe = packaged_vocabulary()
        write_atomic(directory / "vocab.json", lambda p: shutil.copyfile(encoder_json, p))
        write_atomic(directory / "merges.txt", lambda p: shutil.copyfile(vocab_bpe, p))
        special = {"bos_token": GPT2_EOT_TEXT, "eos_token": GPT2_EOT_TEXT, "unk_token": GPT2_EOT_TEXT}
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
        if _chat_tokens(tokenizer_spec):
            # The end of turn as eos: what `pipeline(messages)`, vLLM and lm-eval stop at.
            special["eos_token"] = "<|end|>"
            tokenizer_config["chat_template"] = jinja_chat_template(tokenizer_spec["chat"])
        tokenizer_config.update(special)
    elif isinstance(tokenizer_spec, dict) and tokenizer_spec.get("type") == "char":
        tokenizer = _char_tokenizer(tokenizer_spec["chars"])
        special = {}
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:
        return
    tokenizer_config.update(model_max_length=block_size, clean_up_tokenization_spaces=False)
    write_atomic(directory / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    _write_json(directory / "special_tokens_map.json", special)


# transformers' `pipeline` generates this many new tokens unless told otherwise.
PIPELINE_DEFAULT_NEW_TOKENS = 256


def write_generation_config(directory: Path, config: GPTConfig, tokenizer_spec: Any) -> None:
    """generation_config.json as transformers' `save_pretrained` writes it: the special tokens.
    A context too short for `pipeline`'s default of 256 new tokens also gets its length as
    `max_length`, which keeps the pipeline inside the positions (transformers then warns once per
    `generate` given max_new_tokens: a warning, where the default would be an IndexError)."""
    generation: dict[str, Any] = {k: v for k, v in special_token_ids(tokenizer_spec).items() if v is not None}
    if config.block_size <= PIPELINE_DEFAULT_NEW_TOKENS:
        generation["max_length"] = config.block_size
    generation["transformers_version"] = transformers_version()
    _write_json(directory / "generation_config.json", generation)


def write_model_card(directory: Path, config: GPTConfig, architecture: str, facts: dict[str, Any]) -> None:
    """README.md with the hub's metadata block: what made the model, on what data, how well it did."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- gpt2lab"]
    if facts.get("dataset"):
        lines += ["datasets:", f"- {facts['dataset']}"]
    lines += ["---", "", f"# {facts.get('name', directory.name)}", ""]
    lines.append(
        f"A {architecture} of {config.n_layer} layers, {config.n_head} heads, width {config.n_embd} and "
        f"context {config.block_size}, vocabulary {config.vocab_size}, trained with "
        "gpt2lab and exported by `gpt2lab convert`."
    )
    table = [(label, facts[key]) for key, label in MODEL_CARD_FACTS if facts.get(key) is not None]
    if table:
        lines += ["", "| | |", "|---|---|"] + [f"| {label} | {value} |" for label, value in table]
    write_atomic(directory / "README.md", lambda p: p.write_text("\n".join(lines) + "\n"))


MODEL_CARD_FACTS = (
    ("dataset", "training data"),
    ("steps", "optimizer steps"),
    ("tokens", "tokens seen"),
    ("val_loss", "validation loss"),
    ("finetuning", "fine-tuning"),
    ("hellaswag_acc_norm", "HellaSwag (acc_norm)"),
    ("tokenizer", "tokenizer"),
)


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))
