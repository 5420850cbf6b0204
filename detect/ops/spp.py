"""The fused CPU loop (numba) behind :func:`detect.ops.pooling.spatial_pyramid_pool`.

:func:`detect.ops.pooling.spatial_pyramid_pool` computes each window's integer bins and asks
:mod:`detect.ops.dispatch` where to run; on the CPU (float32/float64, no autograd) it calls :func:`pool_windows`
here, which gives the same values as the torch reference bit for bit (a maximum is exact whatever the order).

Decisions:

- **Finest level first, coarser levels from its bins.** With bins ``[lo + floor(i n / l), lo + ceil((i + 1) n / l))``
  the ``m x m`` bins ``(i m .. i m + m - 1)`` of level ``L = m l`` cover exactly bin ``i`` of level ``l`` (their
  union starts at ``floor(i m n / L) = floor(i n / l)``, ends at ``ceil((i + 1) n / l)`` and has no gap). So a level
  that divides an already pooled one is the max of its ``m x m`` blocks of bins, and only the other levels read
  the feature map. For the paper's levels 1/2/3/6 the map is read once per window, at level 6 (whose bins overlap
  by at most one cell), and levels 3, 2 and 1 cost 36, 36 and 4 channel vectors: about ``cells x C`` maxima per
  window instead of ``4 x cells x C`` for four direct levels, or ``4 x 50 x C`` gathers plus a
  ``log2 H x log2 W``-copy table for the reference's sparse table.
- **Channels last.** The loop reads the ``(B, H, W, C)`` copy of the maps, so its inner loop runs over ``C``
  contiguous values (LLVM vectorises it); each window's bins are kept as ``(P, C)`` rows in a per-range scratch
  buffer and written to the ``(C, l, l)``-per-level layout at the end.
- **NaN propagates** as in ``torch.maximum``: ``v if (v > m or v != v) else m`` keeps a NaN once seen.
- **Threads.** Windows are independent: :func:`detect.ops.dispatch.run_cpu` splits them over the torch thread
  count (plain threads, the loop releases the GIL), as for the box kernels.
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from detect.ops import dispatch

__all__ = ["level_plan", "pool_windows"]


def _jit(fn):
    """``numba.njit`` without fastmath, releasing the GIL, cached on disk when a cache location is writable."""
    options = dict(nogil=True, error_model="numpy", fastmath=False)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache locator
        return numba.njit(cache=False, **options)(fn)


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _max_into(dest, row):
    """``dest = maximum(dest, row)`` element-wise over ``C`` values, NaN-propagating."""
    for c in range(dest.shape[0]):
        v = row[c]
        m = dest[c]
        dest[c] = v if (v > m or v != v) else m


@_jit
def _pool(start, stop, out, maps, windows, levels, offsets, sources):
    """Windows ``[start, stop)``: ``out[k]`` (C * P) gets window ``k``'s pyramid, level-major ``(C, l, l)`` blocks.

    ``maps (B, H, W, C)``; ``windows (K, 5)`` int64 ``[image, y_lo, y_hi, x_lo, x_hi]`` half-open cell ranges, at
    least one cell each, inside the map. ``levels``, ``offsets`` and ``sources`` (each ``(L,)``, in processing
    order): the level, the index of its first bin among the ``P`` bins in output order, and the processing index
    of the finer level it is merged from (-1: read from the map)."""
    channels = maps.shape[3]
    total = 0
    for j in range(levels.shape[0]):
        total += levels[j] * levels[j]
    bins = np.empty((total, channels), dtype=maps.dtype)
    for k in range(start, stop):
        image, y_lo, y_hi, x_lo, x_hi = windows[k, 0], windows[k, 1], windows[k, 2], windows[k, 3], windows[k, 4]
        ny, nx = y_hi - y_lo, x_hi - x_lo
        for j in range(levels.shape[0]):
            level, first, source = levels[j], offsets[j], sources[j]
            for by in range(level):
                for bx in range(level):
                    dest = bins[first + by * level + bx]
                    if source < 0:
                        ys, ye = y_lo + (by * ny) // level, y_lo + ((by + 1) * ny + level - 1) // level
                        xs, xe = x_lo + (bx * nx) // level, x_lo + ((bx + 1) * nx + level - 1) // level
                        dest[:] = maps[image, ys, xs]
                        for y in range(ys, ye):
                            for x in range(xs, xe):
                                _max_into(dest, maps[image, y, x])
                    else:
                        fine, fine_first = levels[source], offsets[source]
                        step = fine // level
                        dest[:] = bins[fine_first + by * step * fine + bx * step]
                        for i in range(step):
                            for jj in range(step):
                                _max_into(dest, bins[fine_first + (by * step + i) * fine + bx * step + jj])
        row = out[k]
        for j in range(levels.shape[0]):
            count = levels[j] * levels[j]
            base = channels * offsets[j]
            for c in range(channels):
                for q in range(count):
                    row[base + c * count + q] = bins[offsets[j] + q, c]


def level_plan(levels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The processing order of ``levels`` for :func:`_pool`: ``(levels, offsets, sources)`` int64 arrays, finest
    first; ``offsets`` the first bin of each level in the caller's (output) order; ``sources`` the processing index
    of the smallest already processed level that is a multiple of it, or -1 (read the map)."""
    starts = np.cumsum([0] + [level * level for level in levels])[:-1]
    order = sorted(range(len(levels)), key=lambda i: -levels[i])
    plan_levels = [levels[i] for i in order]
    sources = []
    for j, level in enumerate(plan_levels):
        multiples = [p for p in range(j) if plan_levels[p] % level == 0]
        sources.append(min(multiples, key=lambda p: plan_levels[p]) if multiples else -1)
    as_int = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return as_int(plan_levels), as_int([starts[i] for i in order]), as_int(sources)


def pool_windows(features: Tensor, windows: Tensor, levels: Sequence[int], out: Tensor | None = None) -> Tensor:
    """SPP of ``features (B, C, H, W)`` (CPU, float32/float64) over integer ``windows (K, 5)`` rows
    ``[image, y_lo, y_hi, x_lo, x_hi]`` (half-open, non-empty, inside the map; the caller checks): ``(K, C * P)``
    in ``features``' dtype, the layout of :func:`detect.ops.pooling.spatial_pyramid_pool`; written into ``out``
    when given (contiguous, that shape and dtype)."""
    channels = features.shape[1]
    bins = sum(level * level for level in levels)
    if out is None:
        out = torch.empty((windows.shape[0], channels * bins), dtype=features.dtype)  # (K, C * P)
    if windows.shape[0] == 0:
        return out
    maps = features.detach().permute(0, 2, 3, 1).contiguous()  # (B, C, H, W) -> (B, H, W, C)
    plan = level_plan(tuple(int(level) for level in levels))
    args = (out.numpy(), maps.numpy(), windows.to(torch.int64).contiguous().numpy(), *plan)
    dispatch.run_cpu(_pool, windows.shape[0], windows.shape[0] * channels * bins, *args)
    return out
