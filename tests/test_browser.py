"""The demo in a real browser: Debian's chromium driven by Playwright against `python app.py model.name=tiny`.

Needs /usr/bin/chromium (`apt-get install -y chromium`); `playwright install` is never used.
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest
from test_app import COFFEE, PANDA, shared_app_server

CHROMIUM = "/usr/bin/chromium"
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

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: apt-get install -y chromium")


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    server = shared_app_server()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1100})
        pg.set_default_timeout(60_000)
        pg.goto(server.url)
        pg.locator("#status").get_by_text("Ready").wait_for()
        yield pg
        browser.close()


def answer(pg) -> str:
    bot = pg.locator("#chat [data-testid=bot]")
    return bot.last.inner_text() if bot.count() else ""


def wait_until(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; the server's log:\n{shared_app_server().log()}"
        time.sleep(0.1)


def set_max_new_tokens(pg, n: int) -> None:
    box = pg.locator("#max-new-tokens input[type=number]")
    slider = pg.locator("#max-new-tokens input[type=range]")
    if not box.is_visible():
        pg.get_by_text("Sampling", exact=True).click()

    def typed() -> bool:
        box.fill(str(n))
        box.press("Enter")
        time.sleep(0.2)
        return slider.input_value() == str(n)

    # Typing straight after the accordion opens can be lost while gradio mounts its contents (CI once sent the
    # old 256 and the Stop test's answer was done before Stop): type until the slider itself shows the value.
    wait_until(typed, timeout=30, what=f"Max new tokens to read {n}")


def test_upload_type_generate_streams_growing_text_then_stop(page):
    set_max_new_tokens(page, 2048)  # the tiny model makes ~350 tokens/s: 256 could all be out before Stop
    page.locator("#image input[type=file]").set_input_files(PANDA)
    page.locator("#image img").first.wait_for()
    page.locator("#prompt textarea").fill("Describe this image")
    page.locator("#generate").click()
    page.locator("#chat [data-testid=user]").get_by_text("Describe this image").wait_for()
    wait_until(lambda: len(answer(page)) > 0, what="the first tokens")
    first = answer(page)
    wait_until(lambda: len(answer(page)) > len(first), what="the answer to grow")
    assert answer(page).startswith(first.strip()[:5])
    server = shared_app_server()
    stops = server.log().count("generation stopped after")
    page.locator("#stop").click()
    wait_until(lambda: server.log().count("generation stopped after") > stops, what="the server to end the generation")
    time.sleep(0.5)
    stopped = answer(page)
    time.sleep(1.5)
    assert answer(page) == stopped, "the answer kept growing after Stop"
    assert "tokens" in page.locator("#stats").inner_text()
    set_max_new_tokens(page, 256)


def test_toggle_to_batch_gives_the_whole_answer_at_once(page):
    page.locator("#clear").click()
    wait_until(lambda: page.locator("#chat [data-testid=bot]").count() == 0, what="Clear")
    page.locator("#mode").get_by_text("Batch (scan)").click()
    assert page.locator("#mode input[value='Batch (scan)']").is_checked()
    page.locator("#prompt textarea").fill("What animal is this?")
    page.locator("#generate").click()
    wait_until(lambda: "sampler: batch" in page.locator("#stats").inner_text(), timeout=120, what="the batch answer")
    assert answer(page)
    page.locator("#mode").get_by_text("Streaming").click()


def test_example_click_fills_image_and_prompt_and_answers(page, tmp_path):
    row = page.locator("#examples tbody tr").nth(1)  # coffee_laptop.png
    row.click()
    wait_until(lambda: page.locator("#prompt textarea").input_value() == "What is on the table?", what="the example")
    name = pathlib.Path(COFFEE).name
    wait_until(lambda: name in (page.locator("#image img").first.get_attribute("src") or ""), what="the example image")
    wait_until(lambda: page.locator("#chat [data-testid=bot]").count() == 0, what="a new image to clear the chat")
    page.locator("#generate").click()
    wait_until(
        lambda: "sampler: streaming" in page.locator("#stats").inner_text() and answer(page),
        timeout=120,
        what="the streamed answer",
    )
    wait_until(lambda: page.locator("#prompt textarea").input_value() == "", timeout=120, what="the answer to finish")
    assert page.locator("#tokens").inner_text().strip()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_image_notes_errors_and_limits_reach_the_page(page, test_images):
    page.locator("#clear").click()
    set_max_new_tokens(page, 8)  # short answers: this test is about what surrounds them
    page.locator("#image input[type=file]").set_input_files(str(test_images["rgba.png"]))
    page.locator("#image img").first.wait_for()
    assert page.locator("#prompt textarea").get_attribute("maxlength") == "4000"  # server.max_prompt_chars
    page.locator("#prompt textarea").fill("Describe this image")
    page.locator("#generate").click()
    page.get_by_text("RGBA: transparency composited on white").first.wait_for()  # a toast and the stats line
    wait_until(lambda: "note: RGBA" in page.locator("#stats").inner_text(), timeout=120, what="the note in the stats")
    wait_until(lambda: page.locator("#prompt textarea").input_value() == "", timeout=120, what="the answer to finish")
    # the upload was deleted once read; the preview stays, and a follow-up question still has the image
    assert page.locator("#image img").first.evaluate("img => img.naturalWidth") > 0
    page.locator("#prompt textarea").fill("And the colours?")
    page.locator("#generate").click()
    wait_until(lambda: page.locator("#chat [data-testid=bot]").count() == 2, timeout=120, what="the follow-up")
    wait_until(lambda: page.locator("#prompt textarea").input_value() == "", timeout=120, what="the follow-up answer")

    page.locator("#clear").click()
    page.locator("#image input[type=file]").set_input_files(str(test_images["truncated.png"]))
    page.locator("#prompt textarea").fill("Describe this image")
    page.locator("#generate").click()
    page.get_by_text("truncated.png is corrupt or truncated").first.wait_for()  # gr.Error, shown as a toast
    assert "Traceback" not in page.content()
