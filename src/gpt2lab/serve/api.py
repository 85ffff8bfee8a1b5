"""The HTTP layer: OpenAI's /v1/completions (streamed and not), /v1/models, /health and the web
page, over an `Engine` that decodes every running request together.

Every client mistake gets a 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` and leaves the server as it was: a `UserError`
from anywhere below (the tokenizer, the engine) is a 400. Every request meets the limits of
`limits.py` (body size, read deadline). Handlers parse and tokenize off the event loop
(`asyncio.to_thread`), so that a long prompt does not hold up the other requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import AsyncIterator, Iterator, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..prompts import checked_prompt, empty_prompt_start
from ..tokenizer import Tokenizer
from .engine import Engine, SamplingParams, Sequence, Update
from .limits import Limits, RequestLimits, error_body, uvicorn_config
from .sockets import listen

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETIONS_PER_REQUEST = 128  # prompts x n
MAX_STOP_STRINGS = 4
# Parameters of OpenAI's API this server does not implement, with the value that means "off".
UNSUPPORTED = {
    "echo": False,
    "logprobs": None,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "best_of": 1,
}
# Messages for fields whose type is a union, where pydantic's first message names one member only.
TYPE_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"must be a string or a list of at most {MAX_STOP_STRINGS} strings",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions. `top_k` is an extension; null means the default."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_COMPLETIONS_PER_REQUEST)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, off in UNSUPPORTED.items():
                value = data.get(name)
                if value is not None and value != off and not (name == "best_of" and value == data.get("n")):
                    raise _BadRequest(f"{name} is not supported by this server; leave it out", name, "unsupported_parameter")
        return data


class _BadRequest(Exception):
    """A client mistake: answered with `status` and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(status: int, message: str, *, param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _describe_validation_error(error: ValidationError) -> _BadRequest:
    first = error.errors()[0]
    loc = first["loc"]
    if first["type"] == "json_invalid":
        return _BadRequest(f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}")
    if not loc:
        return _BadRequest("the request body must be a JSON object")
    param = str(loc[0])
    if param == "stream_options":
        return _BadRequest('stream_options must be an object {"include_usage": true|false}', param)
    if first["type"] == "missing":
        return _BadRequest(f"{param} is required", param, "missing_required_parameter")
    given = json.dumps(first.get("input"), default=str)
    given = given if len(given) <= 60 else given[:57] + "..."
    if param in TYPE_HINTS and first["type"].endswith("_type"):
        return _BadRequest(f"{param} {TYPE_HINTS[param]}; got {given}", param)
    return _BadRequest(f"{param}: {first['msg'][0].lower()}{first['msg'][1:]}; got {given}", param)


class _Completion:
    """One request's sequences and the queue their updates arrive on."""

    def __init__(self):
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.sequences: list[Sequence] = []


@dataclasses.dataclass(frozen=True)
class _Served:
    """What the handlers serve: `create_app` keeps it on `app.state.served`."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    block_size: int
    max_new_tokens_limit: int
    created: int


def _served(request: Request) -> _Served:
    return request.app.state.served


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    *,
    model_name: str,
    max_new_tokens_limit: int | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The server around a not-yet-started engine; the app starts it on startup and stops it on
    shutdown. A prompt must leave room for one new token in the model's context (else 400);
    prompt + max_tokens beyond the context stops at its end; max_tokens above
    `max_new_tokens_limit` (default: the context length) is a 400. `limits` (kept on
    `app.state.limits`) caps every request's body and the time it may take to arrive."""
    app = FastAPI(title="gpt2lab", summary=f"OpenAI-compatible completions from {model_name}", lifespan=_lifespan)
    app.state.served = _Served(
        engine=engine,
        tokenizer=tokenizer,
        model_name=model_name,
        block_size=engine.block_size,
        max_new_tokens_limit=engine.block_size if max_new_tokens_limit is None else max_new_tokens_limit,
        created=int(time.time()),
    )
    app.state.limits = limits or Limits()
    app.add_middleware(RequestLimits, max_body_bytes=app.state.limits.max_body_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_api_route("/", playground, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.served.engine
    loop = asyncio.get_running_loop()

    def deliver(updates: list[Update]) -> None:
        for update in updates:
            update.sequence.owner.queue.put_nowait(update)

    engine.start(lambda updates: loop.call_soon_threadsafe(deliver, updates))
    try:
        yield
    finally:
        engine.close()


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(error.status_code, message.get(error.status_code, str(error.detail)))


async def _user_error(request: Request, error: UserError) -> JSONResponse:
    return error_response(400, str(error))


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(error).__name__}: {error}")


def _model_card(served: _Served) -> dict:
    return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "gpt2lab"}


def _unknown_model(name: str, served: _Served) -> _BadRequest:
    return _BadRequest(
        f"the model {name!r} does not exist; this server serves {served.model_name!r}", "model", "model_not_found", 404
    )


async def playground() -> HTMLResponse:
    page = resources.files("gpt2lab.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


async def health(request: Request) -> dict:
    served = _served(request)
    return {
        "status": "ok",
        "model": served.model_name,
        "context_length": served.block_size,
        "max_new_tokens_limit": served.max_new_tokens_limit,
        "active_sequences": served.engine.active_count,
        "queued_sequences": served.engine.queued_count,
    }


async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_served(request))]}


async def get_model(name: str, request: Request):
    served = _served(request)
    if name != served.model_name:
        error = _unknown_model(name, served)
        return error_response(error.status, error.message, param=error.param, code=error.code)
    return _model_card(served)


async def completions(request: Request):
    served = _served(request)
    raw = await request.body()
    try:
        body, prompts, n, params = await asyncio.to_thread(_parse, raw, served)
    except _BadRequest as error:
        return error_response(error.status, error.message, param=error.param, code=error.code)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": served.model_name}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(served, head, prompts, n, params, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(request, served, head, prompts, n, params)


def _prompts(body: CompletionRequest, served: _Served) -> list[list[int]]:
    tokenizer, engine, block_size = served.tokenizer, served.engine, served.block_size
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise _BadRequest("prompt must not be an empty list", "prompt")
    rows = []
    start = empty_prompt_start(tokenizer)
    for index, item in enumerate(prompt):
        try:
            ids = tokenizer.encode(item) if isinstance(item, str) else item
            ids = checked_prompt(ids, engine.vocab_size, start, name=f"prompt {index}")
        except UserError as error:
            raise _BadRequest(str(error), "prompt") from None
        if len(ids) >= block_size:
            raise _BadRequest(
                f"prompt {index} has {len(ids)} tokens; this model's context is {block_size} tokens, so a prompt "
                f"may have at most {block_size - 1} (one position is left for a new token). Shorten the prompt",
                "prompt",
                "context_length_exceeded",
            )
        rows.append(ids)
    return rows


def _parse(raw: bytes, served: _Served) -> tuple[CompletionRequest, list[list[int]], int, SamplingParams]:
    try:
        body = CompletionRequest.model_validate_json(raw)
    except ValidationError as error:
        raise _describe_validation_error(error) from None
    if body.model is not None and body.model != served.model_name:
        raise _unknown_model(body.model, served)
    limit = served.max_new_tokens_limit
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens > limit:
        raise _BadRequest(
            f"max_tokens is {max_tokens}, above this server's limit of {limit} (set by --max-new-tokens-limit)",
            "max_tokens",
        )
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop is not None else []
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise _BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    n = body.n or 1
    prompts = _prompts(body, served)
    if len(prompts) * n > MAX_COMPLETIONS_PER_REQUEST:
        raise _BadRequest(
            f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; "
            f"at most {MAX_COMPLETIONS_PER_REQUEST} per request",
            "n",
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        stop=tuple(stop),
        seed=body.seed,
    )
    return body, prompts, n, params


def _submit(served: _Served, prompts: list[list[int]], n: int, params: SamplingParams) -> _Completion:
    """Queue every choice: choice j of a prompt continues it with the generator seeded seed + j,
    and a prompt + max_tokens beyond the context stops at the context's end."""
    completion = _Completion()
    for prompt in prompts:
        capped = dataclasses.replace(params, max_tokens=min(params.max_tokens, served.block_size - len(prompt)))
        for j in range(n):
            completion.sequences.append(served.engine.submit(prompt, capped, owner=completion, seed_offset=j))
    return completion


def _usage(prompts: list[list[int]], completion: _Completion) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(s.tokens) for s in completion.sequences)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _cancel(engine: Engine, completion: _Completion) -> None:
    for sequence in completion.sequences:
        engine.cancel(sequence)


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(
    request: Request, served: _Served, head: dict, prompts: list[list[int]], n: int, params: SamplingParams
) -> Response:
    completion = _submit(served, prompts, n, params)
    index = {s: i for i, s in enumerate(completion.sequences)}
    texts = [[] for _ in completion.sequences]
    reasons: list[str | None] = [None] * len(completion.sequences)

    async def collect() -> str | None:
        remaining = len(completion.sequences)
        while remaining:
            update = await completion.queue.get()
            i = index[update.sequence]
            texts[i].append(update.text)
            if update.finish_reason is not None:
                if update.error is not None:
                    return update.error
                reasons[i] = update.finish_reason
                remaining -= 1
        return None

    collecting = asyncio.ensure_future(collect())
    watching = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            _cancel(served.engine, completion)
    if not collecting.done() or collecting.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    error = collecting.result()
    if error is not None:
        _cancel(served.engine, completion)
        return error_response(500, error)
    choices = [
        {"text": "".join(texts[i]), "index": i, "logprobs": None, "finish_reason": reasons[i]}
        for i in range(len(completion.sequences))
    ]
    return JSONResponse({**head, "choices": choices, "usage": _usage(prompts, completion)})


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    served: _Served, head: dict, prompts: list[list[int]], n: int, params: SamplingParams, include_usage: bool
) -> AsyncIterator[bytes]:
    # The sequences are queued here, not in the handler, so that the finally below (run when
    # the client disconnects and the server cancels this generator) always covers them.
    completion = _submit(served, prompts, n, params)
    index = {s: i for i, s in enumerate(completion.sequences)}
    remaining = len(completion.sequences)
    try:
        while remaining:
            updates = [await completion.queue.get()]
            while not completion.queue.empty():
                updates.append(completion.queue.get_nowait())
            out = []
            for update in updates:
                if update.error is not None:
                    yield _event({"error": {"message": update.error, "type": "server_error", "param": None, "code": None}})
                    return
                if update.finish_reason is not None:
                    remaining -= 1
                elif not update.text:
                    continue
                choice = {"text": update.text, "index": index[update.sequence], "logprobs": None, "finish_reason": update.finish_reason}
                out.append(_event({**head, "choices": [choice]}))
            yield b"".join(out)
        if include_usage:
            yield _event({**head, "choices": [], "usage": _usage(prompts, completion)})
        yield b"data: [DONE]\n\n"
    finally:
        _cancel(served.engine, completion)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> Iterator[str]:
    """Serve `app` with uvicorn from a background thread (a notebook, a test); yields the base URL
    once the server answers, and stops it on exit. Port 0 picks a free port."""
    import uvicorn

    sock = listen(host, port)
    server = uvicorn.Server(uvicorn_config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gpt2lab-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
