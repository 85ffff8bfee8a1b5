"""The `convert` verb: export a model or checkpoint as the transformers model of its architecture,
or as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from .options import MODEL_HELP
from ..errors import UserError
from ..eval.report import read_metrics


def add_convert_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    convert = verbs.add_parser(
        "convert",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write a model as config.json + model.safetensors that transformers, vLLM and lm-eval load, as
the architecture that computes exactly what the model computes:
  GPT2LMHeadModel   GPT-2's options
  LlamaForCausalLM  position=rope, norm=rmsnorm, activation=swiglu, bias=false, no logit_softcap
                    (any n_kv_head, mlp_hidden, rope_base; tied embeddings or not)
  Qwen3ForCausalLM  the same with qk_norm=true
Other options (relu2, logit_softcap, learned positions with rmsnorm, ...) are refused, naming
them; such a model folder stays a gpt2lab model. A padded vocabulary is cut back to its real
size, and the model's tokenizer is written beside it (GPT-2's BPE, a BPE of `gpt2lab tokenizer
train`, or characters), so AutoTokenizer gives gpt2lab's ids. A LoRA
checkpoint's adapters are merged into its weights: the export is a plain model.

--format gguf writes one file that llama.cpp, ollama and LM Studio run, as llama.cpp's gpt2,
llama or qwen3 architecture (the same three sets of options), the model's BPE inside (GPT-2's or
a trained one) and a chat model's template; --type f32, f16 (default), bf16 or q8_0. A character
vocabulary is refused.""",
        epilog="""examples:
  gpt2lab convert runs/gpt2-124m --out exported/gpt2-124m
  gpt2lab convert runs/gpt2-124m/checkpoints/step_00019073 --out exported --dtype bfloat16
  gpt2lab convert runs/lora --out exported/lora      # base + adapters, merged
  gpt2lab convert runs/sft --format gguf --out sft.gguf --type q8_0""",
    )
    convert.add_argument("model", help=MODEL_HELP)
    convert.add_argument(
        "--out", required=True,
        help="folder to write (created if needed; must be new or empty), or the file with --format gguf",
    )
    convert.add_argument(
        "--force", action="store_true",
        help="replace what a non-empty --out folder holds, or an existing --out file (never the model converted)",
    )
    convert.add_argument(
        "--format", default="folder", choices=["folder", "gguf"],
        help="a transformers model folder (default), or one GGUF file for llama.cpp",
    )
    convert.add_argument(
        "--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
        help="precision of the saved weights (folder format)",
    )
    convert.add_argument(
        "--type", choices=["f32", "f16", "bf16", "q8_0"], default=None,
        help="the GGUF file's type (--format gguf; default f16): matrices in it, norms and biases in f32",
    )
    convert.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..pretrained import (
        check_finite_weights, export_for_transformers, export_layout, load_model, read_lora_config, resolve_model_path,
    )
    from ..runtime import DTYPES
    from ..tokenizer import load_tokenizer

    folder = resolve_model_path(args.model)
    _check_format_options(args)
    if args.format == "gguf":
        return _convert_to_gguf(folder, Path(args.out), args.type or "f16", args.force)
    out = _output_folder(Path(args.out), folder, args.force)
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    model = load_model(folder, dtype=dtype)
    check_finite_weights(model, folder)  # an export would spread what `sample` refuses
    export_layout(model.config)  # a refusal comes before anything else the folder may lack
    spec = load_tokenizer(folder).spec()
    if args.force and out.exists():
        shutil.rmtree(out)
    export_for_transformers(model, out, tokenizer_spec=spec, card_facts=training_facts(folder))
    lora = read_lora_config(folder)
    merged = f"; LoRA rank {lora.rank} adapters merged into the weights" if lora else ""
    print(f"wrote {args.out} (config.json, generation_config.json, model.safetensors, tokenizer files, README.md){merged}")
    return 0


def _check_format_options(args: argparse.Namespace) -> None:
    if args.format == "gguf" and args.dtype != "keep":
        raise UserError(f"--dtype is the folder format's precision; a GGUF file takes --type (f32, f16, bf16, q8_0), not --dtype {args.dtype}")
    if args.format == "folder" and args.type is not None:
        raise UserError(f"--type {args.type} is a GGUF file's type; add --format gguf, or use --dtype for a folder")


def _convert_to_gguf(folder: Path, out: Path, file_type: str, force: bool) -> int:
    from ..formats.gguf import architecture, gguf_tokenizer, write_gguf
    from ..pretrained import check_finite_weights, load_model, read_config
    from ..tokenizer import load_tokenizer

    _check_output_file(out, folder, force)
    # The refusals come before the weights are read.
    architecture(read_config(folder))
    spec = load_tokenizer(folder).spec()
    gguf_tokenizer(spec)
    model = load_model(folder)
    check_finite_weights(model, folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = write_gguf(model.state_dict(), model.config, out, tokenizer_spec=spec, file_type=file_type,
                         name=training_facts(folder)["name"])
    chat = ", its chat template" if summary.chat_template else ""
    print(f"wrote {out} (llama.cpp's {summary.architecture}, {file_type}, {summary.tokens} tokens{chat})")
    return 0


def _check_output_file(out: Path, source: Path, force: bool) -> None:
    """Refuse a GGUF --out that would lose something: a folder, one of the model's own files, or
    an existing file without --force."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the .gguf file to write, e.g. {out / 'model.gguf'}")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise UserError(f"--out {out} lies under a file, not a folder; name a file in a folder")
    resolved, source = out.resolve(), source.resolve()
    if source in resolved.parents and out.exists() and resolved.suffix != ".gguf":
        raise UserError(f"--out {out} is a file of the model being converted; write the GGUF file elsewhere")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; choose a new file name, or add --force to replace it")


def _output_folder(out: Path, source: Path, force: bool) -> Path:
    """`out`, once it is sure that writing there loses nothing: not the model read (a checkpoint
    rewritten without its padded rows would resume wrongly), not a file, not a folder of other
    files unless --force says to replace them."""
    resolved, source = out.resolve(), source.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise UserError(
            f"--out {out} is the model folder being converted, or holds it, or lies inside it; "
            "write the export to a folder of its own"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out {out} is not empty; choose a new or empty folder, or add --force to replace what it holds"
        )
    return out


def training_facts(folder: Path) -> dict[str, Any]:
    """What the model card can say of a checkpoint: its step, tokens and validation loss
    (state.json), its training data (the training config), its LoRA adapters, and its last
    HellaSwag score before that step (the run's metrics.jsonl). A plain model folder has none of
    these."""
    facts: dict[str, Any] = {"name": folder.parent.parent.name if folder.parent.name == "checkpoints" else folder.name}
    state = _json_object(folder / "state.json")
    for key in ("step", "tokens", "val_loss"):
        if isinstance(state.get(key), (int, float)):
            facts["steps" if key == "step" else key] = round(state[key], 4) if key == "val_loss" else state[key]
    record = _json_object(folder / "gpt2lab.json")
    lora = record.get("lora")
    if isinstance(lora, dict):
        targets = ", ".join(map(str, lora.get("targets", [])))
        facts["finetuning"] = f"LoRA rank {lora.get('rank')} (alpha {lora.get('alpha')}) on {targets}, merged"
    train_config = record.get("train_config")
    if isinstance(train_config, dict) and isinstance(train_config.get("data"), dict):
        data = Path(str(train_config["data"].get("path", "")))
        source = _json_object(data / "dataset.json").get("source")
        facts["dataset"] = f"{source} ({data.name})" if isinstance(source, str) else data.name or None
    metrics = folder.parent.parent / "metrics.jsonl"
    if "steps" in facts and metrics.is_file():
        scores = [r for r in read_metrics(metrics) if "hellaswag_acc_norm" in r and r.get("step", 0) <= facts["steps"]]
        if scores:
            facts["hellaswag_acc_norm"] = round(scores[-1]["hellaswag_acc_norm"], 4)
    return facts


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
