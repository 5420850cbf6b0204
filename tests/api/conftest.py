"""API fixtures: a module-wide stub detector and a server running it, a session-wide folder of random tiny
weights, and an isolated weights search path. The functions behind them live in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import httpx
import pytest
import torch

from tests.helpers import SHAPES_CLASSES, StubDetector, isolate_weights, running


@pytest.fixture(scope="module")
def stub() -> StubDetector:
    return StubDetector()


@pytest.fixture(scope="module")
def client(stub: StubDetector) -> Iterator[httpx.Client]:
    with running(stub, max_body_bytes=200_000, max_pixels=250_000, max_images_per_request=4) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_weights_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder with randomly initialised tiny ``faster_rcnn_shapes`` and ``rcnn_shapes`` (no sppnet)."""
    from detect.testing import save_random_tiny

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_random_tiny("faster_rcnn", folder / "frcnn.safetensors", "faster_rcnn_shapes", SHAPES_CLASSES)
    save_random_tiny("rcnn", folder / "rcnn.safetensors", "rcnn_shapes", SHAPES_CLASSES)
    return folder


@pytest.fixture
def isolated_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Path | None], Path]:
    """:func:`isolate_weights` under ``tmp_path``, called with the source folder (or ``None``)."""
    return lambda source=None: isolate_weights(monkeypatch, tmp_path, source)
