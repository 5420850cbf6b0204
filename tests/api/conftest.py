"""A stub detector with hand-known outputs, and a real uvicorn server on a loopback port."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from api.app import create_app
from api.settings import Settings
from detect.structures import Detections

CLASS_NAMES = ("cat", "dog", "bird")


class StubDetector:
    """Follows the detector interface. For an ``H x W`` image it returns, sorted by score:

    * ``[0, 0, W/2, H/2]`` class 1 (cat), score 0.9
    * ``[0, 0, W/2, H/2 * 0.8]`` class 1 (cat), score 0.6 - IoU 0.8 with the first
    * ``[W/2, H/2, W, H]`` class 2 (dog), score 0.3

    ``delay`` seconds of sleep per forward; ``gate`` (an Event) blocks every forward until set; ``batches``
    records each forward's batch size.
    """

    name = "stub"
    class_names = CLASS_NAMES

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate, self.batches = delay, gate, []

    def __call__(self, images: list[np.ndarray], **kwargs: Any) -> tuple[list[Detections], dict]:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append(len(images))
        out = []
        for image in images:
            h, w = image.shape[:2]
            if image[0, 0, 0] == 13:  # a marker pixel: the model "fails" on this image
                raise RuntimeError("stub failure")
            boxes = torch.tensor(
                [[0, 0, w / 2, h / 2], [0, 0, w / 2, h / 2 * 0.8], [w / 2, h / 2, w, h]], dtype=torch.float32
            )
            out.append(Detections(boxes, torch.tensor([0.9, 0.6, 0.3]), torch.tensor([1, 1, 2]), (h, w)))
        return out, {}


def png(width: int, height: int, value: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def wait_ready(client: httpx.Client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("never ready")
        time.sleep(0.02)


@contextmanager
def running(detector: Any = None, wait: bool = True, **overrides: Any) -> Iterator[httpx.Client]:
    settings = Settings(**{"max_wait_ms": 2.0, **overrides})
    app = create_app(settings, {"stub": detector or StubDetector()})
    with serve(app) as url, httpx.Client(base_url=url, timeout=15) as client:
        if wait:
            wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def stub() -> StubDetector:
    return StubDetector()


@pytest.fixture(scope="module")
def client(stub: StubDetector) -> Iterator[httpx.Client]:
    with running(stub, max_body_bytes=200_000, max_pixels=250_000, max_images_per_request=4) as c:
        yield c


SHAPES_CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="session")
def tiny_weights_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder with randomly initialised tiny ``faster_rcnn_shapes`` and ``rcnn_shapes`` (no sppnet)."""
    from detect.testing import save_random_tiny

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_random_tiny("faster_rcnn", folder / "frcnn.safetensors", "faster_rcnn_shapes", SHAPES_CLASSES)
    save_random_tiny("rcnn", folder / "rcnn.safetensors", "rcnn_shapes", SHAPES_CLASSES)
    return folder


def isolate_weights(monkeypatch: pytest.MonkeyPatch, root: Path, source: Path | None = None) -> Path:
    """Make the weights search path exactly one folder, ``root/weights``: a copy of ``source`` (or empty).

    ``DETECT_WEIGHTS_DIR`` names it; the user folder and the bundled ``weights/`` are pointed at empty folders, so
    weights bundled with the checkout never leak into a test. ``DETECT_MODELS`` is unset.
    """
    import detect.weights

    monkeypatch.setenv("XDG_DATA_HOME", str(root / "xdg"))
    monkeypatch.setattr(detect.weights, "BUNDLED_DIR", root / "no-bundled-weights")
    monkeypatch.delenv("DETECT_MODELS", raising=False)
    folder = root / "weights"
    if source is not None:
        shutil.copytree(source, folder)
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("DETECT_WEIGHTS_DIR", str(folder))
    return folder


@pytest.fixture
def isolated_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Path | None], Path]:
    """:func:`isolate_weights` under ``tmp_path``, called with the source folder (or ``None``)."""
    return lambda source=None: isolate_weights(monkeypatch, tmp_path, source)
