"""Issue 12, overload: answers that need no forward pass stay cheap and fast while forward passes saturate the
CPU. A full queue refuses before the body is read, the inference threads run at a lower priority than the event
loop, and a service that loaded its own models freezes its heap so full garbage collections stay short (the
figures are in ``benchmarks/soak.py``)."""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import pytest

from api.app import create_app
from api.service import Batcher, Metrics
from api.settings import Settings
from tests.helpers import StubDetector, png, running, serve, wait_ready


class Blocking(StubDetector):
    """The stub, but each forward first sets ``entered`` and then waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def __call__(self, images, **kwargs):
        self.entered.set()
        self.gate.wait(10)
        return super().__call__(images, **kwargs)


def test_a_full_queue_refuses_before_reading_the_body() -> None:
    detector = Blocking()
    try:
        with running(detector, warmup=False, queue_size=1, retry_after_s=2) as client, ThreadPoolExecutor(2) as pool:
            one = {"images": ("a.png", png(8, 8), "image/png")}
            held = [pool.submit(client.post, "/detect", files=one)]
            assert detector.entered.wait(10)  # in the forward pass, blocked
            held.append(pool.submit(client.post, "/detect", files=one))  # queued: the queue is full
            deadline = time.monotonic() + 10
            while "detect_queue_depth 1" not in client.get("/metrics").text.splitlines():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            host, port = client.base_url.host, client.base_url.port
            with socket.create_connection((host, port), timeout=5) as s:  # a body that would take for ever
                s.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: 1000000\r\n\r\n--b\r\n")
                answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503 ") and b'"overloaded"' in answer
            assert b"retry-after: 2" in answer.lower() and b"connection: close" in answer.lower()
            detector.gate.set()
            assert [f.result(timeout=10).status_code for f in held] == [200, 200]
    finally:
        detector.gate.set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_inference_threads_run_at_a_lower_priority() -> None:
    import asyncio

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def inference_niceness() -> int:
        batcher = Batcher(8, 1.0, 4, Metrics(), inference_nice=7)
        try:
            return await asyncio.get_running_loop().run_in_executor(batcher._executor, niceness)
        finally:
            await batcher.stop()

    here = niceness()
    assert asyncio.run(inference_niceness()) == min(19, here + 7)
    assert niceness() == here  # the calling thread (the event loop's, in the service) keeps its priority


def test_a_service_that_loads_its_models_freezes_its_heap(
    isolated_weights: Callable[[Path | None], Path], tiny_weights_source: Path
) -> None:
    isolated_weights(tiny_weights_source)
    gc.unfreeze()
    try:
        with serve(create_app(Settings(max_wait_ms=1.0))) as url, httpx.Client(base_url=url, timeout=60) as client:
            wait_ready(client, timeout=60)
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # give the test process its collector back
