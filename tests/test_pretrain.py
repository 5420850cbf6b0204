"""The crop-classification pre-training stage (detect.pretrain) and its place in ``detect train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detect.backbones import Backbone, tiny
from detect.detectors import DETECTORS
from detect.errors import ConfigError
from detect.pretrain import (
    PretrainConfig,
    background_boxes,
    crop_batch,
    find_backbone,
    heldout_split,
    pretrain_backbone,
)
from detect.config import override
from detect.training import TrainConfig, Trainer
from tests.helpers import tiny_recipe

RED, BLUE = (255, 0, 0), (0, 0, 255)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXACT = PretrainConfig(jitter=0.0, enlarge=0.0, flip_prob=0.0, crop_size=4)


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD)])


def _target(boxes, labels, difficult=None) -> dict:
    return {
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.array(labels, np.int64),
        "difficult": np.array(difficult if difficult is not None else [False] * len(labels)),
    }


def test_crops_hold_the_boxes_pixels_and_skip_difficult_objects() -> None:
    image = np.full((64, 64, 3), 128, np.uint8)
    image[20:40, 10:30] = RED  # box (10, 20, 30, 40) in xyxy pixel edges
    image[5:15, 40:60] = BLUE
    image[45:60, 45:60] = RED
    target = _target([[10, 20, 30, 40], [40, 5, 60, 15], [45, 45, 60, 60]], [1, 2, 1], [False, False, True])
    crops, labels = crop_batch([(image, target)], EXACT, np.random.default_rng(0))
    assert crops.shape == (2, 3, 4, 4) and labels.tolist() == [1, 2]
    for crop, colour in zip(crops, (RED, BLUE)):
        expected = _normalised(colour).view(3, 1, 1).expand(3, 4, 4)
        torch.testing.assert_close(crop, expected, atol=1e-5, rtol=0)


def test_flipped_crops_are_mirror_images() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:16] = RED
    image[8:24, 16:24] = BLUE
    target = _target([[8, 8, 24, 24]], [1])
    plain, _ = crop_batch([(image, target)], EXACT, np.random.default_rng(0))
    flipped, _ = crop_batch([(image, target)], override(EXACT, {"flip_prob": 1.0}), np.random.default_rng(0))
    torch.testing.assert_close(flipped, plain.flip(-1))
    assert plain[0, :, :, 0].tolist() != plain[0, :, :, -1].tolist()  # the two halves differ: a real test


def test_jittered_boxes_stay_near_the_object() -> None:
    """Jitter moves the centre by at most 10 % of the size and enlarges by up to 30 %: a 16-pixel red square
    cropped with that jitter on a blue field keeps red at the crop's centre and never sees blue there."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[...] = BLUE
    image[24:40, 24:40] = RED
    config = PretrainConfig(crop_size=9, flip_prob=0.0)
    crops, _ = crop_batch([(image, _target([[24, 24, 40, 40]] * 50, [1] * 50))], config, np.random.default_rng(3))
    centre = crops[:, :, 3:6, 3:6]
    torch.testing.assert_close(centre, _normalised(RED).view(1, 3, 1, 1).expand_as(centre), atol=1e-5, rtol=0)
    assert not torch.allclose(crops[0], crops[1])  # each object gets its own jitter


class _ColourBoxes:
    """Red squares are class 1, blue ones class 2, on noisy grey; deterministic per index."""

    class_names = ("red", "blue")

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        rng = np.random.default_rng(index)
        image = rng.integers(60, 190, (48, 48, 3)).astype(np.uint8)
        boxes, labels = [], []
        for label in (1, 2):
            size = int(rng.integers(10, 18))
            x, y = rng.integers(0, 48 - size, 2)
            image[y : y + size, x : x + size] = RED if label == 1 else BLUE
            boxes.append([x, y, x + size, y + size])
            labels.append(label)
        return image, _target(boxes, labels)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.02), ("adamw", 0.002)])
def test_pretraining_learns_to_tell_the_classes_apart(optimizer: str, lr: float) -> None:
    torch.manual_seed(0)
    backbone = tiny(width=8)
    before = [p.detach().clone() for p in backbone.parameters()]
    rows = []
    config = PretrainConfig(
        iterations=40, images_per_batch=8, crop_size=32, optimizer=optimizer, lr=lr, warmup_iterations=5
    )
    result = pretrain_backbone(backbone, _ColourBoxes(30), config, seed=0, on_step=rows.append)
    assert [r["iteration"] for r in rows] == list(range(1, 41))
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.5 * np.mean([r["loss"] for r in rows[:5]])
    assert min(r["accuracy"] for r in rows[-5:]) >= 0.9
    assert result["seconds"] > 0 and result["iteration"] == 40
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))  # trained in place


def test_images_without_objects_are_a_config_error() -> None:
    class Empty(_ColourBoxes):
        def __getitem__(self, index: int):
            return np.zeros((16, 16, 3), np.uint8), _target([], [])

    with pytest.raises(ConfigError, match="no .*objects"):
        pretrain_backbone(tiny(width=8), Empty(4), PretrainConfig(iterations=1, images_per_batch=2))


@pytest.mark.parametrize("name", ["fasterrcnn_tiny", "rcnn_tiny", "sppnet_tiny"])
def test_every_tiny_detector_has_one_backbone(name: str) -> None:
    backbone = find_backbone(DETECTORS[name](class_names=["a", "b"]))
    assert isinstance(backbone, Backbone) and backbone.out_channels == 128


@pytest.mark.parametrize(
    "bad", [{"iterations": -1}, {"crop_size": 0}, {"lr": 0}, {"flip_prob": 2}, {"jitter": -1}, {"optimizer": "lbfgs"}]
)
def test_invalid_pretrain_values(bad: dict) -> None:
    with pytest.raises(ConfigError):
        override(TrainConfig(), {"pretrain": bad})


def test_unknown_pretrain_key_is_named() -> None:
    with pytest.raises(ConfigError, match="pretrain.*epochs"):
        override(TrainConfig(), {"pretrain": {"epochs": 3}})


def test_train_runs_the_stage_once_and_resume_skips_it(tmp_path: Path) -> None:
    pre = {"iterations": 4, "images_per_batch": 2, "warmup_iterations": 2}
    straight = override(TrainConfig(), tiny_recipe(tmp_path / "a", val_data=None, pretrain=pre))
    Trainer(straight).run(progress=False)
    expected = Trainer(straight).log.rows()
    split = override(TrainConfig(), tiny_recipe(tmp_path / "b", val_data=None, pretrain=pre, max_iterations=3))
    Trainer(split).run(progress=False)
    resumed = Trainer(override(split, {"max_iterations": 6}))
    resumed.run(resume=True, progress=False)
    assert resumed.log.rows() == expected  # the resumed run did not pre-train again: same losses
    out = Path(split.out_dir)
    assert len((out / "pretrain.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["pretrain_seconds"] <= summary["train_seconds"]

    plain = override(TrainConfig(), tiny_recipe(tmp_path / "c", val_data=None))
    Trainer(plain).run(progress=False)
    assert Trainer(plain).log.rows()[0]["loss"] != expected[0]["loss"]  # the stage changed the starting point


# --- background crops and held-out accuracy (issue 13) ------------------------------------------------------------


class _RedSquares(_ColourBoxes):
    """One class: a red square (or two) on noisy grey."""

    class_names = ("red",)

    def __getitem__(self, index: int):
        rng = np.random.default_rng(1000 + index)
        image = rng.integers(60, 190, (48, 48, 3)).astype(np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            size = int(rng.integers(10, 18))
            x, y = rng.integers(0, 48 - size, 2)
            image[y : y + size, x : x + size] = RED
            boxes.append([x, y, x + size, y + size])
        return image, _target(boxes, [1] * len(boxes))


def test_background_windows_avoid_every_object() -> None:
    """Every window lies inside the image and overlaps each object (difficult ones too) by IoU < background_iou,
    checked with torchvision's box_iou in float64."""
    import torchvision

    boxes = np.array([[10, 10, 30, 30], [25, 5, 60, 40], [0, 50, 20, 64]], np.float64)
    config = PretrainConfig(background_iou=0.2)
    windows = background_boxes(boxes, (64, 80), 50, config, np.random.default_rng(0))
    assert 10 <= len(windows) <= 50
    assert (windows[:, :2] >= 0).all() and (windows[:, 2] <= 80).all() and (windows[:, 3] <= 64).all()
    iou = torchvision.ops.box_iou(torch.from_numpy(windows), torch.from_numpy(boxes))
    assert float(iou.max()) < 0.2


def test_one_class_set_learns_with_background_and_reports_heldout_accuracy() -> None:
    """One class alone is a degenerate task (warned about); with background crops (the default for one class)
    the held-out crops, from images no step drew, are classified well above chance."""
    import warnings

    dataset = _RedSquares(30)
    drawn: set[int] = set()
    steps_done = []

    class Recording(_RedSquares):
        def __getitem__(self, index: int):
            if len(steps_done) < 40:
                drawn.add(index)
            return dataset[index]

    torch.manual_seed(0)
    config = PretrainConfig(iterations=40, images_per_batch=8, crop_size=32, optimizer="adamw", lr=0.002,
                            warmup_iterations=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither degenerate nor at chance: no warning at all
        result = pretrain_backbone(tiny(width=8), Recording(30), config, seed=0, on_step=steps_done.append)
    training, heldout = heldout_split(30, config, 0)
    assert len(heldout) == 3 and set(training) | set(heldout) == set(range(30)) and not set(training) & set(heldout)
    assert drawn <= set(training.tolist())  # the steps never saw a held-out image
    assert result["heldout_crops"] >= 6
    assert result["heldout_chance"] == pytest.approx(0.5)  # one background crop per object crop
    assert result["heldout_accuracy"] >= 0.8 > result["heldout_chance"]

    with pytest.warns(UserWarning, match="one class and no background"):
        pretrain_backbone(tiny(width=8), dataset, override(config, {"iterations": 1, "background_ratio": 0.0}))
