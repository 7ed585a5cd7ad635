"""End to end: the real chat server, driven by Debian's chromium through Playwright.

Saves tests/artifacts/chat.png (the streamed reply), chat-welcome.png (welcome screen) and
chat-sessions.png (one of several sessions asking at the same time).
"""

from __future__ import annotations

import shutil
import time

import pytest

from chat.serve import ENV_MAX_TOKENS, ENV_PARALLEL
from chat_support import ARTIFACTS, running_server, tiny_gguf

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


def chromium_path() -> str:
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (make browser installs it)")
    return chromium


REPLIES = "[data-step-type='assistant_message']"
STATUS = ("Reading your message", "Waiting for the model")  # chat/app.py READING, status_text()


@pytest.mark.slow
def test_several_browser_sessions_at_once_each_see_their_own_conversation():
    """Four tabs (separate sessions) ask two questions each, all at the same time, on the tiny exported model
    with two sequences: every question shows an answer area at once, then a reply; no tab shows another's."""
    from playwright.sync_api import sync_playwright

    chromium, tabs = chromium_path(), 4
    env = {ENV_MAX_TOKENS: "12", ENV_PARALLEL: "2"}
    with running_server(ARTIFACTS / "chat-sessions-server.log", tiny_gguf("llama"), env) as (url, proc):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                pages = []
                for _ in range(tabs):
                    page = browser.new_context(viewport={"width": 900, "height": 700}).new_page()
                    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                               else route.abort())
                    page.goto(url)
                    page.wait_for_selector("#chat-input", timeout=30_000)
                    pages.append(page)
                for turn in range(2):
                    for n, page in enumerate(pages):  # everyone sends, then everyone waits
                        page.fill("#chat-input", f"Tab {n} asks question {turn}: can my dog eat grapes?")
                        page.click("#chat-submit")
                    for page in pages:
                        page.locator(REPLIES).nth(turn).wait_for(timeout=30_000)  # the answer area is there
                    for page in pages:
                        page.wait_for_function(
                            "([sel, n, status]) => { const r = document.querySelectorAll(sel)[n];"
                            " return r && r.innerText.trim() && !status.some(s => r.innerText.includes(s)); }",
                            arg=[REPLIES, turn, list(STATUS)], timeout=60_000)
                for page in pages:
                    wait_until_stable(lambda page=page: page.locator(REPLIES).last.inner_text(), 1.0, 30)
                pages[0].screenshot(path=str(ARTIFACTS / "chat-sessions.png"))
                shown = [page.inner_text("body") for page in pages]
            finally:
                browser.close()
        assert proc.poll() is None
    for n, text in enumerate(shown):
        assert f"Tab {n} asks question 0" in text and f"Tab {n} asks question 1" in text
        assert not any(f"Tab {m} asks" in text for m in range(tabs) if m != n)
        assert not any(s in text for s in STATUS)  # every status gave way to its reply


@pytest.mark.slow
def test_browser_chat_streams_a_reply():
    chromium = chromium_path()
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
                page.wait_for_function(  # the reply's status, at once
                    "(sel) => [...document.querySelectorAll(sel)].some(e => e.innerText.trim().length > 0)",
                    arg=REPLIES, timeout=60_000)
                status_s = time.monotonic() - sent
                page.wait_for_function(  # then its first words, in place of the status
                    "([sel, status]) => [...document.querySelectorAll(sel)].some(e => e.innerText.trim()"
                    " && !status.some(s => e.innerText.includes(s)))",
                    arg=[REPLIES, list(STATUS)], timeout=60_000)
                first_token_s = time.monotonic() - sent
                text = wait_until_stable(lambda: reply.inner_text(), seconds=1.5, timeout=60)
                page.screenshot(path=str(ARTIFACTS / "chat.png"))
            finally:
                browser.close()

    print(f"status after {status_s:.2f} s, first streamed words after {first_token_s:.2f} s; reply: {text!r}")
    (ARTIFACTS / "chat-first-token.txt").write_text(f"{first_token_s:.3f}\n")
    assert text.strip(), "the assistant message is empty"
    assert not any("fonts.googleapis.com" in u for u in outside)  # theme.json drops the web font
