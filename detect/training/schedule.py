"""The learning-rate schedule: linear warm-up, then step or cosine decay, as a pure function of the iteration (so
the iteration *is* the scheduler's state and a resumed run continues it exactly)."""

from __future__ import annotations

import dataclasses
import math

from detect.training.config import OptimizerConfig, ScheduleConfig

__all__ = ["base_lr", "fitted_schedule", "lr_factor"]


def fitted_schedule(schedule: ScheduleConfig, iterations: int, planned: int) -> ScheduleConfig:
    """``schedule`` (written for ``planned`` iterations) fitted to a run of ``iterations`` (a time budget's plan):
    step milestones scale with the length, warm-up takes at most a tenth of it. Unchanged when nothing is cut."""
    if iterations >= planned:
        return schedule
    ratio = iterations / max(planned, 1)
    return dataclasses.replace(
        schedule,
        warmup_iterations=min(schedule.warmup_iterations, max(1, iterations // 10)),
        milestones=tuple(max(1, round(m * ratio)) for m in schedule.milestones),
    )


def lr_factor(schedule: ScheduleConfig, iteration: int, max_iterations: int) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based): warm-up times step or cosine decay."""
    warm = 1.0
    if iteration < schedule.warmup_iterations:
        alpha = iteration / schedule.warmup_iterations
        warm = schedule.warmup_factor * (1 - alpha) + alpha
    if schedule.kind == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * iteration / max_iterations))
    return warm * schedule.gamma ** sum(iteration >= m for m in schedule.milestones)


def base_lr(optimizer: OptimizerConfig, global_batch: int) -> float:
    """The learning rate the schedule multiplies: ``optimizer.lr``, scaled by ``global_batch / base_batch_size``
    under ``scale_lr: linear`` (the global batch being every process's batch together)."""
    if optimizer.scale_lr == "linear":
        return optimizer.lr * global_batch / optimizer.base_batch_size
    return optimizer.lr
