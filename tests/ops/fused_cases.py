"""Inputs shared by the fused-kernel tests (numba on the CPU, Triton on CUDA and under ``TRITON_INTERPRET=1``).

Each case is small enough for the Triton interpreter (which runs every program in numpy) and covers what the
issue asks for: random boxes, degenerate ones (zero area, points, lines, inverted), huge NaN-free coordinates
(products overflow float32 to inf, so unions become inf - inf = NaN), tied scores and IoUs exactly equal to the
NMS threshold.
"""

from __future__ import annotations

import math

import torch


def random_boxes(n: int, seed: int, scale: float = 1000.0, max_size: float = 300.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=g) * 1.1 - 0.1) * scale
    return torch.cat((xy, xy + torch.rand(n, 2, generator=g) * max_size), 1)


def degenerate_boxes() -> torch.Tensor:
    """Zero-area, point, line, inverted, identical and nested boxes (float32, exact values)."""
    return torch.tensor(
        [
            [0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5], [2, 2, 2, 9], [10, 10, 0, 0],
            [0, 0, 5, 10], [0, 0, 0, 0], [-3, -3, 4, 4], [1, 1, 9, 9], [10, 0, 20, 10], [0, 0, 20, 1],
        ],
        dtype=torch.float32,
    )


def huge_boxes() -> torch.Tensor:
    """Coordinates near 1e19-1e20: areas overflow float32 to inf; no NaN in the input."""
    base = torch.tensor([[0.0, 0.0, 1e19, 1e19], [0.0, 0.0, 3e19, 2e19], [1e19, 1e19, 1e20, 1e20],
                         [-1e20, -1e20, 1e20, 1e20], [5.0, 5.0, 6.0, 6.0], [1e18, 0.0, 2e18, 1e19]])
    return base


def threshold_equal_boxes() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Boxes whose IoU with the first is exactly 1/2 (kept at threshold 0.5) or 2/3 (suppressed)."""
    boxes = torch.tensor([[0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 3, 1], [10, 10, 12, 11], [10, 10, 11, 11]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.6])
    return boxes, scores, 0.5


def tied_scores(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-integer boxes on a small grid (many overlaps) with scores on a coarse grid (many ties)."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.randint(0, 40, (n, 2), generator=g).float() / 2
    size = torch.randint(0, 24, (n, 2), generator=g).float() / 2
    scores = torch.randint(-2, 6, (n,), generator=g).float() / 4
    return torch.cat((corner, corner + size), 1), scores


def iou64(a: list[float], b: list[float]) -> float:
    """Float64 IoU with the documented zero-union rule (0, not NaN)."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou64_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows, cols = a.double().tolist(), b.double().tolist()
    return torch.tensor([[iou64(x, y) for y in cols] for x in rows], dtype=torch.float64).reshape(len(rows), len(cols))


def nms64(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Slow greedy NMS in float64 (0/0 suppresses nothing), visiting by (score descending, index)."""
    b, s = boxes.double().tolist(), scores.double().tolist()
    kept: list[int] = []
    for i in sorted(range(len(s)), key=lambda i: (-s[i], i)):
        ok = True
        for j in kept:
            x, y = b[j], b[i]
            inter = max(0.0, min(x[2], y[2]) - max(x[0], y[0])) * max(0.0, min(x[3], y[3]) - max(x[1], y[1]))
            union = (x[2] - x[0]) * (x[3] - x[1]) + (y[2] - y[0]) * (y[3] - y[1]) - inter
            if union != 0 and not math.isnan(union) and inter / union > thr:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def same_with_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values (``torch.equal``; ``-0.0 == 0.0``) with NaN in the same places."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(), b.nan_to_num()
    )
