"""The browser playground (serve/playground.html) served by the Serve app at `/`, driven in
headless Chromium (Debian's `chromium`, through Playwright) against the app on 127.0.0.1.

A screenshot of each state goes to tests/artifacts/playground/ (or $PLAYGROUND_SHOTS)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, SERVE_LIMIT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("PLAYGROUND_SHOTS", ROOT / "tests" / "artifacts" / "playground"))
ARGS = [
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
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: Debian's chromium is installed by .ci/run")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    yield pg
    ctx.close()


def _open(page, url):
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#model-a option').length > 0", timeout=30_000)


def _ask(page, model, instruction, temperature="0", max_tokens="40"):
    page.select_option("#model-a", model)
    page.fill("#instruction", instruction)
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.click("#send")


def _status(page, which="a"):
    return page.text_content(f"#out-{which} .status") or ""


def test_model_list_loads(page, server):
    _open(page, server + "/")
    options = page.eval_on_selector_all("#model-a option", "els => els.map(e => e.value)")
    assert options[:3] == ["stories260k", "alpha", "beta"]
    assert page.is_hidden("#image-label")  # text-only models: no image control
    assert page.get_attribute("#instruction", "required") is not None
    page.screenshot(path=str(SHOTS / "models.png"))


def test_an_instruction_streams_into_the_page(page, server):
    _open(page, server + "/")
    _ask(page, "alpha", "Tell me a story about a cat.")
    page.wait_for_function("document.querySelector('#out-a .status').textContent.startsWith('done')", timeout=60_000)
    assert int(page.get_attribute("#out-a", "data-updates")) > 1  # streamed, not one block
    assert page.text_content("#out-a .text").strip()
    assert not page.text_content("#out-a .error")
    page.screenshot(path=str(SHOTS / "streamed.png"))


def test_stop_cancels_the_generation_on_the_server(page, server):
    _open(page, server + "/")
    _ask(page, "stories260k", "Once upon a time", temperature="1", max_tokens=str(SERVE_LIMIT))
    page.wait_for_function(
        "/streaming \\((\\d{2,})/.test(document.querySelector('#out-a .status').textContent)", timeout=60_000
    )
    page.click("#stop")
    page.wait_for_function("document.querySelector('#out-a .status').textContent.startsWith('stopped')", timeout=10_000)
    stopped_at = int(page.get_attribute("#out-a", "data-updates"))
    assert 0 < stopped_at < SERVE_LIMIT
    deadline = time.time() + 20
    while (health := httpx.get(f"{server}/health", timeout=10).json())["running"]:
        assert time.time() < deadline, f"the stopped request still runs on the server: {health}"
        time.sleep(0.1)
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    page.screenshot(path=str(SHOTS / "stopped.png"))


def test_a_bad_setting_shows_the_apis_message(page, server):
    _open(page, server + "/")
    _ask(page, "alpha", "Hello", max_tokens="0")
    page.wait_for_function("document.querySelector('#out-a .error').textContent.length > 0", timeout=30_000)
    message = page.text_content("#out-a .error")
    assert "max_tokens" in message, message
    page.screenshot(path=str(SHOTS / "bad-setting.png"))


def test_with_a_key_the_page_asks_for_it_and_shows_the_401(page, server):
    page.goto(server + "/secure/")
    page.wait_for_selector("#key-form", state="visible", timeout=30_000)
    assert "API key" in page.text_content("#key-reason")
    page.fill("#api-key", "wrong")
    page.click("#key-form button")
    page.wait_for_function(
        "document.querySelector('#key-reason').textContent.startsWith('Key refused')", timeout=30_000
    )
    assert "invalid API key" in page.text_content("#key-reason")  # the API's own 401 message
    page.screenshot(path=str(SHOTS / "wrong-key.png"))
    page.fill("#api-key", "sekrit")
    page.click("#key-form button")
    page.wait_for_function("document.querySelectorAll('#model-a option').length > 0", timeout=30_000)
    assert page.is_hidden("#key-form")
    # The key lives in the tab's memory only: nothing in storage.
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0


def test_side_by_side_shows_base_and_adapter_differ(page, server):
    _open(page, server + "/")
    page.click("#view-compare")
    page.select_option("#model-b", "alpha")
    _ask(page, "stories260k", "Tell me a story.")
    for which in ("a", "b"):
        page.wait_for_function(
            f"document.querySelector('#out-{which} .status').textContent.startsWith('done')", timeout=60_000
        )
    base, adapted = page.text_content("#out-a .text"), page.text_content("#out-b .text")
    assert base.strip() and adapted.strip() and base != adapted
    page.screenshot(path=str(SHOTS / "side-by-side.png"))
