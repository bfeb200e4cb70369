"""The page at `/` in a real browser: headless Chromium (the system's `chromium` and
`chromedriver`, Debian packages) driven by Selenium against a running `sdonnx serve`.

Screenshots land in tests/artifacts/ (kept by CI as the test's artifacts). `make test` installs
the browser; elsewhere the test is skipped when Chromium is missing, unless
SDONNX_REQUIRE_BROWSER=1 makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from serving import Server, png
from sdonnx.models import shapes

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

if not (CHROMIUM and DRIVER):
    if os.environ.get("SDONNX_REQUIRE_BROWSER") == "1":
        raise RuntimeError("the browser test needs Debian's chromium and chromium-driver: "
                           "apt-get install chromium chromium-driver")
    pytest.skip("no system Chromium/chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    s = Server("--provider", "cpu")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                 "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _fill(driver, field: str, value) -> None:
    element = driver.find_element("id", field)
    element.clear()
    element.send_keys(str(value))


def _start(server, browser, prompt: str, steps: int) -> None:
    """Open the page, fill the form at 256 px and click Generate; returns once a step shows.

    Enough steps at 256 px (a few seconds on the default model) that the page's progress poll
    sees the run.
    """
    browser.get(server.url + "/")
    _wait(browser, lambda d: d.find_element("id", "sampler").get_attribute("value") == "Euler")
    assert browser.find_element("id", "width").get_attribute("value") == str(shapes.IMAGE_SIZE)  # the model's native size
    _fill(browser, "prompt", prompt)
    _fill(browser, "steps", steps)
    _fill(browser, "width", 256)
    _fill(browser, "height", 256)
    browser.find_element("id", "generate").click()
    _wait(browser, lambda d: d.find_element("id", "status").text.startswith("step "))


def test_generate_shows_progress_then_the_image_and_copies_settings_back(server, browser):
    _start(server, browser, "a green triangle on a white background", 120)
    assert browser.find_element("id", "cancel").is_enabled()
    _wait(browser, lambda d: d.find_element("id", "preview").is_displayed())
    progress = float(browser.find_element("id", "progress").get_attribute("value"))
    assert 0 < progress < 1
    _wait(browser, lambda d: d.find_element("id", "result").is_displayed())
    status = browser.find_element("id", "status").text
    assert status.startswith("done: seed "), status
    seed = int(status.split("seed ")[1])
    result = browser.find_element("id", "result").get_attribute("src")
    assert result.startswith("data:image/png;base64,")
    assert png(result.split(",", 1)[1]).size == (256, 256)
    figures = browser.find_elements("css selector", "#gallery figure")
    assert len(figures) == 1 and f"seed {seed}" in figures[0].text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-generated.png"))

    # The gallery's button puts the run's settings, with the seed it used, back in the form.
    _fill(browser, "prompt", "something else")
    figures[0].find_element("css selector", "button.copy").click()
    assert browser.find_element("id", "prompt").get_attribute("value") == "a green triangle on a white background"
    assert browser.find_element("id", "seed").get_attribute("value") == str(seed)
    assert browser.find_element("id", "steps").get_attribute("value") == "120"


def test_cancel_stops_the_run_and_says_so(server, browser):
    _start(server, browser, "a blue star", 150)
    browser.find_element("id", "cancel").click()
    _wait(browser, lambda d: "interrupted" in d.find_element("id", "status").text)
    assert browser.find_element("id", "generate").is_enabled()
    assert not browser.find_elements("css selector", "#gallery figure")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-cancelled.png"))
