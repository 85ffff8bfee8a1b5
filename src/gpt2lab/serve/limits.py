"""What every request meets, whatever its endpoint: a cap on the body's size (413 beyond it), a
deadline for its headers and body to arrive (408, and the connection closes, so a client that
sends half a request and waits holds nothing for long), and one log line, not a traceback, for a
client that goes away before its request has arrived.

The cap and the log line are ASGI middleware around the whole app, so every route has them, those
added later included. The deadline needs the HTTP protocol itself (the app sees nothing of a
request before its headers are in): a subclass of uvicorn's, which `uvicorn_config` installs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # 128 prompts of 1024 token ids as JSON fit with room
DEFAULT_READ_TIMEOUT_S = 30.0

log = logging.getLogger("gpt2lab.serve")


@dataclass(frozen=True)
class Limits:
    """`max_body_bytes`: the largest request body; `read_timeout_s`: how long a request's headers
    and body may take to arrive, from the connection's start (or the previous response's end)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise UserError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")
        if not (isinstance(self.read_timeout_s, (int, float)) and math.isfinite(self.read_timeout_s) and self.read_timeout_s > 0):
            raise UserError(f"read_timeout_s must be a finite number of seconds > 0, got {self.read_timeout_s!r}")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _BodyTooLarge(Exception):
    pass


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    # The rest of the body is never read, so the connection cannot carry another request.
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware: a 413 for a body over `max_body_bytes` (by its Content-Length before reading
    any of it, or once the bytes read pass the cap), and one log line for a client that went away
    while its request was being read."""

    def __init__(self, app, max_body_bytes: int):
        from starlette.requests import ClientDisconnect  # here, so that the CLI starts without starlette

        self.app = app
        self.max_body_bytes = max_body_bytes
        self._client_disconnect = ClientDisconnect

    def _too_large(self, size: str) -> str:
        return (
            f"the request body is {size} bytes, above this server's limit of {self.max_body_bytes} "
            "(set by --max-body-bytes); send a shorter request"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, 413, self._too_large(declared.decode()), "request_too_large")
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, 413, self._too_large(f"over {self.max_body_bytes}"), "request_too_large")
        except self._client_disconnect:
            log.info("%s went away before its request to %s %s had arrived", _client(scope), scope["method"], scope["path"])


def _timed_protocol(read_timeout_s: float) -> type:
    """uvicorn's HTTP protocol with a deadline for each request's headers and body to arrive."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    timed_out = _raw_response(
        408, "Request Timeout", f"the request did not arrive in full within {read_timeout_s:g} s", "request_timeout"
    )

    class ReadTimeoutProtocol(AutoHTTPProtocol):
        _read_timer = None
        _armed_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            cycle = self.cycle
            # No request yet, its body still arriving, or only the last one's (answered) cycle.
            waiting = cycle is None or cycle.more_body or cycle.response_complete
            if not waiting or self.transport.is_closing():
                return  # the request is in; answering it may take as long as it takes
            peer = self.client
            log.info("%s sent no complete request within %g s; closed the connection",
                     f"{peer[0]}:{peer[1]}" if peer else "a client", read_timeout_s)
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(timed_out)
            self.transport.close()

    return ReadTimeoutProtocol


def uvicorn_config(app, *, log_level: str = "info"):
    """The uvicorn settings of `gpt2lab serve` and `serve_in_thread`: the read deadline of
    `app.state.limits` (the defaults for an app without one), and gpt2lab's log lines formatted as uvicorn's, at the same level."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging_config = copy.deepcopy(LOGGING_CONFIG)
    logging_config["loggers"]["gpt2lab"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return uvicorn.Config(
        app,
        log_level=log_level,
        log_config=logging_config,
        timeout_graceful_shutdown=5,
        http=_timed_protocol(getattr(app.state, "limits", Limits()).read_timeout_s),
    )
