"""Issue 21, bounded memory: the decoding budget across requests (api/memory.py), decoding for the model's input
size with boxes in the original's pixels, and JPEG DCT scaling finding the same objects as a full decode."""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import api.service
from api.app import create_app
from api.memory import MemoryBudget, decode_fit, to_original
from api.settings import Settings
from detect.errors import ImageTooLargeError, ServiceBusyError
from detect.testing import zero_png
from tests.helpers import StubDetector, png, serve, wait_ready


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


class SizedStub(StubDetector):
    """The stub detector with an input size, as Faster R-CNN declares it (``transform.config``)."""

    def __init__(self, min_size: int, max_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.transform = SimpleNamespace(config=SimpleNamespace(min_size=(min_size,), max_size=max_size))
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images, **kwargs):
        self.seen += [image.shape[:2] for image in images]
        return super().__call__(images, **kwargs)


# --- the budget alone ----------------------------------------------------------------------------------------
def test_budget_serves_in_order_waits_and_refuses() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, wait_s=0.2, retry_after=3)
        first = await budget.acquire(60)
        with pytest.raises(ServiceBusyError) as busy:  # 60 + 50 > 100, for longer than wait_s
            await budget.acquire(50)
        assert busy.value.details["retry_after"] == 3 and budget.used == 60
        with pytest.raises(ImageTooLargeError):  # more than the whole budget: waiting cannot help
            await budget.acquire(101)
        big = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(budget.acquire(10))  # would fit now, but the big one came first
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done()
        first.resize(20)  # the decoded array is smaller than decoding's peak
        granted = await big
        assert (await small).nbytes == 10 and budget.used == 80
        granted.release()
        granted.release()  # idempotent
        first.release()
        assert budget.used == 10

    asyncio.run(scenario())


def test_a_cancelled_waiter_lets_the_next_one_in_and_abandoned_decodes_release_at_their_end() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100, wait_s=5)
        held = await budget.acquire(90)
        blocked = asyncio.create_task(budget.acquire(50))
        behind = asyncio.create_task(budget.acquire(10))
        await asyncio.sleep(0.01)
        blocked.cancel()  # its request timed out
        assert (await behind).nbytes == 10 and budget.used == 100
        work = asyncio.get_running_loop().create_future()  # a decode thread still running
        held.covers(work)
        held.release()
        assert budget.used == 100  # its pixels still exist
        work.set_result(None)
        await asyncio.sleep(0)
        assert budget.used == 10

    asyncio.run(scenario())


# --- the service ---------------------------------------------------------------------------------------------
def test_decode_fit_reads_the_detectors_input_size() -> None:
    from detect.inference import load_model

    assert decode_fit(load_model("faster_rcnn_shapes"), 2000) == (160, 400)
    assert decode_fit(StubDetector(), 2000) == (2000, 2000)  # declares none (R-CNN): decode_max_side


def test_a_40mp_png_is_decoded_small_and_boxes_come_back_in_original_pixels() -> None:
    stub = SizedStub(800, 1333)
    settings = Settings(max_wait_ms=2.0)  # the defaults: 40 MP is within max_pixels and the budget
    app = create_app(settings, {"stub": stub})
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client)
        response = client.post("/detect", files={"images": ("big.png", zero_png(8000, 5000), "image/png")})
        assert response.status_code == 200, response.text
        (item,) = response.json()["images"]
        assert (item["width"], item["height"]) == (8000, 5000)
        assert stub.seen[-1:] == [(834, 1334)]  # after the warm-up image; factor 6: ceil(5000/6), ceil(8000/6)
        boxes = [d["box"] for d in item["detections"]]
        # The stub finds [0, 0, w/2, h/2], [0, 0, w/2, 0.4 h] and [w/2, h/2, w, h] in what it saw; in the
        # original's pixels, by hand: [0, 0, 4000, 2500], ... within one decoded pixel (6 original pixels).
        expected = [[0, 0, 4000, 2500], [0, 0, 4000, 2000], [4000, 2500, 8000, 5000]]
        assert np.abs(np.array(boxes) - np.array(expected)).max() <= 6
        assert app.state.service.budget.used == 0  # every reservation released after the answer


def slow_decoding(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = api.service.decode_fitted

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(api.service, "decode_fitted", slow)


@pytest.mark.parametrize("wait_s, second_status", [(0.2, 503), (10.0, 200)])
def test_an_image_over_the_budget_waits_then_gets_503(monkeypatch: pytest.MonkeyPatch, wait_s: float, second_status: int) -> None:
    slow_decoding(monkeypatch, 1.0)
    image = png(300, 300)  # peak estimate 300*300*4 + 300*300*3 = 630 KB
    settings = Settings(max_wait_ms=2.0, decode_budget_bytes=1_000_000, decode_wait_s=wait_s, retry_after_s=2)
    app = create_app(settings, {"stub": StubDetector()})
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)

        def post(delay: float) -> httpx.Response:
            time.sleep(delay)
            return client.post("/detect", files={"images": ("a.png", image, "image/png")})

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(post, (0.0, 0.3))
        assert first.status_code == 200
        if second_status == 503:
            assert error_of(second, 503)["code"] == "overloaded" and second.headers["retry-after"] == "2"
        else:
            assert second.status_code == 200  # it waited for the first one's decode
        assert app.state.service.budget.used == 0


def test_an_image_larger_than_the_whole_budget_is_413() -> None:
    settings = Settings(max_wait_ms=2.0, decode_budget_bytes=100_000)
    app = create_app(settings, {"stub": StubDetector()})
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client)
        response = client.post("/detect", files={"images": ("a.png", png(300, 300), "image/png")})
        error = error_of(response, 413)
        assert error["code"] == "image_too_large" and "budget" in error["message"]
        two = [("images", ("a.png", png(300, 300), "image/png")), ("images", ("b.png", png(8, 8), "image/png"))]
        items = client.post("/detect", files=two).json()["images"]  # one bad image fails alone
        assert items[0]["error"]["code"] == "image_too_large" and "detections" in items[1]


# --- JPEG DCT scaling against a full decode ------------------------------------------------------------------
def test_dct_scaled_jpeg_finds_the_same_objects_as_a_full_decode() -> None:
    """The bundled shapes model on two synthetic scenes enlarged 10x (2000 px JPEGs). Decoded for its input size
    (160, 400) the JPEG is DCT-scaled 1/8; decoded in full, the detector's bilinear resize samples it 12.5x down.
    The two downsamplings differ (a block mean against a 4-pixel interpolation), so boxes may move by a few
    original pixels and scores by a few hundredths: the same objects means the same labels, matched one to one
    with IoU >= 0.9 (a box off by 2 % of its side on every edge still has IoU ~0.92), scores within 0.1."""
    from torchvision.ops import box_iou

    from detect.data.shapes import ShapesConfig, ShapesDataset
    from detect.inference import forward_batch, load_model
    from detect.io import decode_fitted, decode_image

    detector = load_model("faster_rcnn_shapes")
    dataset = ShapesDataset(ShapesConfig(num_images=2, image_size=200))
    for index in range(len(dataset)):
        buffer = io.BytesIO()
        Image.fromarray(dataset[index][0]).resize((2000, 2000), Image.BICUBIC).save(buffer, "JPEG", quality=92)
        full = forward_batch(detector, [decode_image(buffer.getvalue())])[0]
        fitted = decode_fitted(buffer.getvalue(), decode_fit(detector, 2000))
        assert fitted.factor == 8 and fitted.pixels.shape == (250, 250, 3)
        scaled = to_original(forward_batch(detector, [fitted.pixels])[0], fitted.factor, fitted.original_size)
        full, scaled = full.filter(full.scores >= 0.5), scaled.filter(scaled.scores >= 0.5)
        assert len(full) == len(scaled) > 0
        iou = box_iou(full.boxes, scaled.boxes)  # (N, N)
        best = iou.argmax(dim=1)
        assert sorted(best.tolist()) == list(range(len(full)))  # one to one
        assert (iou.max(dim=1).values >= 0.9).all()
        assert torch.equal(full.labels, scaled.labels[best])
        assert (full.scores - scaled.scores[best]).abs().max() <= 0.1
