"""The playground at `/` in a real browser: headless Chromium (Debian's `chromium` package,
driven by Selenium through the system chromedriver; no browser download). It types a prompt
and sees text streamed in, and sees fill-mask results, with an API key required; the page's
results equal the Python API's. The README's screenshot (docs/playground.png) is written when
JAONNX_PLAYGROUND_SCREENSHOT names a path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import jaonnx
from serving_support import need, running_server

need("fastapi", "serve")
need("prometheus_client", "serve")
webdriver = need("selenium.webdriver", "dev")

KEYS = ("playground-key-1", "playground-key-2", "playground-key-3")  # one per test: none reuses another's state


def chromium() -> tuple[str, str]:
    """(browser, driver) paths: Debian's chromium and chromium-driver; skip if absent. Under
    CI=true only the reason tests/ci_skips.py lists (apt itself failed) is tolerated."""
    browser = os.environ.get("JAONNX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("JAONNX_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        unavailable = os.environ.get("JAONNX_CHROMIUM_UNAVAILABLE")  # set by .ci/run when apt itself failed
        pytest.skip(unavailable or "no chromium/chromedriver: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Any:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    options = Options()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900", "--lang=ja"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(60)
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def site(artifacts: dict[str, Path], browser: Any) -> Any:
    with running_server([artifacts["gpt2-small-ja"], artifacts["rinna-roberta"]], api_keys=KEYS) as (url, _):
        yield browser, url + "/"


@pytest.fixture
def page(site: Any) -> Any:
    """The playground freshly loaded with no key stored: each test sets up its own state, so
    none depends on another having run first."""
    browser, url = site
    browser.get(url)
    browser.execute_script("localStorage.clear()")
    browser.get(url)
    return browser


def enter_key(page: Any, key: str) -> None:
    """Type the API key as a user would and wait for the models it unlocks."""
    box = by_id(page, "api-key")
    box.clear()
    box.send_keys(key)
    page.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)
    wait(page, lambda b: by_id(b, "status").text == "2 models")


def wait(browser: Any, condition: Any, seconds: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, poll_frequency=0.05).until(condition)


def by_id(browser: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, name)


def choose(browser: Any, model: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(browser, "model")).select_by_value(model)


def test_without_the_key_the_page_says_so_then_lists_models(page: Any) -> None:
    wait(page, lambda b: "API key" in by_id(b, "status").text)
    assert by_id(page, "status").get_attribute("class") == "error"
    enter_key(page, KEYS[0])
    values = [o.get_attribute("value") for o in by_id(page, "model").find_elements("tag name", "option")]
    assert values == ["gpt2-small-ja", "rinna-roberta"]


def test_fill_mask_shows_the_top_k(page: Any, artifacts: dict[str, Path]) -> None:
    enter_key(page, KEYS[1])
    choose(page, "rinna-roberta")
    text = "東京は日本の[MASK]です。"
    box = by_id(page, "fm-text")
    box.clear()
    box.send_keys(text)
    by_id(page, "fm-run").click()
    rows = wait(page, lambda b: b.find_elements("css selector", "#fm-results tr.prediction"))
    want = jaonnx.load(artifacts["rinna-roberta"])(text, top_k=5)
    got = [[c.text for c in r.find_elements("tag name", "td")][1:3] for r in rows]
    assert [g[0] for g in got] == [w["token_str"] for w in want]
    assert [float(g[1]) for g in got] == pytest.approx([w["score"] for w in want], abs=1e-4)


def test_generation_streams_text(page: Any, artifacts: dict[str, Path], tmp_path: Path) -> None:
    enter_key(page, KEYS[2])
    choose(page, "gpt2-small-ja")
    prompt = "近年の機械学習は"
    box = by_id(page, "gen-prompt")
    box.clear()
    box.send_keys(prompt)
    for name, value in (("gen-max", "24"), ("gen-temp", "0")):
        field = by_id(page, name)
        field.clear()
        field.send_keys(value)
    by_id(page, "gen-run").click()
    out = by_id(page, "gen-output")
    wait(page, lambda b: out.get_attribute("data-done") == "true")
    text = out.find_element("css selector", ".completion").text
    want = jaonnx.load(artifacts["gpt2-small-ja"]).generate(prompt, max_new_tokens=24, do_sample=False)
    assert text.strip() == want.strip() and text.strip()
    assert int(out.get_attribute("data-chunks")) > 1  # it came in pieces, as they were produced
    assert by_id(page, "status").text == "done"
    shot = Path(os.environ.get("JAONNX_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
