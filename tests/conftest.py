"""Shared fixtures: a ``device`` fixture (CPU always, CUDA when present), seeded randomness and one local Ray
cluster per session. Under ``CI=true`` a test (or module) skipped because a dependency that ``pyproject.toml``
declares (base or ``test`` extra) cannot be imported fails instead: CI installs them all, so such a skip hides a
broken install or a test that never runs (issue 21). Other skips (no CUDA device, undeclared packages) stay."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers import declared_dependencies, missing_declared_dependency

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
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
    the engines' and the API contract's on Ray Serve, whose ingress is the one ``detect serve --engine ray``
    would choose here. Skipped where ray is not installed."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        try:
            from api.ray_serve import ingress_environment
        except ImportError:  # ray without its serve extra: no Serve tests, no ingress to choose
            pass
        else:
            os.environ.update(ingress_environment("auto"))  # HAProxy where installed, as `detect serve --engine ray`
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        request.config.add_cleanup(ray.shutdown)
    return ray


def _fail_declared_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under ``CI=true``, turn a skip for a missing declared dependency into a failure (see the module docstring)."""
    if not IN_CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    missing = missing_declared_dependency(reason, declared_dependencies(ROOT / "pyproject.toml"))
    if missing is not None:
        report.outcome = "failed"
        report.longrepr = f"CI=true: skipped for lack of {missing!r}, a declared dependency (pyproject.toml): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_declared_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_declared_skip(outcome.get_result())
