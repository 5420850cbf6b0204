"""Evaluation: Pascal VOC detection AP, COCO AP through pycocotools, proposal recall and MABO, reports and PR curves;
and the evaluation of a model on a data set (:func:`evaluate_detector`, :func:`evaluate_weights` for ``detect eval``,
with the selective-search :class:`ProposalCache` that region detectors read), which training calls too.

Detection AP (:class:`DetectionEvaluator`) follows the Pascal VOC devkit (``VOCevaldet.m``):

- Per class, every detection of every image is ranked by descending score. Within an image a detection is compared
  with the ground truths of its class; the gt of highest IoU (first one on ties) is its candidate. IoU ``>=`` the
  threshold is a hit (``>=`` as in the MATLAB devkit and pycocotools; the Python ports of py-faster-rcnn use ``>``).
- A hit on a ``difficult`` gt is ignored: neither a true nor a false positive. Difficult gts are not positives
  (they do not count in recall) and are never "used up", so any number of detections may land on one.
- A hit on a gt already taken by a higher-scored detection is a false positive (a duplicate), even when another
  free gt would also pass the threshold: the devkit looks at the best-overlapping gt only (``matching="voc"``, the
  default, so numbers compare with published VOC results). ``matching="coco"`` is pycocotools' greedy rule instead:
  the highest-IoU gt among those still free, non-difficult gts first, difficult ones only when no free
  non-difficult gt passes (on equal IoU the later gt, as pycocotools). Without difficult gts, and with at most
  100 detections per image and class, it agrees with pycocotools (area range "all") detection for detection.
- Boxes are the library's ``xyxy`` with no ``+1``: width ``x2 - x1``. The official devkit adds one pixel to every
  width and height (inclusive integer corners), which raises the IoU of small boxes a little; we do not, so that
  detections and ground truth use one convention everywhere (VOC XML is converted on reading,
  :mod:`detect.data.voc`). AP therefore differs slightly from the devkit's (most for small objects).
- IoU is the shared kernel :func:`detect.ops.boxes.box_iou`, run in float64 on the host: evaluation works on
  numpy arrays that live there anyway, and one IoU definition (zero-union rule included) serves the whole project.
- AP: ``"auc"`` (VOC2010+, the default) is the area under the precision envelope at every recall step;
  ``"voc07"`` (``use_07_metric=True``) averages the envelope at recall ``0, 0.1, ..., 1``, those points computed
  as ``k / 10`` (correctly rounded; an accumulated ``0.1`` step gives ``0.30000000000000004`` and drops a recall of
  exactly ``3/10``); ``"coco101"`` samples it at pycocotools' 101 recall points (:func:`average_precision`).
- mAP is the mean over classes that have at least one non-difficult gt; the AP of any other class is NaN.

COCO AP (:meth:`DetectionEvaluator.compute_coco`) hands the same detections and gts to pycocotools' ``COCOeval``
with its default parameters (IoU 0.5:0.95, area ranges, at most 100 detections per image and class). Difficult gts
become ``iscrowd=1``: the only "ignore" pycocotools honours (it overwrites an ``ignore`` key with ``iscrowd``).
A detection on such a gt is then neither true nor false positive, as in VOC, but its overlap with it is measured as
intersection over the *detection's* area, so that rule is a little more lenient than VOC's.

Confusion matrix (:meth:`DetectionEvaluator.confusion_matrix`): rows are the ground-truth classes plus
``background``, columns the predicted classes plus ``missed``. Per image, the detections scoring at least the score
threshold are taken best first; each claims the free gt of highest IoU, whatever its class, when that IoU is at
least the IoU threshold (0.5): cell (gt class, predicted class), so a correct detection lands on the diagonal and a
right box with the wrong name off it. A detection that claims nothing is a false positive (row ``background``); a
gt that nobody claimed is ``missed``. Difficult gts are neither counted nor missed, and a detection that claims one
is not counted either (as in VOC AP).

:meth:`DetectionEvaluator.report` gathers it all (VOC AP, COCO metrics, confusion matrix) for ``detect eval``.

Proposal quality (:func:`proposal_recall`): recall at IoU thresholds and MABO (mean best overlap), see there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from detect import weights
from detect.data.config import DataConfig, make_dataset
from detect.detectors.region import RegionDetector
from detect.inference import torch_device
from detect.io import atomic_write
from detect.ops.boxes import box_iou
from detect.structures import Detections
from proposals.selective_search import SelectiveSearch, SelectiveSearchConfig

__all__ = [
    "AP_METHODS",
    "DetectionEvaluator",
    "average_precision",
    "proposal_recall",
    "write_report",
    "format_table",
    "format_summary",
    "plot_pr_curves",
    "plot_confusion_matrix",
    "ProposalCache",
    "cache_keys",
    "detect_images",
    "evaluate_detector",
    "evaluate_weights",
]

AP_METHODS = ("auc", "voc07", "coco101")
MATCHING_RULES = ("voc", "coco")
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_TP, _FP, _IGNORED = 1, 0, -1
_log = logging.getLogger(__name__)


def _numpy(values: Any, dtype: type) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array of ``dtype``."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _key(threshold: float) -> str:
    return f"{threshold:g}"


# --- average precision -------------------------------------------------------------------------------------
def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "auc") -> float:
    """AP from the cumulative ``recall`` and ``precision`` of ranked detections (both ``(D,)``, recall rising).

    The precision envelope at recall ``r`` is the best precision at any recall ``>= r``.

    - ``"auc"`` (VOC2010+): the area under the envelope, summed over the steps where recall changes.
    - ``"voc07"``: the mean of the envelope at recall ``k / 10``, ``k = 0..10`` (0 beyond the largest recall).
    - ``"coco101"``: the mean of the envelope at pycocotools' recall points ``np.linspace(0, 1, 101)``, each taking
      the first detection whose recall reaches it (0 beyond the largest recall). pycocotools divides by
      ``tp + fp + eps``; we do not, so results agree with its per-class AP to about 1e-15.

    No detections give 0.
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision  # (D,)
    if method == "auc":
        steps = np.diff(np.concatenate(([0.0], recall)))  # (D,) recall gained at each detection
        return float(np.sum(steps * envelope))
    if method == "voc07":
        points = np.arange(11) / 10
    elif method == "coco101":
        points = np.linspace(0.0, 1.0, 101)
    else:
        raise ValueError(f"method must be one of {AP_METHODS}, got {method!r}")
    first = np.searchsorted(recall, points, side="left")  # (P,) first detection reaching each recall point
    padded = np.concatenate((envelope, [0.0]))  # index D: the point is never reached
    return float(np.mean(padded[first]))


# --- matching ----------------------------------------------------------------------------------------------
def _match_voc(ious: np.ndarray, difficult: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Devkit rule. ``ious`` ``(D, G)``, detections in descending score order, ``-1`` where the classes differ
    -> ``(T, D)`` outcomes."""
    outcome = np.full((len(thresholds), ious.shape[0]), _FP, dtype=np.int8)  # (T, D)
    if ious.shape[1] == 0:
        return outcome
    best = ious.argmax(axis=1)  # (D,) candidate gt of each detection
    overlap = ious[np.arange(ious.shape[0]), best]  # (D,)
    on_difficult = difficult[best]  # (D,)
    for t, threshold in enumerate(thresholds):
        hit = overlap >= threshold
        outcome[t, hit & on_difficult] = _IGNORED
        rows = np.flatnonzero(hit & ~on_difficult)
        _, first = np.unique(best[rows], return_index=True)  # the top-scored hit on each gt; the rest are duplicates
        outcome[t, rows[first]] = _TP
    return outcome


def _match_coco(ious: np.ndarray, difficult: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """pycocotools' rule (with plain IoU for difficult gts). ``ious`` ``(D, G)`` sorted as in :func:`_match_voc`."""
    outcome = np.full((len(thresholds), ious.shape[0]), _FP, dtype=np.int8)  # (T, D)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(ious.shape[1], dtype=bool)  # (G,)
        passes = ious >= threshold  # (D, G)
        for d in np.flatnonzero(passes.any(axis=1)):  # the others pass no gt: false positives
            row, passing = ious[d], passes[d]  # (G,) each
            free = np.flatnonzero(passing & ~taken & ~difficult)
            if free.size:
                last_best = free[::-1][row[free[::-1]].argmax()]  # on equal IoU the later gt, as pycocotools
                taken[last_best] = True
                outcome[t, d] = _TP
            elif (passing & difficult).any():
                outcome[t, d] = _IGNORED
    return outcome


_MATCHERS = {"voc": _match_voc, "coco": _match_coco}


def _pr_curve(scores: np.ndarray, outcomes: np.ndarray, num_positives: int) -> dict[str, np.ndarray]:
    """Cumulative recall and precision of ranked detections ``(N,)`` with their outcomes ``(N,)``; ignored
    detections are dropped (they change neither count). Recall is NaN without positives."""
    kept = outcomes != _IGNORED  # (N,)
    tp = np.cumsum(outcomes[kept] == _TP)  # (N',)
    fp = np.cumsum(outcomes[kept] == _FP)  # (N',)
    recall = tp / num_positives if num_positives else np.full(tp.shape, np.nan)
    return {"recall": recall, "precision": tp / (tp + fp), "scores": scores[kept]}


# --- the accumulator ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Image:
    """One image's detections and ground truth as host float64/int64/bool arrays."""

    det_boxes: np.ndarray  # (D, 4) float64 xyxy
    det_scores: np.ndarray  # (D,) float64
    det_labels: np.ndarray  # (D,) int64, 1-based
    gt_boxes: np.ndarray  # (G, 4) float64 xyxy
    gt_labels: np.ndarray  # (G,) int64, 1-based
    gt_difficult: np.ndarray  # (G,) bool


class DetectionEvaluator:
    """Accumulates detections and ground truth image by image; :meth:`compute` gives VOC AP, :meth:`compute_coco`
    COCO AP on the same data (see the module docstring for every rule).

    ``class_names`` is the class list without background (label ``k`` is ``class_names[k-1]``).
    ``iou_thresholds`` may hold several values (e.g. ``np.linspace(0.5, 0.95, 10)``); ``mAP`` is then averaged over
    them. ``use_07_metric`` selects VOC2007's 11-point AP instead of the area under the curve. Data are copied to
    the host once per :meth:`add` (evaluation is numpy work; tensors may live on any device).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        iou_thresholds: Sequence[float] = (0.5,),
        use_07_metric: bool = False,
        *,
        matching: str = "voc",
    ) -> None:
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)}")
        thresholds = tuple(float(t) for t in iou_thresholds)
        if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
            raise ValueError(f"iou_thresholds must be non-empty, each in (0, 1], got {list(iou_thresholds)}")
        if matching not in MATCHING_RULES:
            raise ValueError(f"matching must be one of {MATCHING_RULES}, got {matching!r}")
        self.class_names = tuple(class_names)
        self.iou_thresholds = thresholds
        self.ap_method = "voc07" if use_07_metric else "auc"
        self.matching = matching
        self._images: dict[Any, _Image] = {}

    def __len__(self) -> int:
        return len(self._images)

    def add(
        self,
        image_id: Any,
        detections: Detections | tuple[Any, Any, Any],
        ground_truth: Mapping[str, Any] | tuple[Any, ...],
    ) -> None:
        """Record one image.

        ``detections``: a :class:`Detections` or ``(boxes (D, 4), scores (D,), labels (D,))``. ``ground_truth``:
        ``(boxes (G, 4), labels (G,))`` or ``(boxes, labels, difficult (G,))``, or a mapping with those keys (a
        data set's target dict; ``difficult`` optional). Tensors (any device) or arrays; labels 1-based.
        """
        if image_id in self._images:
            raise ValueError(f"image {image_id!r} was already added")
        if isinstance(detections, Detections):
            detections = (detections.boxes, detections.scores, detections.labels)
        if isinstance(ground_truth, Mapping):
            ground_truth = tuple(ground_truth[k] for k in ("boxes", "labels", "difficult") if k in ground_truth)
        det_boxes, det_scores, det_labels = detections
        gt_boxes, gt_labels = ground_truth[0], ground_truth[1]
        difficult = ground_truth[2] if len(ground_truth) > 2 else np.zeros(len(gt_labels), dtype=bool)
        image = _Image(
            _numpy(det_boxes, np.float64).reshape(-1, 4),
            _numpy(det_scores, np.float64).reshape(-1),
            _numpy(det_labels, np.int64).reshape(-1),
            _numpy(gt_boxes, np.float64).reshape(-1, 4),
            _numpy(gt_labels, np.int64).reshape(-1),
            _numpy(difficult, bool).reshape(-1),
        )
        self._check(image_id, image)
        self._images[image_id] = image

    def _check(self, image_id: Any, image: _Image) -> None:
        num_classes = len(self.class_names)
        if not len(image.det_boxes) == len(image.det_scores) == len(image.det_labels):
            raise ValueError(f"image {image_id!r}: detection boxes, scores and labels differ in length")
        if not len(image.gt_boxes) == len(image.gt_labels) == len(image.gt_difficult):
            raise ValueError(f"image {image_id!r}: ground-truth boxes, labels and difficult differ in length")
        for what, labels in (("detection", image.det_labels), ("ground-truth", image.gt_labels)):
            if labels.size and not (labels.min() >= 1 and labels.max() <= num_classes):
                raise ValueError(f"image {image_id!r}: {what} labels must be in 1..{num_classes}")
        if not all(np.isfinite(a).all() for a in (image.det_boxes, image.det_scores, image.gt_boxes)):
            raise ValueError(f"image {image_id!r}: boxes and scores must be finite")

    # --- VOC -----------------------------------------------------------------------------------------------
    def compute(self) -> dict:
        """VOC AP per class and mAP over the added images.

        Returns a dict (plain Python values besides ``curves``), thresholds written as ``f"{t:g}"``:

        - ``mAP``: mean over thresholds of ``mAP@<t>``; ``mAP@<t>``: mean AP over classes with ground truth.
        - ``ap``: ``{class: AP}`` averaged over thresholds; ``ap@<t>``: ``{class: AP}`` at one threshold (NaN for a
          class without non-difficult gt).
        - ``num_gt`` (non-difficult), ``num_difficult``, ``num_detections``: ``{class: int}``; ``num_images``.
        - ``ap_method``, ``matching``, ``iou_thresholds``: how it was computed.
        - ``curves``: ``{class: {<t>: {"recall", "precision", "scores"}}}``, float64 arrays, one entry per ranked
          detection that is not ignored (for plots, see :func:`plot_pr_curves`).
        """
        ranked, num_gt, num_difficult = self._ranked_outcomes()
        result: dict[str, Any] = {
            "ap_method": self.ap_method,
            "matching": self.matching,
            "iou_thresholds": list(self.iou_thresholds),
            "num_images": len(self._images),
        }
        per_threshold = np.full((len(self.iou_thresholds), len(self.class_names)), np.nan)  # (T, K)
        curves: dict[str, dict] = {}
        for k, (name, (scores, outcomes)) in enumerate(zip(self.class_names, ranked)):
            curves[name] = {}
            for t, threshold in enumerate(self.iou_thresholds):
                curve = _pr_curve(scores, outcomes[t], int(num_gt[k]))
                curves[name][_key(threshold)] = curve
                if num_gt[k]:
                    per_threshold[t, k] = average_precision(curve["recall"], curve["precision"], self.ap_method)

        has_gt = num_gt > 0
        map_per_threshold = [float(np.mean(row[has_gt])) if has_gt.any() else math.nan for row in per_threshold]
        result["mAP"] = float(np.mean(map_per_threshold))
        for threshold, value in zip(self.iou_thresholds, map_per_threshold):
            result[f"mAP@{_key(threshold)}"] = value
        result["ap"] = dict(zip(self.class_names, per_threshold.mean(axis=0).tolist()))
        for threshold, row in zip(self.iou_thresholds, per_threshold):
            result[f"ap@{_key(threshold)}"] = dict(zip(self.class_names, row.tolist()))
        result["num_gt"] = dict(zip(self.class_names, num_gt.tolist()))
        result["num_difficult"] = dict(zip(self.class_names, num_difficult.tolist()))
        result["num_detections"] = {name: len(scores) for name, (scores, _) in zip(self.class_names, ranked)}
        result["curves"] = curves
        return result

    def _ranked_outcomes(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
        """Match every image and rank each class's detections over all images.

        Returns, per class, ``(scores (N,), outcomes (T, N))`` in descending score order (ties: earlier image first,
        then the order given), outcomes ``_TP``/``_FP``/``_IGNORED`` per threshold; and the per-class counts of
        non-difficult and difficult gts, ``(K,)`` each.
        """
        num_classes = len(self.class_names)
        match = _MATCHERS[self.matching]
        scores, labels, outcomes = [np.zeros(0)], [np.zeros(0, np.int64)], [np.zeros((len(self.iou_thresholds), 0))]
        num_gt = np.zeros(num_classes, dtype=np.int64)
        num_difficult = np.zeros(num_classes, dtype=np.int64)
        for image in self._images.values():
            num_gt += np.bincount(image.gt_labels[~image.gt_difficult] - 1, minlength=num_classes)
            num_difficult += np.bincount(image.gt_labels[image.gt_difficult] - 1, minlength=num_classes)
            order = np.argsort(-image.det_scores, kind="stable")  # (D,) best first, ties in the order given
            boxes = torch.from_numpy(np.ascontiguousarray(image.det_boxes[order]))  # (D, 4)
            ious = box_iou(boxes, torch.from_numpy(image.gt_boxes)).numpy()  # (D, G), all classes in one call
            same_class = image.det_labels[order, None] == image.gt_labels[None, :]  # (D, G)
            ious = np.where(same_class, ious, -1.0)  # other classes' gts never pass a threshold
            scores.append(image.det_scores[order])
            labels.append(image.det_labels[order])
            outcomes.append(match(ious, image.gt_difficult, self.iou_thresholds))
        all_scores, all_labels, all_outcomes = np.concatenate(scores), np.concatenate(labels), np.hstack(outcomes)
        ranked = []
        for label in range(1, num_classes + 1):
            mine = np.flatnonzero(all_labels == label)  # (N,) in image order
            order = mine[np.argsort(-all_scores[mine], kind="stable")]  # (N,) stable: ties keep image order
            ranked.append((all_scores[order], all_outcomes[:, order]))
        return ranked, num_gt, num_difficult

    # --- COCO ----------------------------------------------------------------------------------------------
    def coco_datasets(self) -> tuple[dict, list[dict]]:
        """The accumulated data as COCO structures: ``(ground-truth dataset dict, list of detection results)``.

        Images are numbered 1, 2, ... in the order they were added (ids are ints for pycocotools); category ids are
        our 1-based labels; boxes become ``[x, y, w, h]`` with ``area = w * h``; difficult gts get ``iscrowd=1``.
        Annotation and result ids start at 1 (pycocotools reads id 0 as "unmatched").
        """
        images, annotations, results = [], [], []
        for number, image in enumerate(self._images.values(), start=1):
            images.append({"id": number})
            for box, label, difficult in zip(image.gt_boxes, image.gt_labels, image.gt_difficult):
                entry = {"id": len(annotations) + 1, "image_id": number, "category_id": int(label)}
                annotations.append(entry | _coco_box(box) | {"iscrowd": int(difficult)})
            for box, score, label in zip(image.det_boxes, image.det_scores, image.det_labels):
                entry = {"id": len(results) + 1, "image_id": number, "category_id": int(label)}
                results.append(entry | _coco_box(box) | {"score": float(score), "iscrowd": 0})
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}, results

    def compute_coco(self) -> dict:
        """COCO bbox metrics by pycocotools' ``COCOeval`` (default parameters) on the accumulated data.

        Returns ``AP`` (IoU 0.5:0.95), ``AP50``, ``AP75``, ``APs``/``APm``/``APl`` (area ranges), ``AR1``, ``AR10``,
        ``AR100``, ``ARs``/``ARm``/``ARl``; ``ap`` and ``ap50``: ``{class: AP}``; ``summary``: pycocotools' printed
        table. Values pycocotools leaves undefined (its ``-1``) are NaN. Needs the ``pycocotools`` package.
        """
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt_dataset, results = self.coco_datasets()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # pycocotools reports progress on stdout
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset = gt_dataset
            coco_dt.dataset = dict(gt_dataset, annotations=results)
            coco_gt.createIndex()
            coco_dt.createIndex()
            evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            summary_start = printed.tell()
            evaluation.summarize()
        result: dict[str, Any] = {name: _undefined_as_nan(v) for name, v in zip(COCO_STATS, evaluation.stats)}
        precision = evaluation.eval["precision"][:, :, :, 0, -1]  # (T, R, K): area "all", maxDets 100
        for key, rows in (("ap", precision), ("ap50", precision[:1])):
            result[key] = {name: _mean_defined(rows[:, :, k]) for k, name in enumerate(self.class_names)}
        result["summary"] = printed.getvalue()[summary_start:]
        return result


    # --- confusion matrix ----------------------------------------------------------------------------------
    def confusion_matrix(self, iou_threshold: float = 0.5, score_threshold: float = 0.5) -> dict:
        """Counts of (ground-truth class or background) x (predicted class or missed); see the module docstring.

        Returns ``rows`` (class names + ``"background"``), ``columns`` (class names + ``"missed"``), ``matrix``
        (``(K + 1, K + 1)`` ints as nested lists; the background/missed corner is always 0), ``iou_threshold`` and
        ``score_threshold``."""
        num_classes = len(self.class_names)
        matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)  # (K+1, K+1)
        for image in self._images.values():
            keep = np.flatnonzero(image.det_scores >= score_threshold)
            keep = keep[np.argsort(-image.det_scores[keep], kind="stable")]  # (D,) best first
            boxes = torch.from_numpy(np.ascontiguousarray(image.det_boxes[keep]))  # (D, 4)
            ious = box_iou(boxes, torch.from_numpy(image.gt_boxes)).numpy()  # (D, G)
            taken = np.zeros(len(image.gt_labels), dtype=bool)  # (G,)
            for d, label in enumerate(image.det_labels[keep]):
                free = np.where(~taken & (ious[d] >= iou_threshold), ious[d], -1.0)  # (G,)
                if free.size == 0 or free.max() < 0:
                    matrix[num_classes, label - 1] += 1  # a false positive on background
                    continue
                g = int(free.argmax())
                taken[g] = True
                if not image.gt_difficult[g]:
                    matrix[image.gt_labels[g] - 1, label - 1] += 1
            for g in np.flatnonzero(~taken & ~image.gt_difficult):
                matrix[image.gt_labels[g] - 1, num_classes] += 1
        return {
            "rows": [*self.class_names, "background"],
            "columns": [*self.class_names, "missed"],
            "matrix": matrix.tolist(),
            "iou_threshold": float(iou_threshold),
            "score_threshold": float(score_threshold),
        }

    def report(self, score_threshold: float = 0.5) -> dict:
        """:meth:`compute` (VOC AP) with ``coco`` (:meth:`compute_coco`, when there are images) and
        ``confusion_matrix`` (at IoU 0.5 and ``score_threshold``) added: what ``detect eval`` prints and writes."""
        result = self.compute()
        result["coco"] = self.compute_coco() if len(self) else None
        result["confusion_matrix"] = self.confusion_matrix(0.5, score_threshold)
        return result


def _coco_box(box: np.ndarray) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}


def _undefined_as_nan(value: float) -> float:
    return math.nan if value == -1 else float(value)


def _mean_defined(values: np.ndarray) -> float:
    """Mean of pycocotools' precision entries, NaN where all are its "undefined" ``-1``."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else math.nan


# --- proposals ---------------------------------------------------------------------------------------------
def proposal_recall(
    proposals: Sequence[Tensor],
    gts: Sequence[Tensor],
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    top_n: int | None = None,
    gt_labels: Sequence[Tensor] | None = None,
) -> dict:
    """Proposal quality over a set of images: ``proposals[i]`` ``(R_i, 4)`` (ranked best first when ``top_n`` is
    used) and ``gts[i]`` ``(G_i, 4)``, ``xyxy``.

    Every gt gets its best overlap: the highest IoU with any of its image's first ``top_n`` proposals (all when
    ``None``; 0 when the image has none). Returns

    - ``recall@<t>``: the fraction of gts whose best overlap is ``>= t``;
    - ``mabo``: the mean best overlap over all gts;
    - ``mean_boxes``: the mean number of proposals per image (after ``top_n``); ``num_gt``;
    - with ``gt_labels`` (``(G_i,)`` per image): ``abo`` ``{label: mean best overlap of that class's gts}`` and
      ``class_mabo``, their mean over the classes present: the MABO of Uijlings et al. (selective search), which
      weighs every class alike rather than every box.

    Overlaps are float64 on the proposals' device, one image at a time, with one copy to the host at the end.
    Without any gt the rates are NaN.
    """
    if len(proposals) != len(gts) or (gt_labels is not None and len(gt_labels) != len(gts)):
        raise ValueError("proposals, gts (and gt_labels) need one entry per image")
    best_overlaps, counts = [], []
    for boxes, gt in zip(proposals, gts):
        boxes = boxes[:top_n]  # (R, 4)
        gt = torch.as_tensor(gt).to(device=boxes.device, dtype=torch.float64).reshape(-1, 4)  # (G, 4)
        counts.append(boxes.shape[0])
        if boxes.shape[0] == 0:
            best_overlaps.append(gt.new_zeros(gt.shape[0]))
        else:
            best_overlaps.append(box_iou(gt, boxes.to(torch.float64)).amax(dim=1))  # (G, R) -> (G,)
    best = torch.cat([b.cpu() for b in best_overlaps]).numpy() if best_overlaps else np.zeros(0)  # (sum G,)
    result: dict[str, Any] = {
        f"recall@{_key(t)}": float(np.mean(best >= t)) if best.size else math.nan for t in iou_thresholds
    }
    result["mabo"] = float(best.mean()) if best.size else math.nan
    result["mean_boxes"] = float(np.mean(counts)) if counts else math.nan
    result["num_gt"] = int(best.size)
    if gt_labels is not None:
        labels = np.concatenate([_numpy(g, np.int64).reshape(-1) for g in gt_labels] or [np.zeros(0, np.int64)])
        result["abo"] = {int(c): float(best[labels == c].mean()) for c in np.unique(labels)}
        result["class_mabo"] = float(np.mean(list(result["abo"].values()))) if result["abo"] else math.nan
    return result


# --- reports -----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Plain JSON values: arrays and tensors become lists, numpy scalars Python ones, NaN/inf ``null``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_report(result: Mapping[str, Any], path: str | os.PathLike, *, include_curves: bool = False) -> Path:
    """Write a result dict as strict JSON (NaN as ``null``), atomically: a temporary file beside ``path`` is
    renamed over it, so a reader sees the old report or the new one, never half of one. The ``curves`` entry of
    :meth:`DetectionEvaluator.compute` (one value per detection) is left out unless ``include_curves``."""
    data = {k: v for k, v in result.items() if include_curves or k != "curves"}
    path = Path(path)
    atomic_write(path, (json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path


def format_table(result: Mapping[str, Any]) -> str:
    """The per-class table of a :meth:`DetectionEvaluator.compute` result: gts, difficult, detections and AP at
    each threshold (``-`` where undefined), then the mAP row; with a ``coco`` entry (:meth:`~DetectionEvaluator.
    report`) also each class's COCO AP (IoU 0.5:0.95) and the overall one."""
    keys = [_key(t) for t in result["iou_thresholds"]]
    coco = result.get("coco")
    width = max(8, *(len(name) for name in result["ap"]))
    header = f"{'class':<{width}} {'gt':>6} {'diff':>6} {'dets':>7}" + "".join(f" {'AP@' + k:>8}" for k in keys)
    header += f" {'AP50:95':>8}" if coco else ""
    lines = [header, "-" * len(header)]
    for name in result["ap"]:
        cells = "".join(f" {_cell(result[f'ap@{k}'][name])}" for k in keys)
        cells += f" {_cell(coco['ap'][name])}" if coco else ""
        counts = f"{result['num_gt'][name]:>6} {result['num_difficult'][name]:>6} {result['num_detections'][name]:>7}"
        lines.append(f"{name:<{width}} {counts}{cells}")
    lines.append("-" * len(header))
    total = "".join(f" {_cell(result[f'mAP@{k}'])}" for k in keys) + (f" {_cell(coco['AP'])}" if coco else "")
    lines.append(f"{'mAP':<{width}} {'':>6} {'':>6} {'':>7}" + total)
    return "\n".join(lines)


def format_summary(result: Mapping[str, Any]) -> str:
    """The headline numbers of a :meth:`DetectionEvaluator.report` result: COCO AP, AP50, AP75, AP_S/M/L and the
    VOC mAP, one line each kind (``-`` where undefined, e.g. no small objects)."""
    lines = []
    if result.get("coco"):
        names = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("APs", "AP_S"), ("APm", "AP_M"), ("APl", "AP_L"))
        lines.append("COCO  " + "  ".join(f"{label} {_cell(result['coco'][key]).strip()}" for key, label in names))
    keys = [_key(t) for t in result["iou_thresholds"]]
    lines.append("VOC   " + "  ".join(f"mAP@{k} {_cell(result[f'mAP@{k}']).strip()}" for k in keys))
    return "\n".join(lines)


def _cell(value: float) -> str:
    return f"{value:>8.4f}" if math.isfinite(value) else f"{'-':>8}"


def plot_confusion_matrix(matrix: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """A :meth:`DetectionEvaluator.confusion_matrix` as a PNG heat map with the counts written in (rows normalised
    for the colour, so rare classes show too). ``None`` (and a warning) without matplotlib. Written atomically."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        _log.warning("matplotlib is not installed: no confusion matrix plot (pip install matplotlib)")
        return None
    counts = np.array(matrix["matrix"], dtype=np.float64)  # (K+1, K+1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 2.5 + 0.55 * len(matrix["columns"])
    figure = Figure(figsize=(side + 1, side), dpi=100)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (r, c), value in np.ndenumerate(counts):
        if value:
            axes.text(c, r, f"{int(value)}", ha="center", va="center", color="white" if shares[r, c] > 0.5 else "black")
    axes.set_xticks(range(len(matrix["columns"])), matrix["columns"], rotation=45, ha="right")
    axes.set_yticks(range(len(matrix["rows"])), matrix["rows"])
    axes.set(xlabel="predicted", ylabel="ground truth")
    axes.set_title(f"IoU >= {matrix['iou_threshold']:g}, score >= {matrix['score_threshold']:g}")
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the row")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


def plot_pr_curves(result: Mapping[str, Any], directory: str | os.PathLike) -> list[Path]:
    """Precision-recall curves of a :meth:`DetectionEvaluator.compute` result, written into ``directory``.

    Always ``pr_curves.csv`` (columns ``class, iou_threshold, recall, precision, score``, one row per ranked
    detection that is not ignored); with matplotlib installed also ``pr_<k>_<class>.png`` per class that has ground
    truth, one line per IoU threshold. matplotlib is optional: without it a warning says that only the CSV was
    written. Files are written atomically. Returns the paths written.
    """
    directory = Path(directory)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(("class", "iou_threshold", "recall", "precision", "score"))
    for name, per_threshold in result["curves"].items():
        for key, curve in per_threshold.items():
            for row in zip(curve["recall"], curve["precision"], curve["scores"]):
                writer.writerow((name, key, *(repr(float(v)) for v in row)))
    csv_path = directory / "pr_curves.csv"
    atomic_write(csv_path, rows.getvalue().encode("utf-8"))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        _log.warning("matplotlib is not installed: wrote %s only, no PR plots (pip install matplotlib)", csv_path)
        return [csv_path]
    written = [csv_path]
    for k, (name, per_threshold) in enumerate(result["curves"].items(), start=1):
        if not result["num_gt"][name]:
            continue
        figure = Figure(figsize=(5, 4), dpi=100)
        axes = figure.add_subplot()
        for key, curve in per_threshold.items():
            ap = result[f"ap@{key}"][name]
            axes.step(curve["recall"], curve["precision"], where="post", label=f"IoU {key}: AP {ap:.3f}")
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=name)
        axes.legend(loc="best")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        path = directory / f"pr_{k:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        atomic_write(path, buffer.getvalue())
        written.append(path)
    return written


# --- evaluating a model on a data set ----------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]

def _config_digest(config: Any) -> str:
    return _digest(json.dumps(dataclasses.asdict(config), sort_keys=True))

class ProposalCache:
    """Selective search once per original image, stored as ``.npy`` (see the module docstring); ``cache(images,
    keys)`` gives float32 ``(N_i, 4)`` proposals, computing and storing only the missing ones (in one batch)."""

    def __init__(self, directory: str | Path, config: SelectiveSearchConfig, workers: int | None = 0) -> None:
        self.directory = Path(directory) / _config_digest(config)
        self.search = SelectiveSearch(config, workers=workers)

    def path(self, key: str) -> Path:
        return self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.npy"

    def __call__(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> list[np.ndarray]:
        paths = [self.path(key) for key in keys]
        missing = [i for i, p in enumerate(paths) if not p.exists()]
        if missing:
            for i, boxes in zip(missing, self.search([images[i] for i in missing])):
                buffer = io.BytesIO()
                np.save(buffer, boxes.cpu().numpy().astype(np.float32))
                atomic_write(paths[i], buffer.getvalue())
        return [np.load(p) for p in paths]

def cache_keys(data: DataConfig, targets: Sequence[Mapping[str, Any]]) -> list[str]:
    digest = _config_digest(data)
    return [f"{digest}-{t['image_id']}" for t in targets]

@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 4,
    proposals: Callable[..., list[np.ndarray]] | None = None,
    *,
    score_threshold: float | None = None,
) -> dict:
    """VOC AP (area under the curve, IoU 0.5, difficult ignored) of ``model`` on ``dataset``; ``proposals``
    ``(images, targets) -> boxes`` feeds region detectors. With ``score_threshold``, the whole
    :meth:`~detect.evaluate.DetectionEvaluator.report` instead (COCO metrics, confusion matrix at that score)."""
    evaluator = DetectionEvaluator(dataset.class_names)
    for target, found in detect_images(model, dataset, range(len(dataset)), batch_size, proposals):
        evaluator.add(target["image_id"], found, target)
    return evaluator.compute() if score_threshold is None else evaluator.report(score_threshold)

@torch.no_grad()
def detect_images(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    batch_size: int = 4,
    proposals: Callable[..., list[np.ndarray]] | None = None,
) -> list[tuple[dict, Any]]:
    """``(target, detections)`` of the images ``indices`` of ``dataset``, in that order, batch by batch (a
    shard of an evaluation: distributed training evaluates one per process and gathers them)."""
    model.eval()
    indices, out = list(indices), []
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        images, targets = [s[0] for s in samples], [s[1] for s in samples]
        extra = {"proposals": [torch.from_numpy(p) for p in proposals(images, targets)]} if proposals else {}
        detections, _ = model(images, **extra)
        out.extend(zip(targets, detections))
    return out

def evaluate_weights(
    weights_name: str | Path,
    data: DataConfig,
    out: str | Path,
    batch_size: int = 4,
    score_threshold: float = 0.5,
    device: str = "auto",
) -> dict:
    """VOC AP, COCO metrics and the confusion matrix (detections scoring at least ``score_threshold``) of trained
    weights (a file or a registered name) on ``data``, read in the model's class order (a class the model does not
    know is an error, not a silent shift of labels). Writes ``report.json``, ``pr_curves/`` and
    ``confusion_matrix.png`` into ``out`` (region detectors' proposals are cached under ``out/proposals``)."""
    model = weights.load_detector(weights_name).to(torch_device(device))
    if data.source != "shapes" and data.class_names is None:
        data = dataclasses.replace(data, class_names=tuple(model.class_names))
    dataset = make_dataset(data)
    proposals = None
    if isinstance(model, RegionDetector):
        cache = ProposalCache(Path(out) / "proposals", model.config.proposals)
        proposals = lambda images, targets: cache(images, cache_keys(data, targets))  # noqa: E731
    result = evaluate_detector(model, dataset, batch_size, proposals, score_threshold=score_threshold)
    write_report(result, Path(out) / "report.json")
    plot_pr_curves(result, Path(out) / "pr_curves")
    plot_confusion_matrix(result["confusion_matrix"], Path(out) / "confusion_matrix.png")
    return result
