"""The shared box kernels: formats, IoU, NMS, the box coder, RoI/SPP pooling and region warping.

Each kernel picks its implementation (fused numba loops on the CPU, Triton on CUDA, torch ops as the reference) in
:mod:`detect.ops.dispatch`. Call :func:`warmup` once at start-up so that the fused kernels' loading (or first
compilation) is not paid inside a request.
"""

from __future__ import annotations


def warmup(devices: tuple[str, ...] | None = None) -> dict[str, float]:
    """Load every fused kernel now; returns the seconds spent per device. See :func:`detect.ops.warm.warmup`."""
    from detect.ops.warm import warmup as _warmup

    return _warmup(devices)
