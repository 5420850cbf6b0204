"""Selective search (Uijlings, van de Sande, Gevers & Smeulders, IJCV 2013): class-agnostic object proposals.

One *strategy* is a colour space, a Felzenszwalb-Huttenlocher scale ``k`` and a set of similarities. For each, the
image is over-segmented (:mod:`proposals.segmentation`, ``min_size = k`` as in the authors' code) and the regions are
grouped bottom-up: the most similar pair of adjacent regions merges, its neighbours' similarities to the new region
are computed, and so on until one region is left. Every region ever formed gives a box. Strategies are diversified
over colour spaces, ``k`` and similarity sets, their boxes pooled and ranked.

Decisions (the paper's unless noted):

- Colour spaces, all as 0..255 channels: ``rgb``, ``hsv`` (OpenCV's full-range hue), ``lab`` (OpenCV's 8-bit Lab),
  ``rgi`` (chromaticities ``r = R/(R+G+B)``, ``g`` scaled by 255, and intensity ``I = (R+G+B)/3``), ``h`` (hue alone)
  and ``i`` (intensity alone). Hue is used as a linear channel (its wrap-around at red is ignored).
- Region adjacency is 8-connected, the same neighbourhood as the segmentation graph (F&H regions are connected in
  that sense, not necessarily 4-connected).
- Similarities ``C`` colour (25 bins per channel over 0..255, L1-normalised over all channels, histogram
  intersection), ``T`` texture (Gaussian derivatives, sigma 1, in 8 orientations per channel: the positive and negative
  parts of the derivative along 0, 45, 90 and 135 degrees; each quantised into 10 bins over ``[0, m]``, ``m`` the
  channel's largest response in the image; L1-normalised; intersection), ``S`` size
  ``1 - (|r_i| + |r_j|) / |im|`` and ``F`` fill ``1 - (|BB_ij| - |r_i| - |r_j|) / |im|``. A strategy sums its set's
  terms with unit weights. A merged region's histograms are the size-weighted average of its parts' (exactly the
  histograms of the union's pixels, since every pixel adds the same mass), never recomputed from pixels.
- Grouping keeps the candidate pairs in a max-heap with lazy deletion (pairs touching a merged region are dropped
  when popped) and per-region adjacency lists; both run in numba.
- Ranking: a strategy's regions are numbered by position in the hierarchy from the top (the whole image is 1, the
  region merged just before it 2, ..., the initial regions last) and each box's value is that position times
  ``U(0, 1)``; lower is better. All strategies' boxes are pooled, sorted by value, exact duplicates dropped (keeping
  the best-ranked copy), boxes narrower or lower than ``min_box_size`` dropped, and the first ``max_boxes`` kept.
  The uniform draws come from a generator seeded by ``(seed, strategy index)``: same seed, same boxes.
- Scale: the paper works on PASCAL images (about 500 pixels on the long side) and ``k`` is a scale in pixels, so an
  image whose long side exceeds ``resize_max_side`` (default 500) is shrunk (area interpolation) to that size first,
  and boxes are scaled back to the original pixels afterwards. ``None`` disables it.
- Boxes are float32 ``xyxy`` with ``x2 = last column + 1``, inside the image.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import cv2
import numba
import numpy as np
import torch
from torch import Tensor

from proposals.segmentation import NEIGHBOUR_SHIFTS, felzenszwalb_multi

__all__ = [
    "COLOR_SPACES",
    "SIMILARITY_SETS",
    "MODES",
    "SelectiveSearchConfig",
    "Regions",
    "Hierarchy",
    "convert_color",
    "color_codes",
    "texture_codes",
    "initial_regions",
    "hierarchical_grouping",
    "selective_search",
    "selective_search_batch",
    "SelectiveSearch",
]

COLOR_SPACES = ("rgb", "hsv", "lab", "rgi", "h", "i")
SIMILARITY_SETS = ("CTSF", "TSF", "F", "S")
COLOR_BINS = 25
TEXTURE_BINS = 10
TEXTURE_ORIENTATIONS = 8
TEXTURE_SIGMA = 1.0

# mode -> (colour spaces, ks, similarity sets), Table 4 / section 5.2 of the paper.
MODES: dict[str, tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...]]] = {
    "single": (("hsv",), (100.0,), ("CTSF",)),
    "fast": (("hsv", "lab"), (50.0, 100.0), ("CTSF", "TSF")),
    "quality": (("hsv", "lab", "rgi", "h", "i"), (50.0, 100.0, 150.0, 300.0), SIMILARITY_SETS),
}


@dataclass(frozen=True)
class SelectiveSearchConfig:
    """Selective search settings. ``mode`` picks the paper's preset; the three ``None`` fields override its parts.

    ``min_size`` (F&H's smallest region) defaults to each strategy's ``k``. ``min_box_size`` drops boxes narrower or
    lower than that many original-image pixels (the authors' demo uses 20; the default 10 keeps small objects while
    freeing the budget from slivers). ``max_boxes=None`` keeps all boxes.
    """

    mode: str = "fast"
    color_spaces: tuple[str, ...] | None = None
    ks: tuple[float, ...] | None = None
    similarities: tuple[str, ...] | None = None
    sigma: float = 0.8
    min_size: int | None = None
    max_boxes: int | None = 2000
    min_box_size: float = 10.0
    seed: int = 0
    resize_max_side: int | None = 500

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        spaces, ks, sims = self.strategy_parts()
        if unknown := set(spaces) - set(COLOR_SPACES):
            raise ValueError(f"unknown colour spaces {sorted(unknown)}; choose from {COLOR_SPACES}")
        if bad := [s for s in sims if not s or set(s) - set("CTSF")]:
            raise ValueError(f"similarity sets are strings over 'CTSF', got {bad}")
        if not (spaces and ks and sims) or min(ks) <= 0:
            raise ValueError("need at least one colour space, one positive k and one similarity set")
        if min(self.sigma, self.min_box_size, self.seed) < 0 or (self.min_size is not None and self.min_size < 1):
            raise ValueError("sigma, min_box_size and seed must be >= 0, min_size >= 1")
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ValueError(f"max_boxes must be positive or None, got {self.max_boxes}")
        if self.resize_max_side is not None and self.resize_max_side < 1:
            raise ValueError(f"resize_max_side must be positive or None, got {self.resize_max_side}")

    def strategy_parts(self) -> tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...]]:
        """The effective ``(colour spaces, ks, similarity sets)``: the mode's preset with overrides applied."""
        spaces, ks, sims = MODES[self.mode]
        return (
            tuple(s.lower() for s in (spaces if self.color_spaces is None else self.color_spaces)),
            tuple(float(k) for k in (ks if self.ks is None else self.ks)),
            tuple(s.upper() for s in (sims if self.similarities is None else self.similarities)),
        )


class Regions(NamedTuple):
    """The initial regions of one segmentation, input of :func:`hierarchical_grouping`."""

    sizes: np.ndarray  # (R,) int64 pixel counts
    boxes: np.ndarray  # (R, 4) int32 xyxy, x2/y2 exclusive
    color: np.ndarray  # (R, Dc) float32 L1-normalised colour histograms (Dc = 0 when not needed)
    texture: np.ndarray  # (R, Dt) float32 L1-normalised texture histograms (Dt = 0 when not needed)
    pairs: np.ndarray  # (E, 2) int32 adjacent label pairs, i < j, unique


class Hierarchy(NamedTuple):
    """Output of :func:`hierarchical_grouping`, ``T`` regions: ``0..R-1`` initial, ``R + m`` made by merge ``m``."""

    boxes: np.ndarray  # (T, 4) int32 xyxy of every region
    merges: np.ndarray  # (T - R, 2) int32: the two regions merge m joined
    similarity: np.ndarray  # (T - R,) float64: their similarity when they merged
    color: np.ndarray  # (T, Dc) float32 colour histograms of every region
    texture: np.ndarray  # (T, Dt) float32 texture histograms of every region


# ----------------------------------------------------------------------------------------------- per-pixel features


def convert_color(image: np.ndarray, space: str) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` -> uint8 ``(H, W, C)`` in ``space`` (see the module docstring for the scalings)."""
    if space == "rgb":
        return image
    if space in ("hsv", "h"):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
        return hsv if space == "hsv" else hsv[:, :, :1]
    if space == "lab":
        return cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    total = image.astype(np.float32).sum(axis=2, keepdims=True)  # (H, W, 1)
    intensity = total / 3.0
    if space == "i":
        return np.rint(intensity).astype(np.uint8)
    chroma = 255.0 * image[:, :, :2] / np.maximum(total, 1.0)  # (H, W, 2); black pixels get r = g = 0
    return np.rint(np.concatenate([chroma, intensity], axis=2)).astype(np.uint8)


def color_codes(converted: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, C)`` -> uint16 ``(H*W, C)`` colour-histogram bin of each pixel and channel, offset by channel."""
    h, w, c = converted.shape
    bins = (converted.reshape(h * w, c).astype(np.uint16) * COLOR_BINS) >> 8  # 0..24
    return bins + (np.arange(c, dtype=np.uint16) * COLOR_BINS)


def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Sampled 1-D Gaussian (sum 1) and derivative-of-Gaussian taps, radius ``ceil(3 sigma)``.

    The derivative taps are for correlation (what ``cv2.sepFilter2D`` does) and scaled so that a unit ramp gives +1.
    """
    radius = int(math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    dg = x * g
    dg /= (dg * x).sum()
    return g.astype(np.float32), dg.astype(np.float32)


def texture_codes(converted: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, C)`` -> uint16 ``(H*W, C*8)`` texture-histogram bin per pixel, channel and orientation.

    Orientation ``o < 4`` is the positive part of the derivative along ``45 o`` degrees (from +x towards +y, i.e.
    clockwise on screen), ``o + 4`` its negative part; bins of orientation ``o`` of channel ``c`` are
    ``(c*8 + o)*10 ... +9``.
    """
    h, w, c = converted.shape
    g, dg = _gaussian_kernels(TEXTURE_SIGMA)
    codes = np.empty((h * w, c * TEXTURE_ORIENTATIONS), dtype=np.uint16)
    for ch in range(c):
        img = np.ascontiguousarray(converted[:, :, ch], dtype=np.float32)
        gx = cv2.sepFilter2D(img, cv2.CV_32F, dg, g, borderType=cv2.BORDER_REPLICATE)  # d/dx, (H, W)
        gy = cv2.sepFilter2D(img, cv2.CV_32F, g, dg, borderType=cv2.BORDER_REPLICATE)  # d/dy, (H, W)
        _orientation_codes(gx.ravel(), gy.ravel(), codes, ch)
    return codes


@numba.njit(cache=True, nogil=True)
def _orientation_codes(gx: np.ndarray, gy: np.ndarray, codes: np.ndarray, channel: int) -> None:
    """Fill ``codes[:, channel*8 : channel*8 + 8]`` from the ``(N,)`` x and y derivatives of one channel.

    Responses are quantised into 10 bins over ``[0, m]``, ``m`` the channel's largest response in any orientation.
    """
    diagonal = np.float32(np.sqrt(0.5))
    n = gx.shape[0]
    directional = np.empty((n, 4), dtype=np.float32)  # derivative along 0, 45, 90, 135 degrees
    top = np.float32(0.0)
    for p in range(n):
        x, y = gx[p], gy[p]
        directional[p, 0] = x
        directional[p, 1] = diagonal * (x + y)
        directional[p, 2] = y
        directional[p, 3] = diagonal * (y - x)
        for o in range(4):
            top = max(top, abs(directional[p, o]))
    scale = TEXTURE_BINS / top if top > 0 else 0.0
    base = channel * TEXTURE_ORIENTATIONS
    for p in range(n):
        for o in range(4):
            d = directional[p, o]
            positive = min(int(max(d, 0.0) * scale), TEXTURE_BINS - 1)
            negative = min(int(max(-d, 0.0) * scale), TEXTURE_BINS - 1)
            codes[p, base + o] = (base + o) * TEXTURE_BINS + positive
            codes[p, base + o + 4] = (base + o + 4) * TEXTURE_BINS + negative


# ----------------------------------------------------------------------------------------------- initial regions


@numba.njit(cache=True, nogil=True)
def _region_histograms(labels: np.ndarray, codes: np.ndarray, num_regions: int, dims: int) -> np.ndarray:
    """``(N,)`` labels and ``(N, M)`` bin codes -> ``(R, dims)`` float32 histograms, each row summing to 1."""
    hist = np.zeros((num_regions, dims), dtype=np.float32)
    for p in range(labels.shape[0]):
        r = labels[p]
        for m in range(codes.shape[1]):
            hist[r, codes[p, m]] += 1.0
    for r in range(num_regions):
        total = 0.0
        for d in range(dims):
            total += hist[r, d]
        for d in range(dims):
            hist[r, d] /= max(total, 1.0)
    return hist


@numba.njit(cache=True, nogil=True)
def _region_boxes(labels: np.ndarray, num_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` labels -> ``(R,)`` int64 sizes and ``(R, 4)`` int32 boxes (x2, y2 exclusive)."""
    sizes = np.zeros(num_regions, dtype=np.int64)
    boxes = np.empty((num_regions, 4), dtype=np.int32)
    boxes[:, 0] = labels.shape[1]
    boxes[:, 1] = labels.shape[0]
    boxes[:, 2] = 0
    boxes[:, 3] = 0
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            r = labels[y, x]
            sizes[r] += 1
            boxes[r, 0] = min(boxes[r, 0], x)
            boxes[r, 1] = min(boxes[r, 1], y)
            boxes[r, 2] = max(boxes[r, 2], x + 1)
            boxes[r, 3] = max(boxes[r, 3], y + 1)
    return sizes, boxes


def _adjacent_pairs(labels: np.ndarray, num_regions: int) -> np.ndarray:
    """``(H, W)`` labels -> ``(E, 2)`` int32 unique pairs ``i < j`` of 8-connected adjacent regions."""
    keys = []
    for src, dst in NEIGHBOUR_SHIFTS:
        a, b = labels[src].ravel(), labels[dst].ravel()
        differ = a != b
        a, b = a[differ].astype(np.int64), b[differ].astype(np.int64)
        keys.append(np.minimum(a, b) * num_regions + np.maximum(a, b))
    unique = np.unique(np.concatenate(keys))
    return np.stack([unique // num_regions, unique % num_regions], axis=1).astype(np.int32)


def initial_regions(
    labels: np.ndarray, color: np.ndarray | None = None, texture: np.ndarray | None = None
) -> Regions:
    """Sizes, boxes, adjacency and (when codes are given) histograms of the regions of an ``(H, W)`` label map.

    ``color`` / ``texture`` are the per-pixel codes of :func:`color_codes` / :func:`texture_codes`; a missing one
    gives an ``(R, 0)`` histogram (the similarity set does not use it).
    """
    num_regions = int(labels.max()) + 1
    flat = labels.ravel()
    sizes, boxes = _region_boxes(labels, num_regions)

    def hist(codes: np.ndarray | None, bins: int) -> np.ndarray:
        if codes is None:
            return np.zeros((num_regions, 0), dtype=np.float32)
        return _region_histograms(flat, codes, num_regions, codes.shape[1] * bins)

    return Regions(
        sizes=sizes,
        boxes=boxes,
        color=hist(color, COLOR_BINS),
        texture=hist(texture, TEXTURE_BINS),
        pairs=_adjacent_pairs(labels, num_regions),
    )


# ----------------------------------------------------------------------------------------------- grouping


@numba.njit(cache=True, nogil=True)
def _intersection(hist: np.ndarray, i: int, j: int) -> float:
    total = 0.0
    for d in range(hist.shape[1]):
        total += min(hist[i, d], hist[j, d])
    return total


@numba.njit(cache=True, nogil=True)
def _similarity(
    color: np.ndarray,
    texture: np.ndarray,
    size: np.ndarray,
    box: np.ndarray,
    i: int,
    j: int,
    weights: np.ndarray,
    image_area: float,
) -> float:
    s = 0.0
    if weights[0] != 0.0:
        s += weights[0] * _intersection(color, i, j)
    if weights[1] != 0.0:
        s += weights[1] * _intersection(texture, i, j)
    if weights[2] != 0.0:
        s += weights[2] * (1.0 - (size[i] + size[j]) / image_area)
    if weights[3] != 0.0:
        bw = max(box[i, 2], box[j, 2]) - min(box[i, 0], box[j, 0])
        bh = max(box[i, 3], box[j, 3]) - min(box[i, 1], box[j, 1])
        s += weights[3] * (1.0 - (bw * bh - size[i] - size[j]) / image_area)
    return s


@numba.njit(cache=True, nogil=True)
def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    """``array`` itself, or a copy at least twice as long when ``needed`` exceeds its length."""
    if needed <= array.shape[0]:
        return array
    out = np.empty(max(needed, 2 * array.shape[0]), dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


@numba.njit(cache=True, nogil=True)
def _heap_push(
    key: np.ndarray, first: np.ndarray, second: np.ndarray, n: int, k: float, i: int, j: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert ``(k, i, j)`` into the max-heap held in ``key/first/second[:n]``; returns the (maybe grown) arrays."""
    key, first, second = _grown(key, n + 1), _grown(first, n + 1), _grown(second, n + 1)
    pos = n
    while pos > 0:
        parent = (pos - 1) >> 1
        if key[parent] >= k:
            break
        key[pos], first[pos], second[pos] = key[parent], first[parent], second[parent]
        pos = parent
    key[pos], first[pos], second[pos] = k, i, j
    return key, first, second


@numba.njit(cache=True, nogil=True)
def _heap_pop(key: np.ndarray, first: np.ndarray, second: np.ndarray, n: int) -> tuple[float, int, int]:
    """Remove the top of the max-heap of size ``n`` and return it as ``(k, i, j)``."""
    top = (key[0], first[0], second[0])
    n -= 1
    k, a, b = key[n], first[n], second[n]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and key[child + 1] > key[child]:
            child += 1
        if key[child] <= k:
            break
        key[pos], first[pos], second[pos] = key[child], first[child], second[child]
        pos = child
    key[pos], first[pos], second[pos] = k, a, b
    return top


@numba.njit(cache=True, nogil=True)
def _link(
    neighbour: np.ndarray, link: np.ndarray, head: np.ndarray, used: int, a: int, b: int
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``a`` and ``b`` to each other's adjacency list (entries ``used`` and ``used + 1`` of the pool)."""
    neighbour, link = _grown(neighbour, used + 2), _grown(link, used + 2)
    neighbour[used], link[used], head[a] = b, head[a], used
    neighbour[used + 1], link[used + 1], head[b] = a, head[b], used + 1
    return neighbour, link


@numba.njit(cache=True, nogil=True)
def _merge_regions(
    color: np.ndarray, texture: np.ndarray, size: np.ndarray, box: np.ndarray, i: int, j: int, t: int
) -> None:
    """Region ``t`` = ``i`` united with ``j``: summed size, size-weighted histograms, union box."""
    size[t] = size[i] + size[j]
    wi, wj = size[i] / size[t], size[j] / size[t]
    for d in range(color.shape[1]):
        color[t, d] = wi * color[i, d] + wj * color[j, d]
    for d in range(texture.shape[1]):
        texture[t, d] = wi * texture[i, d] + wj * texture[j, d]
    box[t, 0] = min(box[i, 0], box[j, 0])
    box[t, 1] = min(box[i, 1], box[j, 1])
    box[t, 2] = max(box[i, 2], box[j, 2])
    box[t, 3] = max(box[i, 3], box[j, 3])


@numba.njit(cache=True, nogil=True)
def _group(
    color0: np.ndarray,
    texture0: np.ndarray,
    sizes0: np.ndarray,
    boxes0: np.ndarray,
    pairs: np.ndarray,
    weights: np.ndarray,
    image_area: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = sizes0.shape[0]
    nodes = 2 * r - 1
    color = np.empty((nodes, color0.shape[1]), dtype=np.float32)
    color[:r] = color0
    texture = np.empty((nodes, texture0.shape[1]), dtype=np.float32)
    texture[:r] = texture0
    size = np.empty(nodes, dtype=np.float64)
    size[:r] = sizes0
    box = np.empty((nodes, 4), dtype=np.int32)
    box[:r] = boxes0
    alive = np.zeros(nodes, dtype=np.bool_)
    alive[:r] = True
    seen = np.full(nodes, -1, dtype=np.int64)  # the last new region that took this one as a neighbour
    # Adjacency lists as linked lists in one pool: head[node] -> entry, entry -> (neighbour, next entry).
    head = np.full(nodes, -1, dtype=np.int64)
    neighbour = np.empty(4 * pairs.shape[0] + 16, dtype=np.int64)
    link = np.empty(4 * pairs.shape[0] + 16, dtype=np.int64)
    used = np.int64(0)
    # Candidate pairs in a max-heap; a pair whose region has been merged away is dropped when popped.
    heap_key = np.empty(2 * pairs.shape[0] + 16, dtype=np.float64)
    heap_i = np.empty(2 * pairs.shape[0] + 16, dtype=np.int64)
    heap_j = np.empty(2 * pairs.shape[0] + 16, dtype=np.int64)
    heap_n = np.int64(0)
    for e in range(pairs.shape[0]):
        i, j = np.int64(pairs[e, 0]), np.int64(pairs[e, 1])
        neighbour, link = _link(neighbour, link, head, used, i, j)
        used += 2
        s = _similarity(color, texture, size, box, i, j, weights, image_area)
        heap_key, heap_i, heap_j = _heap_push(heap_key, heap_i, heap_j, heap_n, s, i, j)
        heap_n += 1
    merges = np.empty((r - 1, 2), dtype=np.int32)
    merged_at = np.empty(r - 1, dtype=np.float64)
    t = np.int64(r)
    while heap_n > 0 and t < nodes:
        s, i, j = _heap_pop(heap_key, heap_i, heap_j, heap_n)
        heap_n -= 1
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = False
        alive[t] = True
        merges[t - r, 0], merges[t - r, 1] = i, j
        merged_at[t - r] = s
        _merge_regions(color, texture, size, box, i, j, t)
        for source in (i, j):
            entry = head[source]
            while entry >= 0:
                n = neighbour[entry]
                entry = link[entry]
                if not alive[n] or seen[n] == t:
                    continue
                seen[n] = t
                neighbour, link = _link(neighbour, link, head, used, t, n)
                used += 2
                s = _similarity(color, texture, size, box, t, n, weights, image_area)
                heap_key, heap_i, heap_j = _heap_push(heap_key, heap_i, heap_j, heap_n, s, t, n)
                heap_n += 1
        t += 1
    return box[:t], merges[: t - r], merged_at[: t - r], color[:t], texture[:t]


def hierarchical_grouping(regions: Regions, similarities: str, image_size: tuple[int, int]) -> Hierarchy:
    """Group regions bottom-up with the similarity set ``similarities`` (e.g. ``"CTSF"``) on an ``(H, W)`` image.

    Merges until one region is left (``2R - 1`` regions in all; fewer only if the adjacency graph were disconnected).
    """
    weights = np.array([float(c in similarities) for c in "CTSF"], dtype=np.float64)
    return Hierarchy(
        *_group(
            regions.color,
            regions.texture,
            regions.sizes,
            regions.boxes,
            regions.pairs,
            weights,
            float(image_size[0] * image_size[1]),
        )
    )


# ----------------------------------------------------------------------------------------------- the pipeline


def _strategy_boxes(image: np.ndarray, config: SelectiveSearchConfig) -> tuple[np.ndarray, np.ndarray]:
    """All strategies' boxes on one (already resized) image: int32 ``(M, 4)`` and their float64 ``(M,)`` rank values."""
    spaces, ks, similarity_sets = config.strategy_parts()
    min_sizes = [int(k) if config.min_size is None else config.min_size for k in ks]
    need_color = any("C" in s for s in similarity_sets)
    need_texture = any("T" in s for s in similarity_sets)
    boxes, values = [], []
    strategy = 0
    for space in spaces:
        converted = np.ascontiguousarray(convert_color(image, space))
        colors = color_codes(converted) if need_color else None
        textures = texture_codes(converted) if need_texture else None
        for labels in felzenszwalb_multi(converted, ks, min_sizes, config.sigma):
            regions = initial_regions(labels, colors, textures)
            for similarities in similarity_sets:
                strategy_regions = regions._replace(
                    color=regions.color if "C" in similarities else regions.color[:, :0],
                    texture=regions.texture if "T" in similarities else regions.texture[:, :0],
                )
                region_boxes = hierarchical_grouping(strategy_regions, similarities, labels.shape).boxes
                position = np.arange(len(region_boxes), 0, -1, dtype=np.float64)  # top of the hierarchy is 1
                rng = np.random.default_rng([config.seed, strategy])
                boxes.append(region_boxes)
                values.append(position * rng.random(len(region_boxes)))
                strategy += 1
    return np.concatenate(boxes), np.concatenate(values)


def _rank(boxes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Boxes sorted by value (best first), each box once, at its best rank."""
    boxes = boxes[np.argsort(values, kind="stable")]
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _proposals(image: np.ndarray, config: SelectiveSearchConfig) -> np.ndarray:
    """Selective search on a checked RGB uint8 image -> float32 ``(R, 4)`` xyxy boxes in its pixels."""
    height, width = image.shape[:2]
    work = image
    if config.resize_max_side is not None and max(height, width) > config.resize_max_side:
        scale = config.resize_max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        work = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    fx, fy = width / work.shape[1], height / work.shape[0]
    boxes = _rank(*_strategy_boxes(work, config)) * np.array([fx, fy, fx, fy])  # (R, 4) in original pixels
    np.clip(boxes, 0, [width, height, width, height], out=boxes)
    wide = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= config.min_box_size
    return boxes[wide][: config.max_boxes].astype(np.float32)


def selective_search(image: np.ndarray, config: SelectiveSearchConfig = SelectiveSearchConfig()) -> Tensor:
    """Object proposals for one RGB uint8 ``(H, W, 3)`` image -> float32 ``(R, 4)`` xyxy boxes, best-ranked first."""
    return torch.from_numpy(_proposals(_check_image(image), config))


def init_worker() -> None:
    """Initialiser of a selective-search worker process: OpenCV single-threaded, the parallelism comes from the
    processes (also used by ``detect predict``'s long-lived pool)."""
    cv2.setNumThreads(1)


def selective_search_batch(
    images: Iterable[np.ndarray], config: SelectiveSearchConfig = SelectiveSearchConfig(), workers: int | None = None
) -> list[Tensor]:
    """Selective search on many images across ``workers`` processes (default: one per CPU; 0 or 1: in-process).

    Images travel to the workers in chunks and their boxes come back as numpy arrays, so the results equal the
    sequential ones exactly. Workers are *spawned*: forking a parent whose OpenCV thread pool has run deadlocks the
    child in OpenCV (seen with ``cv2.setNumThreads`` after ``fork``), and spawn is safe whatever threads (torch,
    OpenMP, CUDA) the parent runs. Starting a worker costs an interpreter and the imports (about a second or two),
    and a pool lives for one call: pass many images per call.
    """
    checked = [_check_image(image) for image in images]
    if workers is None:
        workers = os.cpu_count() or 1
    workers = min(workers, len(checked))
    if workers <= 1:
        return [torch.from_numpy(_proposals(image, config)) for image in checked]
    chunksize = max(1, math.ceil(len(checked) / (4 * workers)))
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
        results = pool.map(functools.partial(_proposals, config=config), checked, chunksize=chunksize)
    return [torch.from_numpy(boxes) for boxes in results]


class SelectiveSearch:
    """The proposal-generator interface: ``SelectiveSearch(config)(images) -> list[Tensor[R, 4]]``.

    Accepts RGB uint8 ``(H, W, 3)`` arrays or model-facing ``Tensor[3, H, W]`` floats in ``[0, 1]``; boxes come back
    on the device of a tensor input (the search itself runs on the CPU). ``workers`` is passed to
    :func:`selective_search_batch`; the default 0 runs in-process, since a pool started per call only pays off for
    many images (precomputing a data set's proposals).
    """

    def __init__(self, config: SelectiveSearchConfig = SelectiveSearchConfig(), workers: int | None = 0) -> None:
        self.config = config
        self.workers = workers

    def __call__(self, images: Sequence[np.ndarray | Tensor] | np.ndarray | Tensor) -> list[Tensor]:
        if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 3:
            images = [images]
        arrays = [self._to_array(image) for image in images]
        boxes = selective_search_batch(arrays, self.config, self.workers)
        return [b.to(image.device) if isinstance(image, Tensor) else b for b, image in zip(boxes, images)]

    @staticmethod
    def _to_array(image: np.ndarray | Tensor) -> np.ndarray:
        if not isinstance(image, Tensor):
            return image
        if image.dtype.is_floating_point:
            image = (image.detach() * 255.0).round().clamp(0, 255).to(torch.uint8)  # (3, H, W) float -> uint8
        return image.permute(1, 2, 0).cpu().numpy()  # (3, H, W) -> (H, W, 3)
