"""The `sample` verb: generate text from a model, streaming it to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from .options import (
    MODEL_HELP,
    add_device_options,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    seed,
    read_text_file,
)


def add_sample_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    sample = verbs.add_parser(
        "sample",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text from a model, streaming it to the terminal as it is produced.",
        epilog="""examples:
  gpt2lab sample --model gpt2 --prompt "Hello, I'm a language model,"
  gpt2lab sample --model ./gpt2-weights --num-samples 3 --top-p 0.9 --seed 1
  gpt2lab sample --model runs/shakespeare-char --prompt "ROMEO:" --temperature 0.8

Samples are separated by a line of dashes. Generation stops a sample at end-of-text
(unless --no-stop-at-eot). Offline, a hub name fails with a message: download the
weights elsewhere and pass their folder (config.json + model.safetensors) as --model.
A prompt longer than the model's context keeps its last block-size tokens.

--compile runs each new token's step through torch.compile. On a CPU the weights are
frozen into the graph and the step's small operators fuse, faster than eager decoding (which
streams the weights through gpt2lab's own matrix-vector kernels; GPT2LAB_MATVEC_KERNELS=0
switches them off); docs/benchmarks.md has the figures against eager and ggml. The first
compile takes a minute or so on a CPU (autotuning each matrix shape); inductor caches it on
disk, so later runs compile faster. It pays for long or many samples. It needs the KV cache
(not with --no-cache). int8 and int4 models compile too, around their own matrix kernels.
Compiled int8 may pick other greedy tokens than eager int8 after a near tie: the fused float32 steps
round differently, which moves the on-the-fly int8 quantization of some inputs. -v reports
the compile's time apart from the tokens/s.""",
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
    sample.add_argument("--seed", type=seed, default=1337, help="random seed, for repeatable samples (default 1337)")
    sample.add_argument(
        "--no-stop-at-eot", dest="stop_at_eot", action="store_false", help="keep generating past end-of-text"
    )
    sample.add_argument("--no-cache", action="store_true", help="recompute every step without the KV cache (slow)")
    sample.add_argument(
        "--compile", action="store_true", help="compile the one-token step with torch.compile (see below)"
    )
    sample.add_argument(
        "-v", "--verbose", action="store_true",
        help="print tokens/s to stderr at the end (with --compile, the compile's time apart)",
    )
    add_device_options(sample)
    sample.set_defaults(handler=cmd_sample)


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file, "--prompt-file", "a text file in it")
    return args.prompt


def cmd_sample(args: argparse.Namespace) -> int:
    from ..inference.generate import generate_stream
    from ..pretrained import load_for_inference
    from ..inference.prompts import checked_prompt, empty_prompt_start
    from ..inference.sampling import seeded_generator
    from ..tokenizer import StreamDecoder, load_tokenizer

    prompt = _read_prompt(args)
    folder, model, device, precision = load_for_inference(args.model, args.device, args.dtype)
    tokenizer = load_tokenizer(folder)
    prompt_ids = checked_prompt(tokenizer.encode(prompt), model.config.vocab_size, empty_prompt_start(tokenizer))
    generator = seeded_generator(device, args.seed)
    # The compiled step runs from the second new token, and only within the block size.
    compiles = args.compile and args.max_new_tokens >= 2 and len(prompt_ids) < model.config.block_size
    compile_seconds = _compile_first(model, prompt_ids, args) if compiles else None
    out = sys.stdout
    total_tokens = 0
    started = time.perf_counter()
    for index in range(args.num_samples):
        # The stream checks its options (and that its buffers fit) when made: before any output.
        stream = generate_stream(
            model,
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tokenizer.eot_token if args.stop_at_eot else None,
            generator=generator,
            use_cache=not args.no_cache,
            compile=args.compile,
            vocab_size=tokenizer.vocab_size,
        )
        if index:
            out.write("\n---------------\n")
        out.write(prompt)
        out.flush()
        decoder = StreamDecoder(tokenizer)
        for token in stream:
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
        compiled = "" if compile_seconds is None else f"compiled in {compile_seconds:.1f} s, then "
        print(
            f"[{compiled}{total_tokens} tokens in {elapsed:.2f} s, {total_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
            f"{device.type}, {precision}]",
            file=sys.stderr,
        )
    return 0


def _compile_first(model, prompt_ids: list[int], args: argparse.Namespace) -> float:
    """Seconds spent compiling the one-token step, before the clock of -v starts: its tokens/s is
    then the decoding's own. Greedy, so the samples' random draws are left as they were."""
    from ..inference.generate import generate_stream

    started = time.perf_counter()
    warm_up = generate_stream(
        model, [prompt_ids], args.max_new_tokens, temperature=0, use_cache=not args.no_cache, compile=True
    )
    for _ in zip(range(2), warm_up):  # the prompt's forward, then the first compiled step
        pass
    return time.perf_counter() - started
