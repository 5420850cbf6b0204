"""Training-time augmentation on ``torchvision.transforms.v2``: photometric jitter, an IoU-constrained random
crop, horizontal flip and scale jitter, the boxes transformed with the pixels; and the short side of multi-scale
training, drawn once per batch.

Decisions:

- Samples are the data sets' ``(image, target)`` pairs: ``image`` RGB ``uint8`` ``HxWx3``, ``target["boxes"]``
  float32 ``(N, 4)`` xyxy in pixels (no ``+1``). ``target["proposals"]``, when present, is transformed the same
  way (the trainer caches selective search on the original image and augments the cached boxes). The per-object
  entries (:data:`OBJECT_KEYS`: labels, difficult flags, areas, crowd flags) follow their boxes when a crop drops
  some; every other entry (ids) passes through unchanged. ``area`` scales with the image.
- The kernels are ``torchvision.transforms.v2.functional``'s on ``tv_tensors`` (``Image``, ``BoundingBoxes``
  in XYXY), so boxes move with pixels by the code torchvision's own detection references use. Their parameters
  are drawn from the ``numpy.random.Generator`` the caller passes, never from torch's global generator (which v2's
  random transform classes use): one ``(seed, iteration, slot)`` gives one augmentation whatever process, worker or
  thread runs it and whatever ran before, so a resumed run draws exactly what an uninterrupted one did.
- Order: crop, flip, scale jitter, then photometric jitter (pixels only). Last, it touches only the pixels that
  remain, and gives what it would have given first (up to rounding), but for contrast, whose grey mean is then
  the crop's. The generator still draws flip, scale, jitter, then the crop.
- Photometric jitter as ``ColorJitter``: brightness, contrast and saturation factors uniform in
  ``[max(0, 1 - x), 1 + x]``, a hue shift uniform in ``[-h, h]``, applied in a random order, on ``uint8``.
- The crop is SSD's, as torchvision's ``RandomIoUCrop``: a minimum IoU drawn from ``crop_min_ious``, then up to
  ``crop_trials`` windows whose sides are ``crop_scale`` of the image's and whose aspect ratio lies in
  ``crop_aspect``; a window is taken when some object's centre lies inside it and one such object overlaps it by
  at least the minimum IoU. Objects whose centre lies outside are dropped, the others clipped to the window. When
  no window qualifies (or the image has no objects) the image stays whole.
- A flip maps the continuous coordinate ``x`` to ``W - x``: ``(x1, y1, x2, y2)`` becomes ``(W - x2, y1, W - x1,
  y2)``, exact.
- Scale jitter resizes by one factor drawn uniformly from ``scale_range`` (sides ``round(side * factor)``, at
  least 1; bilinear with antialiasing); boxes scale by the *realised* per-axis factor ``new_side / old_side``. A
  detector resizes its input to its own short side, which undoes this jitter for Faster R-CNN and SPP-Net; it
  changes the resolution R-CNN's crops are warped from.
- Multi-scale training that the model's resize does not undo: :meth:`Augment.short_side` draws one short side from
  ``short_sides`` per batch (the trainer derives its generator from the seed and the iteration) and the trainer
  makes it the detector's resize target for that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as F

from detect.errors import ConfigError

__all__ = ["BOX_KEYS", "OBJECT_KEYS", "AugmentConfig", "Augment", "crop", "hflip", "jitter_colour", "rescale"]

BOX_KEYS = ("boxes", "proposals")  # target entries holding (N, 4) xyxy boxes that move with the pixels
OBJECT_KEYS = ("labels", "difficult", "area", "iscrowd")  # per-object entries that follow "boxes" when some drop


@dataclass(frozen=True)
class AugmentConfig:
    """``flip_prob``: chance of a horizontal flip; ``scale_range``: bounds of the uniform resize factor
    (``(1.0, 1.0)`` disables it); ``short_sides``: multi-scale training, one short side per batch (empty: the
    detector's own); ``brightness``/``contrast``/``saturation``/``hue``: photometric jitter (0 disables each);
    ``crop_prob``: chance of an IoU-constrained crop with ``crop_min_ious``, ``crop_scale``, ``crop_aspect`` and
    ``crop_trials`` (see the module docstring). The defaults flip only, so recipes that name nothing else keep
    their meaning."""

    flip_prob: float = 0.5
    scale_range: tuple[float, float] = (1.0, 1.0)
    short_sides: tuple[int, ...] = ()
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    crop_prob: float = 0.0
    crop_min_ious: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_aspect: tuple[float, float] = (0.5, 2.0)
    crop_trials: int = 40

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0.0 <= self.flip_prob <= 1.0 or not 0.0 < low <= high:
            raise ConfigError(f"invalid AugmentConfig {self}: need 0 <= flip_prob <= 1 and 0 < scale low <= high")
        if any(side < 1 for side in self.short_sides):
            raise ConfigError(f"augment short_sides must be positive pixel counts, got {self.short_sides}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ConfigError(f"augment: brightness, contrast, saturation must be >= 0 and hue in [0, 0.5] ({self})")
        (s_low, s_high), (a_low, a_high) = self.crop_scale, self.crop_aspect
        if not 0 <= self.crop_prob <= 1 or not 0 < s_low <= s_high <= 1 or not 0 < a_low <= a_high:
            raise ConfigError(f"augment: need 0 <= crop_prob <= 1, 0 < crop_scale <= 1, 0 < crop_aspect ({self})")
        if not self.crop_min_ious or not all(0 <= v <= 1 for v in self.crop_min_ious) or self.crop_trials < 1:
            raise ConfigError(f"augment: crop_min_ious must lie in [0, 1] and crop_trials be >= 1 ({self})")


# --- numpy <-> tv_tensors ----------------------------------------------------------------------------------------


def _image(array: np.ndarray) -> tv_tensors.Image:
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))  # (3, H, W) uint8


def _array(image: Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (H, W, 3) uint8


def _boxes(target: dict, key: str, size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    boxes = torch.as_tensor(np.asarray(target[key], dtype=np.float32).reshape(-1, 4))  # (N, 4)
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size)


def _with_boxes(target: dict, moved: dict[str, Tensor]) -> dict:
    out = dict(target)
    out.update({key: boxes.as_subclass(Tensor).numpy().astype(np.float32) for key, boxes in moved.items()})
    return out


# --- the single transforms ---------------------------------------------------------------------------------------


def hflip(image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
    """Mirror ``image`` ``(H, W, 3)`` left-right and its boxes with it: ``x -> W - x``."""
    size = image.shape[:2]
    moved = {key: F.horizontal_flip(_boxes(target, key, size)) for key in BOX_KEYS if key in target}
    return _array(F.horizontal_flip(_image(image))), _with_boxes(target, moved)


def rescale(image: np.ndarray, target: dict, factor: float) -> tuple[np.ndarray, dict]:
    """Resize ``image`` by ``factor`` (sides rounded) and scale its boxes (and ``area``) by the realised factors."""
    height, width = image.shape[:2]
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    resized = F.resize(_image(image), [new_h, new_w], antialias=True)
    moved = {key: F.resize(_boxes(target, key, (height, width)), [new_h, new_w]) for key in BOX_KEYS if key in target}
    out = _with_boxes(target, moved)
    if "area" in target:
        ratio = np.float32(new_w / width * new_h / height)
        out["area"] = (np.asarray(target["area"], dtype=np.float32) * ratio).astype(np.float32)
    return _array(resized), out


def draw_jitter(config: AugmentConfig, rng: np.random.Generator) -> tuple[list[float | None], float | None, list[int]]:
    """``ColorJitter``'s draw from ``rng``: the brightness, contrast and saturation factors (``None`` where off),
    the hue shift (``None`` when off) and the order of the four adjustments."""
    factors = [float(rng.uniform(max(0.0, 1 - x), 1 + x)) if x else None
               for x in (config.brightness, config.contrast, config.saturation)]
    shift = float(rng.uniform(-config.hue, config.hue)) if config.hue else None
    return factors, shift, [int(i) for i in rng.permutation(4)]


def apply_jitter(image: np.ndarray, drawn: tuple[list[float | None], float | None, list[int]]) -> np.ndarray:
    """The adjustments :func:`draw_jitter` drew, in its order, on ``uint8`` ``(H, W, 3)``."""
    factors, shift, order = drawn
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    pixels = _image(image)
    for index in order:
        if index == 3:
            pixels = F.adjust_hue(pixels, shift) if shift is not None else pixels
        elif factors[index] is not None:
            pixels = adjust[index](pixels, factors[index])
    return _array(pixels)


def jitter_colour(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """``ColorJitter`` with factors from ``rng``: brightness, contrast, saturation, hue in a random order."""
    return apply_jitter(image, draw_jitter(config, rng))


def _centres_inside(centres: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """Which ``(N, 2)`` ``(x, y)`` centres lie strictly inside ``window`` ``(top, left, height, width)``."""
    top, left, height, width = window
    x, y = centres[:, 0], centres[:, 1]
    return (x > left) & (x < left + width) & (y > top) & (y < top + height)


def crop_window(
    boxes: np.ndarray, size: tuple[int, int], config: AugmentConfig, rng: np.random.Generator
) -> tuple[int, int, int, int] | None:
    """``(top, left, height, width)`` of an IoU-constrained crop of an image of ``size`` with ``boxes``
    ``(N, 4)``, or ``None`` (keep the image whole); see the module docstring."""
    height, width = size
    if not len(boxes):
        return None
    gt = torch.from_numpy(boxes.astype(np.float32))  # (N, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2) as (x, y)
    min_iou = float(rng.choice(config.crop_min_ious))
    for _ in range(config.crop_trials):
        sides = rng.uniform(*config.crop_scale, size=2)  # (w, h) fractions
        new_w, new_h = int(width * sides[0]), int(height * sides[1])
        if new_w < 1 or new_h < 1 or not config.crop_aspect[0] <= new_w / new_h <= config.crop_aspect[1]:
            continue
        left, top = int((width - new_w) * rng.random()), int((height - new_h) * rng.random())
        inside = _centres_inside(centres, (top, left, new_h, new_w))
        if not inside.any():
            continue
        window = torch.tensor([[left, top, left + new_w, top + new_h]], dtype=torch.float32)
        if float(box_iou(gt[torch.from_numpy(inside)], window).max()) >= min_iou:
            return top, left, new_h, new_w
    return None


def crop(image: np.ndarray, target: dict, window: tuple[int, int, int, int]) -> tuple[np.ndarray, dict]:
    """Cut ``window`` ``(top, left, height, width)`` out of ``image``: objects whose centre lies outside are
    dropped with their per-object entries, the other boxes (and proposals) clipped to it; empty proposals go."""
    top, left, new_h, new_w = window
    size = image.shape[:2]
    boxes = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)  # (N, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    keep = _centres_inside(centres, window)
    moved = {key: F.crop(_boxes(target, key, size), top, left, new_h, new_w) for key in BOX_KEYS if key in target}
    out = _with_boxes(target, moved)
    before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    after = (out["boxes"][:, 2] - out["boxes"][:, 0]) * (out["boxes"][:, 3] - out["boxes"][:, 1])
    out["boxes"] = out["boxes"][keep]
    for key in OBJECT_KEYS:
        if key in target:
            values = np.asarray(target[key])
            if key == "area":
                values = (values * np.where(before > 0, after / np.maximum(before, 1e-12), 1)).astype(np.float32)
            out[key] = values[keep]
    if "proposals" in out:
        proposals = out["proposals"]
        sides = proposals[:, 2:] - proposals[:, :2]  # (P, 2)
        out["proposals"] = proposals[(sides >= 1).all(1)]
    return _array(F.crop(_image(image), top, left, new_h, new_w)), out


class Augment:
    """Photometric jitter, crop, flip and scale jitter per :class:`AugmentConfig`: ``augment(image, target, rng)``;
    :meth:`short_side` draws a batch's short side."""

    def __init__(self, config: AugmentConfig = AugmentConfig()) -> None:
        self.config = config

    def short_side(self, rng: np.random.Generator) -> int | None:
        """One of ``short_sides`` for a batch (``None`` when multi-scale training is off)."""
        sides = self.config.short_sides
        return int(sides[int(rng.integers(len(sides)))]) if sides else None

    def __call__(
        self, image: np.ndarray, target: dict, rng: np.random.Generator,
        finish: Callable[[np.ndarray, dict], tuple[np.ndarray, dict]] | None = None,
    ) -> tuple[np.ndarray, dict]:
        """The augmented ``(image, target)``; ``finish`` runs after the geometric steps and before the photometric
        jitter (the trainer brings the image to the detector's input size there)."""
        cfg = self.config
        flip = rng.random() < cfg.flip_prob
        factor = float(rng.uniform(*cfg.scale_range))
        jitter = draw_jitter(cfg, rng) if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue else None
        if cfg.crop_prob and rng.random() < cfg.crop_prob:
            window = crop_window(np.asarray(target["boxes"], np.float32).reshape(-1, 4), image.shape[:2], cfg, rng)
            if window is not None:
                image, target = crop(image, target, window)
        if flip:
            image, target = hflip(image, target)
        if factor != 1.0:
            image, target = rescale(image, target, factor)
        if finish is not None:
            image, target = finish(image, target)
        if jitter is not None:  # last: on the crop's pixels only (drawn first, so the draws keep their order)
            image = apply_jitter(image, jitter)
        return image, target
