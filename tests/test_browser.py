"""The page in a real browser: Debian's chromium driven by playwright (no browser download).

Type a prompt, click Generate, watch the text appear, save a screenshot. Skipped, saying why, only where
chromium is not installed (`apt-get install -y chromium`; `.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the page is driven in a real browser

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Set NEURALLM_SCREENSHOT to also keep a copy outside the test's temp folder (to look at it).
SCREENSHOT_COPY = os.environ.get("NEURALLM_SCREENSHOT")


def _chromium() -> str:
    for path in (os.environ.get("CHROMIUM"), *CHROMIUM_PATHS, shutil.which("chromium")):
        if path and Path(path).is_file():
            return path
    pytest.skip("chromium not found (looked for /usr/bin/chromium); install Debian's package: apt-get install -y chromium")


@pytest.fixture
def page():
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 720})
        finally:
            browser.close()


def test_typing_a_prompt_and_clicking_generate_streams_text_into_the_page(page, live_server, tmp_path):
    page.goto(live_server + "/")
    sync_api.expect(page.locator("#facts")).to_contain_text("LSTM", timeout=15_000)
    sync_api.expect(page.locator("#facts")).to_contain_text("test ppl")
    page.fill("#prompt", "the cat sat")
    page.fill("#tokens", "40")
    page.fill("#seed", "7")
    # count the pieces of text the page appends: one per streamed token, not one block at the end
    page.evaluate("""() => { window.pieces = 0; const append = Text.prototype.appendData;
                             Text.prototype.appendData = function (data) { window.pieces += 1; return append.call(this, data); }; }""")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("40 tokens in", timeout=30_000)
    assert page.evaluate("window.pieces") == 40
    shown = page.locator("#output").inner_text()
    assert shown.startswith("the cat sat") and len(shown.split()) > 10
    assert page.locator("#generate").is_enabled()
    screenshot = tmp_path / "neurallm-serve.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if SCREENSHOT_COPY:
        shutil.copyfile(screenshot, SCREENSHOT_COPY)


def test_the_page_shows_an_error_from_the_api(page, live_server):
    page.goto(live_server + "/")
    page.fill("#tokens", "100000")  # over --max-tokens
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("422: tokens:", timeout=15_000)
