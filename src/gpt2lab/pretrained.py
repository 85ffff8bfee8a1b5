"""Model folders: finding them (hub names, folders, checkpoints, run folders), loading and writing them.

A folder gpt2lab writes holds `gpt2lab.json` (the native config, the tokenizer, and which layout
`model.safetensors` is in) and the weights: in the layout of transformers' GPT-2, Llama or Qwen3
wherever one of those computes what the model computes, so the folder is also a transformers model
(`config.json`), else in gpt2lab's own layout. A folder with `config.json` and no `gpt2lab.json`
(the hub's, transformers') is in the layout of its `model_type`, GPT-2's by default; one whose
`gpt2lab.json` names no layout (written before layouts were recorded) is GPT-2's.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .errors import UserError
from .files import digest_problem, file_sha256, write_atomic
from .formats import (
    ARCHITECTURES, hub_files, native, options_without_transformers_equivalent, transformers_gpt2, transformers_layout,
    transformers_llama,
)
from .config import LoRAConfig
from .lora import apply_lora, lora_config, lora_state_dict, merge_adapters, split_adapters
from .model import Transformer
from .quantize import QUANTIZERS, quantize
from .runtime import resolve_device, resolve_dtype
from .tokenizer import is_gpt2_spec, tokenizer_from_spec

HUB_MODELS = {
    name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
}
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
NATIVE_RECORD = "gpt2lab.json"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")
# What every model folder gpt2lab writes holds (checkpoints add their training state).
MODEL_FILES = (NATIVE_RECORD, "model.safetensors")
# The adapters of a LoRA checkpoint, beside its frozen base; gpt2lab.json's "lora" says it is one.
ADAPTERS_FILE = "adapters.safetensors"
# gpt2lab.json's table of the sha256 of the files written with it (weights, adapters, training state).
DIGESTS = "sha256"
# The sha256 of the tokenizer record as written: a record edited afterwards (a chat model's record
# claiming plain GPT-2 or characters) agrees with every tensor shape, so only this tells it.
TOKENIZER_DIGEST = "tokenizer_sha256"
# The version of gpt2lab.json's layout that this gpt2lab writes and reads.
RECORD_FORMAT = 1


# ---- finding the folder ----------------------------------------------------------------------


def checkpoint_folders(run_dir: Path, required: tuple[str, ...] = MODEL_FILES) -> list[Path]:
    """The complete checkpoints of `run_dir/checkpoints`, oldest first.

    Only folders under their final name `step_XXXXXXXX` count (they are renamed into place once
    fully written), and only those that hold every file in `required`, plus the adapters where
    gpt2lab.json records LoRA: a folder that a kill left half deleted keeps its name but not all
    its files.
    """
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        (
            p for p in folder.iterdir()
            if p.is_dir() and CHECKPOINT_NAME.match(p.name)
            and all((p / name).is_file() for name in (*required, *_recorded_files(p)))
        ),
        key=lambda p: p.name,
    )


def _recorded_files(folder: Path) -> tuple[str, ...]:
    """The files a folder's own gpt2lab.json says it holds beyond MODEL_FILES: the adapters of a
    LoRA checkpoint. A record that cannot be read adds none (loading it reports the damage)."""
    try:
        record = json.loads((folder / NATIVE_RECORD).read_bytes())
    except (OSError, ValueError):
        return ()
    return (ADAPTERS_FILE,) if isinstance(record, dict) and record.get("lora") is not None else ()


def newest_checkpoint(run_dir: Path, required: tuple[str, ...] = MODEL_FILES) -> Path | None:
    """The complete checkpoint with the highest step in `run_dir/checkpoints` (None if there is none)."""
    complete = checkpoint_folders(run_dir, required)
    return complete[-1] if complete else None


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - every hub failure means the same to the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"could not get the weights of {repo_id!r} from the Hugging Face hub ({reason}). "
            "If this machine is offline, download them elsewhere (a folder with config.json and "
            "model.safetensors, e.g. `hf download "
            f"{repo_id} config.json model.safetensors --local-dir gpt2-weights`) and name that folder "
            "instead: `--model ./gpt2-weights` (sample, chat, eval, serve, convert) or "
            "`--set init_from=./gpt2-weights` (train)"
        ) from None


def _missing_folder(text: str, path: Path) -> UserError | None:
    """The error for a model name meant as a folder that does not exist (so that a mistyped path is
    not sent to the hub): one that looks like a path, or whose parent folder exists."""
    parent = path.parent
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/") or text.count("/") > 1
    if not (looks_like_path or (parent != Path(".") and parent.is_dir())):
        return None
    if parent.is_dir():
        names = sorted(p.name for p in parent.iterdir() if p.is_dir())
        close = difflib.get_close_matches(path.name, names, n=1)
        detail = f"{parent} has no {path.name!r}" + (f"; did you mean {parent / close[0]}?" if close else "")
    else:
        ancestor = next((p for p in parent.parents if p.is_dir()), Path("."))
        detail = f"{parent} does not exist either" + (f"; {ancestor} does" if ancestor not in (Path("."), Path(ancestor.anchor)) else "")
    return UserError(
        f"unknown model {text!r}: no such folder ({detail}). Check the path, or give a hub name such as gpt2"
    )


def resolve_model_path(spec: str | Path) -> Path:
    """A folder holding weights, from a hub name, a transformers folder, a checkpoint folder or a
    run folder (its newest checkpoint)."""
    text = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"{path} is a file; pass the folder that holds config.json and model.safetensors"
            )
        if (path / "config.json").is_file() or (path / NATIVE_RECORD).is_file():
            return path
        if (path / "checkpoints").is_dir():
            newest = newest_checkpoint(path)
            if newest is None:
                raise UserError(
                    f"run folder {path} has no complete checkpoint yet; train longer or pass a checkpoint folder"
                )
            return newest
        raise UserError(
            f"{path} is not a model folder: it has no config.json (nor a checkpoints/ folder of a run); "
            "pass a folder written by save_pretrained, a checkpoint, or a hub name such as gpt2"
        )
    missing = _missing_folder(text, path)
    if missing is not None:
        raise missing
    if text in HUB_MODELS:
        return _download_from_hub(HUB_MODELS[text])
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.startswith((".", "/")):
        return _download_from_hub(text)
    raise UserError(
        f"unknown model {text!r}: not an existing folder, and not one of "
        f"{', '.join(HUB_MODELS)} (or a hub id such as openai-community/gpt2)"
    )


# ---- config ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); the folder is damaged") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object; the folder is damaged")
    return value


def check_digest(folder: Path, name: str) -> None:
    """A UserError naming `folder/name` where it differs from the sha256 that the folder's
    gpt2lab.json recorded when it was written. Folders written before digests were recorded, and
    files without one, pass; a missing file is left to the reader to report."""
    record = folder / NATIVE_RECORD
    if not (record.is_file() and (folder / name).is_file()):
        return
    digests = _read_json(record).get(DIGESTS, {})
    if not isinstance(digests, dict):
        raise UserError(f"{record}: {DIGESTS!r} should be a table of file digests; the folder is damaged")
    problem = digest_problem(folder / name, digests.get(name), NATIVE_RECORD)
    if problem is not None:
        raise UserError(
            f"{problem}: the file is damaged or was changed after it was written; use an earlier "
            "checkpoint, or write the folder again"
        )


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's gpt2lab.json (None: it has none), refused when of a format this gpt2lab does
    not know (folders from before "format" was written are format 1)."""
    path = folder / NATIVE_RECORD
    if not path.is_file():
        return None
    record = _read_json(path)
    version = record.get("format", RECORD_FORMAT)
    if isinstance(version, bool) or version != RECORD_FORMAT:
        raise UserError(
            f"{path} is of format {version!r}, and this gpt2lab reads format {RECORD_FORMAT}: a newer gpt2lab "
            "wrote it, or it is damaged; upgrade gpt2lab, or write the folder again"
        )
    return record


def _check_tokenizer_fits(config: GPTConfig, spec: Any, path: Path) -> None:
    """A UserError where the tokenizer recorded at `path` makes ids the model has no row for (a chat
    format's tokens on a model of GPT-2's 50257, a vocab_size cut short). A model may have more ids
    than its tokenizer (GPT-2's padded 50304): sampling never draws them."""
    tokenizer = tokenizer_from_spec(spec)
    if config.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"{path}: vocab_size {config.vocab_size} is less than the {tokenizer.vocab_size} ids of its tokenizer "
            f"({tokenizer.describe()}): the record does not describe this model; write the folder again with "
            "the model's own tokenizer"
        )


def tokenizer_digest(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_tokenizer_record(record: dict[str, Any], path: Path) -> None:
    """A UserError where the tokenizer record differs from the one gpt2lab wrote with the weights
    (folders written before the digest was recorded pass)."""
    expected = record.get(TOKENIZER_DIGEST)
    if expected is None:
        return
    spec = record.get("tokenizer")
    if spec is None or tokenizer_digest(spec) != expected:
        named = "no tokenizer" if spec is None else tokenizer_from_spec(spec).describe()
        raise UserError(
            f"{path}: its tokenizer record ({named}) is not the one the weights were written with "
            f"({TOKENIZER_DIGEST} differs): the record was changed after it was written; restore it, or write "
            "the folder again with the model's own tokenizer"
        )


def read_config(folder: Path) -> GPTConfig:
    native = folder / NATIVE_RECORD
    record = read_record(folder)
    if record is not None:
        if "model" not in record:
            raise UserError(f"{native} has no 'model' entry; the folder is damaged")
        config = GPTConfig.from_dict(record["model"], where=f"{native}: model")
        if "tokenizer" in record:
            _check_tokenizer_fits(config, record["tokenizer"], native)
        _check_tokenizer_record(record, native)
        return config
    hf_config = folder / "config.json"
    if not hf_config.is_file():
        raise UserError(f"{folder} has no config.json; the folder is incomplete")
    hf = _read_json(hf_config)
    if hf.get("model_type") in transformers_llama.LAYOUT_OF_MODEL_TYPE:
        return transformers_llama.config_from_hf(hf, source=str(hf_config))
    return transformers_gpt2.config_from_hf(hf, source=str(hf_config))


# ---- weights ---------------------------------------------------------------------------------


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} could not be read as safetensors ({error}); the file is damaged") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        check_digest(folder, single.name)
        return _load_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise UserError(f"{folder / shard}, listed in {index.name}, is missing; the folder is incomplete")
            tensors.update(_load_safetensors(folder / shard))
        return tensors
    raise UserError(
        f"{folder} has no model.safetensors; the folder is incomplete "
        "(gpt2lab reads safetensors only; convert .bin weights with transformers' save_pretrained)"
    )


KNOWN_LAYOUTS = (native.LAYOUT, transformers_gpt2.LAYOUT, *transformers_llama.ARCHITECTURES)


def weights_layout(folder: Path) -> str:
    """The layout of the folder's model.safetensors, as its gpt2lab.json records it (a folder
    without one: as its config.json's model_type says)."""
    record = folder / NATIVE_RECORD
    if not record.is_file():
        hf_config = folder / "config.json"
        model_type = _read_json(hf_config).get("model_type") if hf_config.is_file() else None
        return transformers_llama.LAYOUT_OF_MODEL_TYPE.get(model_type, transformers_gpt2.LAYOUT)
    layout = read_record(folder).get("weights", transformers_gpt2.LAYOUT)
    if layout not in KNOWN_LAYOUTS:
        raise UserError(
            f"{record} says the weights are in layout {layout!r}, which this gpt2lab does not know; "
            "update gpt2lab or re-export the model"
        )
    return layout


def read_state_dict(folder: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """Every parameter of GPT(config) (tied matrices once) from the folder's weights, whatever
    their layout, with a UserError for anything missing, extra or of the wrong shape."""
    state = read_weights(folder)
    layout = weights_layout(folder)
    if layout in transformers_llama.ARCHITECTURES:
        state = transformers_llama.to_native(state)
    elif layout != native.LAYOUT:
        state = transformers_gpt2.to_native(state)
    return checked_state_dict(state, config, source=str(folder))


def _unused_tensor_problem(name: str, state: dict[str, torch.Tensor], config: GPTConfig) -> str | None:
    """Why GPT(config), which has no parameter `name`, cannot take that tensor of `state`; None
    for one that holds nothing the model lacks: a zero bias of a model without biases
    (transformers' GPT-2 layout always stores them), a tied head equal to the embedding."""
    tensor = state[name]
    if name.endswith(".bias") and not config.bias:
        return "it is not zero while the record says bias=false" if bool(tensor.any()) else None
    if name == "lm_head.weight" and config.tie_embeddings:
        embedding = state.get("transformer.wte.weight")
        if embedding is not None and embedding.shape == tensor.shape and torch.equal(embedding, tensor):
            return None
        return "it differs from the embedding while the record says tie_embeddings=true"
    return f"the record's configuration ({config.n_layer} layers) has no such tensor"


def checked_state_dict(state: dict[str, torch.Tensor], config: GPTConfig, *, source: str) -> dict[str, torch.Tensor]:
    """`state` checked against the parameters of GPT(config): a UserError for anything missing,
    extra or of the wrong shape; an unpadded vocabulary padded with zero rows."""
    with torch.device("meta"):
        expected = {name: p.shape for name, p in Transformer(config).named_parameters()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(
            f"the weights in {source} lack {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; the file is incomplete or not a GPT-2 model of this configuration"
        )
    # Every tensor of the file is used or refused: a record that leaves one out lies about the weights.
    for name in [k for k in state if k not in expected]:
        problem = _unused_tensor_problem(name, state, config)
        if problem is not None:
            raise UserError(
                f"the weights in {source} hold {name}, but {problem}: the folder's record (gpt2lab.json, "
                "else config.json) does not describe these weights; write the folder again"
            )
        del state[name]
    for name, shape in expected.items():
        tensor = state[name]
        if name in ("transformer.wte.weight", "lm_head.weight") and (
            tensor.shape[0] == config.vocab_size < shape[0] and tensor.shape[1:] == shape[1:]
        ):
            # An unpadded export loaded into a padded model: the extra rows are never produced.
            padded = torch.zeros(shape, dtype=tensor.dtype)
            padded[: tensor.shape[0]] = tensor
            state[name] = padded
        elif tensor.shape != shape:
            raise UserError(
                f"tensor {name} in {source} has shape {tuple(tensor.shape)} but the configuration "
                f"needs {tuple(shape)}: the folder's record (gpt2lab.json, else config.json) does not describe "
                "these weights"
            )
    return state


# ---- LoRA adapters ---------------------------------------------------------------------------


def read_lora_config(folder: Path) -> LoRAConfig | None:
    """The LoRA settings a checkpoint's gpt2lab.json records (None: a plain model folder)."""
    record = folder / NATIVE_RECORD
    if not record.is_file():
        return None
    values = read_record(folder).get("lora")
    if values is None:
        if (folder / ADAPTERS_FILE).is_file():
            raise UserError(
                f"{folder} holds {ADAPTERS_FILE} but {record} records no LoRA settings ('lora'), which would "
                "leave the adapters out: the record is damaged; use an earlier checkpoint"
            )
        return None
    if not isinstance(values, dict):
        raise UserError(f"{record}: 'lora' should be a table of settings; the folder is damaged")
    return LoRAConfig.from_dict(values, where=str(record))


def read_adapters(folder: Path, config: GPTConfig, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA checkpoint, checked against those `lora` gives GPT(config)."""
    path = folder / ADAPTERS_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} records LoRA adapters but has no {ADAPTERS_FILE}; the folder is incomplete: "
            "use an earlier checkpoint"
        )
    check_digest(folder, ADAPTERS_FILE)
    tensors = _load_safetensors(path)
    with torch.device("meta"):
        expected = {k: t.shape for k, t in lora_state_dict(apply_lora(Transformer(config), *_lora_args(lora))).items()}
    wrong = sorted(set(expected) ^ set(tensors)) or [k for k in expected if tensors[k].shape != expected[k]]
    if wrong:
        raise UserError(
            f"{path} does not hold the adapters its gpt2lab.json describes (rank {lora.rank} on "
            f"{', '.join(lora.targets)}; first mismatch: {wrong[0]}); the folder is damaged"
        )
    return tensors


def _lora_args(lora: LoRAConfig) -> tuple:
    return lora.rank, lora.alpha, lora.dropout, lora.targets


def write_adapters(adapters: dict[str, torch.Tensor], directory: Path) -> None:
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in adapters.items()}
    write_atomic(directory / ADAPTERS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_class: type[Transformer] = Transformer,
    **config_overrides: Any,
) -> Transformer:
    """The one resolver every command uses: a `model_class` built from a hub name, a transformers
    folder, a checkpoint folder or a run folder (its newest checkpoint). A LoRA checkpoint's
    adapters are merged into its base weights: the model is a plain one.

    config_overrides change options that don't alter the weights' shapes (dropout, attention,
    padded_vocab_size).
    """
    folder = resolve_model_path(spec)
    config = read_config(folder)
    if config_overrides:
        try:
            config = dataclasses.replace(config, **config_overrides)
        except TypeError as error:
            raise UserError(f"unknown model option: {error}") from None
    state = read_state_dict(folder, config)
    lora = read_lora_config(folder)
    if lora is not None:
        # A LoRA checkpoint: its frozen base with the adapters folded in, a plain model.
        state = merge_adapters(state, read_adapters(folder, config, lora), lora)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


# ---- saving ----------------------------------------------------------------------------------


def save_pretrained(
    model: Transformer,
    directory: str | Path,
    *,
    keep_padded_vocab: bool = False,
    tokenizer_spec: Any = None,
    extra_record: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a model folder (gpt2lab.json + model.safetensors, with config.json where
    transformers has the model's architecture), a LoRA model's adapters merged; see
    `write_model_folder`."""
    return write_model_folder(
        plain_state_dict(model), model.config, directory, keep_padded_vocab=keep_padded_vocab,
        tokenizer_spec=tokenizer_spec, extra_record=extra_record,
    )


def plain_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """`model.state_dict()`, with a LoRA model's adapters folded into its weights (the model
    itself keeps them)."""
    state = model.state_dict()
    lora = lora_config(model)
    if lora is None:
        return state
    return merge_adapters(*split_adapters(state), lora)


def export_layout(config: GPTConfig) -> str:
    """The transformers layout `convert` writes for `config` (GPT-2's, Llama's or Qwen3's), or a
    UserError naming the options transformers has no equivalent for."""
    layout = transformers_layout(config)
    if layout is None:
        options = options_without_transformers_equivalent(config)
        raise UserError(
            f"this model's options have no transformers equivalent: {'; '.join(options)}. "
            f"gpt2lab convert writes {ARCHITECTURES}. Keep the model folder for gpt2lab (sample, "
            "eval, serve and gpt2lab.load_model read it), or train with one of those sets of options to export it"
        )
    return layout


def architecture_name(layout: str) -> str:
    if layout == transformers_gpt2.LAYOUT:
        return "GPT2LMHeadModel"
    return transformers_llama.ARCHITECTURES[layout][0]


def export_for_transformers(
    model: Transformer, directory: str | Path, *, tokenizer_spec: Any = None, card_facts: dict[str, Any] | None = None
) -> Path:
    """What `gpt2lab convert` writes: the transformers model of `model`'s architecture (see
    `export_layout`), padded vocabulary rows cut, with a README.md model card of `card_facts`
    (training data, steps, tokens, val loss, HellaSwag: whatever is known)."""
    layout = export_layout(model.config)
    directory = write_model_folder(
        plain_state_dict(model), model.config, directory, tokenizer_spec=tokenizer_spec, layout=layout
    )
    gpt2 = tokenizer_spec is None or is_gpt2_spec(tokenizer_spec)
    tokenizer = "GPT-2 BPE" if gpt2 else tokenizer_from_spec(tokenizer_spec).describe()
    facts = {"tokenizer": tokenizer, **(card_facts or {})}
    hub_files.write_model_card(directory, model.config, architecture_name(layout), facts)
    return directory


def write_model_folder(
    model_state: dict[str, torch.Tensor],
    config: GPTConfig,
    directory: str | Path,
    *,
    keep_padded_vocab: bool = False,
    tokenizer_spec: Any = None,
    extra_record: dict[str, Any] | None = None,
    layout: str | None = None,
    digested: tuple[str, ...] = (),
) -> Path:
    """Write a model's state dict (as GPT.state_dict() names it) as a model folder.

    gpt2lab.json, written last, records the sha256 of model.safetensors and of the files named in
    `digested`, already written beside it (a checkpoint's adapters and training state), which
    loading checks (`check_digest`).

    The padded rows of the vocabulary are cut unless `keep_padded_vocab` (checkpoints keep them so
    that training resumes exactly). The weights' `layout` (recorded in gpt2lab.json) is by default
    transformers' GPT-2, Llama or Qwen3 wherever that class computes what the model computes, else
    gpt2lab's own.
    """
    directory = Path(directory)
    if tokenizer_spec is not None:
        _check_tokenizer_fits(config, tokenizer_spec, directory / NATIVE_RECORD)  # what loading would refuse
    directory.mkdir(parents=True, exist_ok=True)
    rows = config.embedding_rows if keep_padded_vocab else config.vocab_size
    stored_config = dataclasses.replace(
        config, padded_vocab_size=config.padded_vocab_size if keep_padded_vocab else None
    )
    gpt2_tokens = is_gpt2_spec(tokenizer_spec) or (tokenizer_spec is None and config.vocab_size == 50257)
    if layout is None:
        layout = transformers_layout(config) or native.LAYOUT
    tokens = "gpt2" if tokenizer_spec is None and gpt2_tokens else tokenizer_spec
    if layout == transformers_gpt2.LAYOUT:
        transformers_gpt2.write(model_state, config, directory, rows=rows, tokenizer_spec=tokens)
    elif layout in transformers_llama.ARCHITECTURES:
        transformers_llama.write(model_state, config, directory, layout=layout, rows=rows, tokenizer_spec=tokens)
    elif layout == native.LAYOUT:
        native.write(model_state, stored_config, directory)
    else:
        raise ValueError(f"unknown weights layout {layout!r}")
    record = {"format": RECORD_FORMAT, "model": stored_config.to_dict(), "weights": layout, **(extra_record or {})}
    record[DIGESTS] = {name: file_sha256(directory / name) for name in ("model.safetensors", *digested)}
    if tokenizer_spec is not None or gpt2_tokens:
        record["tokenizer"] = tokenizer_spec if tokenizer_spec is not None else "gpt2"
        record[TOKENIZER_DIGEST] = tokenizer_digest(record["tokenizer"])
    write_atomic(directory / NATIVE_RECORD, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return directory


def check_finite_weights(model: Transformer, folder: Path) -> None:
    """A UserError naming the first tensor that holds NaN or infinite values: such a model gives
    nothing but NaN (a diverged run saved it, or the file is damaged)."""
    for name, tensor in model.named_parameters():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise UserError(
                f"the weights in {folder} hold NaN or infinite values ({int((~finite).sum()):,} of "
                f"{tensor.numel():,} in {name}): the run that saved them diverged or the file is damaged; "
                "use an earlier checkpoint"
            )


def load_for_inference(spec: str | Path, device_name: str = "auto", dtype_name: str = "auto"):
    """(folder, model, device, precision name) for the commands that run a model: `--dtype int8`
    or `int4` loads float32 weights and quantizes the linear layers (CPU only). On a CPU the model
    has the CPU kernels (`gpt2lab.kernels.accelerate`)."""
    device = resolve_device(device_name)
    quantized = dtype_name in QUANTIZERS
    if quantized and device.type != "cpu":
        raise UserError(f"--dtype {dtype_name} runs on the CPU only; add --device cpu or choose bfloat16")
    dtype = torch.float32 if quantized else resolve_dtype(dtype_name, device)
    folder = resolve_model_path(spec)
    model = load_model(folder, device=device, dtype=dtype)
    check_finite_weights(model, folder)
    if quantized:
        model = quantize(model, dtype_name)
    if device.type == "cpu":
        from .kernels import accelerate

        model = accelerate(model)
    return folder, model, device, dtype_name if quantized else str(dtype).removeprefix("torch.")
