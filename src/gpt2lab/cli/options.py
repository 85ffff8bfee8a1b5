"""Options and argument types that several verbs share. Verb modules import them from here, and
this module imports no verb, so that `gpt2lab.cli` can import every verb without a cycle."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError

MODEL_HELP = (
    "a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or owner/name), a folder in the "
    "transformers GPT-2 format, a checkpoint folder, or a run folder (its newest checkpoint)"
)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "int8", "int4"],
        help="weights' precision for inference; auto is bfloat16 on a GPU that has it, float32 elsewhere; "
        "int8 and int4 (CPU only) quantize the linear layers when the model loads: int8 with a scale per "
        "output row, int4 as 4-bit weights in groups of 32 with a scale and minimum each (the smallest and "
        "the least exact); both multiply in gpt2lab's AVX2 kernels, built with the system's C compiler on "
        "first use (elsewhere, or with GPT2LAB_QUANTIZED_KERNELS=0, in PyTorch, slower); docs/benchmarks.md "
        "gives the val loss and the tokens/s of each",
    )


def whole_count(text: str, unit: str) -> int:
    """A positive whole number of `unit` (tokens, characters); accepts 100M, 10k, 1e8 and 100_000_000."""
    cleaned = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(cleaned[-1:].lower(), 1)
    number = cleaned[:-1] if scale > 1 else cleaned
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of {unit} (e.g. 100M, 250000)") from None
    if not value >= 1 or value != int(value) or value > 2**62:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of {unit}, 1 or more")
    return int(value)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not allowed; give 1 or more")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not allowed; give a number > 0")
    return value


def probability(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def seed(text: str) -> int:
    """A seed torch's generators take: 64 bits (negative ones wrap, as torch wraps them)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} does not fit in 64 bits; give a seed from 0 to {2**64 - 1}")
    return value


def read_text_file(path: str | Path, option: str, kind: str) -> str:
    """The UTF-8 text of the file `option` names, or one UserError naming the option, the file
    and the fix; `kind` says what to give instead of a folder ("a JSON file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{option} file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{option} {path} is a folder; give {kind}") from None
    except UnicodeDecodeError:
        raise UserError(f"{option} file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"cannot read {option} file {path} ({error.strerror}); check its permissions") from None
