"""Micro-batching waits for company only while other images are on their way (api.service.Batcher)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from api.service import Batcher, LoadedModel, Metrics
from tests.helpers import StubDetector, png, running

CT_PNG = "image/png"


class GatedDetector(StubDetector):
    """The stub, but each forward first sets ``entered`` and then waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, images: list[np.ndarray], **kwargs: Any):
        self.entered.set()
        self.gate.wait(10)
        return super().__call__(images, **kwargs)


def test_lone_requests_do_not_wait_for_company() -> None:
    detector = StubDetector()
    with running(detector, warmup=False, max_wait_ms=2000, max_batch=8) as client:
        for size in (8, 9, 10):
            start = time.perf_counter()
            r = client.post("/detect", files={"images": ("a.png", png(size, size), CT_PNG)})
            assert r.status_code == 200, r.text
            assert time.perf_counter() - start < 1.0  # max_wait_ms is 2 s: it was not paid
    assert detector.batches == [1, 1, 1]


def test_concurrent_requests_still_share_a_batch() -> None:
    detector = GatedDetector()
    try:
        with running(detector, warmup=False, max_wait_ms=2000, max_batch=8) as client, ThreadPoolExecutor(5) as pool:
            post = lambda size: client.post("/detect", files={"images": ("a.png", png(size, 8), CT_PNG)})  # noqa: E731
            first = pool.submit(post, 8)
            assert detector.entered.wait(10)  # the first request's forward is running (and blocked)
            rest = [pool.submit(post, 9 + i) for i in range(4)]
            deadline = time.monotonic() + 10
            while "detect_queue_depth 4" not in client.get("/metrics").text:  # all four queued behind it
                assert time.monotonic() < deadline
                time.sleep(0.01)
            start = time.perf_counter()
            detector.gate.set()
            widths = [f.result(timeout=10).json()["images"][0]["width"] for f in [first, *rest]]
            assert time.perf_counter() - start < 1.5  # nobody else was on the way: no 2 s wait after the four
    finally:
        detector.gate.set()
    assert widths == [8, 9, 10, 11, 12]
    assert detector.batches == [1, 4]


def test_batcher_waits_for_announced_images_and_not_for_withdrawn_ones() -> None:
    detector = StubDetector()
    image = np.zeros((6, 6, 3), np.uint8)

    async def scenario() -> None:
        batcher = Batcher(max_batch=8, max_wait_ms=5000, queue_size=16, metrics=Metrics())
        batcher.start()
        model = LoadedModel.wrap("stub", detector)
        try:
            a, b = batcher.announce(2), batcher.announce(1)  # two requests are decoding
            first = batcher.submit(model, [image, image], {}, 1)
            batcher.withdraw(a)  # as DetectionService.detect does once its images are queued
            await asyncio.sleep(0.3)
            assert detector.batches == [] and not any(f.done() for f in first)  # b's image is on its way
            second = batcher.submit(model, [image], {}, 1)
            batcher.withdraw(b)
            await asyncio.wait_for(asyncio.gather(*first, *second), 5)
            assert detector.batches == [3] and batcher.expected == 0

            c, d = batcher.announce(2), batcher.announce(1)
            third = batcher.submit(model, [image], {}, 1)  # c's other image failed to decode: withdrawn
            batcher.withdraw(c)
            assert batcher.expected == 2
            await asyncio.sleep(0.3)
            assert detector.batches == [3]  # d's image may still come
            start = time.perf_counter()
            batcher.withdraw(d)  # d was refused: nobody is left to wait for
            await asyncio.wait_for(asyncio.gather(*third), 5)
            assert time.perf_counter() - start < 1.0
            assert detector.batches == [3, 1] and batcher.expected == 0
        finally:
            await batcher.stop()

    asyncio.run(scenario())


class CountingGate(StubDetector):
    """The stub; each forward records the torch thread count, counts itself in ``running`` and waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.lock = threading.Event(), threading.Lock()
        self.running = self.most = 0
        self.threads: list[int] = []

    def __call__(self, images: list[np.ndarray], **kwargs: Any):
        import torch

        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.append(torch.get_num_threads())
        self.gate.wait(10)
        with self.lock:
            self.running -= 1
        return super().__call__(images, **kwargs)


def test_two_inference_workers_run_two_forwards_at_once_with_the_configured_threads() -> None:
    import torch

    before = torch.get_num_threads()
    detector = CountingGate()
    try:
        with running(detector, warmup=False, inference_workers=2, torch_threads=1, max_batch=1) as client, \
                ThreadPoolExecutor(2) as pool:
            post = lambda: client.post("/detect", files={"images": ("a.png", png(8, 8), CT_PNG)})  # noqa: E731
            futures = [pool.submit(post) for _ in range(2)]
            deadline = time.monotonic() + 10
            while detector.most < 2:  # with one worker the second forward could not start before the gate opens
                assert time.monotonic() < deadline, "the second forward never started"
                time.sleep(0.01)
            detector.gate.set()
            assert [f.result(timeout=10).status_code for f in futures] == [200, 200]
    finally:
        detector.gate.set()
        torch.set_num_threads(before)  # DETECT_TORCH_THREADS sizes the process's pool: restore it for other tests
    assert detector.threads == [1, 1]
