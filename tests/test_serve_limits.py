"""Limits every request meets: UserErrors are 400s, bodies are capped (413), prompts are tokenized
off the event loop, half-sent requests are closed (408), and a client that goes away is one log line."""

import http.client
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")

from gpt2lab import load_model, load_tokenizer  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.errors import UserError  # noqa: E402
from gpt2lab.serve import Engine, create_app  # noqa: E402
from gpt2lab.serve.app import serve_in_thread  # noqa: E402
from gpt2lab.serve.limits import Limits  # noqa: E402
from gpt2lab.tokenizer import CharTokenizer  # noqa: E402

CHARS = "abcdefgh \n"
MAX_BODY = 4096
READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def folder(make_model_folder):
    tokenizer = CharTokenizer.from_text(CHARS)
    return make_model_folder(
        "limits", tokenizer_spec=tokenizer.spec(), n_layer=1, n_head=1, n_embd=16, block_size=64,
        vocab_size=tokenizer.vocab_size,
    )


@contextmanager
def serving(folder, tokenizer=None, routes=()):
    model = load_model(folder)
    tokenizer = tokenizer or load_tokenizer(folder)
    app = create_app(
        Engine(model, tokenizer), tokenizer, model_name="chars",
        limits=Limits(max_body_bytes=MAX_BODY, read_timeout_s=READ_TIMEOUT),
    )
    for path, handler in routes:
        app.add_api_route(path, handler, methods=["GET"])
    with serve_in_thread(app, log_level="info") as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


@pytest.fixture(scope="module")
def server(folder):
    async def refuse():
        raise UserError("this is the user's mistake; fix it")

    with serving(folder, routes=[("/user-error", refuse)]) as address:
        yield address


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def server_log():
    """Every record of the server's loggers (uvicorn's tracebacks go to uvicorn.error)."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("gpt2lab", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def request(address, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None, response


def read_until_closed(sock, timeout=10.0) -> bytes:
    """Everything the server sends until it closes the connection (a socket.timeout if it does not)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---- UserErrors ------------------------------------------------------------------------------------


def test_a_character_outside_a_char_models_vocabulary_is_a_400(server):
    with server_log() as records:
        status, body, _ = request(server, "POST", "/v1/completions", {"prompt": "abc xyz", "max_tokens": 2})
    assert status == 400
    assert body["error"]["message"].startswith("character 'x' is not in this model's 10-character vocabulary")
    assert body["error"]["param"] == "prompt" and body["error"]["type"] == "invalid_request_error"
    assert not [r for r in records if r.levelno >= logging.ERROR]
    status, body, _ = request(server, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_a_user_error_from_any_endpoint_is_a_400(server):
    status, body, _ = request(server, "GET", "/user-error")
    assert status == 400
    assert body["error"] == {
        "message": "this is the user's mistake; fix it", "type": "invalid_request_error", "param": None, "code": None,
    }


# ---- body size -------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413(server):
    prompt = "a" * MAX_BODY
    status, body, response = request(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert f"above this server's limit of {MAX_BODY} (set by --max-body-bytes)" in body["error"]["message"]
    assert response.getheader("connection") == "close"


def test_a_declared_10_mb_body_is_refused_before_it_is_sent(server):
    with socket.create_connection(server) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n{\"prompt\": \"aaaa"
        )
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"the request body is 10000000 bytes" in reply


def test_a_chunked_body_over_the_limit_is_a_413(server):
    chunk = b"a" * 1000
    # One write of the whole request: bytes still arriving after the server's 413 and close
    # would make the kernel answer them with a reset, which can discard the reply unread.
    with socket.create_connection(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 6 + b"0\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert f"over {MAX_BODY} bytes".encode() in reply


def test_a_body_at_the_limit_is_served(server):
    body = {"prompt": "ab", "max_tokens": 1, "stop": ["h"]}
    raw = json.dumps(body).encode()
    raw = raw[:-1] + b" " * (MAX_BODY - len(raw)) + b"}"
    assert len(raw) == MAX_BODY
    status, _, _ = request(server, "POST", "/v1/completions", raw)
    assert status == 200


# ---- tokenizing off the event loop --------------------------------------------------------------------


class BlockingTokenizer:
    """The char tokenizer, whose encode waits until the test lets it go."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return self._tokenizer.encode(text)


def test_health_answers_while_a_prompt_is_being_tokenized(folder):
    tokenizer = BlockingTokenizer(load_tokenizer(folder))
    results = []
    with serving(folder, tokenizer) as address:
        def complete():
            results.append(request(address, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 3}, timeout=60))

        thread = threading.Thread(target=complete)
        thread.start()
        try:
            assert tokenizer.entered.wait(30)
            status, health, _ = request(address, "GET", "/health", timeout=10)  # hangs if encode held the loop
            assert status == 200 and health["status"] == "ok"
            time.sleep(READ_TIMEOUT * 1.5)  # a request that has arrived is not cut by the read deadline
        finally:
            tokenizer.release.set()
            thread.join(60)
    status, body, _ = results[0]
    assert status == 200 and body["usage"]["completion_tokens"] == 3


# ---- read deadline (slowloris) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "half",
    [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl",  # headers cut short
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":",  # body cut short
        b"",  # nothing at all
    ],
    ids=["headers", "body", "nothing"],
)
def test_a_half_sent_request_is_closed_within_the_read_timeout(server, half):
    with server_log() as records, socket.create_connection(server) as sock:
        started = time.monotonic()
        sock.sendall(half)
        reply = read_until_closed(sock, timeout=READ_TIMEOUT + 10)
        waited = time.monotonic() - started
        wait_for(lambda: any("sent no complete request" in r.getMessage() for r in records))
    assert READ_TIMEOUT * 0.9 <= waited < READ_TIMEOUT + 10
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"did not arrive in full within 1 s" in reply


def test_a_keep_alive_connection_gets_a_fresh_deadline_per_request(server):
    conn = http.client.HTTPConnection(*server, timeout=30)
    for _ in range(2):
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        time.sleep(READ_TIMEOUT * 0.6)  # the two requests together take longer than one deadline
    conn.close()


# ---- client disconnects --------------------------------------------------------------------------------


def test_a_client_that_goes_away_mid_request_is_one_log_line(server):
    with server_log() as records:
        with socket.create_connection(server) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"prompt\":"
            )
            time.sleep(0.2)
        wait_for(lambda: records)
        time.sleep(0.5)  # anything else logged for it (a traceback) comes with it
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert "went away before its request to POST /v1/completions had arrived" in record.getMessage()


def test_a_streaming_client_that_goes_away_logs_no_traceback(server):
    with server_log() as records:
        conn = http.client.HTTPConnection(*server, timeout=30)
        body = {"prompt": "ab", "max_tokens": 60, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        response.close()
        conn.close()
        time.sleep(0.5)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]


# ---- the verb's options --------------------------------------------------------------------------------


def test_serve_documents_and_checks_its_limits(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--max-body-bytes" in text and "413" in text and "--read-timeout" in text and "408" in text
    for option in (["--max-body-bytes", "0"], ["--read-timeout", "inf"], ["--read-timeout", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--model", "gpt2", *option])
        assert exit_info.value.code == 2
        assert f"argument {option[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("limits", [dict(max_body_bytes=0), dict(read_timeout_s=float("nan")), dict(read_timeout_s=-1)])
def test_limits_from_python_are_checked(limits):
    with pytest.raises(UserError):
        Limits(**limits)
