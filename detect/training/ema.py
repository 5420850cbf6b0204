"""An exponential moving average of a model's weights (``ema`` in a recipe): what a run evaluates and saves when
the recipe asks for it, while the optimiser keeps stepping the raw weights.

After each optimiser step ``t`` (1, 2, ...), every floating-point parameter and buffer ``a`` of the average moves
towards the model's ``w``: ``a <- a + (1 - d_t) (w - a)`` with ``d_t = min(decay, (1 + t) / (10 + t))``. The
ramp keeps the first averages close to the current weights (a fixed 0.999 would remember the initial weights
for about a thousand steps); integer buffers are copied. On small data sets the raw weights of a late SGD step
still move with each batch's noise, and validation mAP swings from one evaluation to the next by a few points;
the average spans about the last ``1 / (1 - d_t)`` steps (a tenth of the run so far while the ramp rules, at
most ``1 / (1 - decay)``) and swings less.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA", "ema_decay"]


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (1 for the first): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEMA:
    """The average (``module``: a copy of the model, in eval mode, without gradients) and its update count."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s current weights (same architecture as the copy)."""
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        ours, theirs, copies, sources = [], [], [], []
        for (name, a), w in zip(self.module.state_dict().items(), model.state_dict().values()):
            if a.shape != w.shape:
                raise ValueError(f"ema: {name} has shape {tuple(w.shape)}, the average {tuple(a.shape)}")
            if a.is_floating_point():
                ours.append(a)
                theirs.append(w.detach())
            else:
                copies.append(a)
                sources.append(w)
        if ours:
            torch._foreach_lerp_(ours, theirs, weight)
        for a, w in zip(copies, sources):
            a.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
