"""Issue 12, the service's limits and messages: one image limit and one code at every count (item 7), the
deadline over decoding (10), readiness messages that name the model and no path (10, 11), the API key's
encoding (12) and the empty class filter (13)."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import api.service
from api.app import create_app
from api.settings import ModelSpec, Settings
from tests.helpers import SHAPES_CLASSES, StubDetector, png, running, serve

CT_PNG = "image/png"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


def files(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", png(8, 8), CT_PNG)) for i in range(n)]


# --- item 7 --------------------------------------------------------------------------------------------------
def test_too_many_images_is_413_at_every_count() -> None:
    with running(max_images_per_request=16) as client:  # the default limit, as the issue found it
        assert client.post("/detect", files=files(16)).status_code == 200
        for n in (17, 18, 40):
            assert error_of(client.post("/detect", files=files(n)), 413)["code"] == "too_many_images", n
            body = {"images": [{"data": b64(png(8, 8))}] * n}
            assert error_of(client.post("/detect", json=body), 413)["code"] == "too_many_images", n


def test_any_file_part_counts_as_an_image() -> None:
    with running(max_images_per_request=2) as client:
        parts = [("images", ("a.png", png(8, 8), CT_PNG)), ("other", ("b.png", png(8, 8), CT_PNG)), ("x", ("c", b"", CT_PNG))]
        error = error_of(client.post("/detect", files=parts), 413)
        assert error == {"code": "too_many_images", "message": "more than 2 images; at most 2 per request"}


def test_a_request_larger_than_the_whole_queue_is_413_not_503() -> None:
    with running(max_images_per_request=16, queue_size=3, retry_after_s=1) as client:
        assert client.post("/detect", files=files(3)).status_code == 200
        json_body = {"images": [{"data": b64(png(8, 8))}] * 4}
        for response in (client.post("/detect", files=files(4)), client.post("/detect", json=json_body)):
            error = error_of(response, 413)
            assert error["code"] == "too_many_images" and "at most 3 per request" in error["message"]
            assert "retry-after" not in response.headers  # retrying cannot help


# --- item 10 -------------------------------------------------------------------------------------------------
def test_the_deadline_covers_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    real_decode = api.service.decode_fitted

    def slow_decode(*args, **kwargs):
        time.sleep(1.5)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(api.service, "decode_fitted", slow_decode)
    with running(warmup=False, request_timeout_s=0.3) as client:
        start = time.perf_counter()
        response = client.post("/detect", files=files(1))
        seconds = time.perf_counter() - start
    assert error_of(response, 504)["code"] == "timeout"
    assert seconds < 1.0  # the deadline (0.3 s), not the decode (1.5 s); the old code answered after the decode


def nan_weights(folder: Path) -> Path:
    """A tiny Faster R-CNN file whose every floating-point tensor is NaN: a random one's tensors and metadata
    (which name its detector) rewritten outside any manifest, so only its values are wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from detect.testing import save_random_tiny

    random = save_random_tiny("faster_rcnn", folder / "random.safetensors", "random", SHAPES_CLASSES)
    with safe_open(str(random), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in load_file(str(random)).items()}
    path = folder / "broken" / "nan.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_nan_weights_keep_the_service_not_ready_naming_the_model_not_the_path(tmp_path: Path) -> None:
    path = nan_weights(tmp_path)
    settings = Settings(models={"shapes": ModelSpec(family="faster_rcnn", weights=str(path))}, max_wait_ms=1.0)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while "loading" in (message := error_of(client.get("/readyz"), 503)["message"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        detect = error_of(client.post("/detect", files=files(1)), 503)
    for error in ({"code": "not_ready", "message": message}, detect):
        assert error["code"] == "not_ready"
        assert "'shapes'" in error["message"] and "weights_error" in error["message"]
        assert str(tmp_path) not in error["message"] and "safetensors" not in error["message"]


def test_a_model_failing_its_warm_up_is_not_ready() -> None:
    class Broken(StubDetector):
        def __call__(self, images, **kwargs):
            raise RuntimeError("broken on every image")

    with running(Broken(), wait=False) as client:
        deadline = time.monotonic() + 10
        while "loading" in (message := error_of(client.get("/readyz"), 503)["message"]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert "'stub'" in message and "warm-up" in message and "inference_error" in message


# --- item 12 -------------------------------------------------------------------------------------------------
def test_the_api_key_is_compared_as_utf8_bytes() -> None:
    key = "clé-ünï-鍵"
    one = {"images": [{"data": b64(png(8, 8))}]}
    with running(api_key=key) as client:
        assert client.post("/detect", json=one, headers={"x-api-key": key.encode("utf-8")}).status_code == 200
        latin1 = "clé-ünï".encode("latin-1")  # the key's first characters in another encoding
        for wrong in (latin1, "clé-ünï-鍵x".encode("utf-8"), b"cl\xc3"):
            assert error_of(client.post("/detect", json=one, headers={"x-api-key": wrong}), 401)["code"] == "unauthorized"
    with running(api_key="clé") as client:  # the key Latin-1 can spell: its Latin-1 bytes are still refused
        assert client.get("/models", headers={"x-api-key": "clé".encode("utf-8")}).status_code == 200
        assert client.get("/models", headers={"x-api-key": "clé".encode("latin-1")}).status_code == 401


# --- item 13 -------------------------------------------------------------------------------------------------
def test_an_empty_class_filter_is_422(client: httpx.Client) -> None:
    one = {"images": [{"data": b64(png(8, 8))}]}
    assert error_of(client.post("/detect", json={**one, "classes": []}), 422)["code"] == "invalid_request"
    for value in ("", ",", " , "):
        response = client.post("/detect", files=files(1), data={"classes": value})
        assert error_of(response, 422)["code"] == "invalid_request", value
    assert client.post("/detect", json={**one, "classes": None}).status_code == 200  # null: no filter

