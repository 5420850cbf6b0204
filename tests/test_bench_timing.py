"""benchmarks._timing.median_seconds against a fake clock: how many calls a sample holds and what it reports."""

from __future__ import annotations

import pytest

from benchmarks import _timing


class FakeClock:
    """perf_counter that only moves when a timed function says it took some time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed(clock: FakeClock, costs: list[float], log: list[float]):
    """A function whose i-th call takes ``costs[i]`` seconds (the last cost repeats); calls are logged."""

    def fn() -> None:
        cost = costs[min(len(log), len(costs) - 1)]
        log.append(cost)
        clock.now += cost

    return fn


def test_samples_fill_min_sample_and_report_the_per_call_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_timing.time, "perf_counter", clock)
    fast_log: list[float] = []
    slow_log: list[float] = []
    # warm-up 1 ms: ceil(0.02 / 0.001) = 20 calls a sample; sample 2 has one 11 ms call among 20 of 1 ms
    fast_costs = [0.001] * (1 + 20) + [0.011] + [0.001] * 200
    fns = {"fast": _timed(clock, fast_costs, fast_log), "slow": _timed(clock, [0.05], slow_log)}
    t = _timing.median_seconds(fns, repeats=3, min_sample=0.02)
    assert len(fast_log) == 1 + 3 * 20 and len(slow_log) == 1 + 3 * 1  # a 50 ms call is a sample alone
    assert t["fast"] == pytest.approx(0.001) and t["slow"] == pytest.approx(0.05)


def test_without_min_sample_each_call_is_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_timing.time, "perf_counter", clock)
    log: list[float] = []
    t = _timing.median_seconds({"f": _timed(clock, [0.5, 0.001, 0.003, 0.002], log)}, repeats=3)
    assert len(log) == 4 and t["f"] == pytest.approx(0.002)  # the warm-up's 0.5 s is not a sample
