"""The `gpt2lab` command: one verb per job, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli_options import (
    MODEL_HELP,
    add_device_options,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
)
from .errors import UserError

# ---- sample ----------------------------------------------------------------------------------


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"prompt file {args.prompt_file} does not exist") from None
        except UnicodeDecodeError:
            raise UserError(f"prompt file {args.prompt_file} is not UTF-8 text") from None
    return args.prompt


def _prompt_tokens(tokenizer, prompt: str) -> list[int]:
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    # Character models have no end-of-text: start from a newline, as nanoGPT does.
    try:
        return tokenizer.encode("\n")
    except UserError:
        raise UserError("the prompt is empty and this model has no end-of-text token; give --prompt") from None


def cmd_sample(args) -> int:
    import torch

    from .pretrained import load_for_inference
    from .tokenizer import StreamDecoder, load_tokenizer

    prompt = _read_prompt(args)
    folder, model, device, precision = load_for_inference(args.model, args.device, args.dtype)
    tokenizer = load_tokenizer(folder)
    prompt_ids = _prompt_tokens(tokenizer, prompt)
    if max(prompt_ids) >= model.config.vocab_size:
        raise UserError(
            f"the prompt has token id {max(prompt_ids)}, beyond this model's vocabulary of "
            f"{model.config.vocab_size}; the model was not trained with this tokenizer"
        )
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    out = sys.stdout
    total_tokens = 0
    started = time.perf_counter()
    for index in range(args.num_samples):
        if index:
            out.write("\n---------------\n")
        out.write(prompt)
        out.flush()
        decoder = StreamDecoder(tokenizer)
        for token in model.generate_stream(
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tokenizer.eot_token if args.stop_at_eot else None,
            generator=generator,
            use_cache=not args.no_cache,
        ):
            token_id = int(token[0])
            total_tokens += 1
            if args.stop_at_eot and token_id == tokenizer.eot_token:
                break
            out.write(decoder.push(token_id))
            out.flush()
        out.write(decoder.flush() + "\n")
        out.flush()
    elapsed = time.perf_counter() - started
    if args.verbose:
        print(
            f"[{total_tokens} tokens in {elapsed:.2f} s, {total_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
            f"{device.type}, {precision}]",
            file=sys.stderr,
        )
    return 0


# ---- convert ---------------------------------------------------------------------------------


def cmd_convert(args) -> int:
    from .pretrained import load_model, resolve_model_path, save_pretrained
    from .runtime import DTYPES
    from .tokenizer import load_tokenizer

    folder = resolve_model_path(args.model)
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    model = load_model(folder, dtype=dtype)
    spec = load_tokenizer(folder).spec()
    save_pretrained(model, args.out, tokenizer_spec=spec)
    print(f"wrote {args.out} (config.json, model.safetensors{', tokenizer files' if spec == 'gpt2' else ''})")
    return 0


# ---- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2lab",
        description="GPT-2 from scratch: prepare data, train, sample, convert, benchmark. "
        "Run `gpt2lab VERB --help` for the manual of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    sample = verbs.add_parser(
        "sample",
        help="generate text from a model, streaming it to the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text from a model, streaming it to the terminal as it is produced.",
        epilog="""examples:
  gpt2lab sample --model gpt2 --prompt "Hello, I'm a language model,"
  gpt2lab sample --model ./gpt2-weights --num-samples 3 --top-p 0.9 --seed 1
  gpt2lab sample --model runs/shakespeare-char --prompt "ROMEO:" --temperature 0.8

Samples are separated by a line of dashes. Generation stops a sample at end-of-text
(unless --no-stop-at-eot). Offline, a hub name fails with a message: download the
weights elsewhere and pass their folder (config.json + model.safetensors) as --model.
A prompt longer than the model's context keeps its last block-size tokens.""",
    )
    sample.add_argument("--model", required=True, help=MODEL_HELP)
    source = sample.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    sample.add_argument("--num-samples", type=positive_int, default=1, help="how many samples (default 1)")
    sample.add_argument(
        "--max-new-tokens", type=non_negative_int, default=200, help="tokens to generate per sample (default 200)"
    )
    sample.add_argument(
        "--temperature", type=non_negative_float, default=0.8, help="0 is greedy; higher is more random (default 0.8)"
    )
    sample.add_argument("--top-k", type=positive_int, default=200, help="keep the k most likely tokens (default 200)")
    sample.add_argument(
        "--top-p", type=probability, default=None, help="keep the smallest set of tokens holding this probability"
    )
    sample.add_argument("--seed", type=int, default=1337, help="random seed, for repeatable samples (default 1337)")
    sample.add_argument(
        "--no-stop-at-eot", dest="stop_at_eot", action="store_false", help="keep generating past end-of-text"
    )
    sample.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache (slow)")
    sample.add_argument("-v", "--verbose", action="store_true", help="print tokens/s to stderr at the end")
    add_device_options(sample)
    sample.set_defaults(handler=cmd_sample)

    convert = verbs.add_parser(
        "convert",
        help="export a model or checkpoint to the transformers GPT-2 format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a model as config.json + model.safetensors that transformers' "
        "GPT2LMHeadModel, vLLM and lm-eval load; a padded vocabulary is cut back to its real size, "
        "and GPT-2 tokenizer files are written beside it.",
        epilog="""examples:
  gpt2lab convert runs/gpt2-124m --out exported/gpt2-124m
  gpt2lab convert runs/gpt2-124m/checkpoints/step_00019073 --out exported --dtype bfloat16""",
    )
    convert.add_argument("model", help=MODEL_HELP)
    convert.add_argument("--out", required=True, help="folder to write (created if needed)")
    convert.add_argument(
        "--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"], help="precision of the saved weights"
    )
    convert.set_defaults(handler=cmd_convert)

    from .data.cli import add_prepare_parser
    from .eval.cli import add_eval_parser
    from .report import add_report_parser
    from .train.bench import add_bench_parser
    from .train.cli import add_train_parser
    from .serve.cli import add_serve_parser

    add_prepare_parser(verbs)
    add_train_parser(verbs)
    add_bench_parser(verbs)
    add_eval_parser(verbs)
    add_report_parser(verbs)
    add_serve_parser(verbs)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for verbs that re-launch themselves
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except UserError as error:
        print(f"gpt2lab {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2lab {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
