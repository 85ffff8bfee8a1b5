"""Checkpoint folders: complete only under their final name, so a kill never leaves one half-trusted.

    checkpoints/step_00000250/
        model.safetensors                the model, padded vocabulary kept: transformers' layout
        config.json                      where it has GPT-2's, Llama's or Qwen3's shape, else gpt2lab's own
        adapters.safetensors             a LoRA run's adapters; model.safetensors is then its frozen
                                         base in gpt2lab's layout (no config.json: transformers would
                                         load the base alone)
        gpt2lab.json                     native model config, weights layout, tokenizer, training
                                         config, LoRA settings
        optimizer.pt                     optimizer (and grad scaler) state, read with weights_only=True
        state.json                       step, tokens, loader position, RNG states, validation loss
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import UserError
from ..formats import native
from ..config import LoRAConfig
from ..lora import lora_config, split_adapters
from ..model import Transformer
from ..pretrained import (
    ADAPTERS_FILE, CHECKPOINT_NAME, MODEL_FILES, check_digest, checkpoint_folders, newest_checkpoint, read_adapters,
    read_lora_config, read_state_dict, write_adapters, write_model_folder,
)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
# A checkpoint that resume and pruning trust holds all of these (and, where its gpt2lab.json
# records LoRA, pretrained.ADAPTERS_FILE: `checkpoint_folders` adds it).
CHECKPOINT_FILES = (*MODEL_FILES, OPTIMIZER_FILE, STATE_FILE)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_states() -> dict[str, Any]:
    """This process's random number generators (dropout draws from them)."""
    states = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = _b64(torch.cuda.get_rng_state())
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(states["cuda"]))


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's generators, in rank order."""
    own = rng_states()
    if not dist.is_initialized():
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered


def save_checkpoint(
    run_dir: Path,
    *,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
    tokenizer_spec: Any,
    train_config: dict[str, Any],
) -> Path | None:
    """Write the checkpoint of `state["step"]` under a temporary name, then rename it into place.

    Every rank calls this (sharded weights are gathered); rank 0 writes and gets the path.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rank_rngs = _gather_rng_states()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{state['step']:08d}"
    temp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    torch.save(
        {"optimizer": optimizer_state, "scaler": scaler.state_dict() if scaler is not None else None},
        temp / OPTIMIZER_FILE,
    )
    (temp / STATE_FILE).write_text(json.dumps({**state, "rng": rank_rngs}, indent=2) + "\n")
    # Last: its gpt2lab.json records the sha256 of every file beside it.
    _write_model(model, model_state, temp, tokenizer_spec, train_config)
    for path in temp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        # The same step saved again (an interrupt right after a scheduled save): replace it.
        stale = folder / f".tmp-stale-{final.name}-{os.getpid()}"
        os.rename(final, stale)
        os.rename(temp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(temp, final)
    return final


def _write_model(model: Transformer, model_state: dict[str, torch.Tensor], folder: Path, tokenizer_spec: Any,
                 train_config: dict[str, Any]) -> None:
    """The weights of a checkpoint: the model, or a LoRA model's frozen base and its adapters."""
    lora = lora_config(model)
    record: dict[str, Any] = {"train_config": train_config}
    digested: tuple[str, ...] = (OPTIMIZER_FILE, STATE_FILE)
    if lora is not None:
        model_state, adapters = split_adapters(model_state)
        write_adapters(adapters, folder)
        record["lora"] = lora.to_dict()
        digested += (ADAPTERS_FILE,)
    write_model_folder(
        model_state, model.config, folder, keep_padded_vocab=True, tokenizer_spec=tokenizer_spec,
        extra_record=record, layout=native.LAYOUT if lora is not None else None, digested=digested,
    )


def _delete(path: Path) -> None:
    """Rename first, then delete: a kill during the deletion leaves a `.tmp-*` folder, which no
    one trusts and the next pruning removes, never a half-empty `step_*` one."""
    doomed = path.with_name(f".tmp-deleting-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_best: bool) -> None:
    """Delete all but the newest `keep_last` checkpoints and, if asked, the best by validation loss."""
    folder = run_dir / "checkpoints"
    complete = checkpoint_folders(run_dir, CHECKPOINT_FILES)
    keep = set(complete[-keep_last:])
    if keep_best:
        scored = [(read_state(p).get("val_loss"), p) for p in complete]
        scored = [(loss, p) for loss, p in scored if loss is not None]
        if scored:
            keep.add(min(scored, key=lambda item: item[0])[1])
    for path in complete:
        if path not in keep:
            _delete(path)
    for leftover in folder.iterdir():
        # Temporary folders of processes that died mid-save or mid-delete, and step folders that
        # such a delete left without all their files (written by older versions).
        temporary = leftover.name.startswith(".tmp-") and not leftover.name.endswith(f"-{os.getpid()}")
        incomplete = CHECKPOINT_NAME.match(leftover.name) and leftover.is_dir() and leftover not in complete
        if temporary or incomplete:
            shutil.rmtree(leftover, ignore_errors=True)


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    check_digest(checkpoint, STATE_FILE)
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{checkpoint} has no {STATE_FILE}: it is a model folder, not a training checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({error}); resume from an earlier checkpoint") from None
    problem = _state_problem(state)
    if problem:
        raise UserError(f"{path} is not a training state gpt2lab wrote ({problem}); resume from an earlier checkpoint")
    return state


def _state_problem(state: Any) -> str | None:
    """What is wrong with the shape of a parsed state.json, if anything."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    expected = {"step": int, "loader": dict, "rng": list}
    for key, kind in expected.items():
        if key not in state:
            return f"no {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key!r} is {state[key]!r}"
    if state["step"] < 0 or not all(isinstance(r, dict) and isinstance(r.get("torch"), str) for r in state["rng"]):
        return "its step or RNG states are malformed"
    for key in ("val_loss", "best_val_loss", "elapsed_s"):
        if state.get(key) is not None and not isinstance(state[key], (int, float)):
            return f"{key!r} is {state[key]!r}"
    return None


def find_resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of the run (None if it has none); else a folder."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_checkpoint(run_dir, CHECKPOINT_FILES)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); use --resume auto or a checkpoints/step_* folder")
    return path


def _read_model(checkpoint: Path, model: Transformer) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as `model.state_dict()` names them, adapters included: its LoRA
    settings must be the run's."""
    saved, wanted = read_lora_config(checkpoint), lora_config(model)
    if saved != wanted:
        raise UserError(
            f"{checkpoint} was trained with {_described(saved)} but this run has {_described(wanted)}; "
            "resume with the run's own finetune.* settings (its config.toml)"
        )
    state = read_state_dict(checkpoint, model.config)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    if saved is not None:
        state.update(read_adapters(checkpoint, model.config, saved))
    return state


def _described(lora: LoRAConfig | None) -> str:
    if lora is None:
        return "no LoRA"
    return f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on {', '.join(lora.targets)}"


def load_checkpoint(
    checkpoint: Path,
    *,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Load weights and optimizer state in place (rank 0 reads the files and the others receive
    them, so N ranks' checkpoint resumes on M); return the saved training state."""
    state = read_state(checkpoint)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    model_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if not distributed or dist.get_rank() == 0:
        model_state = _read_model(checkpoint, model)
        check_digest(checkpoint, OPTIMIZER_FILE)
        try:
            saved = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            optimizer_state = saved["optimizer"]
        except FileNotFoundError:
            raise UserError(f"{checkpoint} has no {OPTIMIZER_FILE}; it cannot be resumed exactly") from None
        except (RuntimeError, KeyError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
            reason = str(error).strip() or "it is empty or ends early"
            raise UserError(f"{checkpoint / OPTIMIZER_FILE} is damaged ({reason}); resume from another checkpoint") from None
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(model, model_state, options=options)
    try:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    except (KeyError, ValueError, RuntimeError) as error:
        raise UserError(
            f"the optimizer state in {checkpoint} does not fit this run ({error}); resume with the run's own "
            "settings (optimizer and model)"
        ) from None
    if scaler is not None:
        scaler_state = saved.get("scaler")
        if distributed:
            holder = [scaler_state]
            dist.broadcast_object_list(holder, src=0)
            scaler_state = holder[0]
        if scaler_state:
            scaler.load_state_dict(scaler_state)
    return state
