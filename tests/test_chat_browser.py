"""End to end: the real chat server, driven by Debian's chromium through Playwright.

Saves tests/artifacts/chat.png (the streamed reply) and chat-welcome.png (welcome screen).
"""

from __future__ import annotations

import shutil
import time

import pytest

from chat.serve import ENV_MAX_TOKENS
from chat_support import ARTIFACTS, running_server

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
QUESTION = "My cat keeps sneezing. What should I do?"


def wait_until_stable(read, seconds: float, timeout: float) -> str:
    """Poll read() until its value has not changed for `seconds` (the stream has ended)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
    return last


@pytest.mark.slow
def test_browser_chat_streams_a_reply():
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (make browser installs it)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_server(ARTIFACTS / "chat-browser-server.log", env={ENV_MAX_TOKENS: "48"}) as (url, _proc):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 820})
                outside = []

                def only_our_server(route):
                    if route.request.url.startswith(url):
                        return route.continue_()
                    outside.append(route.request.url)
                    return route.abort()

                page.route("**/*", only_our_server)
                page.goto(url)
                page.wait_for_selector("#chat-input", timeout=30_000)
                page.get_by_text("not a substitute for a veterinarian").wait_for(timeout=15_000)
                page.get_by_text("Toxic foods").wait_for(timeout=5_000)  # a starter
                page.wait_for_function(  # the welcome screen fades in
                    "() => getComputedStyle(document.querySelector('#welcome-screen')).opacity === '1'",
                    timeout=10_000,
                )
                page.screenshot(path=str(ARTIFACTS / "chat-welcome.png"))

                page.fill("#chat-input", QUESTION)
                sent = time.monotonic()
                page.click("#chat-submit")
                reply = page.locator("[data-step-type='assistant_message']").last
                reply.wait_for(timeout=60_000)
                page.wait_for_function(
                    "() => [...document.querySelectorAll(\"[data-step-type='assistant_message']\")]"
                    ".some(e => e.innerText.trim().length > 0)",
                    timeout=60_000,
                )
                first_token_s = time.monotonic() - sent
                text = wait_until_stable(lambda: reply.inner_text(), seconds=1.5, timeout=60)
                page.screenshot(path=str(ARTIFACTS / "chat.png"))
            finally:
                browser.close()

    print(f"first streamed text after {first_token_s:.2f} s; reply: {text!r}")
    (ARTIFACTS / "chat-first-token.txt").write_text(f"{first_token_s:.3f}\n")
    assert text.strip(), "the assistant message is empty"
    assert not any("fonts.googleapis.com" in u for u in outside)  # theme.json drops the web font
