"""The web playground in headless Chromium (Debian's, driven by Playwright): text streams in."""

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
from gpt2lab.serve import Engine, create_app  # noqa: E402
from gpt2lab.serve.api import serve_in_thread  # noqa: E402

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


@pytest.fixture(scope="module")
def served(make_model_folder):
    folder = make_model_folder("browser", block_size=1024, vocab_size=50257, peaked=True)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
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
