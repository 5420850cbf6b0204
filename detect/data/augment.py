"""Training-time augmentation: horizontal flip and scale jitter, boxes transformed with the images.

Decisions:

- Samples are the data sets' ``(image, target)`` pairs: ``image`` RGB ``uint8`` ``HxWx3``, ``target["boxes"]``
  float32 ``(N, 4)`` xyxy in pixels (no ``+1``). ``target["proposals"]``, when present, is transformed the same
  way (the trainer caches selective search on the original image and augments the cached boxes). Every other
  entry is passed through unchanged (labels, difficult flags, ids), except ``area`` which scales with the image.
- A flip maps pixel column ``k`` to ``W - 1 - k``, i.e. the continuous coordinate ``x`` to ``W - x``, so a box
  ``(x1, y1, x2, y2)`` becomes ``(W - x2, y1, W - x1, y2)``: exact, no off-by-one.
- Scale jitter resizes by one factor drawn uniformly from ``scale_range`` (the aspect ratio is kept; the output
  side is ``round(side * factor)``, at least 1), with bilinear interpolation (area averaging when shrinking).
  Boxes scale by the *realised* per-axis factor ``new_side / old_side``, so rounding never misplaces them.
- Randomness comes only from the ``numpy.random.Generator`` the caller passes, so one seed gives one sequence of
  augmentations, whatever process or worker runs it (the trainer derives it from the recipe's seed, the
  iteration and the image's position in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from detect.errors import ConfigError

__all__ = ["BOX_KEYS", "AugmentConfig", "Augment", "hflip", "rescale"]

BOX_KEYS = ("boxes", "proposals")  # target entries holding (N, 4) xyxy boxes that move with the pixels


@dataclass(frozen=True)
class AugmentConfig:
    """``flip_prob``: chance of a horizontal flip; ``scale_range``: bounds of the uniform resize factor
    (``(1.0, 1.0)`` disables jitter)."""

    flip_prob: float = 0.5
    scale_range: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0.0 <= self.flip_prob <= 1.0 or not 0.0 < low <= high:
            raise ConfigError(f"invalid AugmentConfig {self}: need 0 <= flip_prob <= 1 and 0 < scale low <= high")


def hflip(image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
    """Mirror ``image`` ``(H, W, 3)`` left-right and its boxes with it: ``x -> W - x``."""
    width = image.shape[1]
    out = dict(target)
    for key in BOX_KEYS:
        if key in target:
            boxes = np.asarray(target[key], dtype=np.float32).reshape(-1, 4)  # (N, 4)
            out[key] = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.ascontiguousarray(image[:, ::-1]), out


def rescale(image: np.ndarray, target: dict, factor: float) -> tuple[np.ndarray, dict]:
    """Resize ``image`` by ``factor`` (sides rounded) and scale its boxes (and ``area``) by the realised factors."""
    height, width = image.shape[:2]
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    sx, sy = new_w / width, new_h / height
    scale = np.array([sx, sy, sx, sy], np.float32)
    out = dict(target)
    for key in BOX_KEYS:
        if key in target:
            out[key] = np.asarray(target[key], dtype=np.float32).reshape(-1, 4) * scale  # (N, 4)
    if "area" in target:
        out["area"] = (np.asarray(target["area"], dtype=np.float32) * np.float32(sx * sy)).astype(np.float32)
    return resized, out


class Augment:
    """Random flip then scale jitter per :class:`AugmentConfig`; ``augment(image, target, rng)``."""

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config

    def __call__(self, image: np.ndarray, target: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        flip = rng.random() < self.config.flip_prob
        factor = float(rng.uniform(*self.config.scale_range))
        if flip:
            image, target = hflip(image, target)
        if factor != 1.0:
            image, target = rescale(image, target, factor)
        return image, target
