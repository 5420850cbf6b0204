"""benchmarks/gpu.sh, the prepared GPU check: valid bash, and its dry run lists every step within the time limit."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dry_run_lists_each_step_under_eight_minutes(tmp_path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^== (\S+) \(limit (\d+)s\): (.+)$", done.stdout, flags=re.M)
    names = [name for name, _, _ in steps]
    assert names[:5] == ["cuda-tests", "kernels", "detectors", "runtime", "service"], done.stdout
    assert sum(int(limit) for _, limit, _ in steps) <= 8 * 60 - 10
    commands = {name: command for name, _, command in steps}
    assert "-m pytest" in commands["cuda-tests"] and "-k cuda" in commands["cuda-tests"]
    for name in ("kernels", "detectors", "runtime", "service"):
        script = re.search(r"benchmarks/\w+\.py", commands[name]).group(0)
        assert (ROOT / script).is_file(), f"{name} runs {script}, which does not exist"
    assert "DETECT_DEVICE=cuda" in commands["service"]
    train_scale = (ROOT / "benchmarks" / "train_scale.py").is_file()
    assert ("train-scale (limit" in done.stdout) == train_scale
    assert ("train_scale.py not present" in done.stdout) != train_scale


def test_unknown_argument_is_a_usage_error() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
