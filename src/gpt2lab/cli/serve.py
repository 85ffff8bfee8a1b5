"""The `serve` verb: load a model and serve it over HTTP until interrupted."""

from __future__ import annotations

import argparse
import sys

from .options import MODEL_HELP, add_device_options, positive_float, positive_int
from ..serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_READ_TIMEOUT_S
from ..serve.sockets import listen


SERVE_DESCRIPTION = """Serve a model over HTTP: OpenAI's POST /v1/completions and POST /v1/chat/completions
(each streamed with server-sent events or not), GET /v1/models, GET /health, and a web playground
at / to type a prompt, or chat, and watch the text stream in. Requests running at the same time
are decoded together, one forward pass per step for all of them; beyond --max-concurrency they
wait in a queue. A request whose client disconnects stops at the next step."""

SERVE_EPILOG = """examples:
  gpt2lab serve --model gpt2                          # then open http://127.0.0.1:8000/
  gpt2lab serve --model runs/my-run --port 8080 --max-concurrency 16
  gpt2lab serve --model ./gpt2-weights --host 0.0.0.0 --served-model-name gpt2-mine

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "Hello, I am", "max_tokens": 20, "temperature": 0}'
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.completions.create(model="gpt2", prompt="Hello", max_tokens=20, seed=1,
                            extra_body={"top_k": 50})
  client.chat.completions.create(model="runs/my-sft", messages=[{"role": "user", "content": "Hi!"}])

Request fields of /v1/completions: model (optional; if given, the served name), prompt (string,
list of strings, token ids or lists of them), max_tokens (default 16), temperature (default 1,
0 is greedy), top_p, top_k (an extension), n, stop (up to 4 strings), seed, stream,
stream_options.include_usage. A prompt must leave room in the model's context for one new token;
prompt + max_tokens beyond the context stops at its end (finish_reason "length"). With a seed,
choice j of each prompt samples with seed + j, so choice 0 gives the tokens of
`gpt2lab sample --seed SEED` with the same settings (exactly so when decoded alone; in a batch,
last-bit rounding may differ).

POST /v1/chat/completions takes messages (a list of {"role": "system"|"user"|"assistant",
"content": TEXT}, a system message only first), rendered by the chat format the model's
tokenizer records (docs/chat.md), and the same fields but prompt; max_tokens (or
max_completion_tokens) defaults to the rest of the context, within --max-new-tokens-limit. The
answer ends at the end-of-turn token <|end|> (finish_reason "stop"; the token counts in usage,
not in the content). Streamed, each choice opens with a chunk whose delta names the role, then
deltas carry the content. A base model, whose tokenizer has no chat format or whose vocabulary
lacks the chat tokens, gets a 400 (make a chat model with `gpt2lab prepare chat` and
`gpt2lab train --preset sft`); /v1/models and /health say "chat": true or false, and the page
shows its chat view when true.

The server listens on 127.0.0.1 only unless --host says otherwise; it has no authentication."""


def add_serve_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser], summary: str) -> None:
    serve = verbs.add_parser(
        "serve",
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
    )
    serve.add_argument("--model", required=True, help=MODEL_HELP)
    serve.add_argument(
        "--served-model-name", help="the name /v1/models reports and requests must use (default: --model as given)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    serve.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=64,
        help="sequences decoded together (n > 1 counts each choice); more wait in a queue (default 64)",
    )
    serve.add_argument(
        "--max-new-tokens-limit",
        type=positive_int,
        default=None,
        help="the largest max_tokens a request may ask for (default: the model's context length)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"the largest request body; a larger one gets 413 (default {DEFAULT_MAX_BODY_BYTES}: 2 MiB)",
    )
    serve.add_argument(
        "--read-timeout",
        type=positive_float,
        default=DEFAULT_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="how long a client may take to send a request's headers and body; then 408 and the "
        f"connection closes (default {DEFAULT_READ_TIMEOUT_S:g})",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log detail (default info)"
    )
    add_device_options(serve)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..pretrained import load_for_inference
    from ..tokenizer import load_tokenizer
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from ..serve.limits import Limits, uvicorn_config

    sock = listen(args.host, args.port)
    folder, model, _, _ = load_for_inference(args.model, args.device, args.dtype)
    tokenizer = load_tokenizer(folder)
    name = args.served_model_name or args.model
    app = create_app(
        Engine(model, tokenizer, max_concurrency=args.max_concurrency),
        tokenizer,
        model_name=name,
        max_new_tokens_limit=args.max_new_tokens_limit,
        limits=Limits(max_body_bytes=args.max_body_bytes, read_timeout_s=args.read_timeout),
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"gpt2lab serve: {name} at http://{shown}:{port}/ (API under /v1)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0
