"""The README's picture of the chat page: serve.py, a short conversation typed in headless Chromium, one PNG.

    python llm/screenshot_page.py                      # SmolLM2-135M-Instruct -> llm/assets/chat_page.png

Needs the dev extra (playwright) and a Chromium or Chrome binary (Debian: apt-get install chromium).
"""

import argparse
import shutil
import sys
from pathlib import Path

from llm.serve import start_server_process

QUESTIONS = ["What is the capital of France?", "Give me three things to see there."]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="llm/assets/chat_page.png", help="the PNG to write")
    parser.add_argument("--gguf", default=None, help="the model file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("google-chrome"),
                        help="the browser binary")
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("error: no chromium found; install it (apt-get install chromium) or pass --chromium PATH")
    from playwright.sync_api import expect, sync_playwright

    try:
        process, url = start_server_process(["--gguf", args.gguf] if args.gguf else [])
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 980, "height": 560})
            page.goto(url + "/")
            page.fill("#temperature", "0")
            for number, question in enumerate(QUESTIONS):
                page.fill("#input", question)
                page.keyboard.press("Enter")
                answer = page.locator(".message.assistant").nth(number)
                expect(answer).to_have_attribute("data-state", "done", timeout=120_000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
