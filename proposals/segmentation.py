"""Efficient graph-based image segmentation (Felzenszwalb & Huttenlocher, IJCV 2004).

The image is a graph: one vertex per pixel, an edge between 8-connected neighbours weighted by the Euclidean distance
of their (Gaussian-smoothed) colours over *all* channels together, as selective search uses it in each of its colour
spaces (the F&H paper also describes segmenting each channel alone and intersecting the partitions; we do not).
Edges are taken in increasing
weight; two components ``C1, C2`` joined by an edge of weight ``w`` merge when
``w <= min(Int(C1) + k/|C1|, Int(C2) + k/|C2|)``, ``Int`` being the largest edge weight inside a component (tracked
as the weight of the edge that made it). A second pass over the same sorted edges then merges every component
smaller than ``min_size`` into its neighbour across the lightest edge.

Decisions:

- Smoothing is a separable Gaussian of ``sigma`` (0.8 in both papers) truncated at ``ceil(4 * sigma)`` pixels each
  side and normalised, with replicated borders, as in the F&H program; ``sigma = 0`` skips it.
- Edges are enumerated direction by direction (right, down, down-right, up-right; row-major inside each) and sorted by
  weight with a *stable* radix sort, so ties resolve by that enumeration order and the result is deterministic.
- Labels are numbered ``0..R-1`` in order of each region's first pixel in row-major order.
- Weights are float32 (sorting and memory dominate the cost); the merge thresholds are computed in float64.
- The sorted graph does not depend on ``k``, so :func:`felzenszwalb_multi` builds and sorts it once for several
  ``(k, min_size)`` settings, which is how selective search's diversification uses it.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numba
import numpy as np

__all__ = ["NEIGHBOUR_SHIFTS", "smooth", "grid_graph", "segment_graph", "felzenszwalb", "felzenszwalb_multi"]

# The four edge directions of the 8-connected grid (right, down, down-right, up-right), each as the pair of
# (row slice, column slice) that selects an edge's first and second pixel: ``grid[src]`` and ``grid[dst]``.
NEIGHBOUR_SHIFTS = (
    ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
    ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
    ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
    ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
)


def smooth(image: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Gaussian-smooth every channel: ``(H, W)`` or ``(H, W, C)`` any dtype -> ``(H, W, C)`` float32."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
    if sigma <= 0:
        return np.ascontiguousarray(img)
    radius = int(math.ceil(4.0 * sigma))
    ksize = 2 * radius + 1
    channels = [
        cv2.GaussianBlur(img[:, :, c], (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
        for c in range(img.shape[2])
    ]
    return np.ascontiguousarray(np.stack(channels, axis=2))


def grid_graph(smoothed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8-connected pixel graph of an ``(H, W, C)`` float image, sorted by weight (stable).

    Returns ``(a, b, w)``: int32 pixel indices (row-major ``y * W + x``) of each edge's two ends and its float32
    Euclidean colour distance, all of length ``E`` and in increasing ``w``.
    """
    h, w_, _ = smoothed.shape
    index = np.arange(h * w_, dtype=np.int32).reshape(h, w_)
    a_parts, b_parts, w_parts = [], [], []
    for src, dst in NEIGHBOUR_SHIFTS:
        diff = smoothed[src] - smoothed[dst]  # (h', w', C)
        w_parts.append(np.sqrt(np.einsum("ijc,ijc->ij", diff, diff)).ravel())
        a_parts.append(index[src].ravel())
        b_parts.append(index[dst].ravel())
    weights = np.concatenate(w_parts).astype(np.float32)
    order = _radix_argsort(weights.view(np.uint32))
    return np.concatenate(a_parts)[order], np.concatenate(b_parts)[order], weights[order]


@numba.njit(cache=True, nogil=True)
def _radix_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of uint32 keys (LSD radix, two 16-bit digits); non-negative float32 bits sort as uint32."""
    n = keys.shape[0]
    order = np.arange(n).astype(np.int32)
    tmp = np.empty(n, dtype=np.int32)
    counts = np.empty(65537, dtype=np.int64)
    for shift in (0, 16):
        counts[:] = 0
        for i in range(n):
            counts[((keys[i] >> shift) & 0xFFFF) + 1] += 1
        for d in range(65536):
            counts[d + 1] += counts[d]
        for i in range(n):
            e = order[i]
            d = (keys[e] >> shift) & 0xFFFF
            tmp[counts[d]] = e
            counts[d] += 1
        order, tmp = tmp, order
    return order


@numba.njit(cache=True, nogil=True)
def _find(parent: np.ndarray, x: int) -> int:
    while parent[x] != x:  # path halving
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _union(parent: np.ndarray, rank: np.ndarray, size: np.ndarray, x: int, y: int) -> int:
    """Join the roots ``x != y`` by rank; returns the new root."""
    if rank[x] > rank[y]:
        x, y = y, x
    parent[x] = y
    size[y] += size[x]
    if rank[x] == rank[y]:
        rank[y] += 1
    return y


@numba.njit(cache=True, nogil=True)
def _segment_graph(
    a: np.ndarray, b: np.ndarray, w: np.ndarray, num_vertices: int, k: float, min_size: int
) -> np.ndarray:
    parent = np.arange(num_vertices).astype(np.int32)
    rank = np.zeros(num_vertices, dtype=np.uint8)
    size = np.ones(num_vertices, dtype=np.int32)
    threshold = np.full(num_vertices, k, dtype=np.float64)
    for e in range(a.shape[0]):
        x = _find(parent, a[e])
        y = _find(parent, b[e])
        we = np.float64(w[e])
        if x != y and we <= threshold[x] and we <= threshold[y]:
            root = _union(parent, rank, size, x, y)
            threshold[root] = we + k / size[root]
    small = 0  # components below min_size: the second pass can stop when none is left
    for v in range(num_vertices):
        small += parent[v] == v and size[v] < min_size
    for e in range(a.shape[0]):
        if small == 0:
            break
        x = _find(parent, a[e])
        y = _find(parent, b[e])
        if x != y and (size[x] < min_size or size[y] < min_size):
            small -= (size[x] < min_size) + (size[y] < min_size)
            root = _union(parent, rank, size, x, y)
            small += size[root] < min_size
    labels = np.empty(num_vertices, dtype=np.int32)
    root_label = np.full(num_vertices, -1, dtype=np.int32)
    count = 0
    for v in range(num_vertices):
        r = _find(parent, v)
        if root_label[r] < 0:
            root_label[r] = count
            count += 1
        labels[v] = root_label[r]
    return labels


def segment_graph(
    a: np.ndarray, b: np.ndarray, w: np.ndarray, num_vertices: int, k: float, min_size: int
) -> np.ndarray:
    """F&H union-find over edges already sorted by weight -> int32 ``(num_vertices,)`` labels ``0..R-1``."""
    return _segment_graph(a, b, w, num_vertices, float(k), int(min_size))


def felzenszwalb_multi(
    image: np.ndarray, ks: Sequence[float], min_sizes: Sequence[int], sigma: float = 0.8
) -> list[np.ndarray]:
    """One segmentation per ``(k, min_size)`` pair, sharing the smoothed, sorted graph: a list of int32 ``(H, W)``."""
    smoothed = smooth(image, sigma)
    h, w, _ = smoothed.shape
    a, b, weights = grid_graph(smoothed)
    return [segment_graph(a, b, weights, h * w, k, m).reshape(h, w) for k, m in zip(ks, min_sizes)]


def felzenszwalb(image: np.ndarray, k: float, min_size: int | None = None, sigma: float = 0.8) -> np.ndarray:
    """Segment an ``(H, W)`` or ``(H, W, C)`` image -> int32 ``(H, W)`` labels ``0..R-1``.

    ``k`` sets the scale (larger: larger regions); ``min_size`` defaults to ``k`` as in selective search's code.
    Channels are used as given (the caller picks the colour space and its scaling; F&H's ``k`` assumes 0..255).
    """
    return felzenszwalb_multi(image, [k], [int(k) if min_size is None else min_size], sigma)[0]
