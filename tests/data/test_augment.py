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


# --- transforms.v2: crop, photometric jitter, multi-scale (issue 13) ---------------------------------------------


def test_crop_keeps_objects_whose_centre_is_inside_and_clips_them() -> None:
    """Window (top 5, left 10, 20 x 30): box A (centre inside) is clipped, box B (centre outside) is dropped with
    its label, difficult flag and area; pixels and boxes agree (hand-computed)."""
    from detect.data.augment import crop

    image = _box_image(40, 60, (5, 8, 20, 16))  # box A, partly left of the window
    target = {
        "boxes": np.array([[5, 8, 20, 16], [45, 30, 58, 38]], np.float32),
        "labels": np.array([1, 2]),
        "difficult": np.array([False, True]),
        "area": np.array([120.0, 104.0], np.float32),
        "proposals": np.array([[0, 0, 8, 4], [12, 6, 50, 40]], np.float32),
        "image_id": 3,
    }
    out_image, out = crop(image, target, (5, 10, 20, 30))
    assert out_image.shape == (20, 30, 3)
    np.testing.assert_array_equal(out["boxes"], [[0, 3, 10, 11]])  # (5-10, 8-5, 20-10, 16-5), x1 clipped to 0
    assert _extent(out_image) == (0, 3, 10, 11)
    assert out["labels"].tolist() == [1] and out["difficult"].tolist() == [False] and out["image_id"] == 3
    np.testing.assert_allclose(out["area"], [120.0 * (10 * 8) / (15 * 8)])  # the visible share of the box
    np.testing.assert_array_equal(out["proposals"], [[2, 1, 30, 20]])  # the first one fell outside: dropped


@given(seed=st.integers(0, 10_000))
def test_crop_window_honours_the_iou_constraint(seed: int) -> None:
    """Any window :func:`crop_window` returns has the configured scale and aspect bounds, and some object whose
    centre lies in it overlaps it by at least one of the allowed minimum IoUs (float64 reference)."""
    from detect.data.augment import crop_window

    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 60, (3, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 40, (3, 2))], 1).astype(np.float32)
    config = AugmentConfig(crop_prob=1.0, crop_min_ious=(0.5,), crop_scale=(0.3, 1.0), crop_aspect=(0.5, 2.0))
    window = crop_window(boxes, (100, 120), config, np.random.default_rng(seed))
    if window is None:
        return
    top, left, height, width = window
    assert 0 <= top and top + height <= 100 and 0 <= left and left + width <= 120
    assert 0.3 * 120 - 1 <= width and 0.3 * 100 - 1 <= height and 0.5 <= width / height <= 2.0
    b = boxes.astype(np.float64)
    centre = (b[:, :2] + b[:, 2:]) / 2
    x, y = centre[:, 0], centre[:, 1]
    inside = (x > left) & (x < left + width) & (y > top) & (y < top + height)
    ix = np.clip(np.minimum(b[:, 2], left + width) - np.maximum(b[:, 0], left), 0, None)
    iy = np.clip(np.minimum(b[:, 3], top + height) - np.maximum(b[:, 1], top), 0, None)
    iou = ix * iy / ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + width * height - ix * iy)
    assert inside.any() and iou[inside].max() >= 0.5 - 1e-6


def test_brightness_jitter_scales_pixels_and_leaves_boxes() -> None:
    """Brightness alone multiplies every channel by one factor in [0.5, 1.5] (uint8, within rounding); the boxes
    do not move; the same generator seed gives the same image."""
    image = np.random.default_rng(0).integers(0, 160, (12, 16, 3)).astype(np.uint8)
    target = {"boxes": np.array([[1, 2, 9, 10]], np.float32)}
    augment = Augment(AugmentConfig(flip_prob=0.0, brightness=0.5))
    out, out_target = augment(image, target, np.random.default_rng(7))
    factor = (out.astype(np.float64) / np.maximum(image, 1)).ravel()[image.ravel() > 40]
    assert 0.5 <= np.median(factor) <= 1.5 and np.ptp(factor) < 0.1  # one factor for all pixels
    np.testing.assert_array_equal(out_target["boxes"], target["boxes"])
    np.testing.assert_array_equal(out, augment(image, target, np.random.default_rng(7))[0])


def test_photometric_jitter_is_deterministic_and_varies() -> None:
    image = np.random.default_rng(1).integers(0, 255, (10, 10, 3)).astype(np.uint8)
    augment = Augment(AugmentConfig(flip_prob=0.0, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    target = {"boxes": np.zeros((0, 4), np.float32)}
    a = [augment(image, target, np.random.default_rng(s))[0] for s in (1, 1, 2)]
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], a[2]) and not np.array_equal(a[0], image)


def test_short_side_is_drawn_from_the_list_per_generator() -> None:
    augment = Augment(AugmentConfig(short_sides=(128, 160, 192)))
    sides = [augment.short_side(np.random.default_rng([0, i])) for i in range(40)]
    assert set(sides) == {128, 160, 192}
    assert sides == [augment.short_side(np.random.default_rng([0, i])) for i in range(40)]
    assert Augment(AugmentConfig()).short_side(np.random.default_rng(0)) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"short_sides": (0,)}, {"brightness": -1}, {"hue": 0.6}, {"crop_prob": 2}, {"crop_scale": (0.0, 1.0)},
     {"crop_min_ious": ()}, {"crop_trials": 0}],
)
def test_invalid_new_augment_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AugmentConfig(**kwargs)
