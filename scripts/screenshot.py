"""Take docs/screenshot.png: start `python app.py model.name=tiny`, pick the panda example, generate, shoot.

    python scripts/screenshot.py [OUT.png]        # needs Debian's chromium at /usr/bin/chromium

Offline: the tiny checkpoint has random weights, so the answer in the picture is random text (the page says so).
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_app import AppServer  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, wait_until  # noqa: E402


def main() -> None:
    from playwright.sync_api import sync_playwright

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "screenshot.png")
    server = AppServer(out.parent if out.parent.exists() else ROOT)
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.locator("#status").get_by_text("Ready").wait_for()
            page.locator("#examples tbody tr").first.click()
            wait_until(lambda: page.locator("#prompt textarea").input_value() == "Describe this image", what="example")
            page.get_by_text("Sampling", exact=True).click()  # open the accordion: it shows in the picture
            page.locator("#max-new-tokens input[type=number]").fill("48")
            page.locator("#max-new-tokens input[type=number]").press("Enter")
            page.locator("#generate").click()
            wait_until(lambda: page.locator("#prompt textarea").input_value() == "", timeout=180, what="the answer")
            page.wait_for_timeout(500)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
    print(out)


if __name__ == "__main__":
    main()
