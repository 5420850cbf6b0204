"""``detect predict`` with a region detector: selective search in worker processes gives the in-process results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from detect.detectors.rcnn import rcnn_tiny
from detect.engines.local import PredictOptions, run
from proposals.selective_search import SelectiveSearch


class CountingSearch(SelectiveSearch):
    """Selective search that counts the images it searched in this process."""

    calls = 0

    def __call__(self, images):  # type: ignore[override]
        CountingSearch.calls += len(images)
        return super().__call__(images)


def shapes_image(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, size[0] - 16)), int(rng.integers(0, size[1] - 16))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        draw.rectangle([x, y, x + 14, y + 12], fill=colour)
    image.save(path)


@pytest.mark.slow  # spawning the search workers (an interpreter and the imports each) takes several seconds
def test_worker_proposals_equal_in_process(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shapes_image(src / "a.png", (64, 48), 0)
    shapes_image(src / "b.png", (56, 56), 1)
    torch.manual_seed(0)
    detector = rcnn_tiny(("circle", "square")).eval()
    detector.proposer = CountingSearch(detector.proposer.config)

    outputs = {}
    for workers in (0, 2):
        CountingSearch.calls = 0
        out = tmp_path / f"out{workers}"
        summary = run(PredictOptions((str(src),), out, batch_size=2, proposal_workers=workers), detector, progress=None)
        assert (summary.images, summary.failed) == (2, 0)
        assert CountingSearch.calls == (2 if workers == 0 else 0)  # with workers, nothing is searched in-process
        outputs[workers] = {name: json.loads((out / f"{name}.json").read_text()) for name in ("a.png", "b.png")}
    assert outputs[2] == outputs[0]
    assert any(result["detections"] for result in outputs[0].values())  # a comparison of something
