"""The best model of a run, not the last: every evaluation offers the model to :class:`BestKeeper`, which keeps
it in ``best.safetensors`` when it scores higher, and counts evaluations without improvement for early stopping.

Decisions:

- The score is VOC mAP@0.5, ties broken by mAP@[.5:.95] (COCO's AP; NaN, as on an empty validation set, ranks
  lowest). A model must score strictly higher to replace the best, so the earliest of equal models is kept.
- ``patience`` evaluations without improvement stop the run early (0: never).
- The keeper's state (best score, its iteration, evaluations since) travels in the checkpoint, so a resumed run
  compares against the best of the whole run, not of its second session.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["BestKeeper", "score_of"]


def score_of(result: Mapping[str, Any]) -> tuple[float, float]:
    """``(mAP@0.5, mAP@[.5:.95])`` of an evaluation, NaN as -1 (ranks below every real score)."""
    voc = result.get("mAP@0.5", result.get("mAP", math.nan))
    coco = (result.get("coco") or {}).get("AP", math.nan)
    clean = lambda v: -1.0 if v is None or not math.isfinite(float(v)) else float(v)  # noqa: E731
    return clean(voc), clean(coco)


class BestKeeper:
    """Keeps the best-scoring model of a run in ``out/best.safetensors`` (see the module docstring)."""

    def __init__(self, out: Path, patience: int = 0) -> None:
        self.path = Path(out) / "best.safetensors"
        self.patience = patience
        self.score: tuple[float, float] | None = None
        self.iteration: int | None = None
        self.since = 0  # evaluations since the last improvement
        self.result: dict | None = None  # the best evaluation of this session (None after a resume)

    def offer(self, iteration: int, result: Mapping[str, Any], write: Callable[[Path], None]) -> bool:
        """Consider the model evaluated at ``iteration`` with ``result``; ``write(path)`` saves it when it is the
        best so far. Returns whether it was."""
        score = score_of(result)
        if self.score is None or score > self.score:
            self.score, self.iteration, self.since, self.result = score, iteration, 0, dict(result)
            write(self.path)
            return True
        self.since += 1
        return False

    def exhausted(self) -> bool:
        """Whether ``patience`` evaluations in a row brought no improvement."""
        return bool(self.patience) and self.since >= self.patience

    def state(self) -> dict[str, Any]:
        return {"score": list(self.score) if self.score else None, "iteration": self.iteration, "since": self.since}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.score = tuple(state["score"]) if state.get("score") else None  # type: ignore[assignment]
        self.iteration = state.get("iteration")
        self.since = int(state.get("since", 0))
