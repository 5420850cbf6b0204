"""The API through a real uvicorn server on 127.0.0.1 (see tests/helpers.py): results, every error case, batching."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.helpers import CLASS_NAMES, StubDetector, png, running, wait_ready

CT_PNG = "image/png"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert "Traceback" not in response.text


def expected(w: int, h: int) -> list[dict]:
    """The stub's detections for a w x h image, written out by hand."""
    return [
        {"box": [0, 0, w / 2, h / 2], "score": 0.9, "class_id": 1, "class_name": "cat"},
        {"box": [0, 0, w / 2, round(h / 2 * 0.8, 2)], "score": 0.6, "class_id": 1, "class_name": "cat"},
        {"box": [w / 2, h / 2, w, h], "score": 0.3, "class_id": 2, "class_name": "dog"},
    ]


def test_probes_and_models(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    models = client.get("/models").json()
    assert models["default"] == "stub"
    assert models["models"][0]["class_names"] == list(CLASS_NAMES)
    assert models["models"][0]["proposals"] == []


def test_multipart_single_image(client: httpx.Client) -> None:
    r = client.post("/detect", files={"images": ("a.png", png(40, 20), CT_PNG)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "stub", "version": "unversioned"}
    (item,) = body["images"]
    assert (item["id"], item["width"], item["height"]) == ("a.png", 40, 20)
    assert item["detections"] == expected(40, 20)
    assert {"decode", "queue", "inference", "postprocess"} <= set(item["timings_ms"])
    assert item["batch_size"] >= 1 and item["error"] is None


def test_server_timing_header_covers_the_apps_own_time(client: httpx.Client) -> None:
    """``Server-Timing: app;dur=<ms>``: at least the image's own stages (they run inside the app), at most the time
    the client waited."""
    start = time.perf_counter()
    r = client.post("/detect", files={"images": ("a.png", png(40, 20), CT_PNG)})
    waited_ms = (time.perf_counter() - start) * 1e3
    name, _, duration = r.headers["server-timing"].partition(";dur=")
    assert name == "app"
    stages_ms = sum(r.json()["images"][0]["timings_ms"].values())
    assert stages_ms <= float(duration) <= waited_ms
    assert float(client.get("/healthz").headers["server-timing"].partition(";dur=")[2]) >= 0.0


def test_json_ids_echoed(client: httpx.Client) -> None:
    images = [{"data": b64(png(30, 10)), "id": "x"}, {"data": b64(png(10, 30)).rstrip("="), "id": "y"}]
    r = client.post("/detect", json={"images": images})
    assert r.status_code == 200, r.text
    items = r.json()["images"]
    assert [(i["id"], i["width"], i["height"]) for i in items] == [("x", 30, 10), ("y", 10, 30)]


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"score_threshold": 0.5}, [0, 1]),
        ({"iou_threshold": 0.7}, [0, 2]),  # the two cats overlap with IoU 0.8
        ({"iou_threshold": 0.9}, [0, 1, 2]),
        ({"max_detections": 1}, [0]),
        ({"classes": ["dog"]}, [2]),
        ({"classes": ["1"]}, [0, 1]),
    ],
)
def test_parameters(client: httpx.Client, params: dict, keep: list[int]) -> None:
    r = client.post("/detect", json={"images": [{"data": b64(png(40, 40))}], **params})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["detections"] == [expected(40, 40)[k] for k in keep]
    assert r.json()["parameters"]["model"] == "stub"


def test_multipart_parameters_as_form_fields(client: httpx.Client) -> None:
    r = client.post("/detect", files={"images": ("a.png", png(40, 40), CT_PNG)}, data={"classes": "cat,dog", "score_threshold": "0.5"})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["detections"] == expected(40, 40)[:2]


def test_annotate_returns_png_of_same_size(client: httpx.Client) -> None:
    r = client.post("/detect", json={"images": [{"data": b64(png(32, 24))}], "annotate": True})
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["annotated_png"])))
    assert (image.format, image.size) == ("PNG", (32, 24))


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"hello, not an image", 415, "unsupported_format"),
        (png(20, 20)[:60], 422, "corrupt_image"),
        (b"", 422, "empty_input"),
        (png(600, 600), 413, "image_too_large"),  # above max_pixels=250_000, from the header
    ],
)
def test_single_bad_image_status(client: httpx.Client, data: bytes, status: int, code: str) -> None:
    assert_error(client.post("/detect", files={"images": ("f", data, CT_PNG)}), status, code)


def test_batch_with_bad_images_fails_only_them(client: httpx.Client, stub: StubDetector) -> None:
    marker = io.BytesIO()
    Image.new("RGB", (8, 8), (13, 0, 0)).save(marker, format="PNG")  # the stub raises on it
    images = [
        {"data": b64(png(20, 10)), "id": "good1"},
        {"data": b64(png(20, 20)[:60]), "id": "corrupt"},
        {"data": "@@not base64@@", "id": "b64"},
        {"data": b64(marker.getvalue()), "id": "model_fails"},
    ]
    r = client.post("/detect", json={"images": images})
    assert r.status_code == 200, r.text
    items = {i["id"]: i for i in r.json()["images"]}
    assert items["good1"]["detections"] == expected(20, 10) and items["good1"]["error"] is None
    assert items["corrupt"]["error"]["code"] == "corrupt_image"
    assert items["b64"]["error"]["code"] == "bad_base64"
    assert items["model_fails"]["error"]["code"] == "inference_error"


def test_request_errors(client: httpx.Client) -> None:
    one = {"images": [{"data": b64(png(8, 8))}]}
    assert_error(client.post("/detect", json={**one, "model": "nope"}), 404, "unknown_model")
    assert_error(client.post("/detect", json={**one, "classes": ["zebra"]}), 422, "unknown_class")
    assert_error(client.post("/detect", json={**one, "proposals": "rpn"}), 422, "unsupported_proposals")
    assert_error(client.post("/detect", json={**one, "score_threshold": 2}), 422, "invalid_request")
    assert_error(client.post("/detect", json={**one, "surprise": 1}), 422, "invalid_request")
    assert_error(client.post("/detect", json={"images": []}), 422, "invalid_request")
    assert_error(client.post("/detect", json={"images": [{"data": "!!"}]}), 422, "bad_base64")
    assert_error(client.post("/detect", content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid_request")
    assert_error(client.post("/detect", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    assert_error(client.post("/detect", data={"score_threshold": "0.5"}, files={"other": ("x", b"", "text/plain")}), 422, "empty_input")
    assert_error(client.post("/detect", files={"images": ("a", png(8, 8), CT_PNG)}, data={"max_detections": "0"}), 422, "invalid_request")
    assert_error(client.post("/detect", json={"images": [{"data": b64(png(8, 8))}] * 5}), 413, "too_many_images")
    assert_error(client.get("/detect"), 405, "method_not_allowed")
    assert_error(client.get("/nowhere"), 404, "not_found")


def test_body_limit_declared_and_streamed(client: httpx.Client) -> None:
    big = b"\0" * 300_000  # above max_body_bytes=200_000
    assert_error(client.post("/detect", content=big, headers={"content-type": "application/json"}), 413, "payload_too_large")

    def chunks():  # no Content-Length: chunked transfer encoding, counted as it arrives
        yield b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n\r\n'
        for _ in range(30):
            yield b"\0" * 10_000

    r = client.post("/detect", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 413, "payload_too_large")


def test_metrics_exposition(client: httpx.Client) -> None:
    client.post("/detect", files={"images": ("a.png", png(8, 8), CT_PNG)})
    text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert values['detect_requests_total{path="/detect",status="200"}'] >= 1
    assert values['detect_stage_seconds_count{stage="inference"}'] >= 1
    assert values["detect_batch_size_count"] >= 1
    assert values['detect_batch_size_bucket{le="+Inf"}'] == values["detect_batch_size_count"]
    assert "detect_requests_in_flight" in values and "detect_queue_depth" in values


def test_openapi_documents_both_bodies(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/detect"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("DetectResponse")
    assert {"DetectJSONRequest", "ImageIn", "DetectResponse", "ErrorResponse"} <= set(spec["components"]["schemas"])
    assert client.get("/docs").status_code == 200


def test_concurrent_clients_get_their_own_answers() -> None:
    detector = StubDetector(delay=0.05)
    with running(detector, max_batch=8) as client:
        sizes = [(16 + 3 * i, 40 - i) for i in range(16)]

        def one(size: tuple[int, int]) -> tuple[tuple[int, int], dict]:
            r = client.post("/detect", files={"images": (f"{size}", png(*size), CT_PNG)})
            assert r.status_code == 200, r.text
            return size, r.json()["images"][0]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, sizes))
    for (w, h), item in results:
        assert (item["width"], item["height"], item["id"]) == (w, h, f"{(w, h)}")
        assert item["detections"] == expected(w, h)
    assert max(detector.batches) > 1  # requests shared forward passes
    assert max(detector.batches) <= 8


def test_full_queue_answers_503_with_retry_after() -> None:
    """A request that fits the queue but finds it full. (One larger than the whole queue can never fit: 413, see
    tests/api/test_hardening_limits.py.)"""
    entered, gate = threading.Event(), threading.Event()

    class Blocking(StubDetector):
        def __call__(self, images, **kwargs):
            entered.set()
            gate.wait(10)
            return super().__call__(images, **kwargs)

    try:
        with running(Blocking(), warmup=False, queue_size=1, retry_after_s=3) as client, ThreadPoolExecutor(2) as pool:
            one = {"images": [{"data": b64(png(8, 8))}]}
            held = [pool.submit(client.post, "/detect", json=one)]
            assert entered.wait(10)  # its forward runs, blocked
            held.append(pool.submit(client.post, "/detect", json=one))  # waits in the queue, which is now full
            deadline = time.monotonic() + 10
            while "detect_queue_depth 1" not in client.get("/metrics").text.splitlines():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = client.post("/detect", json=one)
            assert_error(r, 503, "overloaded")
            assert r.headers["retry-after"] == "3"
            gate.set()
            assert [f.result(timeout=10).status_code for f in held] == [200, 200]
    finally:
        gate.set()


def test_timeout_answers_504() -> None:
    gate = threading.Event()
    try:
        with running(StubDetector(gate=gate), warmup=False, request_timeout_s=0.3) as client:
            assert_error(client.post("/detect", json={"images": [{"data": b64(png(8, 8))}]}), 504, "timeout")
            gate.set()
    finally:
        gate.set()


def test_not_ready_until_warmed_up() -> None:
    gate = threading.Event()
    try:
        with running(StubDetector(gate=gate), wait=False) as client:
            assert_error(client.get("/readyz"), 503, "not_ready")
            assert_error(client.post("/detect", json={"images": [{"data": b64(png(8, 8))}]}), 503, "not_ready")
            assert client.get("/healthz").status_code == 200
            gate.set()
            wait_ready(client)
    finally:
        gate.set()


def test_api_key_and_cors() -> None:
    with running(api_key="s3cret", cors_origins=["http://a.example"]) as client:
        one = {"images": [{"data": b64(png(8, 8))}]}
        assert_error(client.post("/detect", json=one), 401, "unauthorized")
        assert_error(client.post("/detect", json=one, headers={"x-api-key": "wrong"}), 401, "unauthorized")
        assert client.post("/detect", json=one, headers={"x-api-key": "s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200
        preflight = client.options(
            "/detect", headers={"origin": "http://a.example", "access-control-request-method": "POST"}
        )
        assert preflight.headers["access-control-allow-origin"] == "http://a.example"
        assert "access-control-allow-origin" not in client.options(
            "/detect", headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
        ).headers


def test_default_score_threshold_is_for_people(caplog: pytest.LogCaptureFixture) -> None:
    """Omitted (or null), the score threshold is 0.25, echoed in the parameters; 0 returns all the model keeps.
    The service logs one ``ready`` line, with its models, when /readyz turns 200."""
    import logging

    with caplog.at_level(logging.INFO, logger="detect.api"), running(StubDetector(scores=(0.9, 0.2, 0.05))) as c:
        files = {"images": ("a.png", png(40, 20), "image/png")}
        default = c.post("/detect", files=files).json()
        everything = c.post("/detect", files=files, data={"score_threshold": "0"}).json()
        nulled = c.post("/detect", json={"images": [{"data": base64.b64encode(png(40, 20)).decode()}], "score_threshold": None}).json()
    assert default["parameters"]["score_threshold"] == 0.25 and nulled["parameters"]["score_threshold"] == 0.25
    assert [d["score"] for d in default["images"][0]["detections"]] == [0.9]
    assert [d["score"] for d in nulled["images"][0]["detections"]] == [0.9]
    assert [round(d["score"], 2) for d in everything["images"][0]["detections"]] == [0.9, 0.2, 0.05]
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready:")]
    assert ready == [f"ready: serving stub ({len(StubDetector.class_names)} classes) on cpu"]
