"""The web playground in headless Chromium (Debian's, driven by Playwright): text streams in, in
the completion view and in the chat view."""

import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium; .ci/run does it in CI)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

from gpt2lab import load_model, load_tokenizer  # noqa: E402
from gpt2lab.chat.template import ChatTemplate  # noqa: E402
from gpt2lab.serve import Engine, create_app  # noqa: E402
from gpt2lab.serve.app import serve_in_thread  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def paced(model, seconds=0.01):
    """The model, each forward made to last `seconds` longer. The tiny test models decode 40
    tokens faster than the browser paints, and text that arrives within one frame is painted once
    whether or not it was streamed; spaced steps make streaming visible to the page."""
    model.transformer.h[-1].register_forward_hook(lambda *_: time.sleep(seconds))
    return model


@pytest.fixture(scope="module")
def served(make_model_folder):
    folder = make_model_folder("browser", block_size=1024, vocab_size=50257, peaked=True)
    model, tokenizer = paced(load_model(folder)), load_tokenizer(folder)
    engine = Engine(model, tokenizer)
    with serve_in_thread(create_app(engine, tokenizer, model_name="tiny")) as url:
        yield url, engine, model, tokenizer


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_generate_streams_text_into_the_page(served, page, tmp_path):
    url, engine, model, tokenizer = served
    page.goto(url + "/")
    sync_api.expect(page.locator("#model")).to_have_text("model: tiny")
    prompt = "The quick brown fox"
    page.locator("#prompt").fill(prompt)
    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("300")
    # Record the length of the generated text at every change: streamed text grows in pieces.
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => {
          const generated = document.getElementById("generated");
          if (generated) window.lengths.push(generated.textContent.length);
        }).observe(document.getElementById("output"), {childList: true, subtree: true, characterData: true}); }"""
    )
    page.locator("#generate").click()
    sync_api.expect(page.locator("#status")).to_contain_text("done (length): 300 tokens", timeout=60_000)
    ids = tokenizer.encode(prompt)
    expected = tokenizer.decode(model.generate([ids], 300, temperature=0)[0][len(ids) :])
    assert page.locator("#generated").text_content() == expected
    partial = {n for n in page.evaluate("window.lengths") if 0 < n < len(expected)}
    assert len(partial) >= 2, "the text arrived all at once, not streamed"
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_stop_button_ends_the_generation_and_its_compute(served, page):
    url, engine, _, _ = served
    page.goto(url + "/")
    page.locator("#max-tokens").fill("1000")
    cancelled = engine.sequences_cancelled
    page.locator("#generate").click()
    sync_api.expect(page.locator("#generated")).not_to_be_empty(timeout=30_000)
    page.locator("#stop").click()
    sync_api.expect(page.locator("#status")).to_have_text("stopped")
    for _ in range(400):  # 20 s at most
        if engine.active_count == 0 and engine.sequences_cancelled == cancelled + 1:
            break
        page.wait_for_timeout(50)
    assert engine.active_count == 0 and engine.sequences_cancelled == cancelled + 1
    assert page.locator("#generate").is_enabled()


def test_a_base_model_gets_no_chat_view(served, page):
    page.goto(served[0] + "/")
    sync_api.expect(page.locator("#model")).to_have_text("model: tiny")
    assert page.locator("#views").is_hidden() and page.locator("#chat-view").is_hidden()
    assert page.locator("#complete-view").is_visible()


# ---- the chat view ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_served(make_chat_model_folder):
    folder = make_chat_model_folder("browser-chat", block_size=1024)  # answers never end by themselves
    model, tokenizer = paced(load_model(folder)), load_tokenizer(folder)
    engine = Engine(model, tokenizer)
    with serve_in_thread(create_app(engine, tokenizer, model_name="tiny-chat")) as url:
        yield url, engine, model, ChatTemplate(tokenizer)


def greedy_answer(model, template, messages, max_tokens):
    ids = template.render_prompt(messages)
    return template.tokenizer.decode(model.generate([ids], max_tokens, temperature=0)[0][len(ids) :])


def ask(page, text, tokens):
    """Send a message and wait for its whole answer; returns the lengths the answer's bubble had."""
    page.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => {
          const answers = document.querySelectorAll("#conversation .assistant");
          if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById("conversation"), {childList: true, subtree: true, characterData: true}); }"""
    )
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")
    sync_api.expect(page.locator("#chat-status")).to_contain_text(f"done (length): {tokens} tokens", timeout=60_000)
    return page.evaluate("window.lengths")


def test_chat_streams_answers_keeps_the_conversation_and_starts_anew(chat_served, page, tmp_path):
    url, engine, model, template = chat_served
    page.goto(url + "/")
    sync_api.expect(page.locator("#chat-view")).to_be_visible()
    assert page.locator("#complete-view").is_hidden()
    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("40")
    first = [{"role": "user", "content": "Tell me a story."}]
    lengths = ask(page, first[0]["content"], 40)
    answer = greedy_answer(model, template, first, 40)
    bubbles = page.locator("#conversation .bubble")
    assert bubbles.all_text_contents() == [first[0]["content"], answer]
    assert len({n for n in lengths if 0 < n < len(answer)}) >= 2, "the answer arrived all at once, not streamed"
    # The second question is asked with the first exchange before it.
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    ask(page, "And then?", 40)
    second_answer = greedy_answer(model, template, second, 40)
    assert bubbles.all_text_contents() == [first[0]["content"], answer, "And then?", second_answer]
    assert second_answer != greedy_answer(model, template, second[-1:], 40)
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.locator("#new-chat").click()
    assert bubbles.count() == 0 and page.locator("#chat-status").text_content() == ""
    ask(page, first[0]["content"], 40)  # no earlier turns now: the first answer again
    assert bubbles.all_text_contents() == [first[0]["content"], answer]


def test_chat_stop_ends_the_answer_and_its_compute(chat_served, page):
    url, engine, _, _ = chat_served
    page.goto(url + "/")
    page.locator("#max-tokens").fill("1000")
    cancelled = engine.sequences_cancelled
    page.locator("#message").fill("Talk for a long time.")
    page.locator("#send").click()
    answer = page.locator("#conversation .assistant")
    sync_api.expect(answer).not_to_be_empty(timeout=30_000)
    # The streaming answer must not move the button (a click would land on the wrong place).
    stop_at = page.locator("#chat-stop").bounding_box()
    so_far = len(answer.text_content())
    page.wait_for_function(f"document.querySelector('#conversation .assistant').textContent.length > {so_far + 200}")
    assert page.locator("#chat-stop").bounding_box() == stop_at
    page.locator("#chat-stop").click()
    sync_api.expect(page.locator("#chat-status")).to_have_text("stopped")
    for _ in range(400):  # 20 s at most
        if engine.active_count == 0 and engine.sequences_cancelled == cancelled + 1:
            break
        page.wait_for_timeout(50)
    assert engine.active_count == 0 and engine.sequences_cancelled == cancelled + 1
    assert page.locator("#send").is_enabled() and page.locator("#chat-stop").is_disabled()
    assert answer.text_content()  # what arrived stays in the conversation
