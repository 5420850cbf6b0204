"""Selective search: features, grouping bookkeeping and ranking against slow references, and the public API."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proposals.segmentation import felzenszwalb
from proposals.selective_search import (
    COLOR_BINS,
    SelectiveSearch,
    SelectiveSearchConfig,
    color_codes,
    convert_color,
    hierarchical_grouping,
    initial_regions,
    selective_search,
    selective_search_batch,
    texture_codes,
)

ALL_BOXES = dict(max_boxes=None, min_box_size=0.0, resize_max_side=None)


def noisy_blocks(rng: np.random.Generator, h: int, w: int, count: int = 5, noise: float = 10.0) -> np.ndarray:
    img = np.full((h, w, 3), 128.0)
    for _ in range(count):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        img[y : y + rng.integers(3, h // 2 + 4), x : x + rng.integers(3, w // 2 + 4)] = rng.integers(0, 256, 3)
    return np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)


def iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    lt = np.maximum(boxes[:, :2], box[:2])
    rb = np.minimum(boxes[:, 2:], box[2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    return inter / ((boxes[:, 2:] - boxes[:, :2]).prod(1) + (box[2:] - box[:2]).prod() - inter)


# --------------------------------------------------------------------------------------------- per-pixel features


def test_convert_color_hand_values():
    image = np.array([[[51, 102, 102], [0, 0, 0], [255, 0, 0], [0, 255, 0]]], dtype=np.uint8)
    rgi = convert_color(image, "rgi")
    np.testing.assert_array_equal(rgi[0, 0], [51, 102, 85])  # r = 255*51/255, g = 255*102/255, I = 255/3
    np.testing.assert_array_equal(rgi[0, 1], [0, 0, 0])
    hsv = convert_color(image, "hsv")
    np.testing.assert_array_equal(hsv[0, 2], [0, 255, 255])  # red: hue 0
    np.testing.assert_array_equal(hsv[0, 3], [85, 255, 255])  # green: 120 degrees = 85/255 of the circle
    np.testing.assert_array_equal(convert_color(image, "h")[..., 0], hsv[..., 0])
    np.testing.assert_array_equal(convert_color(image, "i")[0, :, 0], [85, 0, 85, 85])
    assert convert_color(image, "lab").shape == (1, 4, 3) and convert_color(image, "i").shape == (1, 4, 1)


def test_color_codes_bins():
    converted = np.array([[[0, 10, 11], [255, 128, 254]]], dtype=np.uint8)
    expected = [[0, 25 + 0, 50 + 1], [24, 25 + 12, 50 + 24]]  # floor(v * 25 / 256) + 25 * channel
    np.testing.assert_array_equal(color_codes(converted), expected)


def reference_texture_codes(converted: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian derivatives by explicit float64 correlation with replicated borders, then 8 half-wave responses."""
    h, w, c = converted.shape
    radius = math.ceil(3 * sigma)
    offsets = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    g /= g.sum()
    dg = offsets * g / (offsets**2 * g).sum()  # unit response to a ramp
    ys, xs = np.arange(h), np.arange(w)
    codes = np.zeros((h * w, c, 8), dtype=np.int64)
    for ch in range(c):
        img = converted[:, :, ch].astype(np.float64)
        gx, gy = np.zeros((h, w)), np.zeros((h, w))
        for s, gs, dgs in zip(offsets, g, dg):
            for t, gt, dgt in zip(offsets, g, dg):
                shifted = img[np.clip(ys + s, 0, h - 1)][:, np.clip(xs + t, 0, w - 1)]
                gx += gs * dgt * shifted
                gy += dgs * gt * shifted
        d = np.stack([gx, (gx + gy) / math.sqrt(2), gy, (gy - gx) / math.sqrt(2)], axis=-1).reshape(-1, 4)
        responses = np.concatenate([np.maximum(d, 0), np.maximum(-d, 0)], axis=1)  # (H*W, 8)
        bins = np.minimum(np.floor(responses / responses.max() * 10), 9).astype(np.int64)
        codes[:, ch] = bins + (ch * 8 + np.arange(8)) * 10
    return codes.reshape(h * w, c * 8)


def test_texture_codes_match_reference(rng):
    converted = convert_color(noisy_blocks(rng, 30, 40), "lab")
    codes = texture_codes(converted).astype(np.int64)
    expected = reference_texture_codes(converted)
    assert codes.shape == expected.shape == (30 * 40, 24)
    assert np.abs(codes - expected).max() <= 1  # float32 vs float64 only flips values on a bin edge
    assert (codes != expected).mean() < 0.005
    # A vertical step brighter on the right: positive x-derivative (orientation 0), none in the negative one (4).
    step = np.zeros((9, 12, 1), dtype=np.uint8)
    step[:, 6:] = 200
    by_orientation = texture_codes(step).reshape(9, 12, 8) % 10
    assert by_orientation[4, 5:7, 0].min() >= 8 and by_orientation[..., 4].max() == 0


# --------------------------------------------------------------------------------------------- grouping


def test_grouping_hand_computed():
    """Stripes 1, 2 and 3 pixels wide (sizes 4, 8, 12 of 24) with similarity C + S + F, values worked out by hand."""
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[:, 1:3] = (200, 0, 0)
    image[:, 3:] = (200, 0, 250)
    labels = np.array([[0, 1, 1, 2, 2, 2]] * 4, dtype=np.int32)
    regions = initial_regions(labels, color_codes(image))
    np.testing.assert_array_equal(regions.pairs, [[0, 1], [1, 2]])
    np.testing.assert_array_equal(regions.sizes, [4, 8, 12])
    result = hierarchical_grouping(regions, "CSF", labels.shape)
    # C(0,1) = 2/3 (G and B agree), S = 1 - 12/24, F = 1; C(1,2) = 2/3, S = 1 - 20/24, F = 1 -> (0,1) first.
    # Then C(3,2) = min(2/9, 1/3) on red bin 19 + 1/3 on green bin 0 = 5/9, S = 0, F = 1.
    assert [set(m) for m in result.merges.tolist()] == [{0, 1}, {2, 3}]
    np.testing.assert_allclose(result.similarity, [13 / 6, 14 / 9], rtol=1e-6)
    merged = np.zeros(3 * COLOR_BINS)
    merged[[0, 19, COLOR_BINS, 2 * COLOR_BINS]] = [1 / 9, 2 / 9, 1 / 3, 1 / 3]
    np.testing.assert_allclose(result.color[3], merged, atol=1e-7)
    np.testing.assert_array_equal(result.boxes, [[0, 0, 1, 4], [1, 0, 3, 4], [3, 0, 6, 4], [0, 0, 3, 4], [0, 0, 6, 4]])


def dilate8(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def pixel_histogram(codes: np.ndarray, mask: np.ndarray, dims: int) -> np.ndarray:
    """A region's L1-normalised histogram counted from its pixels, float64."""
    hist = np.zeros(dims)
    for row in codes[mask.ravel()]:
        for code in row:
            hist[code] += 1
    return hist / hist.sum()


@pytest.mark.parametrize("similarities", ["CTSF", "TSF", "CF", "S"])
def test_grouping_matches_pixel_reference(similarities):
    """Every merge joins the most similar adjacent pair (similarities recomputed from the regions' pixels), and every
    region's histograms and box equal those of its pixels."""
    rng = np.random.default_rng(3)
    converted = convert_color(noisy_blocks(rng, 24, 28, count=8, noise=20.0), "hsv")
    labels = felzenszwalb(converted, 30.0, 6)
    colors, textures = color_codes(converted), texture_codes(converted)
    regions = initial_regions(labels, colors, textures)
    result = hierarchical_grouping(regions, similarities, labels.shape)
    r, area = len(regions.sizes), labels.size
    assert r >= 10 and result.merges.shape == (r - 1, 2) and len(result.boxes) == 2 * r - 1

    masks = [labels == i for i in range(r)]
    hists: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def histograms(i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in hists:
            hists[i] = (pixel_histogram(colors, masks[i], 75), pixel_histogram(textures, masks[i], 240))
        return hists[i]

    def similarity(i: int, j: int) -> float:
        union = masks[i] | masks[j]
        ys, xs = np.nonzero(union)
        box_area = (ys.max() + 1 - ys.min()) * (xs.max() + 1 - xs.min())
        terms = {
            "C": np.minimum(histograms(i)[0], histograms(j)[0]).sum(),
            "T": np.minimum(histograms(i)[1], histograms(j)[1]).sum(),
            "S": 1 - union.sum() / area,
            "F": 1 - (box_area - union.sum()) / area,
        }
        return sum(terms[c] for c in similarities)

    alive = set(range(r))
    for m, (i, j) in enumerate(result.merges.tolist()):
        candidates = {
            (a, b): similarity(a, b) for a in alive for b in alive if a < b and (dilate8(masks[a]) & masks[b]).any()
        }
        pair = (min(i, j), max(i, j))
        assert pair in candidates, f"merge {m} joins non-adjacent or dead regions {pair}"
        assert candidates[pair] == pytest.approx(max(candidates.values()), abs=1e-5)
        assert result.similarity[m] == pytest.approx(candidates[pair], abs=1e-5)
        masks.append(masks[i] | masks[j])
        alive = (alive - {i, j}) | {r + m}
    assert alive == {2 * r - 2}
    for t, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(result.boxes[t], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(result.color[t], histograms(t)[0], atol=2e-6)
        np.testing.assert_allclose(result.texture[t], histograms(t)[1], atol=2e-6)


def test_adjacency_is_8_connected():
    labels = np.kron(np.array([[0, 1], [2, 3]], dtype=np.int32), np.ones((3, 4), dtype=np.int32))
    # 0-3 and 1-2 touch only diagonally: 8-connectivity makes them neighbours too.
    np.testing.assert_array_equal(initial_regions(labels).pairs, [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


# --------------------------------------------------------------------------------------------- the pipeline


def test_ranking_matches_reference(rng):
    """Single strategy, everything kept: boxes ordered by (position from the top) * U(0, 1), duplicates dropped."""
    image = noisy_blocks(rng, 50, 60)
    config = SelectiveSearchConfig(mode="single", seed=5, **ALL_BOXES)
    converted = convert_color(image, "hsv")
    labels = felzenszwalb(converted, 100.0, 100)
    boxes = hierarchical_grouping(
        initial_regions(labels, color_codes(converted), texture_codes(converted)), "CTSF", labels.shape
    ).boxes
    values = np.arange(len(boxes), 0, -1) * np.random.default_rng([5, 0]).random(len(boxes))
    expected, seen = [], set()
    for index in sorted(range(len(boxes)), key=lambda n: (values[n], n)):
        if tuple(boxes[index]) not in seen:
            seen.add(tuple(boxes[index]))
            expected.append(boxes[index])
    np.testing.assert_array_equal(selective_search(image, config).numpy(), np.array(expected, dtype=np.float32))


def test_output_format_and_limits(rng):
    image = noisy_blocks(rng, 90, 130)
    config = SelectiveSearchConfig(max_boxes=150, min_box_size=8.0)
    boxes = selective_search(image, config)
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 0 < len(boxes) <= 150
    b = boxes.numpy()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 130).all() and (b[:, 3] <= 90).all()
    assert (b[:, 2] - b[:, 0] >= 8).all() and (b[:, 3] - b[:, 1] >= 8).all()
    assert len(np.unique(b, axis=0)) == len(b)
    assert len(selective_search(image, replace(config, max_boxes=None))) > 150


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 48), w=st.integers(1, 48), k=st.sampled_from([5.0, 30.0, 200.0]))
def test_boxes_stay_inside_any_image(seed, h, w, k):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if seed % 2 else noisy_blocks(rng, h + 2, w + 2)[:h, :w]
    config = SelectiveSearchConfig(mode="single", ks=(k,), resize_max_side=32, max_boxes=None, min_box_size=0.0)
    boxes = selective_search(image, config).numpy()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert [0, 0, w, h] in boxes.tolist()  # the top of every hierarchy is the whole image


def test_deterministic_per_seed_and_seed_only_reorders(rng):
    image = noisy_blocks(rng, 60, 80)
    config = SelectiveSearchConfig(**ALL_BOXES)
    first, again = selective_search(image, config), selective_search(image, config)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    other = selective_search(image, replace(config, seed=1))
    assert not torch.equal(first, other)
    assert {tuple(b) for b in first.tolist()} == {tuple(b) for b in other.tolist()}


@pytest.mark.parametrize("shape, rect", [((160, 200), (50, 30, 140, 90)), ((700, 900), (250, 150, 610, 420))])
def test_finds_a_flat_rectangle_on_noise(shape, rect):
    """A uniformly coloured rectangle on a noisy background is proposed (IoU > 0.9), also through the resize path."""
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(120, 30, (*shape, 3)), 0, 255).astype(np.uint8)
    x1, y1, x2, y2 = rect
    image[y1:y2, x1:x2] = (220, 40, 40)
    boxes = selective_search(image).numpy()
    assert boxes[:, 2].max() <= shape[1] and boxes[:, 3].max() <= shape[0]
    assert iou(boxes, np.array(rect, dtype=np.float32)).max() > 0.9


def test_modes_and_config_validation():
    assert len(SelectiveSearchConfig(mode="single").strategy_parts()[1]) == 1
    spaces, ks, sims = SelectiveSearchConfig(mode="fast").strategy_parts()
    assert len(spaces) * len(ks) * len(sims) == 8
    spaces, ks, sims = SelectiveSearchConfig(mode="quality").strategy_parts()
    assert len(spaces) * len(ks) * len(sims) == 80
    assert SelectiveSearchConfig(color_spaces=("RGB",), ks=(20,)).strategy_parts()[:2] == (("rgb",), (20.0,))
    for bad in [
        dict(mode="best"),
        dict(color_spaces=("xyz",)),
        dict(similarities=("CX",)),
        dict(ks=(0,)),
        dict(max_boxes=0),
        dict(resize_max_side=0),
    ]:
        with pytest.raises(ValueError):
            SelectiveSearchConfig(**bad)
    with pytest.raises(ValueError):
        selective_search(np.zeros((10, 10), dtype=np.uint8))


def test_tiny_and_flat_images():
    flat = selective_search(np.full((20, 30, 3), 77, dtype=np.uint8), SelectiveSearchConfig(min_box_size=0.0))
    np.testing.assert_array_equal(flat.numpy(), [[0, 0, 30, 20]])
    single_pixel = selective_search(np.zeros((1, 1, 3), dtype=np.uint8), SelectiveSearchConfig(min_box_size=0.0))
    np.testing.assert_array_equal(single_pixel.numpy(), [[0, 0, 1, 1]])


def test_generator_interface_accepts_arrays_and_tensors(rng):
    images = [noisy_blocks(rng, 40, 50), noisy_blocks(rng, 30, 45)]
    search = SelectiveSearch(SelectiveSearchConfig(mode="single"), workers=0)
    from_arrays = search(images)
    from_tensors = search([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    assert len(from_arrays) == 2
    for a, b in zip(from_arrays, from_tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(search(images[0])[0], from_arrays[0], rtol=0, atol=0)


@pytest.mark.slow  # starting worker processes takes seconds
def test_batch_with_workers_equals_sequential(rng):
    images = [noisy_blocks(rng, 40 + 5 * i, 60) for i in range(4)]
    config = SelectiveSearchConfig(mode="single")
    sequential = [selective_search(im, config) for im in images]
    for workers in (0, 2):
        batched = selective_search_batch(images, config, workers=workers)
        assert len(batched) == len(images)
        for a, b in zip(batched, sequential):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
