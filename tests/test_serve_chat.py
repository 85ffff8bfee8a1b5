"""POST /v1/chat/completions through OpenAI's client: the answer of the chat template's prompt,
ended at <|end|>, streamed and not; base models and bad messages refused."""

import http.client
import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from starlette.testclient import TestClient  # noqa: E402

from gpt2lab import load_model, load_tokenizer  # noqa: E402
from gpt2lab.chat.template import ChatTemplate  # noqa: E402
from gpt2lab.cli import main  # noqa: E402
from gpt2lab.serve import Engine, create_app  # noqa: E402
from gpt2lab.serve.app import serve_in_thread  # noqa: E402
from gpt2lab.serve.limits import Limits  # noqa: E402
from gpt2lab.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

NAME = "tiny-chat"
BLOCK = 128
END_AT = 40  # every answer of the served model ends with <|end|> at this position
MAX_BODY = 64 * 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
TEMPLATE = ChatTemplate(GPT2Tokenizer(chat="gpt2lab-chat-v1"))


@pytest.fixture(scope="module")
def folder(make_chat_model_folder):
    return make_chat_model_folder("serve-chat", end_at=END_AT, block_size=BLOCK)


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def server(folder, model):
    tokenizer = load_tokenizer(folder)
    app = create_app(Engine(model, tokenizer), tokenizer, model_name=NAME, limits=Limits(max_body_bytes=MAX_BODY))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)


def reference(model, messages, max_tokens, **options) -> tuple[str, list[int]]:
    """The answer `generate` gives the rendered prompt, cut after its first stop token: its text
    (without that token) and its tokens (with it)."""
    ids = TEMPLATE.render_prompt(messages)
    out = model.generate([ids], max_tokens, **options)[0][len(ids) :]
    ends = [i for i, t in enumerate(out) if t in TEMPLATE.stop_tokens()]
    out = out[: ends[0] + 1] if ends else out
    return TEMPLATE.tokenizer.decode(t for t in out if t not in TEMPLATE.stop_tokens()), out


def post(url, body, path="/v1/chat/completions", method="POST"):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data if method == "POST" else None, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


def streamed_choices(chunks) -> dict[int, dict]:
    """Per choice index: its role (from the first chunk only), content and finish_reason."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.model == NAME
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"role": c.delta.role, "content": "", "finish": None, "chunks": 0})
            assert got["chunks"] == 0 or c.delta.role is None
            assert got["finish"] is None, "a chunk after the finish_reason"
            got["content"] += c.delta.content or ""
            got["finish"] = c.finish_reason
            got["chunks"] += 1
    return choices


def test_the_answer_ends_at_end_of_turn_without_the_token(client, model):
    prompt = TEMPLATE.render_prompt(QUESTION)
    expected, tokens = reference(model, QUESTION, BLOCK - len(prompt), temperature=0)
    assert tokens[-1] == TEMPLATE.end_token and len(tokens) == END_AT - len(prompt) + 1 > 10
    # No max_tokens: the answer may run to the end of the context, and ends at <|end|> well before it.
    result = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-") and result.model == NAME
    [choice] = result.choices
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "stop")
    assert choice.message.content == expected and "<|end|>" not in expected and len(expected) > 20
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(tokens)  # the answer and its <|end|>
    assert result.usage.total_tokens == len(prompt) + len(tokens)
    # /v1/completions of the rendered prompt ends there too, and shows no control token as text.
    raw = client.completions.create(model=NAME, prompt=prompt, max_tokens=len(tokens) + 2, temperature=0)
    assert (raw.choices[0].text, raw.choices[0].finish_reason) == (expected, "stop")
    assert raw.usage.completion_tokens == len(tokens)
    stream = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    [streamed] = streamed_choices(chunks).values()
    assert (streamed["role"], streamed["content"], streamed["finish"]) == ("assistant", expected, "stop")
    assert streamed["chunks"] > 3  # the text came in pieces


def test_n_choices_sample_with_seed_plus_j_and_repeat(client, model):
    options = dict(model=NAME, messages=CONVERSATION, n=2, max_tokens=12, temperature=0.9, seed=5)
    result = client.chat.completions.create(**options)
    assert [c.index for c in result.choices] == [0, 1]
    contents = [c.message.content for c in result.choices]
    for j, content in enumerate(contents):
        assert content == reference(model, CONVERSATION, 12, temperature=0.9, seed=5 + j)[0]
    assert contents[0] != contents[1]
    assert [c.message.content for c in client.chat.completions.create(**options).choices] == contents
    assert client.chat.completions.create(**{**options, "seed": 6}).choices[0].message.content == contents[1]
    streamed = streamed_choices(client.chat.completions.create(**options, stream=True))
    assert [(s["role"], s["content"], s["finish"]) for s in streamed.values()] == [
        ("assistant", content, "length") for content in contents
    ]
    assert sorted(streamed) == [0, 1]


def test_usage_counts_the_rendered_conversation(client):
    prompt_tokens = len(TEMPLATE.render_prompt(CONVERSATION))
    for limit in (dict(max_tokens=7), dict(max_completion_tokens=7), dict(max_tokens=7, max_completion_tokens=7)):
        result = client.chat.completions.create(model=NAME, messages=CONVERSATION, temperature=0, **limit)
        assert result.choices[0].finish_reason == "length"
        assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, 7)
    options = dict(max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(client.chat.completions.create(model=NAME, messages=CONVERSATION, **options))
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, 7)
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_strings_cut_the_answer(client):
    free = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0).choices[0].message.content
    stop = free[len(free) // 2 : len(free) // 2 + 4]
    for stream in (False, True):
        result = client.chat.completions.create(
            model=NAME, messages=QUESTION, temperature=0, stop=["zzzz-not-there", stop], stream=stream
        )
        if stream:
            [choice] = streamed_choices(result).values()
            content, finish = choice["content"], choice["finish"]
        else:
            content, finish = result.choices[0].message.content, result.choices[0].finish_reason
        assert (content, finish) == (free[: free.index(stop)], "stop")


def test_models_and_health_say_the_model_has_chat_and_the_page_offers_it(server, client):
    assert client.models.list().data[0].model_extra["chat"] is True
    assert post(server, None, path="/health", method="GET")[1]["chat"] is True
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    html = conn.getresponse().read().decode()
    assert 'id="chat-view"' in html and 'id="new-chat"' in html and "/v1/chat/completions" in html


# ---- refusals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_server(make_model_folder):
    folder = make_model_folder("serve-base", block_size=BLOCK, vocab_size=50257)
    tokenizer = load_tokenizer(folder)
    with serve_in_thread(create_app(Engine(load_model(folder), tokenizer), tokenizer, model_name="gpt2-base")) as url:
        yield url


def test_a_base_model_gets_a_400_that_says_so_and_how_to_make_a_chat_model(base_server):
    client = openai.OpenAI(base_url=base_server + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gpt2-base", messages=QUESTION)
    error = raised.value.body
    assert error["param"] == "model" and error["type"] == "invalid_request_error"
    for part in (
        "'gpt2-base' is a base model without the chat tokens", "without a chat format", "gpt2lab prepare chat", "--preset sft"
    ):
        assert part in error["message"]
    assert client.models.list().data[0].model_extra["chat"] is False
    assert post(base_server, None, path="/health", method="GET")[1]["chat"] is False
    assert client.completions.create(model="gpt2-base", prompt="Hi", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize(
    "tokenizer, vocab_size, why",
    [
        (GPT2Tokenizer(), 50304, "its tokenizer record is plain 'gpt2', without a chat format"),
        (GPT2Tokenizer(chat="gpt2lab-chat-v1"), 50257, "its vocabulary has 50257 ids and the chat tokens need 50261"),
        (CharTokenizer(list("abc \n")), 5, "it has a character vocabulary"),
    ],
    ids=["plain-gpt2-record", "vocab-without-chat-rows", "char"],
)
def test_chat_needs_a_chat_format_and_the_vocabulary_rows_for_it(make_model, tokenizer, vocab_size, why):
    model = make_model(vocab_size=vocab_size)
    with TestClient(create_app(Engine(model, tokenizer), tokenizer, model_name="m")) as http_client:
        reply = http_client.post("/v1/chat/completions", json={"messages": QUESTION})
        assert reply.status_code == 400
        assert "base model without the chat tokens" in reply.json()["error"]["message"]
        assert why in reply.json()["error"]["message"]
        assert http_client.get("/v1/models").json()["data"][0]["chat"] is False


USER = {"messages": QUESTION}
BAD_REQUESTS = [
    ({}, 400, "messages", "messages is required"),
    ({"messages": []}, 400, "messages", "messages: a conversation must be a non-empty list"),
    ({"messages": "hi"}, 400, "messages", "messages: a conversation must be a non-empty list"),
    ({"messages": ["hi"]}, 400, "messages", "messages: message 0 is str, not an object"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages", "messages: message 0 has role 'bot'"),
    ({"messages": [*QUESTION, {"role": "user", "content": 5}]}, 400, "messages", "message 1 (user) has content of type"),
    ({"messages": [*QUESTION, {"role": "system", "content": "x"}]}, 400, "messages", "only the first message"),
    ({"messages": [{"role": "user", "content": " hello" * BLOCK}]}, 400, "messages", "context is 128 tokens"),
    ({**USER, "tools": [{"type": "function"}]}, 400, "tools", "tools is not supported"),
    ({**USER, "logprobs": True}, 400, "logprobs", "logprobs is not supported"),
    ({**USER, "max_tokens": BLOCK + 1}, 400, "max_tokens", "max_tokens is 129, above this server's limit of 128"),
    ({**USER, "max_completion_tokens": 200}, 400, "max_completion_tokens", "max_completion_tokens is 200"),
    ({**USER, "max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens", "differ"),
    ({**USER, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({**USER, "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({**USER, "stop": ""}, 400, "stop", "non-empty string"),
    ({**USER, "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body, status, param, message", BAD_REQUESTS, ids=[m for *_, m in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error_naming_the_field(server, body, status, param, message):
    got_status, payload = post(server, body)
    assert got_status == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert message in payload["error"]["message"]
    assert payload["error"]["param"] == param


def test_unsupported_settings_left_at_off_are_accepted(client):
    result = client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=2, logprobs=False, tools=[], response_format={"type": "text"},
        presence_penalty=0, frequency_penalty=0, user="someone",
    )
    assert result.usage.completion_tokens == 2


def test_the_body_cap_applies(server, client):
    status, payload = post(server, {"messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    assert status == 413 and "above this server's limit of 65536" in payload["error"]["message"]
    assert client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=3).usage.completion_tokens == 3


def test_serve_help_documents_chat(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "POST /v1/chat/completions" in text and "client.chat.completions.create" in text and "<|end|>" in text
