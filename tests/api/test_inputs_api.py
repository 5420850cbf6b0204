"""``POST /detect`` beyond multipart and base64 JSON (issue 26): raw ``image/*`` bodies, sliced inference
(``slice``/``overlap``), and JSON ``{"url": ...}`` bodies behind their setting and the URL guards."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import SquareFinder, image_server, png, running


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and "Traceback" not in response.text


def squares_png(width: int, height: int, squares: list[tuple[int, int, int]]) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    for x, y, side in squares:
        image[y : y + side, x : x + side] = 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client():
    with running(SquareFinder(), max_batch=4) as c:
        yield c


def boxes(response: httpx.Response) -> list[list[float]]:
    assert response.status_code == 200, response.text
    return sorted(d["box"] for d in response.json()["images"][0]["detections"])


def test_a_raw_image_body_with_parameters_in_the_query(client):
    body = squares_png(120, 80, [(10, 10, 20), (60, 30, 40)])
    r = client.post("/detect?score_threshold=0.5&classes=square", content=body,
                    headers={"content-type": "image/png", "x-image-id": "shelf-1"})
    assert boxes(r) == [[10, 10, 30, 30], [60, 30, 100, 70]]
    assert r.json()["images"][0]["id"] == "shelf-1"
    assert_error(client.post("/detect", content=b"garbage", headers={"content-type": "image/png"}), 415, "unsupported_format")
    assert_error(client.post("/detect?slice=8", content=body, headers={"content-type": "image/png"}), 422, "invalid_request")


def test_slice_and_overlap_as_form_fields_merge_cut_squares(client):
    # 400x300, tiles of 128 at overlap 0.25 (stride 96): the 70-px square at x=170 is cut by the tiles' edges
    squares = [(20, 20, 40), (170, 100, 70), (330, 230, 50)]
    body = squares_png(400, 300, squares)
    files = {"images": ("a.png", body, "image/png")}
    sliced = client.post("/detect", files=files, data={"slice": "128", "overlap": "0.25"})
    assert boxes(sliced) == sorted([x, y, x + s, y + s] for x, y, s in squares)
    whole = client.post("/detect", files=files)
    assert boxes(whole) == boxes(sliced)  # the stand-in finds squares at any scale: same answer
    assert boxes(client.post("/detect", files=files, data={"overlap": "0.3"})) == boxes(whole)  # ignored alone
    assert_error(client.post("/detect", files=files, data={"slice": "128", "overlap": "1"}), 422, "invalid_request")


def test_url_bodies_are_off_by_default(client):
    assert_error(client.post("/detect", json={"url": "https://example.com/a.png"}), 422, "url_refused")


def test_url_bodies_when_enabled_keep_the_guards():
    with image_server() as base, running(SquareFinder(), url_inputs=True, url_timeout_s=3) as guarded:
        r = guarded.post("/detect", json={"url": f"{base}/image.png"})
        assert_error(r, 422, "url_refused")
        assert "loopback" in r.json()["error"]["message"]
    with image_server() as base, running(SquareFinder(), url_inputs=True, url_allow_private=True, url_timeout_s=3,
                                         max_body_bytes=100_000) as open_client:
        r = open_client.post("/detect", json={"url": f"{base}/image.png", "score_threshold": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["id"] == f"{base}/image.png" and r.json()["images"][0]["width"] == 32
        assert_error(open_client.post("/detect", json={"url": f"{base}/missing"}), 422, "url_unreachable")
        assert_error(open_client.post("/detect", json={"url": f"{base}/page"}), 415, "unsupported_format")
        assert_error(open_client.post("/detect", json={"url": f"{base}/endless"}), 413, "input_too_large")
        assert_error(open_client.post("/detect", json={"url": f"{base}/loop"}), 422, "url_unreachable")
        assert_error(open_client.post("/detect", json={"url": 5}), 422, "invalid_request")
        # the base64 form still works next to it
        import base64

        r = open_client.post("/detect", json={"images": [{"data": base64.b64encode(png(8, 8)).decode()}]})
        assert r.status_code == 200
