"""The HTTP server: OpenAI's client against it, bad requests, disconnects, concurrent load."""

import http.client
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from gpt2lab import load_model, load_tokenizer  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.serve import Engine, create_app  # noqa: E402
from gpt2lab.serve.app import serve_in_thread  # noqa: E402

NAME = "tiny-gpt2"
BLOCK = 1024
LIMIT = 1000  # --max-new-tokens-limit
PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def folder(make_model_folder):
    """A tiny random GPT-2 with the BPE vocabulary and a 1024-token context, saved to disk;
    peaked predictions, so that greedy text depends on the prompt."""
    return make_model_folder("serve", block_size=BLOCK, vocab_size=50257, peaked=True)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def server(folder, model):
    tokenizer = load_tokenizer(folder)
    engine = Engine(model, tokenizer, max_concurrency=64)
    app = create_app(engine, tokenizer, model_name=NAME, max_new_tokens_limit=LIMIT)
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)


def reference(model, prompt: str, max_tokens: int, **options) -> str:
    tok = load_tokenizer("gpt2")
    ids = tok.encode(prompt)
    out = model.generate([ids], max_tokens, eos_token_id=tok.eot_token, **options)[0][len(ids) :]
    return tok.decode(t for t in out if t != tok.eot_token)


def sample_cli(capsys, folder, prompt, *args) -> str:
    """What `gpt2lab sample` prints after the prompt."""
    capsys.readouterr()
    assert main(["sample", "--model", str(folder), "--prompt", prompt, "--device", "cpu", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt) : -1]


def post(url, body, *, path="/v1/completions", method="POST"):
    """Status and parsed JSON of a raw request (bytes are sent as they are)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


# ---- acceptance 1: the official client gets the tokens of `gpt2lab sample` -------------------


def test_greedy_completion_equals_gpt2lab_sample(client, folder, capsys):
    expected = sample_cli(capsys, folder, PROMPT, "--max-new-tokens", "20", "--temperature", "0")
    result = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    assert result.choices[0].text == expected
    assert len(set(expected.split())) > 5  # the comparison is not vacuous
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected


def test_seeded_sampling_equals_gpt2lab_sample_with_that_seed(client, folder, capsys):
    # `gpt2lab sample`'s own defaults: temperature 0.8, top-k 200, seed 1337.
    expected = sample_cli(capsys, folder, PROMPT, "--max-new-tokens", "20")
    options = dict(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0.8, seed=1337, extra_body={"top_k": 200})
    assert client.completions.create(**options).choices[0].text == expected
    chunks = client.completions.create(**options, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    other = client.completions.create(**{**options, "seed": 1338}).choices[0].text
    assert other != expected


def test_usage_counts_and_finish_reason(client):
    result = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=7, temperature=0)
    prompt_tokens = len(load_tokenizer("gpt2").encode(PROMPT))
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.completion_tokens == 7
    assert result.usage.total_tokens == prompt_tokens + 7
    assert result.choices[0].finish_reason == "length"
    assert result.model == NAME and result.object == "text_completion"
    chunks = list(
        client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"


def test_list_prompts_and_n_choices_in_openai_order(client, model):
    prompts = ["Once upon a time", "The weather today"]
    result = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=12, temperature=0.7, seed=5)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        prompt, j = prompts[choice.index // 2], choice.index % 2
        assert choice.text == reference(model, prompt, 12, temperature=0.7, seed=5 + j)
    assert result.choices[0].text != result.choices[1].text
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(
        model=NAME, prompt=prompts, n=2, max_tokens=12, temperature=0.7, seed=5, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in result.choices]


def test_token_id_prompts_are_accepted(client, model):
    ids = load_tokenizer("gpt2").encode(PROMPT)
    result = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert result.choices[0].text == reference(model, PROMPT, 10, temperature=0)


def test_stop_strings_cut_the_text(client):
    free = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 4]
    for stream in (False, True):
        result = client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=["zzzz-not-there", stop], stream=stream
        )
        chunks = list(result) if stream else [result]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == free[: free.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_prompt_plus_max_tokens_past_the_context_stops_at_its_end(client):
    prompt = " hello" * 1000  # 1000 tokens of the 1024
    result = client.completions.create(model=NAME, prompt=prompt, max_tokens=50, temperature=0)
    assert result.usage.prompt_tokens == 1000
    assert result.usage.completion_tokens == BLOCK - 1000
    assert result.choices[0].finish_reason == "length"


def test_models_health_and_the_page(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    status, body = post(url, None, path="/health", method="GET")
    assert status == 200 and body["status"] == "ok" and body["context_length"] == BLOCK
    assert body["max_new_tokens_limit"] == LIMIT
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    page = conn.getresponse()
    html = page.read().decode()
    assert page.status == 200 and page.getheader("content-type").startswith("text/html")
    assert 'id="generate"' in html and 'id="stop"' in html and "/v1/completions" in html


# ---- acceptance 4: bad requests -----------------------------------------------------------------

BAD_REQUESTS = [
    (b'{"prompt": "hi", "max_tokens": 5', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"max_tokens": 5}, 400, "prompt", "prompt is required"),
    ({"prompt": 42}, 400, "prompt", "prompt must be a string"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [1, "a"]}, 400, "prompt", "prompt must be a string"),
    ({"prompt": [50257]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "hi", "max_tokens": LIMIT + 1}, 400, "max_tokens", "limit of 1000"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "hi", "temperature": -0.1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "hi", "top_k": 0}, 400, "top_k", "greater than or equal to 1"),
    ({"prompt": "hi", "n": True}, 400, "n", "valid integer"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "hi", "logprobs": 3}, 400, "logprobs", "not supported"),
    ({"prompt": "hi", "stream": True, "stream_options": 5}, 400, "stream_options", "must be an object"),
    ({"prompt": " hello" * BLOCK}, 400, "prompt", "context is 1024 tokens"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body, status, param, message", BAD_REQUESTS, ids=[m for *_, m in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, body, status, param, message):
    got_status, payload = post(server[0], body)
    assert got_status == status
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert message in payload["error"]["message"]
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"


def test_the_official_client_raises_on_an_unknown_model_and_a_long_prompt(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt=" hello" * BLOCK)


def test_unknown_routes_and_methods_get_openai_error_bodies(server):
    status, payload = post(server[0], {"prompt": "hi"}, path="/v1/chat/nothing")
    assert status == 404 and "no route" in payload["error"]["message"]
    status, payload = post(server[0], None, method="GET")
    assert status == 405 and "not allowed" in payload["error"]["message"]
    host, port = server[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/v1/completions")
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 405 and response.getheader("Allow") == "POST"  # RFC 9110: a 405 names what is allowed


def test_after_200_bad_requests_the_server_still_answers_correctly(server, client, model):
    for i in range(200):
        body, status, _, _ = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        assert post(server[0], body)[0] == status
    result = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=15, temperature=0)
    assert result.choices[0].text == reference(model, PROMPT, 15, temperature=0)
    assert server[1].active_count == 0


# ---- disconnects and load -------------------------------------------------------------------------


def wait_for(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_streaming_client_that_disconnects_stops_its_compute(server):
    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    cancelled, generated = engine.sequences_cancelled, engine.tokens_generated
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"prompt": "Hi", "max_tokens": LIMIT, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    events = 0
    while events < 3:
        events += response.readline().startswith(b"data: ")
    assert engine.active_count == 1
    response.close()
    conn.close()
    wait_for(lambda: engine.active_count == 0)
    assert engine.sequences_cancelled == cancelled + 1
    assert engine.tokens_generated - generated < LIMIT


def test_a_waiting_client_that_disconnects_stops_its_compute(server):
    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    cancelled, generated = engine.sequences_cancelled, engine.tokens_generated
    body = json.dumps({"prompt": "Hi", "max_tokens": LIMIT, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: engine.tokens_generated > generated)
    wait_for(lambda: engine.active_count == 0)
    assert engine.sequences_cancelled == cancelled + 1
    assert engine.tokens_generated - generated < LIMIT


def stream_completion(url, body) -> tuple[str, str | None, bool]:
    """Text, last finish_reason and whether [DONE] arrived, from a raw SSE stream."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    text, finish, done = "", None, False
    for line in response:
        if line.startswith(b"data: [DONE]"):
            done = True
        elif line.startswith(b"data: "):
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    conn.close()
    return text, finish, done


def test_20_concurrent_streams_all_complete_and_share_decode_steps(server, model):
    url, engine = server
    prompts = [f"Request number {i} says" for i in range(20)]
    results: list = [None] * 20
    errors: list = []
    steps_before, tokens_before = engine.decode_steps, engine.tokens_generated

    def run(i):
        try:
            results[i] = stream_completion(url, {"prompt": prompts[i], "max_tokens": 40, "temperature": 0})
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    for prompt, (text, finish, done) in zip(prompts, results):
        assert done and finish == "length"
        assert text == reference(model, prompt, 40, temperature=0)
    tokens = engine.tokens_generated - tokens_before
    assert tokens == 20 * 40
    # One at a time would take 39 decode steps per request; together they share them.
    assert engine.decode_steps - steps_before < tokens / 2


def test_openapi_describes_the_request_bodies_and_the_error_answers(server):
    host, port = server[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/openapi.json")
    spec = json.loads(conn.getresponse().read())
    conn.close()
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert operation["requestBody"]["required"] and field in body["required"]
        assert {"max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream"} <= set(body["properties"])
        assert {"400", "404", "408", "413"} <= set(operation["responses"])
        error = operation["responses"]["400"]["content"]["application/json"]["schema"]
        assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
        assert "$ref" not in json.dumps(body)  # a schema's own $defs do not resolve inside the document
