"""``detect demo`` (the README's main job): draws sample scenes, detects with registered weights, writes the
annotated images and JSON, and scores the detections against the drawn objects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from detect import weights
from detect.cli import main
from detect.data.shapes import SHAPES_CLASSES
from detect.demo import DEMO_SIZE
from detect.testing import save_random_tiny


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "weights"
    save_random_tiny("faster_rcnn", folder / "demo.safetensors", "faster_rcnn_shapes", SHAPES_CLASSES)
    monkeypatch.setenv(weights.ENV_VAR, str(folder))
    return folder


def test_demo_writes_annotated_images_and_json(tmp_path: Path, registered: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-images", "2"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["images"] == 2 and report["failed"] == 0 and 0.0 <= report["mAP"] <= 1.0
    images = sorted((out / "samples" / "JPEGImages").glob("*.jpg"))
    assert len(images) == 2 and len(list((out / "samples" / "Annotations").glob("*.xml"))) == 2
    annotated = sorted((out / "detections").glob("*.jpg.annotated.jpg"))  # a JPEG input keeps its format
    assert len(annotated) == 2 and Image.open(annotated[0]).size == (DEMO_SIZE, DEMO_SIZE)
    assert Image.open(annotated[0]).format == "JPEG"
    lines = (out / "detections" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["width"] == DEMO_SIZE for line in lines)
    assert isinstance(json.loads((out / "detections" / "coco_results.json").read_text()), list)


def test_demo_without_weights_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "empty"))
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    code = main(["demo", "--out", str(tmp_path / "demo"), "--model", "sppnet"])
    assert code == 2 and "error[weights_error]" in capsys.readouterr().err
