"""Engine fixtures: one local Ray cluster for the whole session (2 CPUs, shut down at the end) and random tiny
weights."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.helpers import SHAPES_CLASSES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest) -> ModuleType:
    """``ray``, initialised once per session; tests/api/test_contract_engines.py starts the same cluster when it
    runs first (a Ray session is per process, so whichever fixture comes first starts it, the other reuses it)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        request.config.add_cleanup(ray.shutdown)
    return ray


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detect.testing import save_random_tiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("engine-weights")
    return save_random_tiny("faster_rcnn", folder / "frcnn.safetensors", "frcnn_tiny", SHAPES_CLASSES)
