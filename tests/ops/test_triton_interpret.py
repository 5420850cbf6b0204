"""Runs ``triton_cases.py`` (the Triton kernels, bitwise on CPU tensors) under ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when :mod:`detect.ops._gpu` is imported, so
the cases run in a fresh Python process with the variable set (and ``DETECT_OPS_BACKEND=triton`` so that the
public kernels choose Triton for CPU tensors). A few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("triton")


def test_triton_kernels_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "DETECT_OPS_BACKEND": "triton"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/triton_cases.py"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
