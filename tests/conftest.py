"""Shared fixtures: a ``device`` fixture (CPU always, CUDA when present), seeded randomness and one local Ray
cluster per session."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each test using it runs on the CPU, and again on CUDA when a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session", autouse=True)
def _kernels_loaded() -> None:
    """The fused box kernels are loaded (compiled, on a cold numba cache) once, before any test: no test's timing,
    deadline or readiness wait pays for it, as no request does in the service."""
    import detect.ops

    detect.ops.warmup(("cpu",))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state (Python, NumPy, torch)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def generator() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(0)
    return g


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest) -> ModuleType:
    """``ray``, initialised once per session as a local 2-CPU cluster (shut down at the end) for every Ray test:
    the engines' and the API contract's on Ray Serve. Skipped where ray is not installed."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        request.config.add_cleanup(ray.shutdown)
    return ray
