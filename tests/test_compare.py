"""``detect compare``: the three detectors on a generated image with the bundled weights, the table, the detections
and the side-by-side picture; the stage timer against known sleeps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detect.cli import main
from detect.compare import STAGES, StageTimer, instrument
from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.inference import load_model


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    image, _ = ShapesDataset(ShapesConfig(num_images=1, image_size=160, seed=31))[0]
    path = tmp_path_factory.mktemp("compare") / "scene.png"
    Image.fromarray(image).save(path)
    return path, image


def test_compare_prints_the_table_and_detections_and_writes_the_picture(scene, tmp_path, capsys) -> None:
    path, image = scene
    out = tmp_path / "side.png"
    missing = tmp_path / "missing.png"
    code = main(["compare", str(path), str(missing), "--out", str(out), "--sppnet-svd", "64,16"])
    captured = capsys.readouterr()
    assert code == 1  # one input failed, the other went through
    assert "missing.png" in captured.err and captured.err.startswith("error[")
    table = captured.out.splitlines()
    header = next(line for line in table if line.startswith("ms per image"))
    assert all(stage in header for stage in STAGES)
    rows = {label: next(line for line in table if line.startswith(label + " ")) for label in ("R-CNN", "Faster R-CNN")}
    rows["SPP-Net"] = next(line for line in table if line.startswith("SPP-Net+SVD 64/16"))
    for row in rows.values():
        numbers = [float(v.rstrip("x")) for v in row.split()[-8:]]  # 5 stages, other, total, speed-up
        assert all(v >= 0 for v in numbers[:5]) and numbers[6] > 0
    assert rows["R-CNN"].endswith("1.0x")
    assert str(path) + ":" in captured.out
    picture = Image.open(out)
    height, width = image.shape[:2]
    assert picture.size == (3 * width, height + 22)  # three panels, one caption strip
    panels = np.asarray(picture.convert("RGB"))[22:]
    for column in range(3):  # each panel shows the image (drawn boxes change a few pixels only)
        panel = panels[:, column * width : (column + 1) * width].astype(int)
        assert (np.abs(panel - image) <= 2).mean() > 0.8


def test_compare_refuses_bad_settings(scene, tmp_path, capsys) -> None:
    path, _ = scene
    assert main(["compare", str(path), "--sppnet-svd", "64"]) == 2
    assert main(["compare", str(path), "--score-threshold", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "score threshold" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_stage_timer_attributes_known_sleeps(scene) -> None:
    _, image = scene
    model = load_model("sppnet_shapes")
    original_pool, original_heads = model.pool, model.heads.forward

    def slow_pool(*args, **kwargs):
        time.sleep(0.05)
        return original_pool(*args, **kwargs)

    def slow_heads(*args, **kwargs):
        time.sleep(0.03)
        return original_heads(*args, **kwargs)

    model.pool = slow_pool
    model.heads.forward = slow_heads
    timer = StageTimer()
    stages = instrument(timer, model)
    start = time.perf_counter()
    with torch.inference_mode():
        model([image])
    split = timer.split(stages, time.perf_counter() - start)
    timer.remove()
    assert split["pooling"] >= 0.05 and split["heads"] >= 0.03  # one chunk: one pool and one heads call
    assert split["pooling"] < split["total"] and sum(split[s] for s in STAGES) <= split["total"] + 1e-6
    assert split["proposals"] > 0 and split["features"] > 0 and split["NMS"] > 0
    assert model.pool is slow_pool  # the timer's wrappers are gone again
