"""The web page at ``/``, in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by Selenium, against the app served by uvicorn on 127.0.0.1 with the bundled tiny Faster R-CNN.

The page is checked against independent references: the drawn shapes image's own ground-truth box (the
detection the page shows must overlap it), the palette of :mod:`detect.drawing` (the pixels of the box's edge
on the canvas must be its class colour, and the same pixel of the input must not be), and the API's error codes
(each error shows its code and the words for its status class). Without a browser the tests skip, except
under ``CI=true``, where they fail (``.ci/run`` installs the browser).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.drawing import PALETTE
from detect.ops.boxes import box_iou
from tests.helpers import serve

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "page-test-key"
BODY_LIMIT = 2_000_000


def test_page_palette_is_the_drawing_palette() -> None:
    """The page colours classes as the annotated images do: app.js's list equals detect.drawing.PALETTE."""
    source = (ROOT / "api" / "static" / "app.js").read_text(encoding="utf-8")
    block = source[source.index("const PALETTE = [") : source.index("];", source.index("const PALETTE = ["))]
    found = [tuple(int(v) for v in m) for m in re.findall(r"\[(\d+), (\d+), (\d+)\]", block)]
    assert found == list(PALETTE)


def test_page_and_docs_need_nothing_from_outside(tmp_path: Path) -> None:
    """Every URL the page and the docs pages reference is one of the app's own (no CDN)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings
    from tests.helpers import StubDetector

    with TestClient(create_app(Settings(), {"stub": StubDetector()})) as client:
        for path in ("/", "/docs", "/redoc"):
            page = client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text) + re.findall(r"url:\s*'([^']+)'", page.text)
            assert urls, path
            for url in urls:
                assert "://" not in url and not url.startswith("//"), f"{path} references {url}"
                assert client.get(url if url.startswith("/") else "/" + url).status_code == 200, (path, url)


# --- the browser ---------------------------------------------------------------------------------------------
def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if chromium is None or driver is None or webdriver is None:
        why = "headless Chromium and Selenium are needed: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return webdriver, chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    webdriver, chromium, driver = _browser_or_skip()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    session.set_page_load_timeout(60)
    try:
        yield session
    finally:
        session.quit()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The app with the bundled tiny Faster R-CNN, an API key and a small body limit, on 127.0.0.1. The docs are
    opened (``public_docs``): with a key they are guarded, and a browser cannot send the header to /docs."""
    from api.app import create_app
    from api.settings import ModelSpec, Settings

    settings = Settings(
        models={"faster_rcnn": ModelSpec(family="faster_rcnn", weights="faster_rcnn_shapes")},
        device="cpu",
        api_key=API_KEY,
        public_docs=True,
        max_body_bytes=BODY_LIMIT,
    )
    import httpx

    from tests.helpers import wait_ready

    with serve(create_app(settings), timeout=60) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, timeout=180)
        yield url


@pytest.fixture(scope="module")
def shapes_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, str]:
    """A generated shapes scene as PNG: (path, pixels, its first ground-truth box, that box's class name)."""
    from detect.data.shapes import SHAPES_CLASSES, ShapesDataset

    image, target = ShapesDataset()[0]
    path = tmp_path_factory.mktemp("page") / "shapes.png"
    Image.fromarray(image).save(path)
    return path, image, target["boxes"][0], SHAPES_CLASSES[int(target["labels"][0]) - 1]


def _wait(browser, condition: str, timeout: float = 90.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: b.execute_script(f"return {condition}"))


def _open(browser, base_url: str, key: str | None = API_KEY) -> None:
    browser.get(base_url + "/")
    if key is not None:
        field = browser.find_element("id", "api-key")
        field.send_keys(key)
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        _wait(browser, "!document.getElementById('model').disabled", 60)


def _upload(browser, *paths: Path) -> list[dict]:
    """Choose ``paths``, press Detect, wait until every card is done or failed; the cards' states and texts."""
    browser.find_element("id", "files").send_keys("\n".join(str(p) for p in paths))
    browser.find_element("id", "run").click()
    _wait(browser, f"document.querySelectorAll('.result').length === {len(paths)} && "
                   "[...document.querySelectorAll('.result')].every(c => c.dataset.state !== 'waiting')")
    return browser.execute_script(
        "return [...document.querySelectorAll('.result')].map(c => ({file: c.dataset.file, state: c.dataset.state, "
        "error: c.querySelector('.error').textContent, text: c.textContent}))"
    )


def test_page_draws_the_boxes_the_api_found(browser, base_url: str, shapes_image) -> None:
    path, pixels, truth_box, truth_class = shapes_image
    _open(browser, base_url)
    (card,) = _upload(browser, path)
    assert card["state"] == "done", card
    response = browser.execute_script("return window.detectPage.state.responses[arguments[0]]", path.name)
    found = response["images"][0]["detections"]
    assert response["parameters"]["score_threshold"] == 0.25 and all(d["score"] >= 0.25 for d in found)
    best = max(found, key=lambda d: d["score"])
    import torch

    iou = float(box_iou(torch.tensor([best["box"]]), torch.tensor(truth_box[None]))[0, 0])
    assert best["class_name"] == truth_class and iou > 0.5, (best, truth_box)
    assert f"{truth_class}: " in card["text"] and "inference" in card["text"]  # the legend and the timings

    # the left edge of the box, half-way down, is drawn in the class colour (the input's pixel there is not)
    scale = float(browser.execute_script("return document.querySelector('.result canvas').dataset.scale"))
    x1, y1, _, y2 = (v * scale for v in best["box"])
    x, y = int(x1) + 1, int((y1 + y2) / 2)
    drawn = browser.execute_script(
        "return [...document.querySelector('.result canvas').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data]",
        x, y,
    )
    colour = PALETTE[(best["class_id"] - 1) % len(PALETTE)]
    assert tuple(drawn[:3]) == colour, (drawn, colour)
    assert tuple(pixels[int(y / scale), int(x / scale)]) != colour

    # the JSON download holds what the API answered
    assert browser.execute_script("return !document.getElementById('download').disabled")


def test_page_shows_the_api_errors_in_words(browser, base_url: str, shapes_image, tmp_path: Path) -> None:
    path = shapes_image[0]
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(path.read_bytes()[:400])
    big = tmp_path / "huge.png"
    big.write_bytes(path.read_bytes() + bytes(BODY_LIMIT))  # a PNG with trailing bytes, over the body limit

    _open(browser, base_url)
    cards = {c["file"]: c for c in _upload(browser, text, corrupt, big)}
    assert all(c["state"] == "error" for c in cards.values()), cards
    assert "Not an image" in cards["notes.txt"]["error"] and "unsupported_format:" in cards["notes.txt"]["error"]
    assert "could not use this input" in cards["broken.png"]["error"] and "corrupt_image:" in cards["broken.png"]["error"]
    assert "Too large" in cards["huge.png"]["error"] and "payload_too_large:" in cards["huge.png"]["error"]
    assert browser.execute_script("return document.getElementById('status').textContent") == "3 of 3 done"

    # without the API key, loading the models shows the 401 in words
    _open(browser, base_url, key=None)
    _wait(browser, "!document.getElementById('error').hidden", 30)
    message = browser.find_element("id", "error").text
    assert "needs an API key" in message and "unauthorized:" in message


@pytest.mark.parametrize(
    "status, words",
    [(0, "could not be reached"), (400, "could not read the request"), (401, "needs an API key"),
     (404, "does not know this model"), (408, "took too long"), (413, "Too large"), (415, "Not an image"),
     (422, "could not use this input"), (500, "failed on this input"), (502, "failed on this input"),
     (503, "busy or still loading"), (504, "did not answer in time"), (418, "could not read the request")],
)
def test_every_error_class_has_words(browser, base_url: str, status: int, words: str) -> None:
    """Every status class the API answers with (and a network failure) reads as a sentence plus the code."""
    if browser.execute_script("return typeof window.detectPage") != "object":
        browser.get(base_url + "/")
    body = {"error": {"code": "some_code", "message": "the service's message"}}
    shown = browser.execute_script("return window.detectPage.describeError(arguments[0], arguments[1])", status, body)
    assert words in shown and "some_code: the service's message" in shown


def test_docs_pages_render_offline(browser, base_url: str) -> None:
    """Swagger UI and ReDoc render from the app's own assets; the one outside URL ReDoc asks for (a decorative
    logo on its CDN) is refused by the pages' Content-Security-Policy, which the browser's log shows."""
    for path, ready in (("/docs", "document.querySelector('.swagger-ui .info') !== null"),
                        ("/redoc", "document.querySelector('.api-content') !== null")):
        browser.get_log("browser")  # drop earlier pages' lines
        browser.get(base_url + path)
        _wait(browser, ready, 60)
        requested = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        log = " ".join(entry["message"] for entry in browser.get_log("browser"))
        assert any(url.startswith(base_url + "/docs-assets/") for url in requested), requested
        for url in requested:
            assert url.startswith(base_url) or (url in log and "The action has been blocked" in log), (url, log)
