"""The HTTP layer: OpenAI's /v1/completions and /v1/chat/completions (streamed and not),
/v1/models, /health and the web page, over an `Engine` that decodes every running request together.

Both completion endpoints parse into one `_Job` (prompts, n, sampling) and share its submission,
collection and streaming; only the parsing of the prompt and the shape of the answer differ.
A chat request is a conversation rendered by the served model's chat template, whose answer ends
at the end-of-turn token.

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
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat.template import ChatTemplate, base_model_reason
from ..errors import UserError
from ..inference.prompts import checked_prompt, empty_prompt_start
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
UNSUPPORTED_IN_CHAT = {
    "logprobs": False,
    "top_logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "tools": [],
    "tool_choice": "none",
    "response_format": {"type": "text"},
}
# Messages for fields whose type is a union, where pydantic's first message names one member only.
TYPE_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": f"must be a string or a list of at most {MAX_STOP_STRINGS} strings",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields both completion endpoints take. `top_k` is an extension; null means the default."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    unsupported: ClassVar[dict[str, Any]] = UNSUPPORTED

    model: str | None = None
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
            for name, off in cls.unsupported.items():
                value = data.get(name)
                if value is not None and value != off and not (name == "best_of" and value == data.get("n")):
                    raise _BadRequest(f"{name} is not supported by this server; leave it out", name, "unsupported_parameter")
        return data


class CompletionRequest(_SamplingRequest):
    """The body of POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]


class ChatCompletionRequest(_SamplingRequest):
    """The body of POST /v1/chat/completions; `messages` is checked by the chat template, whose
    messages name the bad message. `max_completion_tokens` is OpenAI's newer name of `max_tokens`."""

    unsupported: ClassVar[dict[str, Any]] = UNSUPPORTED_IN_CHAT

    messages: Any
    max_completion_tokens: int | None = Field(None, ge=0)


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


class _TextShape:
    """The objects of /v1/completions: a choice holds its `text`."""

    id_prefix = "cmpl-"
    object = chunk_object = "text_completion"

    @staticmethod
    def choice(index: int, text: str, finish_reason: str | None) -> dict:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}

    chunk_choice = choice

    @staticmethod
    def opening(index: int) -> dict | None:
        return None


class _ChatShape:
    """The objects of /v1/chat/completions: a choice holds the assistant's `message`; streamed,
    each choice opens with a chunk naming the role, then `delta`s carry the content."""

    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @staticmethod
    def choice(index: int, text: str, finish_reason: str | None) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def chunk_choice(index: int, text: str, finish_reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def opening(index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


@dataclasses.dataclass(frozen=True)
class _Job:
    """A parsed request of either endpoint: `n` choices for each prompt, sampled with `params`,
    answered in the objects of `shape`; `head` holds the answer's id, created and model."""

    shape: type
    head: dict
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class _Served:
    """What the handlers serve: `create_app` keeps it on `app.state.served`."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    block_size: int
    max_new_tokens_limit: int
    created: int
    chat: ChatTemplate | None  # None: a base model, for the reason in `no_chat`
    no_chat: str = ""


def _served(request: Request) -> _Served:
    return request.app.state.served


def _chat_support(tokenizer: Tokenizer, vocab_size: int) -> tuple[ChatTemplate | None, str]:
    """The served model's chat template, or None and why it has none."""
    reason = base_model_reason(tokenizer, vocab_size)
    return (None, reason) if reason is not None else (ChatTemplate(tokenizer), "")


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
    `max_new_tokens_limit` (default: the context length) is a 400. /v1/chat/completions answers
    when the tokenizer carries a chat format and the model's vocabulary holds its tokens (else
    400). `limits` (kept on `app.state.limits`) caps every request's body and the time it may
    take to arrive."""
    app = FastAPI(title="gpt2lab", summary=f"OpenAI-compatible completions from {model_name}", lifespan=_lifespan)
    chat, no_chat = _chat_support(tokenizer, engine.vocab_size)
    app.state.served = _Served(
        engine=engine,
        tokenizer=tokenizer,
        model_name=model_name,
        block_size=engine.block_size,
        max_new_tokens_limit=engine.block_size if max_new_tokens_limit is None else max_new_tokens_limit,
        created=int(time.time()),
        chat=chat,
        no_chat=no_chat,
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
    app.add_api_route("/v1/completions", completions, methods=["POST"], **_documented(CompletionRequest))
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], **_documented(ChatCompletionRequest))
    return app


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
    }, "required": ["message", "type", "param", "code"]}},
    "required": ["error"],
}
_ERRORS = {
    400: "a bad request: the message names the field (`param`) and the fix",
    404: "no such model (`model_not_found`)",
    408: "the body did not arrive within the read deadline",
    413: "the body is larger than the server's cap",
}


def _documented(body: type[BaseModel]) -> dict[str, Any]:
    """What /openapi.json says of an endpoint that reads its body itself (to answer every mistake
    with OpenAI's error body): the body's schema and the error answers."""
    schema = body.model_json_schema()
    definitions = schema.pop("$defs", {})
    schema = _inline(schema, definitions)
    errors = {status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
              for status, text in _ERRORS.items()}
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        "responses": errors,
    }


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    """`schema` with its `$ref`s to `definitions` replaced by what they name: refs into a schema's
    own `$defs` do not resolve inside an OpenAPI document."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
        return {key: _inline(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    return schema


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
    response = error_response(error.status_code, message.get(error.status_code, str(error.detail)))
    response.headers.update(error.headers or {})  # a 405's Allow: the methods the path takes
    return response


async def _user_error(request: Request, error: UserError) -> JSONResponse:
    return error_response(400, str(error))


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(error).__name__}: {error}")


def _model_card(served: _Served) -> dict:
    # `chat` (an extension) tells clients such as the page whether /v1/chat/completions answers.
    card = {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "gpt2lab"}
    return {**card, "chat": served.chat is not None}


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
        "chat": served.chat is not None,
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
    return await _serve(request, _parse_completion)


async def chat_completions(request: Request):
    return await _serve(request, _parse_chat)


async def _serve(request: Request, parse: Callable[[bytes, _Served], _Job]):
    served = _served(request)
    raw = await request.body()
    try:
        job = await asyncio.to_thread(parse, raw, served)
    except _BadRequest as error:
        return error_response(error.status, error.message, param=error.param, code=error.code)
    if job.stream:
        return StreamingResponse(
            _stream(served, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(request, served, job)


def _too_long(what: str, length: int, block_size: int, param: str, fix: str) -> _BadRequest:
    return _BadRequest(
        f"{what} has {length} tokens; this model's context is {block_size} tokens, so a prompt "
        f"may have at most {block_size - 1} (one position is left for a new token). {fix}",
        param,
        "context_length_exceeded",
    )


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
            raise _too_long(f"prompt {index}", len(ids), block_size, "prompt", "Shorten the prompt")
        rows.append(ids)
    return rows


def _validated(kind: type[_SamplingRequest], raw: bytes, served: _Served) -> Any:
    try:
        body = kind.model_validate_json(raw)
    except ValidationError as error:
        raise _describe_validation_error(error) from None
    if body.model is not None and body.model != served.model_name:
        raise _unknown_model(body.model, served)
    return body


def _sampling(body: _SamplingRequest, served: _Served, max_tokens: int, field: str) -> SamplingParams:
    """The settings both endpoints share; `max_tokens` arrives in the request's `field`."""
    limit = served.max_new_tokens_limit
    if max_tokens > limit:
        raise _BadRequest(
            f"{field} is {max_tokens}, above this server's limit of {limit} (set by --max-new-tokens-limit)", field
        )
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop is not None else []
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise _BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        stop=tuple(stop),
        seed=body.seed,
    )


def _job(shape: type, body: _SamplingRequest, served: _Served, prompts: list[list[int]], params: SamplingParams) -> _Job:
    n = body.n or 1
    if len(prompts) * n > MAX_COMPLETIONS_PER_REQUEST:
        raise _BadRequest(
            f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; "
            f"at most {MAX_COMPLETIONS_PER_REQUEST} per request",
            "n",
        )
    head = {"id": f"{shape.id_prefix}{uuid.uuid4().hex}", "created": int(time.time()), "model": served.model_name}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return _Job(shape, head, prompts, n, params, bool(body.stream), include_usage)


def _parse_completion(raw: bytes, served: _Served) -> _Job:
    body = _validated(CompletionRequest, raw, served)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = _sampling(body, served, max_tokens, "max_tokens")
    return _job(_TextShape, body, served, _prompts(body, served), params)


def _parse_chat(raw: bytes, served: _Served) -> _Job:
    body = _validated(ChatCompletionRequest, raw, served)
    template = served.chat
    if template is None:
        raise _BadRequest(
            f"{served.model_name!r} is a base model without the chat tokens ({served.no_chat}), so it cannot "
            "answer messages: use /v1/completions with it, or make a chat model with `gpt2lab prepare chat "
            "FILE... --out DIR` and `gpt2lab train --preset sft --set data.path=DIR`, and serve that",
            "model",
        )
    # Unset, the answer may run to the end of the context (as OpenAI's chat does), within the limit.
    given = [(f, getattr(body, f)) for f in ("max_completion_tokens", "max_tokens") if getattr(body, f) is not None]
    if len({value for _, value in given}) > 1:
        raise _BadRequest("max_tokens and max_completion_tokens differ; give one of them", "max_completion_tokens")
    field, max_tokens = given[0] if given else ("max_tokens", served.max_new_tokens_limit)
    params = _sampling(body, served, max_tokens, field)
    params = dataclasses.replace(params, stop_token_ids=tuple(template.stop_tokens()))
    try:
        prompt = template.render_prompt(body.messages)
    except UserError as error:
        raise _BadRequest(f"messages: {error}", "messages") from None
    if len(prompt) >= served.block_size:
        raise _too_long(
            "the conversation", len(prompt), served.block_size, "messages", "Shorten it or leave out earlier messages"
        )
    return _job(_ChatShape, body, served, [prompt], params)


def _submit(served: _Served, job: _Job) -> _Completion:
    """Queue every choice: choice j of a prompt continues it with the generator seeded seed + j,
    and a prompt + max_tokens beyond the context stops at the context's end."""
    completion = _Completion()
    for prompt in job.prompts:
        capped = dataclasses.replace(job.params, max_tokens=min(job.params.max_tokens, served.block_size - len(prompt)))
        for j in range(job.n):
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


async def _complete(request: Request, served: _Served, job: _Job) -> Response:
    completion = _submit(served, job)
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
    choices = [job.shape.choice(i, "".join(texts[i]), reasons[i]) for i in range(len(completion.sequences))]
    head = {**job.head, "object": job.shape.object}
    return JSONResponse({**head, "choices": choices, "usage": _usage(job.prompts, completion)})


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _stream(served: _Served, job: _Job) -> AsyncIterator[bytes]:
    # The sequences are queued here, not in the handler, so that the finally below (run when
    # the client disconnects and the server cancels this generator) always covers them.
    completion = _submit(served, job)
    index = {s: i for i, s in enumerate(completion.sequences)}
    remaining = len(completion.sequences)
    head = {**job.head, "object": job.shape.chunk_object}
    try:
        openings = [c for c in map(job.shape.opening, range(len(completion.sequences))) if c is not None]
        if openings:
            yield b"".join(_event({**head, "choices": [choice]}) for choice in openings)
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
                choice = job.shape.chunk_choice(index[update.sequence], update.text, update.finish_reason)
                out.append(_event({**head, "choices": [choice]}))
            yield b"".join(out)
        if job.include_usage:
            yield _event({**head, "choices": [], "usage": _usage(job.prompts, completion)})
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
