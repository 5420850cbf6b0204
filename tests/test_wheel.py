"""Issue 21, item 10: a wheel built from the project carries the bundled weights and recipes, so a normal install
(``pip install .``, not ``-e``) runs ``detect demo`` and reads the README's recipes, from any folder.

The wheel is built without build isolation (no download) and installed into a fresh virtual environment; the
heavy dependencies (torch, ...) are borrowed from the test's own environment through a ``.pth`` line, which adds
that folder to ``sys.path`` without running its ``.pth`` files, so the project itself is imported from the wheel
and never from the checkout (the test checks ``detect.__file__``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_runs_the_demo_and_finds_the_recipes(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "_bundled", "notes"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("detect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "detect/_bundled/weights/manifest.json" in names
    assert "detect/_bundled/weights/faster_rcnn_shapes.safetensors" in names
    assert "detect/_bundled/recipes/faster_rcnn_shapes.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    (Path(site) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DETECT_WEIGHTS_DIR", "DETECT_MODELS")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    where = subprocess.run(
        [str(python), "-c", "import detect, detect.training as t; print(detect.__file__); "
         "print(t.load_recipe('recipes/faster_rcnn_shapes.yaml').detector)"],
        cwd=work, env=env, check=True, capture_output=True, text=True, timeout=300,
    ).stdout.split()
    assert where[0].startswith(site) and where[1] == "fasterrcnn_tiny"
    demo = subprocess.run([str(python), "-m", "detect", "demo", "--out", str(work / "demo")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "VOC mAP@0.5" in demo.stdout + demo.stderr
    assert (work / "demo" / "detections" / "predictions.jsonl").is_file()
