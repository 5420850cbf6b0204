"""Timing shared by the benchmark scripts: medians of interleaved runs, measured in the same process."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, min_sample: float = 0.0) -> dict[str, float]:
    """Median wall time of each function, calls interleaved so that machine noise hits all of them alike.

    ``min_sample`` (seconds): each sample then times as many back-to-back calls of a function as its warm-up
    call says fill that long, and counts their mean. A call of a millisecond timed alone is at the mercy of one
    scheduler tick or page fault on a shared machine; ten or twenty of them in one sample are not.
    """
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()  # warm-up
        once = time.perf_counter() - start
        calls[name] = max(1, math.ceil(min_sample / max(once, 1e-6))) if min_sample > 0 else 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(t) for name, t in times.items()}
