"""The time budget of a run (``detect train --time 30m``, recipe ``time_budget`` in seconds).

Decisions:

- The budget is wall time of the whole run, from the command's start (the derivation's read of the data, opening
  the data, building the model): the pretrain stage, every optimisation step, every evaluation and the
  end of the run (the region detectors' closed-form fits, the final evaluation, writing the model). Time spent
  before a kill is carried in the checkpoint, so a resumed run spends what is left, not a new budget.
- The schedule is fitted, not guessed: the first :data:`PROBE_STEPS` steps after one warm-up step are timed and
  their mean step time ``t`` gives the plan. A step's time is wall time from the end of the previous step,
  evaluations left out: waiting for the batch, logging and checkpoints are part of it. With ``R`` seconds left after a reserve for the end of the run
  (:attr:`Budget.reserve`: the final evaluation and two steps), ``E`` evaluations costing ``e`` seconds each,
  ``N = (R - E e) / t`` more steps fit, evaluated every ``N / (E + 1)`` steps (the final evaluation is the last);
  evaluations take :data:`EVAL_SHARE` of the time at most (at most :data:`MAX_EVALS` with the final one). ``e`` is
  estimated from the step time until the first evaluation is measured; after every step the plan is fitted
  again with the measured figures (the mean of the last :data:`STEP_WINDOW` step times; a shared machine's speed
  changes), so the run
  ends within the budget.
- The pretrain stage (:mod:`detect.pretrain`) ends at its recipe's step count or when :data:`PRETRAIN_SHARE` of
  the budget is spent, whichever comes first (its step time on photos depends on their decoding, so it is bounded
  by time, not guessed).
- The learning-rate schedule follows the plan: the trainer scales the recipe's warm-up and step milestones (or the
  cosine's length) to the planned number of steps, so warm-up and decay happen inside the budget.
- A hard stop guards the end: the run stops when one more step would leave less than the reserve.
- The clock is injected (``clock``, default :func:`time.monotonic`): tests drive a budget with a simulated clock.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from detect.errors import ConfigError

__all__ = ["Budget", "BudgetPlan", "EVAL_SHARE", "MAX_EVALS", "PRETRAIN_SHARE", "PROBE_STEPS", "format_seconds", "parse_duration"]

PRETRAIN_SHARE = 0.15  # the most of the budget the pretrain stage may take (it stops at the step that reaches it)
PROBE_STEPS = 5  # timed steps (after one warm-up step) before the first plan
EVAL_SHARE = 0.15  # the most of the remaining time evaluations may take
MAX_EVALS = 10
STEP_WINDOW = 200  # the recent steps whose mean time plans the rest (a shared machine's speed changes)
EVAL_STEP_RATIO = 0.35  # an image's evaluation cost per training image-step, until an evaluation is measured

_UNITS = {"": 60.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"30m"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` or a bare number (minutes); a zero, negative or
    unparseable budget is a :class:`ConfigError`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        raw = str(text).strip().lower()
        parts = re.findall(r"(-?\d+(?:\.\d+)?)\s*([a-z]*)", raw)
        if not parts or re.sub(r"(-?\d+(?:\.\d+)?)\s*([a-z]*)", "", raw).strip() or any(u not in _UNITS for _, u in parts):
            raise ConfigError(f"--time {text!r}: not a duration (examples: 30m, 90s, 1h30m, 1.5h)")
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--time {text!r}: a time budget must be positive")
    return seconds


def format_seconds(seconds: float) -> str:
    """``"1h02m"``, ``"4m05s"`` or ``"12s"``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class BudgetPlan:
    """What fits: the last iteration (exclusive end), the evaluation period in iterations, and the figures it came
    from."""

    max_iterations: int
    eval_every: int
    step_seconds: float
    eval_seconds: float
    evaluations: int


@dataclass
class Budget:
    """A run's time budget (see the module docstring). ``spent`` is the time a resumed run already used;
    ``eval_images`` and ``batch_size`` size the evaluation estimate; ``cap`` bounds the plan (the recipe's
    ``max_iterations``); ``final_evaluations`` the evaluations after the last step (the region detectors re-evaluate
    after their closed-form fits)."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    spent: float = 0.0
    eval_images: int = 0
    batch_size: int = 1
    cap: int = 10**9
    final_evaluations: int = 0
    step_times: list[float] = field(default_factory=list)
    eval_times: list[float] = field(default_factory=list)
    plan: BudgetPlan | None = None
    _origin: float | None = None

    # -- the clock --

    def start(self, origin: float | None = None) -> None:
        """Start (or restart after a resume) counting from ``origin`` on the clock (default: now)."""
        self._origin = self.clock() if origin is None else origin

    def elapsed(self) -> float:
        """Seconds spent so far, earlier sessions of a resumed run included."""
        return self.spent + (self.clock() - self._origin if self._origin is not None else 0.0)

    def left(self) -> float:
        return self.seconds - self.elapsed()

    # -- measurements --

    def record_step(self, seconds: float) -> None:
        self.step_times.append(float(seconds))

    def record_eval(self, seconds: float) -> None:
        self.eval_times.append(float(seconds))

    @property
    def step_seconds(self) -> float | None:
        """The mean time of the last :data:`STEP_WINDOW` steps, the first (warm-up) step left out once there are
        others. A mean, not a median: the periodic costs (a checkpoint every hundred steps, the log) belong to
        the steps' cost, and a median would plan as if they were free."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return statistics.fmean(times[-STEP_WINDOW:]) if times else None

    @property
    def eval_seconds(self) -> float:
        if self.eval_times:
            return statistics.median(self.eval_times)
        step = self.step_seconds or 0.0
        return step * EVAL_STEP_RATIO * self.eval_images / max(1, self.batch_size)

    @property
    def reserve(self) -> float:
        """Seconds kept for the end of the run: its final evaluations and a margin of two steps."""
        return self.final_evaluations * self.eval_seconds + 2 * (self.step_seconds or 0.0)

    def ready(self) -> bool:
        """Whether enough steps were timed for a plan."""
        return len(self.step_times) >= PROBE_STEPS + 1

    # -- the plan --

    def fit(self, iteration: int, evaluations_done: int = 0, evaluate: bool = True) -> BudgetPlan:
        """Fit the rest of the run from ``iteration`` to the time left (see the module docstring)."""
        step = self.step_seconds
        if step is None or step <= 0:
            step = 1e-6
        left = self.left() - self.reserve
        each = self.eval_seconds if evaluate else 0.0
        evaluations = 0
        if evaluate and each > 0:  # the final evaluation is in the reserve, these come before it
            evaluations = max(0, int(min(MAX_EVALS - 1 - evaluations_done, EVAL_SHARE * left // each)))
        steps = max(0, int((left - evaluations * each) // step))
        max_iterations = min(self.cap, iteration + steps)
        steps = max_iterations - iteration
        every = max(1, math.ceil(steps / (evaluations + 1))) if evaluations else 0  # the last is the final one
        self.plan = BudgetPlan(max_iterations, every, step, each, evaluations)
        return self.plan

    def stop_now(self) -> bool:
        """Whether one more step would eat into the reserve: the hard stop (before the first plan, whose figures
        are not yet measured, only a spent budget stops)."""
        if self.plan is None:
            return self.left() <= 0
        step = self.step_seconds or 0.0
        return self.left() - step < self.reserve

    def eta(self) -> float:
        """Seconds to the end of the budget."""
        return max(0.0, self.left())

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (see :meth:`restore`)."""
        return {
            "seconds": self.seconds,
            "spent": self.elapsed(),
            "step_times": list(self.step_times),
            "eval_times": list(self.eval_times),
            "max_iterations": self.plan.max_iterations if self.plan else None,
            "eval_every": self.plan.eval_every if self.plan else None,
            "evaluations": self.plan.evaluations if self.plan else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a budget from a checkpoint's :meth:`state`: the same total, the time already spent, the
        measured step and evaluation times and the plan in force."""
        if abs(float(state["seconds"]) - self.seconds) > 1e-6:
            raise ConfigError(
                f"--resume: the run's time budget was {format_seconds(float(state['seconds']))}, "
                f"not {format_seconds(self.seconds)}; resume with the same --time"
            )
        self.spent = float(state["spent"])
        self.step_times = [float(t) for t in state["step_times"]]
        self.eval_times = [float(t) for t in state["eval_times"]]
        if state.get("max_iterations") is not None:
            self.plan = BudgetPlan(
                int(state["max_iterations"]), int(state["eval_every"]), self.step_seconds or 0.0, self.eval_seconds,
                int(state["evaluations"]),
            )
        self._origin = None
