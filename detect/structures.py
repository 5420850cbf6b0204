"""Plain data types shared by every layer. No model code here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Detections:
    """Detections for one image.

    ``boxes`` are float32 ``xyxy`` in pixels of the original (EXIF-upright) image, without the ``+1`` of old
    VOC code: a box ``[0, 0, 10, 5]`` is 10 pixels wide. ``labels`` are 1-based indices into the model's
    ``class_names`` (0 is background inside models and never appears here). ``image_size`` is ``(height, width)``.
    """

    boxes: Tensor  # (N, 4) float32 xyxy
    scores: Tensor  # (N,) float32
    labels: Tensor  # (N,) int64, 1-based
    image_size: tuple[int, int]  # (H, W)
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        if self.scores.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(
                f"scores {tuple(self.scores.shape)} and labels {tuple(self.labels.shape)} must be ({n},)"
            )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, image_size: tuple[int, int], device: torch.device | str = "cpu") -> "Detections":
        return cls(
            boxes=torch.zeros((0, 4), dtype=torch.float32, device=device),
            scores=torch.zeros((0,), dtype=torch.float32, device=device),
            labels=torch.zeros((0,), dtype=torch.int64, device=device),
            image_size=image_size,
        )

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(
            self.boxes.to(device), self.scores.to(device), self.labels.to(device), self.image_size, dict(self.extras)
        )

    def filter(self, keep: Tensor) -> "Detections":
        """A subset by boolean mask or index tensor."""
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.image_size, dict(self.extras))

    def to_json(self, class_names: Sequence[str]) -> dict:
        """The JSON the API and CLI emit: ``{width, height, detections: [{box, score, class_id, class_name}]}``.

        ``class_names`` is the weights' class list without background: ``class_id`` ``k`` is ``class_names[k-1]``.
        """
        boxes = self.boxes.detach().to("cpu", torch.float32).tolist()
        scores = self.scores.detach().to("cpu", torch.float32).tolist()
        labels = self.labels.detach().to("cpu", torch.int64).tolist()
        h, w = self.image_size
        return {
            "width": int(w),
            "height": int(h),
            "detections": [
                {
                    "box": [round(v, 2) for v in b],
                    "score": round(s, 5),
                    "class_id": int(c),
                    "class_name": class_names[c - 1] if 0 < c <= len(class_names) else str(c),
                }
                for b, s, c in zip(boxes, scores, labels)
            ],
        }
