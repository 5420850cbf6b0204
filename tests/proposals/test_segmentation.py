"""Felzenszwalb-Huttenlocher segmentation against a slow float64 reference and its structural invariants."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proposals.segmentation import felzenszwalb, felzenszwalb_multi, smooth

# Edge directions (dy, dx) in the documented tie-break order: right, down, down-right, up-right.
DIRECTIONS = ((0, 1), (1, 0), (1, 1), (-1, 1))


def reference_smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian (radius ceil(4 sigma), normalised) with replicated borders, float64 loops."""
    img = np.asarray(image, dtype=np.float64)
    img = img[:, :, None] if img.ndim == 2 else img
    radius = math.ceil(4 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w, _ = img.shape
    rows = np.zeros_like(img)
    for x in range(w):
        for t, off in zip(taps, range(-radius, radius + 1)):
            rows[:, x] += t * img[:, min(max(x + off, 0), w - 1)]
    out = np.zeros_like(img)
    for y in range(h):
        for t, off in zip(taps, range(-radius, radius + 1)):
            out[y] += t * rows[min(max(y + off, 0), h - 1)]
    return out


def reference_felzenszwalb(smoothed: np.ndarray, k: float, min_size: int) -> np.ndarray:
    """The F&H algorithm written plainly: explicit component member lists, float64 weights, a Python sort."""
    img = np.asarray(smoothed, dtype=np.float64)
    h, w, _ = img.shape
    edges = []
    for d, (dy, dx) in enumerate(DIRECTIONS):
        for y in range(h):
            for x in range(w):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < h and 0 <= x2 < w:
                    weight = math.sqrt(float(((img[y, x] - img[y2, x2]) ** 2).sum()))
                    edges.append((weight, d, y, x, y * w + x, y2 * w + x2))
    edges.sort()
    label = list(range(h * w))
    members = {i: [i] for i in range(h * w)}
    internal = {i: 0.0 for i in range(h * w)}  # largest edge weight inside the component

    def join(a: int, b: int, weight: float) -> None:
        for m in members[b]:
            label[m] = a
        members[a] += members.pop(b)
        internal[a] = weight

    for weight, *_, p, q in edges:
        a, b = label[p], label[q]
        if a != b and weight <= internal[a] + k / len(members[a]) and weight <= internal[b] + k / len(members[b]):
            join(a, b, weight)
    for weight, *_, p, q in edges:
        a, b = label[p], label[q]
        if a != b and (len(members[a]) < min_size or len(members[b]) < min_size):
            join(a, b, weight)
    return canonical(np.array(label).reshape(h, w))


def canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber a partition 0..R-1 by first pixel in row-major order."""
    _, first, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].reshape(labels.shape)


def blocks(rng: np.random.Generator, h: int, w: int, channels: int = 3, noise: float = 12.0) -> np.ndarray:
    """A few flat rectangles plus Gaussian noise, uint8."""
    img = np.zeros((h, w, channels))
    for _ in range(4):
        y, x = rng.integers(0, h), rng.integers(0, w)
        img[y : y + rng.integers(1, h + 1), x : x + rng.integers(1, w + 1)] = rng.integers(0, 256, channels)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def test_smooth_matches_separable_gaussian(rng):
    image = rng.integers(0, 256, (13, 9, 3)).astype(np.uint8)
    np.testing.assert_allclose(smooth(image, 0.8), reference_smooth(image, 0.8), atol=1e-3)
    np.testing.assert_array_equal(smooth(image, 0.0), image.astype(np.float32))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k, min_size", [(20.0, 1), (100.0, 5), (300.0, 12)])
def test_matches_reference_on_tiny_images(seed, k, min_size):
    rng = np.random.default_rng(seed)
    image = blocks(rng, 12, 10) if seed % 2 else rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    expected = reference_felzenszwalb(reference_smooth(image, 0.8), k, min_size)
    np.testing.assert_array_equal(felzenszwalb(image, k, min_size), expected)


def test_matches_reference_with_exact_ties():
    """Unsmoothed two-level images have many equal weights: the tie-break order must match the documented one."""
    rng = np.random.default_rng(7)
    image = (rng.random((11, 13, 1)) < 0.35).astype(np.uint8) * 60
    for k, min_size in [(10.0, 1), (50.0, 4), (200.0, 9)]:
        expected = reference_felzenszwalb(image.astype(np.float64), k, min_size)
        np.testing.assert_array_equal(felzenszwalb(image, k, min_size, sigma=0.0), expected)


def test_multi_equals_separate_runs(rng):
    image = blocks(rng, 40, 50)
    many = felzenszwalb_multi(image, [50.0, 100.0, 300.0], [50, 30, 300])
    for labels, (k, m) in zip(many, [(50.0, 50), (100.0, 30), (300.0, 300)]):
        np.testing.assert_array_equal(labels, felzenszwalb(image, k, m))


@given(
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    channels=st.sampled_from([1, 3]),
    k=st.floats(1.0, 500.0),
    min_size=st.integers(1, 60),
)
def test_invariants(seed, h, w, channels, k, min_size):
    rng = np.random.default_rng(seed)
    image = blocks(rng, h, w, channels)
    labels = felzenszwalb(image[:, :, 0] if channels == 1 else image, k, min_size)
    assert labels.shape == (h, w) and labels.dtype == np.int32
    count = int(labels.max()) + 1
    np.testing.assert_array_equal(np.unique(labels), np.arange(count))  # every label 0..R-1 is used
    np.testing.assert_array_equal(labels, canonical(labels))  # numbered by first pixel
    sizes = np.bincount(labels.ravel())
    if h * w >= min_size:
        assert sizes.min() >= min_size
    else:
        assert count == 1
    for r in range(count):
        pieces, _ = cv2.connectedComponents((labels == r).astype(np.uint8), connectivity=8)
        assert pieces == 2, f"region {r} is not 8-connected"  # background + one piece


def test_larger_k_gives_fewer_regions(rng):
    image = blocks(rng, 60, 80, noise=20.0)
    counts = [int(felzenszwalb(image, k, 1).max()) + 1 for k in (10.0, 100.0, 1000.0)]
    assert counts[0] > counts[1] > counts[2]


def test_separates_flat_regions_and_defaults_min_size_to_k():
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    image[:, 20:] = (200, 30, 90)
    labels = felzenszwalb(image, 100.0)
    np.testing.assert_array_equal(labels[:, :20], 0)
    np.testing.assert_array_equal(labels[:, 20:], 1)
    tiny = np.zeros((5, 5, 3), dtype=np.uint8)
    tiny[0, 0] = 255  # a 1-pixel region, far below min_size = k = 100
    assert felzenszwalb(tiny, 100.0).max() == 0
