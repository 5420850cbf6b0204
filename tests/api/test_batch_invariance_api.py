"""Micro-batching never changes a client's answer (issue 12, item 1): the service batches images of different
clients and different sizes into one forward pass, and each image must get the detections it gets alone."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.weights import load_detector
from tests.helpers import running

# (height, width) of each client's images: different padded sizes once resized, two sizes repeated.
SIZES = ((96, 96), (100, 160), (120, 90), (64, 128), (40, 120), (72, 100), (96, 96), (100, 150))
# The second phase: client 0 runs alone while the others queue; each tuple is one request.
REQUESTS = ((0,), (1,), (4,), (2, 5), (3,), (6, 7))


class Gated:
    """A detector wrapper that records the ``(h, w)`` of every batch and, once ``hold`` is set, makes the next
    forward wait for ``gate`` (after setting ``entered``), so the other clients' images queue up behind it."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.name, self.class_names = detector.name, detector.class_names
        self.batches: list[list[tuple[int, int]]] = []
        self.hold, self.entered, self.gate = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, images: list[np.ndarray], **kwargs: Any):
        self.batches.append([image.shape[:2] for image in images])
        if self.hold.is_set() and not self.entered.is_set():
            self.entered.set()
            self.gate.wait(10)
        return self.detector(images, **kwargs)


def png_images() -> list[bytes]:
    out = []
    for index, (height, width) in enumerate(SIZES):
        scene = ShapesDataset(ShapesConfig(num_images=1, image_size=height, seed=200 + index))[0][0]
        buffer = io.BytesIO()
        Image.fromarray(scene).resize((width, height)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def post(client: httpx.Client, images: list[bytes], indices: tuple[int, ...]) -> list[dict]:
    files = [("images", (f"{i}.png", images[i], "image/png")) for i in indices]
    response = client.post("/detect", files=files, timeout=150)  # R-CNN, 7 images, default vector path: slow
    assert response.status_code == 200, response.text
    return [item["detections"] for item in response.json()["images"]]


def assert_same(actual: list[dict], expected: list[dict], where: str, exact: bool) -> None:
    """The same JSON, exactly: on the CPU an image's raw outputs are bitwise its outputs alone (issue 21), so the
    rounded ones are too (``exact``); on CUDA (a padded-size group is one batch there) within 1e-4 plus the JSON's
    rounding."""
    if exact:
        assert actual == expected, where
        return
    assert [d["class_id"] for d in actual] == [d["class_id"] for d in expected], where
    for a, e in zip(actual, expected):
        assert np.allclose(a["box"], e["box"], rtol=0, atol=0.01 + 1e-4), where
        assert abs(a["score"] - e["score"]) <= 1e-5 + 1e-4, where


@pytest.mark.exact
@pytest.mark.parametrize("name", ["faster_rcnn_shapes", "sppnet_shapes", "rcnn_shapes"])
def test_concurrent_clients_with_different_sizes_get_their_lone_answers(name: str, device: torch.device) -> None:
    detector = Gated(load_detector(name, device))
    images = png_images()
    try:
        serving = running(detector, warmup=False, max_batch=8, max_wait_ms=2000, request_timeout_s=120)
        with serving as client, ThreadPoolExecutor(6) as pool:
            alone = {i: post(client, images, (i,))[0] for i in range(len(SIZES))}
            assert [len(batch) for batch in detector.batches] == [1] * len(SIZES)
            assert any(alone.values()), "the bundled model should detect something in shapes images"
            detector.hold.set()
            first = pool.submit(post, client, images, REQUESTS[0])
            assert detector.entered.wait(10)  # client 0's forward runs (and waits)
            rest = [pool.submit(post, client, images, request) for request in REQUESTS[1:]]
            queued = sum(len(request) for request in REQUESTS[1:])
            deadline = time.monotonic() + 10
            while f"detect_queue_depth {queued}" not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "the other clients' images never queued"
                time.sleep(0.01)
            detector.gate.set()
            answers = [future.result(timeout=150) for future in [first, *rest]]
    finally:
        detector.gate.set()
    mixed = detector.batches[len(SIZES) + 1]  # the batch after client 0's
    assert len(mixed) == queued and len(set(mixed)) >= 5, mixed
    for request, answer in zip(REQUESTS, answers):
        for index, detections in zip(request, answer):
            where = f"{name}: image {index} {SIZES[index]} in a batch of {mixed}"
            assert_same(detections, alone[index], where, exact=device.type == "cpu")
