"""The recipe derived from the data: ``detect train --data DIR`` without ``--recipe``.

The data is read once, from the annotations and the image headers (:func:`detect.data.check.scan_dataset`, what
``detect data check`` reads; no pixel is decoded), into :class:`DataStats`, and :func:`derive_recipe` turns the
statistics into a recipe (a plain mapping, the YAML ``recipe.yaml`` holds). Decisions:

- Model: the from-scratch tiny variant of the family (``fasterrcnn_tiny``, ``sppnet_tiny``, ``rcnn_tiny``): no
  outside weights; pre-training on crops of the training boxes (:mod:`detect.pretrain`) is on.
- Input short side: the images' median short side ``s`` resized to ``S`` = 320 (at most ``s`` itself, at least
  160), raised until the small objects (the 10th percentile of ``sqrt(w h)``) measure :data:`SMALL_OBJECT_SIDE`
  pixels at the input, capped at :data:`MAX_SHORT_SIDE` (CPU cost grows with its square). Long side: ``5/3 S``.
  For Faster R-CNN, where the small objects do not need more, ``S`` is lowered (to 160 at least) until the median
  object measures about :data:`RECEPTIVE_FIELD` pixels, what one cell of the tiny backbone's map sees: the RPN
  scores a cell's anchors from that cell alone, so an object several times larger is judged from a part of
  it, and each step costs four times as much at twice the side. On the raccoon photos (objects 0.83 of the
  short side) 320 pixels plateaued at VOC mAP@0.5 0.75 within the 30-minute budget.
- Anchors (Faster R-CNN): the training boxes at the derived scale, fitted as the tiny model's grid of 4 sizes x 3
  aspect ratios (height / width): sizes are 1-D k-means centres of ``log sqrt(w h)``, ratios of ``log(h / w)``.
  Best-possible recall (BPR) is the share of boxes whose best anchor (same centre) overlaps them by IoU >= 0.5,
  as YOLO's autoanchor reports; the fitted anchors replace the defaults only when their BPR is higher.
- Batch size 4 at 320 pixels on a CPU (scaled by the inverse square of ``S``, 1-8), 8 on a GPU, never more than
  the training images; SGD, cosine decay with warm-up; ``max_iterations`` a cap of 300 epochs that the time budget
  (:mod:`detect.training.budget`) cuts to what fits; evaluations on the budget's plan, early stop after
  :data:`PATIENCE` evaluations without improvement. Faster R-CNN keeps a moving average of its weights
  (:data:`EMA_DECAY`, :mod:`detect.training.ema`): evaluations and the saved model are the average's. In 30
  minutes on the fruit photos the best VOC mAP@0.5 / mAP@[.5:.95] went from 0.738 / 0.395 (one run) to 0.750 /
  0.432 (mean of three), and on the raccoons every evaluation after the first half stayed above 0.80 (the region
  detectors were not measured with it and go without). Augmentation: flip, photometric jitter, IoU crops. No
  hue shift: torchvision's goes through HSV and back, and on the 2-core CPU it took 100 ms of a 560 ms step with
  8 photos of 0.2 MP, 310 ms of 1.1 s at 0.7 MP; under a time budget those steps count for more.
- Validation: ``--val-data`` when given, else the data's own ``val`` split, else a seeded fifth of the images.
- Every surprise in the data becomes a :attr:`Derivation.notes` line saying what the recipe did about it; data
  that cannot be trained on (no boxes at all) is a :class:`DatasetError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detect.backbones import TINY_LAYERS
from detect.data.check import scan_dataset
from detect.data.config import DataConfig, make_dataset
from detect.detectors.faster_rcnn import TINY_ANCHORS
from detect.errors import DatasetError
from detect.io import atomic_write

__all__ = ["MODELS", "DataStats", "Derivation", "anchor_bpr", "data_stats", "derive_recipe", "fit_anchors",
           "format_derivation", "write_recipe"]

MODELS = {"faster_rcnn": "fasterrcnn_tiny", "sppnet": "sppnet_tiny", "rcnn": "rcnn_tiny"}
BASE_SHORT_SIDE = 320
MIN_SHORT_SIDE = 160
MAX_SHORT_SIDE = 640
SMALL_OBJECT_SIDE = 24  # pixels at the input the small objects should measure (3 cells of the stride-8 backbone)
TINY_BOX_SIDE = 8  # boxes below this at the input are a note: the stride-8 backbone hardly sees them
PATIENCE = 5
DEFAULT_BUDGET = 1800.0  # seconds: detect train --data without --time
EPOCH_CAP = 300
VAL_FRACTION = 0.2
EMA_DECAY = 0.999  # Faster R-CNN: evaluate and keep a moving average of the weights (detect.training.ema)


def _receptive_field(layers: Sequence[tuple[int, int, int]]) -> int:
    """Input pixels one output cell of 3x3 conv ``layers`` (width multiple, stride, dilation) sees."""
    field, jump = 1, 1
    for _, stride, dilation in layers:
        field += 2 * dilation * jump
        jump *= stride
    return field


RECEPTIVE_FIELD = _receptive_field(TINY_LAYERS)  # 135 pixels: what one cell of the tiny backbone's map sees


@dataclass
class DataStats:
    """What the derivation reads: the class names, the training images' ``(H, W)`` (``image_sizes``, ``(N, 2)``),
    every training box's ``(w, h)`` in original pixels (``boxes_wh``, ``(M, 2)``) and the short side of its
    image (``box_short_sides``, ``(M,)``), boxes reaching past their image (``outside``), the most objects in one
    image, and the validation objects per class (``None`` when validation is a hold-out of the same data
    unmeasured)."""

    class_names: tuple[str, ...]
    image_sizes: np.ndarray
    boxes_wh: np.ndarray
    box_short_sides: np.ndarray
    outside: int = 0
    max_objects: int = 0
    val_images: int = 0
    val_objects: dict[str, int] | None = None
    problems: list[str] = field(default_factory=list)


def data_stats(train: DataConfig, val: DataConfig | None) -> DataStats:
    """:class:`DataStats` of a run's training data (and its validation data's class counts), read once."""
    dataset = make_dataset(train)
    indices = getattr(dataset, "indices", None)  # a hold-out part: scan the whole set, keep the part's images
    scan = scan_dataset(dataset.dataset if indices is not None else dataset)
    pairs = list(zip(scan["targets"], scan["sizes"]))
    if indices is not None:
        pairs = [pairs[i] for i in indices]
    sizes, wh, short, outside, most = [], [], [], 0, 0
    for target, size in pairs:
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        most = max(most, len(boxes))
        if size is None:
            continue
        sizes.append(size)
        h, w = size
        outside += int(np.sum((boxes[:, 0] < -0.5) | (boxes[:, 1] < -0.5) | (boxes[:, 2] > w + 0.5)
                              | (boxes[:, 3] > h + 0.5)))
        clipped = np.stack([boxes[:, 0].clip(0, w), boxes[:, 1].clip(0, h), boxes[:, 2].clip(0, w),
                            boxes[:, 3].clip(0, h)], axis=1)
        side = clipped[:, 2:] - clipped[:, :2]  # (n, 2) w, h
        wh.append(side[(side > 0).all(axis=1)])
        short.append(np.full(len(wh[-1]), min(h, w), dtype=np.float64))
    val_objects, val_images = None, 0
    if val is not None:
        val_set = make_dataset(val)
        val_images = len(val_set)
        counts = np.zeros(len(scan["dataset"].class_names), dtype=np.int64)
        for i in range(val_images):
            labels = np.asarray(val_set.annotation(i)["labels"], dtype=np.int64)
            counts += np.bincount(labels - 1, minlength=len(counts))[: len(counts)] if labels.size else 0
        val_objects = dict(zip(scan["dataset"].class_names, counts.tolist()))
    return DataStats(
        class_names=tuple(scan["dataset"].class_names),
        image_sizes=np.array(sizes, dtype=np.float64).reshape(-1, 2),
        boxes_wh=np.concatenate(wh or [np.zeros((0, 2))]),
        box_short_sides=np.concatenate(short or [np.zeros(0)]),
        outside=outside,
        max_objects=most,
        val_images=val_images,
        val_objects=val_objects,
        problems=[p["message"] for p in scan["problems"]],
    )


# -- anchors --------------------------------------------------------------------------------------------------------

def _anchor_shapes(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """``(A, 2)`` anchor ``(w, h)``: size ``s`` and ratio ``r = h / w`` give ``w = s / sqrt(r)``, ``h = s sqrt(r)``
    (the rounding of :func:`proposals.anchors.cell_anchors` aside)."""
    s, r = np.meshgrid(np.asarray(sizes, np.float64), np.asarray(ratios, np.float64))
    return np.stack([(s / np.sqrt(r)).ravel(), (s * np.sqrt(r)).ravel()], axis=1)


def anchor_bpr(boxes_wh: np.ndarray, sizes: Sequence[float], ratios: Sequence[float], iou: float = 0.5) -> float:
    """Best-possible recall: the share of boxes ``(M, 2)`` (w, h) whose best anchor, centred on the box, overlaps
    it by at least ``iou``."""
    if not len(boxes_wh):
        return math.nan
    anchors = _anchor_shapes(sizes, ratios)  # (A, 2)
    inter = np.minimum(boxes_wh[:, None, :], anchors[None]).prod(axis=2)  # (M, A)
    union = boxes_wh.prod(axis=1)[:, None] + anchors.prod(axis=1)[None] - inter
    return float(np.mean((inter / union).max(axis=1) >= iou))


def _kmeans_1d(values: np.ndarray, k: int, steps: int = 50) -> np.ndarray:
    """Sorted k-means centres of 1-D ``values``, started at evenly spaced quantiles (deterministic)."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(steps):
        nearest = np.abs(values[:, None] - centres[None]).argmin(axis=1)
        new = np.array([values[nearest == j].mean() if np.any(nearest == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def fit_anchors(boxes_wh: np.ndarray, n_sizes: int = 4, n_ratios: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Anchor sizes and ratios (height / width) fitted to boxes ``(M, 2)``: k-means on ``log sqrt(w h)`` and on
    ``log(h / w)`` (see the module docstring). Sizes are whole pixels (at least 4), ratios two decimals."""
    logs = np.log(np.sqrt(boxes_wh.prod(axis=1)))
    ratios = np.log(boxes_wh[:, 1] / boxes_wh[:, 0])
    sizes = tuple(float(max(4, round(math.exp(c)))) for c in _kmeans_1d(logs, min(n_sizes, len(logs))))
    aspect = tuple(float(round(math.exp(c), 2)) for c in _kmeans_1d(ratios, min(n_ratios, len(ratios))))
    sizes = list(dict.fromkeys(sizes))
    while len(sizes) < n_sizes:  # fewer distinct box sizes than anchors: the spare ones double the largest
        sizes.append(sizes[-1] * 2)
    return tuple(sizes), tuple(dict.fromkeys(aspect))


# -- the recipe -----------------------------------------------------------------------------------------------------

@dataclass
class Derivation:
    """A derived recipe (``recipe``, the mapping ``recipe.yaml`` holds), the table of what was chosen and why
    (``rows``: field, value, reason), the anchors' BPR before and after the fit, and the notes on the data."""

    recipe: dict[str, Any]
    rows: list[tuple[str, str, str]]
    bpr_default: float | None = None
    bpr_fitted: float | None = None
    notes: list[str] = field(default_factory=list)


def _round32(value: float) -> int:
    return int(32 * math.ceil(value / 32))


def derive_recipe(
    stats: DataStats,
    data: Mapping[str, Any],
    val_data: Mapping[str, Any] | None = None,
    model: str = "faster_rcnn",
    budget_seconds: float | None = None,
    device: str = "cpu",
    out_dir: str = "runs/train",
) -> Derivation:
    """The recipe for ``stats`` (see the module docstring). ``data``/``val_data`` are the recipe's data fields
    (where the images are); ``budget_seconds`` ``None`` leaves the length to ``max_iterations``."""
    if model not in MODELS:
        raise DatasetError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    n = len(stats.image_sizes)
    notes = [f"data problem (skipped): {p}" for p in stats.problems[:5]]
    if len(stats.problems) > 5:
        notes.append(f"... and {len(stats.problems) - 5} more data problems (detect data check lists them all)")
    if n == 0:
        raise DatasetError("the data holds no readable image: nothing to train on (detect data check lists why)")
    if not len(stats.boxes_wh):
        raise DatasetError(
            f"the data holds {n} image(s) but no boxes at all: a detector learns from boxes, so there is nothing to "
            "train on. Annotate some objects (detect data check shows what was read)"
        )
    rows: list[tuple[str, str, str]] = []
    # input size
    short = float(np.median(stats.image_sizes.min(axis=1)))
    object_side = np.sqrt(stats.boxes_wh.prod(axis=1))  # (M,)
    relative = object_side / stats.box_short_sides  # object side as a share of its image's short side
    small = float(np.quantile(relative, 0.1))
    side = max(MIN_SHORT_SIDE, min(BASE_SHORT_SIDE, _round32(short)))
    needed = _round32(SMALL_OBJECT_SIDE / max(small, 1e-6))
    reason = f"median image short side {short:g}"
    if needed > side:
        side = min(MAX_SHORT_SIDE, needed)
        reason += f"; small objects (10th percentile {small * short:.0f} px) need {needed}"
        if needed > MAX_SHORT_SIDE:
            reason += f", capped at {MAX_SHORT_SIDE}"
    elif model == "faster_rcnn":
        typical = float(np.median(relative))
        fits = max(MIN_SHORT_SIDE, needed, 32 * round(RECEPTIVE_FIELD / max(typical, 1e-6) / 32))
        if fits < side:
            reason += (f"; the median object ({typical * side:.0f} px at {side}) is larger than what one cell of "
                       f"the backbone sees ({RECEPTIVE_FIELD} px): lowered to {fits}")
            side = fits
    rows.append(("input short side", str(side), reason))
    scaled = stats.boxes_wh * (side / stats.box_short_sides)[:, None]  # (M, 2) at the input
    tiny = int(np.sum(np.sqrt(scaled.prod(axis=1)) < TINY_BOX_SIDE))
    if tiny:
        notes.append(f"{tiny} of {len(scaled)} boxes stay under {TINY_BOX_SIDE} pixels at the {side}-pixel input "
                     f"(the backbone's stride is 8): expect them to be missed; the input was raised to {side}")
    # classes and validation
    rows.append(("classes", ", ".join(stats.class_names) if len(stats.class_names) <= 6
                 else f"{len(stats.class_names)} ({', '.join(stats.class_names[:4])}, ...)",
                 f"{len(scaled)} boxes in {n} training images"))
    data = dict(data)
    if val_data is None and n < 5:
        data["val_fraction"] = 0.0
        notes.append(f"only {n} image(s): no validation hold-out is possible, so the model is the last one, not "
                     "the best, and no mAP is measured (give --val-data to measure one)")
    if stats.val_objects is not None:
        missing = [name for name, count in stats.val_objects.items() if count == 0]
        if missing:
            notes.append(f"class(es) {', '.join(missing)} have no object in the {stats.val_images} validation "
                         "images: their AP is not measured and the mAP averages the other classes")
    if stats.outside:
        notes.append(f"{stats.outside} boxes reach past their image: clipped to the image for the statistics "
                     "(the loader clips them the same way in training)")
    # anchors
    detector = MODELS[model]
    detector_config: dict[str, Any] = {}
    bpr_default = bpr_fitted = None
    if model == "faster_rcnn":
        bpr_default = anchor_bpr(scaled, *TINY_ANCHORS)
        sizes, ratios = fit_anchors(scaled)
        fitted = (sizes, ratios)
        bpr_fitted = anchor_bpr(scaled, *fitted)
        if bpr_fitted > bpr_default:
            detector_config |= {"anchor_sizes": list(fitted[0]), "anchor_ratios": list(fitted[1])}
            rows.append(("anchors", f"sizes {_nums(fitted[0])}, ratios {_nums(fitted[1])}",
                         f"fitted: BPR@0.5 {bpr_default:.3f} -> {bpr_fitted:.3f}"))
        else:
            rows.append(("anchors", f"sizes {_nums(TINY_ANCHORS[0])}, ratios {_nums(TINY_ANCHORS[1])}",
                         f"default kept: BPR@0.5 {bpr_default:.3f} (fit {bpr_fitted:.3f})"))
        most = max(100, stats.max_objects)
        detector_config |= {
            "transform": {"min_size": [side], "max_size": _round32(side * 5 / 3)},
            "rpn": {"pre_nms_top_n_train": 1200, "post_nms_top_n_train": 600, "pre_nms_top_n_test": 600,
                    "post_nms_top_n_test": max(300, most), "batch_size_per_image": 256},
            "roi_heads": {"batch_size_per_image": 128, "score_thresh": 0.01, "detections_per_img": most},
        }
    else:
        region = {"proposals": {"mode": "fast", "max_boxes": 300, "resize_max_side": 500},
                  "postprocess": {"nms_thresh": 0.3, "score_thresh": 0.01}, "representation_size": 256}
        if model == "sppnet":
            region |= {"scales": [side], "max_size": _round32(side * 5 / 3), "pyramid_levels": [1, 2, 4],
                       "sampling": {"batch_size": 64, "positive_fraction": 0.25, "bg_iou_low": 0.1,
                                    "per_image": True}}
        else:
            region |= {"input_size": 64, "context_padding": 8,
                       "sampling": {"batch_size": 128, "positive_fraction": 0.25, "fg_iou_thresh": 0.5,
                                    "bg_iou_low": 0.0}}
            rows[0] = ("input short side", "-", "R-CNN warps each region to 64 x 64; no image resize")
        detector_config |= region
    if stats.max_objects > 100:
        notes.append(f"up to {stats.max_objects} objects in one image: detections per image raised to "
                     f"{stats.max_objects}")
    # batch, length, budget
    if device == "cpu":
        batch = int(min(8, max(1, round(4 * (BASE_SHORT_SIDE / side) ** 2))))
    else:
        batch = 8
    batch = max(1, min(batch, n))
    cap = max(500, math.ceil(EPOCH_CAP * n / batch))
    rows.append(("batch size", str(batch), f"{device}, {side}-pixel input"))
    if budget_seconds:
        pretrain_steps = 1500  # a cap: the budget ends the stage at its share of the time
        length = f"fitted to the {_duration(budget_seconds)} budget from the measured step time (cap {cap})"
    else:
        pretrain_steps = 1000
        cap = min(cap, 3000)
        length = f"{cap} iterations (no time budget)"
    rows.append(("iterations", "budget" if budget_seconds else str(cap), length))
    rows.append(("pretrain on crops", f"{pretrain_steps} steps" + (" at most" if budget_seconds else ""),
                 "no outside weights: the backbone first learns to name the training boxes' crops"
                 + (" (at most 15% of the budget)" if budget_seconds else "")))
    rows.append(("augmentation", "flip, colour jitter, IoU crops", "on; brightness, contrast, saturation, no hue shift"))
    if model == "faster_rcnn":
        rows.append(("weight average", f"EMA {EMA_DECAY}", "evaluated and saved in place of the last step's weights"))
    rows.append(("validation", "--val-data" if val_data else f"{int(data.get('val_fraction', VAL_FRACTION) * 100)}% "
                 "held out" if data.get("val_fraction", VAL_FRACTION) else "none",
                 f"best model by mAP@0.5, early stop after {PATIENCE} evaluations without improvement"))
    recipe: dict[str, Any] = {
        "detector": detector,
        "detector_config": detector_config,
        "data": {"val_fraction": VAL_FRACTION, "on_error": "skip", **data},
        "val_data": dict(val_data) if val_data else None,
        "pretrain": {"iterations": pretrain_steps, "images_per_batch": 32, "crop_size": 64, "optimizer": "adamw",
                     "lr": 0.002, "warmup_iterations": min(100, pretrain_steps // 5)},
        "augment": {"flip_prob": 0.5, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0,
                    "crop_prob": 0.3},
        "optimizer": {"name": "sgd", "lr": 0.01 * batch / 4, "momentum": 0.9, "weight_decay": 1e-4,
                      "clip_grad_norm": 10.0},
        "schedule": {"kind": "cosine", "warmup_iterations": 100, "warmup_factor": 0.001},
        "max_iterations": cap,
        "batch_size": batch,
        "time_budget": budget_seconds,
        "patience": PATIENCE,
        "eval_every": 0 if budget_seconds else max(1, cap // 10),
        "checkpoint_every": 100,
        "log_every": 10,
        "seed": 0,
        "out_dir": out_dir,
    }
    if model == "faster_rcnn":
        recipe["ema"] = EMA_DECAY
    else:
        recipe |= {"fit_box_regressor": True, "region_fit_images": min(200, n)}
    return Derivation(recipe, rows, bpr_default, bpr_fitted, notes)


def _nums(values: Sequence[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def format_derivation(derivation: Derivation) -> str:
    """The derived recipe as a short table (field, value, why), then the notes."""
    width = max(len(r[0]) for r in derivation.rows)
    value_width = max(len(r[1]) for r in derivation.rows)
    lines = [f"{'derived recipe':<{width}}  {'value':<{value_width}}  why", "-" * (width + value_width + 40)]
    lines += [f"{name:<{width}}  {value:<{value_width}}  {why}" for name, value, why in derivation.rows]
    lines += [f"note: {note}" for note in derivation.notes]
    return "\n".join(lines)


def write_recipe(path: str | Path, recipe: Mapping[str, Any], header: str = "") -> None:
    """``recipe`` as YAML at ``path`` (atomically), ``detect train --recipe`` reads it back unchanged."""
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(
        _plain(recipe), sort_keys=False, default_flow_style=None, width=120
    )
    atomic_write(Path(path), text.encode())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def derive_for(
    data: Mapping[str, Any],
    val_data: Mapping[str, Any] | None,
    model: str = "faster_rcnn",
    budget_seconds: float | None = None,
    device: str = "cpu",
    out_dir: str = "runs/train",
) -> Derivation:
    """Read the data a command line names (``data``/``val_data``: :class:`DataConfig` fields) once and derive its
    recipe: the run's splits are the ones training will use (:func:`detect.training.data.data_splits`)."""
    from detect.config import override
    from detect.training.config import TrainConfig
    from detect.training.data import data_splits

    data = {"val_fraction": VAL_FRACTION, "on_error": "skip", **data}
    config = override(TrainConfig(), {"data": data, "val_data": val_data})
    train, val = data_splits(config)
    stats = data_stats(train, val)
    return derive_recipe(stats, data, val_data, model, budget_seconds, device, out_dir)
