"""Augmentation: boxes follow the pixels (hand-computed flips and scales, and a drawn rectangle's extent)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detect.data.augment import Augment, AugmentConfig, hflip, rescale
from detect.errors import ConfigError


def _box_image(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A black image with the pixels ``[x1, x2) x [y1, y2)`` white."""
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def _extent(image: np.ndarray) -> tuple[int, int, int, int]:
    """The tight xyxy box of the bright pixels (no +1 on widths)."""
    mask = image[..., 0] >= 128
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def test_hflip_hand_computed() -> None:
    image = _box_image(20, 30, (2, 3, 10, 7))
    target = {"boxes": np.array([[2, 3, 10, 7]], np.float32), "labels": np.array([4]), "image_id": 7}
    flipped, out = hflip(image, target)
    # W = 30: x1' = 30 - 10 = 20, x2' = 30 - 2 = 28
    np.testing.assert_array_equal(out["boxes"], [[20, 3, 28, 7]])
    assert _extent(flipped) == (20, 3, 28, 7)
    assert out["labels"].tolist() == [4] and out["image_id"] == 7
    assert out["boxes"].dtype == np.float32


def test_rescale_hand_computed() -> None:
    image = _box_image(20, 40, (4, 2, 12, 10))
    target = {"boxes": np.array([[4, 2, 12, 10]], np.float32), "area": np.array([64.0], np.float32)}
    scaled, out = rescale(image, target, 1.5)
    assert scaled.shape == (30, 60, 3)
    np.testing.assert_allclose(out["boxes"], [[6, 3, 18, 15]])
    np.testing.assert_allclose(out["area"], [144.0])
    assert _extent(scaled) == (6, 3, 18, 15)


def test_rescale_uses_realised_factors() -> None:
    """21 * 0.5 rounds to 10 (banker's) or 11: the boxes use new_side / old_side, never the nominal 0.5."""
    image = np.zeros((21, 33, 3), np.uint8)
    scaled, out = rescale(image, {"boxes": np.array([[0, 0, 33, 21]], np.float32)}, 0.5)
    h, w = scaled.shape[:2]
    np.testing.assert_allclose(out["boxes"], [[0, 0, w, h]], rtol=1e-6)


@given(
    x1=st.integers(0, 20),
    y1=st.integers(0, 10),
    w=st.integers(4, 20),
    h=st.integers(4, 10),
    factor=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    flip=st.booleans(),
)
def test_boxes_match_transformed_pixels(x1: int, y1: int, w: int, h: int, factor: float, flip: bool) -> None:
    box = (x1, y1, x1 + w, y1 + h)
    image = _box_image(24, 48, box)
    target = {"boxes": np.array([box], np.float32)}
    if flip:
        image, target = hflip(image, target)
    image, target = rescale(image, target, factor)
    expected = np.array(_extent(image), np.float64)
    np.testing.assert_allclose(target["boxes"][0], expected, atol=1.0)  # bilinear edges: within a pixel


def test_augment_is_deterministic_per_seed() -> None:
    augment = Augment(AugmentConfig(flip_prob=0.5, scale_range=(0.5, 1.5)))
    image = _box_image(16, 16, (1, 2, 5, 9))
    target = {"boxes": np.array([[1, 2, 5, 9]], np.float32)}
    runs = [
        [augment(image, target, rng) for _ in range(5)] for rng in (np.random.default_rng(3), np.random.default_rng(3))
    ]
    for (a_img, a_t), (b_img, b_t) in zip(*runs):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_t["boxes"], b_t["boxes"])
    shapes = {img.shape for img, _ in runs[0]}
    assert len(shapes) > 1  # the jitter really varies the size


def test_augment_flip_only_matches_hand_flip() -> None:
    augment = Augment(AugmentConfig(flip_prob=1.0))
    image = _box_image(10, 10, (0, 0, 3, 4))
    out_image, out = augment(image, {"boxes": np.array([[0, 0, 3, 4]], np.float32)}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["boxes"], [[7, 0, 10, 4]])
    np.testing.assert_array_equal(out_image, image[:, ::-1])


@pytest.mark.parametrize("kwargs", [{"flip_prob": 1.5}, {"scale_range": (0.0, 1.0)}, {"scale_range": (2.0, 1.0)}])
def test_invalid_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AugmentConfig(**kwargs)


def test_proposals_move_with_the_boxes() -> None:
    target = {"boxes": np.array([[1, 1, 4, 4]], np.float32), "proposals": np.array([[0, 2, 5, 6]], np.float32)}
    _, flipped = hflip(np.zeros((8, 10, 3), np.uint8), target)
    np.testing.assert_array_equal(flipped["proposals"], [[5, 2, 10, 6]])
    _, scaled = rescale(np.zeros((8, 10, 3), np.uint8), target, 2.0)
    np.testing.assert_array_equal(scaled["proposals"], [[0, 4, 10, 12]])
