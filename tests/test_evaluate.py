"""Evaluation against independent references: hand-computed AP values, a float64 loop port of the VOC devkit's
``VOCevaldet.m`` (without its +1 pixel), pycocotools run directly on COCO structures built here, and brute-force
float64 loops for proposal recall and MABO."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detect.evaluate import (
    DetectionEvaluator,
    average_precision,
    format_summary,
    format_table,
    plot_pr_curves,
    proposal_recall,
    write_report,
)
from detect.structures import Detections

# Three disjoint 10x10 ground truths of class 1 ("a").
GT3 = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], dtype=np.float64)


def evaluate(dets, gts, **kwargs) -> dict:
    """One image, classes ("a", "b"); ``dets`` rows ``(x1, y1, x2, y2, score, label)``, ``gts`` ``(boxes, labels,
    difficult)``."""
    evaluator = DetectionEvaluator(("a", "b"), **kwargs)
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
    evaluator.add("img", (dets[:, :4], dets[:, 4], dets[:, 5].astype(np.int64)), gts)
    return evaluator.compute()


def gt3(difficult=(False, False, False)):
    return GT3, np.ones(3, np.int64), np.array(difficult)


# --- hand-computed cases -----------------------------------------------------------------------------------
# Ranked TP, FP, TP, FP(duplicate of gt 0), TP on 3 gts: recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5.
STEPS = [
    (0, 0, 10, 10, 0.9, 1),
    (60, 60, 70, 70, 0.8, 1),
    (20, 20, 30, 30, 0.7, 1),
    (1, 0, 10, 10, 0.6, 1),
    (40, 40, 50, 50, 0.5, 1),
]


def test_hand_computed_precision_recall_steps():
    result = evaluate(STEPS, gt3())
    curve = result["curves"]["a"]["0.5"]
    np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(curve["scores"], [0.9, 0.8, 0.7, 0.6, 0.5])
    # Area under the envelope: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45.
    assert result["ap"]["a"] == pytest.approx(34 / 45, abs=1e-15)
    assert result["mAP"] == result["mAP@0.5"] == pytest.approx(34 / 45, abs=1e-15)
    assert math.isnan(result["ap"]["b"])  # no ground truth: undefined and left out of the mean
    assert result["num_gt"] == {"a": 3, "b": 0} and result["num_detections"] == {"a": 5, "b": 0}


def test_hand_computed_11_point():
    # Envelope 1 at recall points 0..0.3 (4), 2/3 at 0.4..0.6 (3), 3/5 at 0.7..1 (4).
    result = evaluate(STEPS, gt3(), use_07_metric=True)
    assert result["ap_method"] == "voc07"
    assert result["ap"]["a"] == pytest.approx((4 + 3 * 2 / 3 + 4 * 3 / 5) / 11, abs=1e-15)


def test_average_precision_methods_by_hand():
    recall, precision = np.array([1, 1, 2, 2, 3]) / 3, np.array([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    assert average_precision(recall, precision, "auc") == pytest.approx(34 / 45, abs=1e-15)
    assert average_precision(recall, precision, "voc07") == pytest.approx(8.4 / 11, abs=1e-15)
    # 101 points: 0.00..0.33 -> 1 (34), 0.34..0.66 -> 2/3 (33), 0.67..1.00 -> 3/5 (34).
    assert average_precision(recall, precision, "coco101") == pytest.approx(76.4 / 101, abs=1e-15)
    # Recall stopping at 0.5: points above it score 0.
    assert average_precision(np.array([0.5]), np.array([1.0]), "voc07") == pytest.approx(6 / 11, abs=1e-15)
    assert average_precision(np.array([0.5]), np.array([1.0]), "coco101") == pytest.approx(51 / 101, abs=1e-15)
    for method in ("auc", "voc07", "coco101"):
        assert average_precision(np.zeros(0), np.zeros(0), method) == 0.0
    with pytest.raises(ValueError):
        average_precision(recall, precision, "voc12")


def test_11_point_reaches_recall_exactly_three_tenths():
    """Recall 3/10 counts at the 0.3 point (an accumulated 0.1 step, 0.30000000000000004, would miss it)."""
    gts = np.array([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(10)])
    dets = [(*gts[i], 0.9 - 0.1 * i, 1) for i in range(3)] + [(0, 50, 10, 60, 0.5, 1), (*gts[3], 0.4, 1)]
    result = evaluate(dets, (gts, np.ones(10, np.int64)), use_07_metric=True)
    # Envelope 1 at 0, 0.1, 0.2, 0.3; 4/5 at 0.4; nothing beyond recall 0.4.
    assert result["ap"]["a"] == pytest.approx((4 + 0.8) / 11, abs=1e-15)


def test_difficult_ground_truth_is_neither_positive_nor_penalised():
    dets = [
        (40, 40, 50, 50, 0.95, 1),  # on the difficult gt: ignored
        (41, 40, 50, 50, 0.9, 1),  # again on it: ignored, not a duplicate
        (0, 0, 10, 10, 0.8, 1),  # TP
        (60, 60, 70, 70, 0.7, 1),  # FP
        (20, 20, 30, 30, 0.6, 1),  # TP
    ]
    result = evaluate(dets, gt3(difficult=(False, False, True)))
    curve = result["curves"]["a"]["0.5"]
    np.testing.assert_allclose(curve["recall"], [1 / 2, 1 / 2, 1], atol=1e-15)
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3], atol=1e-15)
    assert result["ap"]["a"] == pytest.approx(1 / 2 + 1 / 2 * 2 / 3, abs=1e-15)
    assert result["num_gt"]["a"] == 2 and result["num_difficult"]["a"] == 1
    assert result["num_detections"]["a"] == 5


def test_difficult_best_match_under_both_rules():
    """Both detections overlap a normal gt (IoU 9/11) and a difficult one (IoU 1) best. The devkit looks at the
    best gt only and ignores both; pycocotools' rule prefers the free normal gt, then ignores the repeat."""
    gts = (np.array([[0, 0, 10, 10], [1, 0, 11, 10]], np.float64), np.array([1, 1]), np.array([False, True]))
    dets = [(1, 0, 11, 10, 0.9, 1), (1, 0, 11, 10, 0.8, 1)]
    voc = evaluate(dets, gts)
    assert voc["ap"]["a"] == 0.0 and len(voc["curves"]["a"]["0.5"]["recall"]) == 0
    coco = evaluate(dets, gts, matching="coco")
    assert coco["ap"]["a"] == 1.0 and coco["curves"]["a"]["0.5"]["precision"].tolist() == [1.0]


def test_only_difficult_ground_truth_leaves_class_undefined():
    result = evaluate([(0, 0, 10, 10, 0.9, 1)], (GT3[:1], np.array([1]), np.array([True])))
    assert math.isnan(result["ap"]["a"]) and math.isnan(result["mAP"])


def test_duplicates_are_false_positives():
    # The lower-scored detection is the better fit, but the higher-scored one claims the gt first.
    dets = [(1, 1, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 1), (0, 0, 10, 11, 0.7, 1)]
    result = evaluate(dets, (GT3[:1], np.array([1])))
    curve = result["curves"]["a"]["0.5"]
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 1 / 3], atol=1e-15)
    assert result["ap"]["a"] == 1.0  # recall is complete at the first detection


def test_devkit_and_coco_matching_differ_on_a_taken_best_gt():
    """A detection whose best gt is taken: a duplicate for the devkit; pycocotools' rule moves to the next free gt."""
    gts = (np.array([[0, 0, 10, 10], [2, 0, 12, 10]], np.float64), np.array([1, 1]))
    dets = [(0, 0, 10, 10, 0.9, 1), (0.5, 0, 10.5, 10, 0.8, 1)]  # second: IoU 0.905 with gt 0, 0.739 with gt 1
    assert evaluate(dets, gts)["ap"]["a"] == pytest.approx(0.5, abs=1e-15)
    assert evaluate(dets, gts, matching="coco")["ap"]["a"] == 1.0


@pytest.mark.parametrize("matching", ["voc", "coco"])
def test_iou_threshold_is_inclusive_and_boxes_have_no_plus_one(matching):
    # IoU exactly 0.5 (5x10 inside 10x10): a hit. With the devkit's +1 it would be 66/121 instead.
    assert evaluate([(0, 0, 5, 10, 0.9, 1)], (GT3[:1], np.array([1])), matching=matching)["ap"]["a"] == 1.0
    # IoU 0.49 misses.
    assert evaluate([(0, 0, 4.9, 10, 0.9, 1)], (GT3[:1], np.array([1])), matching=matching)["ap"]["a"] == 0.0
    result = evaluate([(0, 0, 6, 10, 0.9, 1)], (GT3[:1], np.array([1])), iou_thresholds=(0.5, 0.75), matching=matching)
    assert result["ap@0.5"]["a"] == 1.0 and result["ap@0.75"]["a"] == 0.0
    assert result["ap"]["a"] == 0.5 and result["mAP"] == 0.5


def test_no_detections_and_classes_without_ground_truth():
    result = evaluate([], (GT3[:2], np.array([1, 2])))
    assert result["ap"] == {"a": 0.0, "b": 0.0} and result["mAP"] == 0.0
    # Detections of a class without gt: counted, AP undefined, mAP over "a" only.
    result = evaluate([(0, 0, 10, 10, 0.9, 1), (0, 0, 10, 10, 0.8, 2)], (GT3[:1], np.array([1])))
    assert result["ap"]["a"] == 1.0 and math.isnan(result["ap"]["b"]) and result["mAP"] == 1.0
    assert result["num_detections"]["b"] == 1
    assert math.isnan(DetectionEvaluator(("a",)).compute()["mAP"])


def test_inputs_detections_tensors_and_mapping_targets(device):
    evaluator = DetectionEvaluator(("a", "b"))
    dets = Detections(
        torch.tensor(GT3, dtype=torch.float32, device=device),
        torch.tensor([0.9, 0.8, 0.7], device=device),
        torch.tensor([1, 1, 2], device=device),
        (100, 100),
    )
    target = {"boxes": GT3.astype(np.float32), "labels": np.array([1, 1, 1]), "difficult": np.zeros(3, bool),
              "image_id": "000001"}
    evaluator.add(target["image_id"], dets, target)
    assert len(evaluator) == 1
    result = evaluator.compute()
    assert result["ap"]["a"] == pytest.approx(2 / 3) and result["num_detections"] == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="already added"):
        evaluator.add("000001", dets, target)


@pytest.mark.parametrize(
    "dets, gts",
    [
        ((np.zeros((1, 4)), np.ones(1), np.array([3])), (np.zeros((0, 4)), np.zeros(0))),  # label out of range
        ((np.zeros((0, 4)), np.zeros(0), np.zeros(0)), (np.zeros((1, 4)), np.array([0]))),  # background gt
        ((np.zeros((2, 4)), np.ones(1), np.ones(2)), (np.zeros((0, 4)), np.zeros(0))),  # lengths differ
        ((np.full((1, 4), np.nan), np.ones(1), np.ones(1)), (np.zeros((0, 4)), np.zeros(0))),  # NaN box
    ],
)
def test_bad_input_is_refused(dets, gts):
    with pytest.raises(ValueError):
        DetectionEvaluator(("a", "b")).add(0, dets, gts)


def test_bad_configuration_is_refused():
    for kwargs in ({"iou_thresholds": ()}, {"iou_thresholds": (0.0,)}, {"matching": "nearest"}):
        with pytest.raises(ValueError):
            DetectionEvaluator(("a",), **kwargs)
    with pytest.raises(ValueError):
        DetectionEvaluator(("a", "a"))


# --- random cases against a port of VOCevaldet.m -----------------------------------------------------------
def iou64(a, b) -> float:
    """Float64 IoU, no +1, in the order of the shared kernel (so both sides round alike)."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def devkit_ap(images, label: int, threshold: float, use_07: bool) -> float:
    """``VOCevaldet.m`` + ``VOCap`` for one class as loops: all detections ranked, each compared with every gt of
    its image, duplicates and difficult handled as there. Returns NaN without positives."""
    npos = sum(1 for im in images for g, c, d in zip(*im["gt"]) if c == label and not d)
    detected = [[False] * len(im["gt"][1]) for im in images]
    dets = [(s, i, list(b)) for i, im in enumerate(images) for b, s, c in zip(*im["det"]) if c == label]
    dets = sorted(dets, key=lambda d: -d[0])  # stable: image order, then given order
    tp, fp = [], []
    for _, i, box in dets:
        ovmax, jmax = -math.inf, -1
        for j, (g, c) in enumerate(zip(images[i]["gt"][0], images[i]["gt"][1])):
            if c == label and iou64(box, list(g)) > ovmax:
                ovmax, jmax = iou64(box, list(g)), j
        if ovmax >= threshold and images[i]["gt"][2][jmax]:
            tp.append(0), fp.append(0)  # difficult: don't care
        elif ovmax >= threshold and not detected[i][jmax]:
            detected[i][jmax] = True
            tp.append(1), fp.append(0)
        else:
            tp.append(0), fp.append(1)
    if npos == 0:
        return math.nan
    rec, prec, ctp, cfp = [], [], 0, 0
    for t_, f_ in zip(tp, fp):
        ctp, cfp = ctp + t_, cfp + f_
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp) if ctp + cfp else math.nan)  # MATLAB's 0/0; max() below skips it
    if use_07:
        total = 0.0
        for k in range(11):
            ps = [p for r, p in zip(rec, prec) if r >= k / 10 and not math.isnan(p)]
            total += max(ps) if ps else 0.0
        return total / 11
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = mpre[i + 1] if math.isnan(mpre[i]) else max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


@st.composite
def scenes(draw, difficult: bool = True, integral: bool = True):
    """A few images with clustered gts and detections jittered from them (duplicates, near misses) plus noise."""
    images = []
    for _ in range(draw(st.integers(1, 4))):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        num_gt = int(rng.integers(0, 6))
        xy = rng.uniform(0, 40, (num_gt, 2))
        gt_boxes = np.concatenate([xy, xy + rng.uniform(4, 20, (num_gt, 2))], axis=1)
        gt_labels = rng.integers(1, 4, num_gt)
        gt_diff = rng.random(num_gt) < 0.25 if difficult else np.zeros(num_gt, bool)
        picked = rng.integers(0, num_gt, int(rng.integers(0, 10))) if num_gt else np.zeros(0, np.int64)
        jittered = gt_boxes[picked] + rng.normal(0, 2, (len(picked), 4))
        noise_xy = rng.uniform(0, 50, (int(rng.integers(0, 4)), 2))
        boxes = np.concatenate([jittered, np.concatenate([noise_xy, noise_xy + 8], axis=1)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        if integral:
            boxes, gt_boxes = np.round(boxes), np.round(gt_boxes)
        own_label = np.concatenate([gt_labels[picked], rng.integers(1, 4, len(noise_xy))])
        labels = np.where(rng.random(len(boxes)) < 0.8, own_label, rng.integers(1, 4, len(boxes)))
        scores = rng.choice(np.arange(1, 6) / 5, len(boxes)) if integral else rng.random(len(boxes))
        images.append({"det": (boxes, scores, labels), "gt": (gt_boxes, gt_labels, gt_diff)})
    return images


@given(scenes(), st.sampled_from([0.5, 0.7]), st.booleans())
def test_voc_matches_devkit_port(images, threshold, use_07):
    """Integral boxes and tied scores on purpose: exact-threshold IoUs, IoU ties and score ties all follow the
    devkit's first-max and stable-order rules."""
    evaluator = DetectionEvaluator(("a", "b", "c"), iou_thresholds=(threshold,), use_07_metric=use_07)
    for i, image in enumerate(images):
        evaluator.add(i, image["det"], image["gt"])
    result = evaluator.compute()
    expected = [devkit_ap(images, label, threshold, use_07) for label in (1, 2, 3)]
    np.testing.assert_allclose(list(result["ap"].values()), expected, rtol=0, atol=1e-12)
    defined = [e for e in expected if not math.isnan(e)]
    assert (math.isnan(result["mAP"]) and not defined) or result["mAP"] == pytest.approx(np.mean(defined), abs=1e-12)


# --- pycocotools as the reference --------------------------------------------------------------------------
def run_cocoeval(images, num_classes: int = 3, crowd: bool = False):
    """pycocotools' COCOeval on the scenes, through its own loadRes. Difficult gts become crowd when ``crowd``."""
    COCO = pytest.importorskip("pycocotools.coco").COCO
    COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval
    anns, res = [], []
    for i, image in enumerate(images, start=1):
        for (x1, y1, x2, y2), c, d in zip(*image["gt"]):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": int(d and crowd)})
        for (x1, y1, x2, y2), s, c in zip(*image["det"]):
            res.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(1, len(images) + 1)], "annotations": anns,
                      "categories": [{"id": k} for k in range(1, num_classes + 1)]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(res), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def with_a_detection(images):
    """At least one detection overall: pycocotools' loadRes cannot take an empty list."""
    if not any(len(im["det"][1]) for im in images):
        images[0]["det"] = (np.array([[0.0, 0, 5, 5]]), np.array([0.5]), np.array([1]))
    return images


@given(scenes(difficult=False, integral=False))
def test_coco_matching_with_101_points_equals_pycocotools(images):
    """Exactly comparable: pycocotools' greedy rule, its 101 recall points, all 10 of its IoU thresholds; at most
    ~13 detections per image (under maxDets 100), no crowd/difficult gts, area range "all", distinct float scores.
    Left: pycocotools adds eps to tp + fp, and computes IoU from xywh in C (rounding apart only at ulp level)."""
    images = with_a_detection(images)
    reference = run_cocoeval(images)
    thresholds = reference.params.iouThrs
    evaluator = DetectionEvaluator(("a", "b", "c"), iou_thresholds=thresholds, matching="coco")
    for i, image in enumerate(images):
        evaluator.add(i, image["det"], image["gt"])
    result = evaluator.compute()
    precision = reference.eval["precision"][:, :, :, 0, -1]  # (T, R, K): area all, maxDets 100
    for t, threshold in enumerate(thresholds):
        for k, name in enumerate(("a", "b", "c")):
            expected = precision[t, :, k].mean() if (precision[t, :, k] > -1).all() else math.nan
            curve = result["curves"][name][f"{threshold:g}"]
            ours = average_precision(curve["recall"], curve["precision"], "coco101")
            assert (ours if result["num_gt"][name] else math.nan) == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_coco_matching_ties_and_exact_threshold_like_pycocotools():
    """Equal IoU with two free gts: pycocotools takes the later one, which here leaves the next detection without a
    gt (with the earlier one it would find one). Also IoU exactly 0.5 is a hit there too."""
    gts = (np.array([[0, 0, 10, 10], [2, 0, 12, 10], [30, 0, 40, 10]], np.float64), np.array([1, 1, 1]))
    dets = [(1, 0, 11, 10, 0.9, 1), (4, 0, 14, 10, 0.8, 1), (30, 0, 35, 10, 0.7, 1)]
    # 1st: IoU 9/11 with gts 0 and 1, takes gt 1; 2nd: IoU 2/3 with gt 1 (taken), 3/7 with gt 0: FP;
    # 3rd: IoU 0.5 with gt 2: TP. Ranked TP FP TP on 3 gts.
    result = evaluate(dets, gts, matching="coco")
    curve = result["curves"]["a"]["0.5"]
    np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3], atol=1e-15)
    rows = np.array(dets)
    images = [{"det": (rows[:, :4], rows[:, 4], np.ones(3, np.int64)), "gt": (*gts, np.zeros(3, bool))}]
    expected = run_cocoeval(images, num_classes=2).eval["precision"][0, :, 0, 0, -1].mean()
    assert average_precision(curve["recall"], curve["precision"], "coco101") == pytest.approx(expected, abs=1e-12)


@given(scenes(difficult=True, integral=False))
def test_compute_coco_converts_like_a_direct_pycocotools_run(images):
    images = with_a_detection(images)
    reference = run_cocoeval(images, crowd=True)
    evaluator = DetectionEvaluator(("a", "b", "c"))
    for i, image in enumerate(images):
        evaluator.add(f"im{i}", image["det"], image["gt"])
    result = evaluator.compute_coco()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    expected = [math.nan if v == -1 else v for v in reference.stats]
    np.testing.assert_allclose([result[n] for n in names], expected, rtol=0, atol=1e-12)


def test_compute_coco_perfect_and_difficult_as_crowd():
    pytest.importorskip("pycocotools")
    evaluator = DetectionEvaluator(("a", "b"))
    evaluator.add(1, (GT3, np.array([0.9, 0.8, 0.7]), np.array([1, 1, 1])), gt3())
    evaluator.add(2, (np.zeros((0, 4)), np.zeros(0), np.zeros(0)), (np.zeros((0, 4)), np.zeros(0)))
    result = evaluator.compute_coco()
    assert result["AP"] == result["AP50"] == result["AR100"] == 1.0
    assert result["ap"]["a"] == 1.0 and math.isnan(result["ap"]["b"]) and math.isnan(result["APl"])
    assert "Average Precision" in result["summary"]
    # A detection on a difficult (crowd) gt, even scored highest, is ignored; one elsewhere is a false positive.
    evaluator = DetectionEvaluator(("a",))
    dets = np.concatenate([GT3, [[41, 41, 49, 49], [60, 60, 70, 70]]])
    evaluator.add(1, (dets, np.array([0.9, 0.8, 0.7, 0.95, 0.1]), np.ones(5, np.int64)), gt3((False, False, True)))
    result = evaluator.compute_coco()
    assert result["AP50"] == 1.0 and result["AR100"] == 1.0
    # And with no detections at all (pycocotools' own loadRes refuses an empty list).
    evaluator = DetectionEvaluator(("a",))
    evaluator.add(1, (np.zeros((0, 4)), np.zeros(0), np.zeros(0)), gt3())
    assert evaluator.compute_coco()["AP"] == 0.0


# --- proposals ---------------------------------------------------------------------------------------------
def best_overlaps_reference(proposals, gts, top_n):
    return [
        max([iou64(list(g), list(p)) for p in props[:top_n]] or [0.0]) for props, gt in zip(proposals, gts) for g in gt
    ]


@given(st.integers(0, 2**32 - 1), st.sampled_from([None, 1, 5]))
def test_proposal_recall_matches_brute_force(seed, top_n):
    rng = np.random.default_rng(seed)
    proposals, gts, labels = [], [], []
    for _ in range(int(rng.integers(1, 5))):
        xy = rng.uniform(0, 50, (int(rng.integers(0, 12)), 2))
        proposals.append(np.concatenate([xy, xy + rng.uniform(2, 30, xy.shape)], axis=1))
        gxy = rng.uniform(0, 50, (int(rng.integers(0, 5)), 2))
        gts.append(np.concatenate([gxy, gxy + rng.uniform(2, 30, gxy.shape)], axis=1))
        labels.append(rng.integers(1, 4, len(gxy)))
    result = proposal_recall(
        [torch.tensor(p, dtype=torch.float32) for p in proposals],
        [torch.tensor(g, dtype=torch.float32) for g in gts],
        iou_thresholds=(0.5, 0.7),
        top_n=top_n,
        gt_labels=[torch.tensor(c) for c in labels],
    )
    # Reference on the float32-rounded boxes the function sees, in float64.
    proposals = [p.astype(np.float32).astype(np.float64) for p in proposals]
    gts = [g.astype(np.float32).astype(np.float64) for g in gts]
    best = np.array(best_overlaps_reference(proposals, gts, top_n))
    assert result["num_gt"] == len(best)
    assert result["mean_boxes"] == pytest.approx(np.mean([len(p[:top_n]) for p in proposals]))
    if not len(best):
        assert math.isnan(result["mabo"]) and math.isnan(result["recall@0.5"]) and result["abo"] == {}
        return
    assert result["recall@0.5"] == np.mean(best >= 0.5) and result["recall@0.7"] == np.mean(best >= 0.7)
    assert result["mabo"] == pytest.approx(best.mean(), abs=1e-12)
    flat_labels = np.concatenate(labels)
    abo = {c: best[flat_labels == c].mean() for c in sorted(set(flat_labels.tolist()))}
    assert result["abo"].keys() == abo.keys()
    for c in abo:
        assert result["abo"][c] == pytest.approx(abo[c], abs=1e-12)
    assert result["class_mabo"] == pytest.approx(np.mean(list(abo.values())), abs=1e-12)


def test_proposal_recall_by_hand(device):
    gts = [
        torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]], device=device),
        torch.tensor([[0.0, 0, 4, 4]], device=device),
    ]
    proposals = [
        torch.tensor([[0.0, 0, 5, 10], [0, 0, 10, 10], [20, 20, 30, 26]], device=device),  # IoU 0.5, 1, 0.6
        torch.zeros((0, 4), device=device),  # an image without proposals: its gt scores 0
    ]
    result = proposal_recall(proposals, gts, iou_thresholds=(0.5, 0.7))
    assert result["recall@0.5"] == pytest.approx(2 / 3) and result["recall@0.7"] == pytest.approx(1 / 3)
    assert result["mabo"] == pytest.approx((1 + 0.6 + 0) / 3) and result["mean_boxes"] == 1.5
    top1 = proposal_recall(proposals, gts, top_n=1, gt_labels=[torch.tensor([1, 2]), torch.tensor([2])])
    assert top1["mabo"] == pytest.approx((0.5 + 0 + 0) / 3) and top1["mean_boxes"] == 0.5
    assert top1["abo"] == {1: 0.5, 2: 0.0} and top1["class_mabo"] == 0.25


def test_proposal_recall_without_images_or_matching_lengths():
    result = proposal_recall([], [])
    assert math.isnan(result["mabo"]) and result["num_gt"] == 0
    with pytest.raises(ValueError):
        proposal_recall([torch.zeros((0, 4))], [])


# --- reports -----------------------------------------------------------------------------------------------
def test_write_report_strict_json_atomic(tmp_path):
    result = evaluate(STEPS, gt3())
    path = tmp_path / "sub" / "report.json"
    path.parent.mkdir()
    path.write_text("old")
    assert write_report(result, path) == path
    data = json.loads(path.read_text())  # strict: NaN became null
    assert data["ap"] == {"a": pytest.approx(34 / 45), "b": None} and "curves" not in data
    assert data["num_gt"] == {"a": 3, "b": 0} and data["iou_thresholds"] == [0.5]
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temporary file left behind
    write_report(result | {"extra": {1: np.float32(0.5), "t": torch.tensor([1, 2])}}, path, include_curves=True)
    data = json.loads(path.read_text())
    assert data["curves"]["a"]["0.5"]["precision"][1] == 0.5 and data["extra"] == {"1": 0.5, "t": [1, 2]}


def test_format_table():
    table = format_table(evaluate(STEPS, gt3(), iou_thresholds=(0.5, 0.75)))
    lines = table.splitlines()
    assert lines[0].split() == ["class", "gt", "diff", "dets", "AP@0.5", "AP@0.75"]
    assert lines[2].split() == ["a", "3", "0", "5", "0.7556", "0.7556"]
    assert lines[3].split() == ["b", "0", "0", "0", "-", "-"]
    assert lines[-1].split() == ["mAP", "0.7556", "0.7556"]


def test_pr_curves_csv_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    written = plot_pr_curves(evaluate(STEPS, gt3()), tmp_path)
    assert written == [tmp_path / "pr_curves.csv"]
    rows = (tmp_path / "pr_curves.csv").read_text().splitlines()
    assert rows[0] == "class,iou_threshold,recall,precision,score"
    assert len(rows) == 6 and rows[2].split(",")[:2] == ["a", "0.5"]
    assert [float(v) for v in rows[2].split(",")[2:]] == [1 / 3, 0.5, 0.8]
    assert "matplotlib is not installed" in caplog.text


def test_pr_curves_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    written = plot_pr_curves(evaluate(STEPS, gt3()), tmp_path)
    assert [p.name for p in written] == ["pr_curves.csv", "pr_01_a.png"]  # "b" has no gt: no plot
    assert (tmp_path / "pr_01_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- confusion matrix and the full report --------------------------------------------------------------------
def test_confusion_matrix_by_hand():
    """Classes (a, b). Image 1: gts a0 [0,0,10,10], b1 [20,20,30,30], a2 [40,40,50,50] (difficult), b3
    [60,60,70,70]. Detections best first: a on a0 (diagonal); a on b1 (b called a); b on a0 again (a0 taken: a
    false positive); a on the difficult a2 (not counted); b at IoU 1/3 with b3 (false positive, b3 missed); a at
    0.3 on nothing (under the score threshold). Image 2: gt a, a detection of it at IoU exactly 0.5 (counts) and
    image 3: an a gt without detections (missed)."""
    gts = (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], np.float64),
           np.array([1, 2, 1, 2]), np.array([False, False, True, False]))
    dets = np.array([
        [0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 1], [0, 0, 10, 10, 0.7, 2], [40, 40, 50, 50, 0.6, 1],
        [65, 60, 75, 70, 0.55, 2], [100, 100, 110, 110, 0.3, 1],
    ])
    evaluator = DetectionEvaluator(("a", "b"))
    evaluator.add(1, (dets[:, :4], dets[:, 4], dets[:, 5].astype(np.int64)), gts)
    evaluator.add(2, (np.array([[0, 0, 10, 5]]), np.array([0.5]), np.array([1])), (np.array([[0, 0, 10, 10]]), [1]))
    evaluator.add(3, (np.zeros((0, 4)), np.zeros(0), np.zeros(0)), (np.array([[0, 0, 10, 10]]), [1]))
    result = evaluator.confusion_matrix(iou_threshold=0.5, score_threshold=0.5)
    assert result["rows"] == ["a", "b", "background"] and result["columns"] == ["a", "b", "missed"]
    assert result["matrix"] == [[2, 0, 1], [1, 0, 1], [0, 2, 0]]
    lower = evaluator.confusion_matrix(score_threshold=0.2)["matrix"]
    assert lower == [[2, 0, 1], [1, 0, 1], [1, 2, 0]]  # the 0.3 detection is now a false positive


def test_report_coco_numbers_equal_pycocotools_on_the_json_file(tmp_path):
    """A COCO set on disk read through CocoDataset into the evaluator gives the numbers pycocotools computes from
    the same JSON file and the same detections (loadRes), metric for metric."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detect.data.coco import CocoDataset

    rng = np.random.default_rng(4)
    images, annotations, results = [], [], []
    for image_id in (3, 8, 11):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 300, "height": 300})
        for _ in range(4):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 140, 2)
            label = int(rng.integers(1, 3))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(2):
                jitter = rng.normal(0, 4, 4)
                results.append({"image_id": image_id, "category_id": label if rng.random() < 0.8 else 3 - label,
                                "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                                "score": float(rng.random())})
    document = {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "images").mkdir()
    for image in images:
        (tmp_path / "images" / image["file_name"]).write_bytes(b"")
    (tmp_path / "gt.json").write_text(json.dumps(document))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        evaluation = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()

    dataset = CocoDataset(tmp_path / "gt.json")
    evaluator = DetectionEvaluator(dataset.class_names)
    for i in range(len(dataset)):
        target = dataset.annotation(i)
        mine = [r for r in results if r["image_id"] == target["image_id"]]
        boxes = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (r["bbox"] for r in mine)])
        evaluator.add(target["image_id"], (boxes, [r["score"] for r in mine], [r["category_id"] for r in mine]), target)
    report = evaluator.report()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    np.testing.assert_allclose([report["coco"][n] for n in names], evaluation.stats[:6], rtol=0, atol=1e-9)
    assert report["confusion_matrix"]["rows"] == ["a", "b", "background"]
    assert "COCO  AP " in format_summary(report) and "AP_S" in format_summary(report)
    assert "AP50:95" in format_table(report)


def test_confusion_matrix_png(tmp_path):
    pytest.importorskip("matplotlib")
    from detect.evaluate import plot_confusion_matrix

    matrix = {"rows": ["a", "background"], "columns": ["a", "missed"], "matrix": [[3, 1], [2, 0]],
              "iou_threshold": 0.5, "score_threshold": 0.5}
    path = plot_confusion_matrix(matrix, tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
