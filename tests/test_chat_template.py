import json

import pytest

from gpt2lab.chat.template import ChatTemplate, validate_messages
from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.inference.prompts import checked_prompt
from gpt2lab.tokenizer import CharTokenizer, GPT2Tokenizer, gpt2_encoding, is_gpt2_spec, load_tokenizer, tokenizer_from_spec

SYSTEM, USER, ASSISTANT, END, EOT = 50257, 50258, 50259, 50260, 50256

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": " See you."},
]


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(GPT2Tokenizer())


def bpe(text):
    return gpt2_encoding().encode_ordinary(text)


def test_rendered_ids_are_exact(template):
    ids, mask = template.render(CONVERSATION)
    expected = ([EOT, SYSTEM] + bpe("Be brief.") + [END, USER] + bpe("Hi there") + [END, ASSISTANT]
                + bpe("Hello!") + [END, USER] + bpe("Bye") + [END, ASSISTANT] + bpe(" See you.") + [END])
    assert ids == expected
    assert len(mask) == len(ids)


def test_mask_covers_assistant_content_and_its_end(template):
    ids, mask = template.render(CONVERSATION)
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == bpe("Hello!") + [END] + bpe(" See you.") + [END]
    # The assistant's role token itself is context, not a target.
    assert all(m == 0 for t, m in zip(ids, mask) if t == ASSISTANT)


def test_generation_prompt_ends_with_assistant_token(template):
    messages = CONVERSATION[:2]
    prompt = template.render_prompt(messages)
    assert prompt == template.render(messages)[0] + [ASSISTANT]
    ids, mask = template.render(messages, add_generation_prompt=True)
    assert ids == prompt and mask == [0] * len(prompt)
    assert template.stop_tokens() == (END, EOT)


@pytest.mark.parametrize("text", ["<|user|>", "<|end|>", "a<|assistant|>b", "<|endoftext|>", "<|system|>"])
def test_lookalike_text_is_encoded_as_text(template, text):
    ids, _ = template.render([{"role": "user", "content": text}])
    assert ids == [EOT, USER] + bpe(text) + [END]
    assert all(t < 50257 for t in bpe(text))
    assert template.tokenizer.encode(text) == bpe(text)


def test_special_ids_decode_to_their_names(template):
    ids, _ = template.render([{"role": "user", "content": "héllo"}])
    assert template.tokenizer.decode(ids) == "<|endoftext|><|user|>héllo<|end|>"
    assert template.tokenizer.token_bytes(ASSISTANT) == b"<|assistant|>"


def test_plain_gpt2_tokenizer_still_refuses_special_ids():
    with pytest.raises(UserError, match="outside the GPT-2 vocabulary"):
        GPT2Tokenizer().decode([USER])
    with pytest.raises(UserError, match="outside the GPT-2 vocabulary"):
        ChatTemplate(GPT2Tokenizer()).tokenizer.decode([END + 1])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user", "content": "a"}, "b"], "message 1 is str"),
    ([{"role": "bot", "content": "a"}], "message 0 has role 'bot'; use one of system, user, assistant"),
    ([{"content": "a"}], "message 0 has role None"),
    ([{"role": "user", "content": ["a"]}], "message 0 \\(user\\) has content of type list"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
     "message 1 is a system message; only the first"),
])
def test_bad_messages_are_named(template, messages, match):
    with pytest.raises(UserError, match=match):
        template.render(messages)
    with pytest.raises(UserError, match=match):
        validate_messages(messages)


def test_spec_round_trip(template, tmp_path):
    spec = template.spec()
    assert spec == {"type": "gpt2", "chat": "gpt2lab-chat-v1"}
    again = ChatTemplate.from_spec(json.loads(json.dumps(spec)))
    assert again.name == "gpt2lab-chat-v1"
    assert again.render(CONVERSATION) == template.render(CONVERSATION)
    tok = tokenizer_from_spec(spec)
    assert isinstance(tok, GPT2Tokenizer) and tok.chat == "gpt2lab-chat-v1" and tok.vocab_size == 50261
    (tmp_path / "gpt2lab.json").write_text(json.dumps({"tokenizer": spec}))
    assert load_tokenizer(tmp_path).spec() == spec


def test_old_gpt2_record_still_loads_and_gets_the_default_template():
    tok = tokenizer_from_spec("gpt2")
    assert tok.spec() == "gpt2" and tok.vocab_size == 50257 and tok.chat is None
    assert ChatTemplate.from_spec("gpt2").spec() == {"type": "gpt2", "chat": "gpt2lab-chat-v1"}


@pytest.mark.parametrize("spec", [{"type": "gpt2", "chat": "other-v9"}, {"type": "gpt2", "chat": 3},
                                  {"type": "gpt2", "extra": 1}])
def test_unknown_chat_records_are_refused(spec):
    with pytest.raises(UserError, match="unknown"):
        tokenizer_from_spec(spec)


def test_char_tokenizer_is_refused():
    with pytest.raises(UserError, match="chat needs a BPE tokenizer.*'char'"):
        ChatTemplate(CharTokenizer.from_text("hello"))


def test_padded_gpt2_config_accepts_the_ids_and_unpadded_is_refused(template):
    ids = template.render_prompt(CONVERSATION)
    padded = GPTConfig(vocab_size=50304)
    template.check_vocab(padded.vocab_size)
    assert checked_prompt(ids, padded.vocab_size) == ids
    with pytest.raises(UserError, match="50257 ids but the chat tokens .* need 50261; use a model padded to 50304"):
        template.check_vocab(GPTConfig().vocab_size)
    with pytest.raises(UserError, match="outside the vocabulary"):
        checked_prompt(ids, GPTConfig().vocab_size)


@pytest.mark.parametrize("spec, expected", [("gpt2", True), ({"type": "gpt2", "chat": "gpt2lab-chat-v1"}, True),
                                            ({"type": "char", "chars": "ab"}, False), (None, False)])
def test_is_gpt2_spec(spec, expected):
    assert is_gpt2_spec(spec) is expected
