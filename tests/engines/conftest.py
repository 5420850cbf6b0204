"""Engine fixtures: random tiny weights (the session's Ray cluster is ``ray_cluster`` in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import SHAPES_CLASSES




@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detect.testing import save_random_tiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("engine-weights")
    return save_random_tiny("faster_rcnn", folder / "frcnn.safetensors", "frcnn_tiny", SHAPES_CLASSES)
