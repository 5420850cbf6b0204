"""An image's detections do not depend on the other images in its batch (issue 12, item 1).

The reference for every image is the detector run on that image alone; a batch of any composition (sizes mixed,
repeated, in any order) must give each image the same labels and its boxes and scores within 1e-4. Every
detector family runs with random weights (many low-confidence detections, so that near-threshold decisions are
exercised) and with the bundled weights (the models users get), on the CPU and on CUDA when present. The same
holds end to end for ``detect predict``: ``--batch-size 1`` and ``--batch-size 4`` write byte-equal files.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detect.data.shapes import SHAPES_CLASSES, ShapesConfig, ShapesDataset
from detect.detectors import DETECTORS
from detect.structures import Detections
from detect.weights import load_detector

TOLERANCE = 1e-4

# (height, width): two of the same size, two that differ but pad to the same size once resized (160 x 240 and
# 160 x 256, padded to 160 x 256), portrait and landscape, and one whose long side hits max_size (40 x 120).
SIZES = ((96, 96), (96, 96), (100, 150), (100, 160), (120, 90), (64, 128), (40, 120), (72, 100))
RANDOM = ("fasterrcnn_tiny", "sppnet_tiny", "rcnn_tiny")
BUNDLED = ("faster_rcnn_shapes", "sppnet_shapes", "rcnn_shapes")


@functools.lru_cache(maxsize=None)
def pool() -> tuple[np.ndarray, ...]:
    """Shapes images (RGB uint8) of :data:`SIZES`, each a different scene."""
    images = []
    for index, (height, width) in enumerate(SIZES):
        config = ShapesConfig(num_images=1, image_size=height, image_size_max=None, seed=100 + index)
        scene = ShapesDataset(config)[0][0]  # (h, h, 3)
        images.append(np.ascontiguousarray(np.asarray(Image.fromarray(scene).resize((width, height)))))
    return tuple(images)


@functools.lru_cache(maxsize=None)
def model(name: str, device: str) -> torch.nn.Module:
    """A tiny detector with random weights (seeded) or bundled weights, in eval mode on ``device``."""
    if name in BUNDLED:
        return load_detector(name, device)
    torch.manual_seed(0)
    return DETECTORS[name].build(SHAPES_CLASSES).to(device).eval()


@functools.lru_cache(maxsize=None)
def alone(name: str, device: str, index: int) -> Detections:
    """The reference: image ``index`` of the pool run on its own."""
    with torch.inference_mode():
        return model(name, device)([pool()[index]])[0][0]


def assert_same(actual: Detections, expected: Detections, where: str) -> None:
    assert actual.image_size == expected.image_size, where
    assert torch.equal(actual.labels.cpu(), expected.labels.cpu()), f"{where}: labels differ"
    torch.testing.assert_close(actual.boxes, expected.boxes, rtol=0, atol=TOLERANCE, msg=f"{where}: boxes")
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=TOLERANCE, msg=f"{where}: scores")


def check_batch(name: str, device: str, indices: list[int]) -> None:
    with torch.inference_mode():
        detections, _ = model(name, device)([pool()[i] for i in indices])
    for position, (index, actual) in enumerate(zip(indices, detections)):
        assert_same(actual, alone(name, device, index), f"{name}: image {index} at {position} of {indices}")


batches = st.lists(st.integers(0, len(SIZES) - 1), min_size=2, max_size=4)
property_settings = settings(
    max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def test_the_pool_mixes_padded_sizes() -> None:
    """The pool has what the property needs: repeated sizes, equal padded sizes from different sizes, and
    different padded sizes (Faster R-CNN's tiny transform: short side 160, long side at most 400, multiples of 32)."""
    transform = model("fasterrcnn_tiny", "cpu").transform
    resized = transform.resize(list(pool()))[0]
    padded = [transform.padded_size(image.shape[1:]) for image in resized]
    assert padded[2] == padded[3] == (160, 256) and resized[2].shape != resized[3].shape
    assert resized[6].shape[1:] == (133, 400)
    assert len(set(padded)) >= 5


def test_grouped_pads_each_image_as_it_would_be_padded_alone() -> None:
    transform = model("fasterrcnn_tiny", "cpu").transform
    images = list(pool())
    groups = transform.grouped(images)
    assert sorted(index for group in groups for index in group.indices) == list(range(len(images)))
    assert len(groups) < len(images)  # images of one padded size share a batch
    for group in groups:
        for row, index in enumerate(group.indices):
            alone, _ = transform([images[index]])
            assert torch.equal(group.batch.tensors[row], alone.tensors[0])
            assert group.batch.image_sizes[row] == alone.image_sizes[0]
            assert group.batch.original_sizes[row] == alone.original_sizes[0] == images[index].shape[:2]


@pytest.mark.parametrize("name", RANDOM)
@property_settings
@given(indices=batches)
def test_random_weights_detect_the_same_in_any_batch(name: str, device: torch.device, indices: list[int]) -> None:
    check_batch(name, str(device), indices)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
@property_settings
@given(indices=batches)
def test_bundled_weights_detect_the_same_in_any_batch(name: str, device: torch.device, indices: list[int]) -> None:
    check_batch(name, str(device), indices)


@pytest.mark.parametrize("name", BUNDLED)
def test_the_reported_pair(name: str, device: torch.device) -> None:
    """The issue's case: two images of different sizes, each alone and together, in both orders."""
    check_batch(name, str(device), [0, 3])
    check_batch(name, str(device), [3, 0])


def test_losses_of_a_mixed_batch_are_the_image_weighted_mean_of_its_groups() -> None:
    """With targets, a batch of two padded sizes gives each loss as the image-weighted mean of the two groups'
    (run here one after the other from the same seed, so the samplers draw the same anchors and RoIs)."""
    detector = model("fasterrcnn_tiny", "cpu")
    images = [pool()[i] for i in (0, 6, 1)]  # padded 160 x 160, 160 x 416, 160 x 160: groups {0, 2} and {1}
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([k])} for k in (1, 2, 3)]
    with torch.no_grad():
        torch.manual_seed(1)
        detections, mixed = detector(images, targets)
        torch.manual_seed(1)
        _, first = detector([images[0], images[2]], [targets[0], targets[2]])
        _, second = detector([images[1]], [targets[1]])
    assert set(mixed) == set(first) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    for key in mixed:
        torch.testing.assert_close(mixed[key], first[key] * (2 / 3) + second[key] / 3, rtol=1e-6, atol=1e-7)
    for index, actual in zip((0, 6, 1), detections):
        assert_same(actual, alone("fasterrcnn_tiny", "cpu", index), f"image {index} with targets")


def _write_pool(folder: Path) -> None:
    folder.mkdir()
    for index, image in enumerate(pool()):
        Image.fromarray(image).save(folder / f"{index}.png")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["faster_rcnn", "sppnet", "rcnn"])
def test_predict_batch_size_does_not_change_the_output_files(family: str, tmp_path: Path) -> None:
    from detect import cli  # imported here: a CLI broken mid-refactor fails this test only

    source = tmp_path / "images"
    _write_pool(source)
    written = {}
    for batch_size in (1, 4):
        out = tmp_path / f"batch{batch_size}"
        argv = ["predict", str(source), "--out", str(out), "--model", family, "--batch-size", str(batch_size)]
        assert cli.main([*argv, "--proposal-workers", "0"]) == 0
        written[batch_size] = {p.name: p.read_bytes() for p in sorted(out.glob("*.png.json"))}
    assert len(written[1]) == len(SIZES)
    assert written[1] == written[4]
    assert any(b'"detections": [{' in data or b'"detections":[{' in data for data in written[1].values())
