"""The chat page served at / of llm/serve.py, in a real browser: Playwright drives Debian's headless chromium to
type messages, watch an answer stream in, stop one half-way, and start again."""

import shutil
import time

import pytest
from chat_fixtures import RunningServer, save_tiny_chat_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)"),
]


def launch_chromium(playwright):
    """Debian's chromium (Playwright cannot download its own browser here), headless."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def test_page_streams_an_answer_stops_one_midway_and_resets(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    folder = save_tiny_chat_model(tmp_path / "model", context_length=4096, never_ends_turn=True)
    server = RunningServer("--hf", str(folder), "--model-name", "tiny")
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_have_text("tiny")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "20")
            page.fill("#input", "Hello there")
            page.keyboard.press("Enter")
            first = page.locator(".message.assistant").nth(0)
            expect(first).to_have_attribute("data-state", "done", timeout=30_000)
            assert len(first.inner_text()) > 5
            expect(page.locator(".message.user")).to_have_text(["Hello there"])
            expect(page.locator("#status")).to_contain_text("20 tokens")

            page.fill("#max_tokens", "4000")  # a long answer, to be stopped half-way
            page.fill("#input", "Tell me everything")
            page.click("#send")
            second = page.locator(".message.assistant").nth(1)
            expect(second).not_to_have_text("", timeout=30_000)  # it streams in
            expect(page.locator("#stop")).to_be_enabled()
            shown_while_streaming = len(second.inner_text())
            page.click("#stop")
            expect(second).to_have_attribute("data-state", "stopped")
            expect(second).to_contain_text("(stopped)")
            assert 0 < shown_while_streaming
            deadline = time.monotonic() + 5
            while server.health()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            health = server.health()
            assert health["running"] == 0 and health["tokens_generated"] < 20 + 4000  # its generation ended too
            expect(page.locator("#send")).to_be_enabled()

            page.click("#reset")
            expect(page.locator(".message")).to_have_count(0)
            page.fill("#max_tokens", "5")
            page.fill("#input", "Hello again")
            page.keyboard.press("Enter")
            expect(page.locator(".message.assistant").nth(0)).to_have_attribute("data-state", "done",
                                                                                 timeout=30_000)
            browser.close()
    finally:
        server.stop()
