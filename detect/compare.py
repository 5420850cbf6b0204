"""``detect compare``: R-CNN, SPP-Net and Faster R-CNN on the same images, with the papers' speed table measured live.

Each detector runs its whole pipeline (selective search + R-CNN, selective search + SPP-Net, RPN + Faster R-CNN)
on the caller's images; :func:`compare` returns, per detector, the seconds spent in each stage and its detections,
:func:`format_table` prints the table and :func:`side_by_side` draws one picture with a row per image and a column
per detector.

Decisions:

- **Stages.** ``proposals`` (selective search; the RPN for Faster R-CNN), ``features`` (what computes the maps the
  regions are read from: R-CNN's warping and conv layers on every crop, SPP-Net's and Faster R-CNN's one conv pass
  per image, with their resizing), ``pooling`` (R-CNN's pool5 on each crop, SPP-Net's pyramid pooling, Faster
  R-CNN's RoI Align), ``heads`` (fc6/fc7, classifier and regressors), ``NMS`` (decoding, clipping, per-class
  suppression, mapping back to the image), and ``other`` (the rest of the wall time).
- **Timed from outside.** The detectors record no timings: :class:`StageTimer` wraps their stage methods and
  hooks their stage modules for the one timed call and removes itself afterwards, so what is timed is the
  ordinary forward. Nested parts are subtracted (R-CNN's ``features`` is its ``pool`` minus ``pool5``).
- **Warm-up.** Each detector first runs once, untimed, on a small generated image: numba loads or compiles its
  kernels and PyTorch its own lazy state on first use, which is no part of any stage.
- **Models** are loaded as ``detect predict`` loads them (:func:`detect.inference.load_model`: eval mode, frozen
  BN folded), with the bundled ``<family>_shapes`` weights unless others are given. ``sppnet_ranks`` compresses
  SPP-Net's fc6/fc7 by truncated SVD first (:meth:`detect.detectors.region.RegionDetector.compress`).
- **Detections** shown and drawn are those scoring at least ``score_threshold`` (0.5 by default), best first.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from detect import detectors
from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.detectors.faster_rcnn import FasterRCNN
from detect.detectors.rcnn import RCNN
from detect.detectors.sppnet import SPPNet
from detect.errors import ConfigError
from detect.drawing import draw_detections
from detect.inference import Refinement, default_weights, load_model
from detect.structures import Detections

__all__ = [
    "FAMILIES",
    "STAGES",
    "DetectorRun",
    "StageTimer",
    "compare",
    "format_detections",
    "format_table",
    "instrument",
    "side_by_side",
]

FAMILIES = detectors.generations()  # (family, paper title), oldest first: the registry's, not a second table
"""The three generations in paper order: family name and the label the table and the picture use."""

STAGES = ("proposals", "features", "pooling", "heads", "NMS")

Stages = list[tuple[str, tuple[str, ...], tuple[str, ...]]]  # (stage, parts added, parts subtracted)


class StageTimer:
    """Wall time of named parts of a model, summed over calls: forward hooks on modules, wrappers on methods
    (instance attributes, removed again by :meth:`remove`). Parts may nest; :meth:`split` combines them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def module(self, part: str, module: nn.Module) -> None:
        starts: list[float] = []
        pre = module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        post = module.register_forward_hook(lambda *_: self._add(part, starts.pop()))
        self._undo += [pre.remove, post.remove]

    def method(self, part: str, owner: object, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._add(part, start)

        own = vars(owner).get(name)  # an instance attribute of its own comes back on removal
        setattr(owner, name, timed)
        self._undo.append(lambda: delattr(owner, name) if own is None else setattr(owner, name, own))

    def _add(self, part: str, start: float) -> None:
        self.seconds[part] += time.perf_counter() - start

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def split(self, stages: Stages, total: float) -> dict[str, float]:
        """Seconds per stage, plus ``other`` (the rest of ``total``) and ``total``."""
        result = {
            stage: sum(self.seconds[p] for p in plus) - sum(self.seconds[p] for p in minus)
            for stage, plus, minus in stages
        }
        result["other"] = total - sum(result.values())
        result["total"] = total
        return result


def instrument(timer: StageTimer, model: nn.Module) -> Stages:
    """Attach ``timer`` to the stage parts of an R-CNN, SPP-Net or Faster R-CNN and return how the parts make up
    :data:`STAGES` (see the module docstring)."""
    if isinstance(model, FasterRCNN):
        heads = model.roi_heads
        timer.method("resize", model.transform, "grouped")
        timer.method("unresize", model.transform, "postprocess")
        timer.method("postprocess", heads, "postprocess")
        for part, module in (("backbone", model.backbone), ("rpn", model.rpn), ("roi_pool", heads.box_roi_pool),
                             ("box_head", heads.box_head), ("predictor", heads.box_predictor)):
            timer.module(part, module)
        return [
            ("proposals", ("rpn",), ()),
            ("features", ("resize", "backbone"), ()),
            ("pooling", ("roi_pool",), ()),
            ("heads", ("box_head", "predictor"), ()),
            ("NMS", ("postprocess", "unresize"), ()),
        ]
    if not isinstance(model, (RCNN, SPPNet)):
        raise ConfigError(f"cannot time the stages of {type(model).__name__}: not an R-CNN, SPP-Net or Faster R-CNN")
    for part in ("region_proposals", "prepare", "pool", "detections"):
        timer.method(part, model, part)
    timer.module("heads", model.heads)
    if isinstance(model, RCNN):
        timer.module("pool5", model.pool5)
        features: tuple[tuple[str, ...], tuple[str, ...]] = (("prepare", "pool"), ("pool5",))
        pooling: tuple[str, ...] = ("pool5",)
    else:
        features, pooling = (("prepare",), ()), ("pool",)
    return [
        ("proposals", ("region_proposals",), ()),
        ("features", *features),
        ("pooling", pooling, ()),
        ("heads", ("heads",), ()),
        ("NMS", ("detections",), ()),
    ]


@dataclass
class DetectorRun:
    """One detector's run over the images: its label and weights, the seconds per stage (summed over the images;
    keys :data:`STAGES`, ``other`` and ``total``) and each image's detections at the score threshold."""

    label: str
    weights: str
    class_names: tuple[str, ...]
    seconds: dict[str, float]
    detections: list[Detections] = field(default_factory=list)


def _warm_up(model: nn.Module) -> None:
    """One untimed call on a small generated shapes image (numba kernels, lazy PyTorch state)."""
    image, _ = ShapesDataset(ShapesConfig(num_images=1, image_size=96, seed=7))[0]
    with torch.inference_mode():
        model([image])


def compare(
    images: Sequence[np.ndarray],
    weights: Mapping[str, str] | None = None,
    *,
    device: str = "auto",
    score_threshold: float = 0.5,
    sppnet_ranks: tuple[int | None, int | None] | None = None,
) -> list[DetectorRun]:
    """Run R-CNN, SPP-Net and Faster R-CNN (in that order) on ``images`` (RGB ``uint8`` ``HxWx3``), timing each
    stage of one call over all images (see the module docstring). ``weights`` maps a family (``rcnn``,
    ``sppnet``, ``faster_rcnn``) to a registered name or file; the others use their bundled weights."""
    if not images:
        raise ConfigError("detect compare needs at least one image")
    weights = dict(weights or {})
    if unknown := sorted(set(weights) - {family for family, _ in FAMILIES}):
        raise ConfigError(f"unknown detector families {unknown}; known: {[f for f, _ in FAMILIES]}")
    refinement = Refinement(score_threshold=score_threshold)
    runs = []
    for family, label in FAMILIES:
        name = weights.get(family) or default_weights(family)
        model = load_model(name, device, family)
        if family == "sppnet" and sppnet_ranks is not None:
            model.compress(*sppnet_ranks)
            label = f"{label}+SVD {'/'.join(str(r) for r in sppnet_ranks)}"
        _warm_up(model)
        timer = StageTimer()
        stages = instrument(timer, model)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                found, _ = model(list(images))
        finally:
            total = time.perf_counter() - start
            timer.remove()
        detections = [refinement.apply(d.to("cpu")) for d in found]
        runs.append(DetectorRun(label, str(name), tuple(model.class_names), timer.split(stages, total), detections))
    return runs


def format_table(runs: Sequence[DetectorRun], num_images: int) -> str:
    """The per-stage table: milliseconds per image for every stage, the total, and the speed-up over the first
    detector (R-CNN)."""
    columns = [*STAGES, "other", "total"]
    width = max(len(r.label) for r in runs) + 2
    lines = [f"{'ms per image':<{width}}" + "".join(f"{c:>11}" for c in columns) + f"{'vs ' + runs[0].label:>16}"]
    baseline = runs[0].seconds["total"]
    for run in runs:
        cells = "".join(f"{run.seconds[c] * 1e3 / num_images:>11.1f}" for c in columns)
        lines.append(f"{run.label:<{width}}{cells}{baseline / run.seconds['total']:>15.1f}x")
    return "\n".join(lines)


def format_detections(runs: Sequence[DetectorRun], names: Sequence[str]) -> str:
    """Each image's detections by each detector: ``class score [x1, y1, x2, y2]``, best first."""
    lines = []
    for index, name in enumerate(names):
        lines.append(f"{name}:")
        for run in runs:
            found = run.detections[index].to_json(run.class_names)["detections"]
            items = ", ".join(f"{d['class_name']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]"
                              for d in found)
            lines.append(f"  {run.label:<22} {len(found):>3}: {items or '-'}")
    return "\n".join(lines)


_HEADER = 22  # pixels of caption above each panel


def side_by_side(images: Sequence[np.ndarray], runs: Sequence[DetectorRun]) -> Image.Image:
    """One picture: a row per image, a column per detector, each panel the image with that detector's boxes and a
    caption with the detector's name, its milliseconds for this batch per image and its detection count."""
    width = max(image.shape[1] for image in images)
    heights = [image.shape[0] + _HEADER for image in images]
    canvas = Image.new("RGB", (width * len(runs), sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = 0
    for index, image in enumerate(images):
        for column, run in enumerate(runs):
            left = column * width
            canvas.paste(draw_detections(image, run.detections[index], run.class_names), (left, top + _HEADER))
            milliseconds = run.seconds["total"] * 1e3 / len(images)
            caption = f"{run.label}: {milliseconds:.0f} ms/image, {len(run.detections[index])} found"
            draw.text((left + 4, top + 5), caption, fill=(0, 0, 0))
        top += heights[index]
    return canvas
