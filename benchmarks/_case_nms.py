"""Benchmark case: multi-image multi-class NMS (detector-head post-processing) against torchvision.

    python benchmarks/_case_nms.py [--repeats 5]

Input: 8 images x 1,000 RoIs x 20 classes with class-specific boxes, as a Faster R-CNN box head produces: most
RoIs are jittered around a few dozen objects per image (so NMS has work to do), the rest are uniformly random,
each class's box is the RoI refined by a small random regression, and the scores are a softmax over 21 logits
where a RoI's own object class scores with its overlap. Post-processing: score > 0.05, class-wise NMS at IoU
0.5, the 100 best detections per image. The peer is the usual per-image loop: score filter,
``torchvision.ops.batched_nms`` with class ids, ``keep[:100]``. A second case drops the per-image cap.
``ours`` is the default (fused) path, ``reference`` our torch-op path; ``floor`` is one pass over the input
scores (the score threshold), the least any implementation reads (the output itself is a few hundred boxes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._timing import median_seconds  # noqa: E402
from detect.ops import dispatch  # noqa: E402
from detect.ops.nms import NMSResult, multiclass_nms  # noqa: E402

IMAGES, ROIS, CLASSES = 8, 1000, 20
SCORE_THRESHOLD, IOU_THRESHOLD, CAP = 0.05, 0.5, 100
HEIGHT, WIDTH = 800.0, 1066.0


def head_outputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``boxes (B, N, C, 4)`` and ``scores (B, N, C)`` shaped like a trained box head's output."""
    g = torch.Generator().manual_seed(seed)
    boxes, scores = [], []
    for _ in range(IMAGES):
        n_obj = int(torch.randint(20, 41, (1,), generator=g))
        obj_size = torch.empty(n_obj, 2).uniform_(24, 360, generator=g)
        obj_centre = torch.rand(n_obj, 2, generator=g) * torch.tensor([WIDTH, HEIGHT])
        objects = torch.cat([obj_centre - obj_size / 2, obj_centre + obj_size / 2], 1)  # (O, 4)
        obj_class = torch.randint(0, CLASSES, (n_obj,), generator=g)
        n_near = int(0.7 * ROIS)
        pick = torch.randint(0, n_obj, (n_near,), generator=g)
        near = objects[pick] + 0.12 * obj_size[pick].repeat(1, 2) * torch.randn(n_near, 4, generator=g)
        size = torch.empty(ROIS - n_near, 2).uniform_(16, 400, generator=g)
        centre = torch.rand(ROIS - n_near, 2, generator=g) * torch.tensor([WIDTH, HEIGHT])
        rois = torch.cat([near, torch.cat([centre - size / 2, centre + size / 2], 1)])  # (N, 4)
        roi_size = (rois[:, 2:] - rois[:, :2]).abs().clamp(min=4).repeat(1, 2)  # (N, 4)
        refined = rois[:, None, :] + 0.04 * roi_size[:, None, :] * torch.randn(ROIS, CLASSES, 4, generator=g)
        x1, x2 = refined[..., 0::2].min(-1).values, refined[..., 0::2].max(-1).values  # (N, C)
        y1, y2 = refined[..., 1::2].min(-1).values, refined[..., 1::2].max(-1).values
        x1, x2, y1, y2 = x1.clamp(0, WIDTH), x2.clamp(0, WIDTH), y1.clamp(0, HEIGHT), y2.clamp(0, HEIGHT)
        boxes.append(torch.stack([x1, y1, x2, y2], -1))  # (N, C, 4) clipped to the image, as heads do
        overlap, nearest = torchvision.ops.box_iou(rois, objects).max(1)  # (N,)
        logits = torch.randn(ROIS, CLASSES + 1, generator=g)  # (N, 1 + C), column 0 = background
        logits[:, 0] += 1.0 + 3.0 * (1 - overlap)
        logits[torch.arange(ROIS), obj_class[nearest] + 1] += 6.0 * overlap
        scores.append(logits.softmax(1)[:, 1:])
    return torch.stack(boxes), torch.stack(scores)


def torchvision_loop(boxes: torch.Tensor, scores: torch.Tensor, cap: int | None) -> list[tuple[torch.Tensor, ...]]:
    """The peer: per image, score filter, ``batched_nms`` over class ids, ``keep[:cap]``."""
    out = []
    for image_boxes, image_scores in zip(boxes, scores):
        rows, classes = torch.nonzero(image_scores > SCORE_THRESHOLD, as_tuple=True)
        cand_boxes, cand_scores = image_boxes[rows, classes], image_scores[rows, classes]
        keep = torchvision.ops.batched_nms(cand_boxes, cand_scores, classes, IOU_THRESHOLD)[:cap]
        out.append((cand_boxes[keep], cand_scores[keep], classes[keep], rows[keep]))
    return out


def ours(boxes: torch.Tensor, scores: torch.Tensor, cap: int | None) -> list[NMSResult]:
    return multiclass_nms(
        boxes, scores, iou_threshold=IOU_THRESHOLD, score_threshold=SCORE_THRESHOLD, max_per_image=cap
    )


def reference(boxes: torch.Tensor, scores: torch.Tensor, cap: int | None) -> list[NMSResult]:
    """:func:`ours` on the torch-op reference path (the per-group strategy), as before the fused loops."""
    with dispatch.use_backend("torch"):
        return ours(boxes, scores, cap)


def _identical(mine: list[NMSResult], peer: list[tuple[torch.Tensor, ...]]) -> bool:
    return len(mine) == len(peer) and all(
        all(torch.equal(a, b) for a, b in zip(m, p)) for m, p in zip(mine, peer)
    )


def run(repeats: int = 5) -> list[dict]:
    """One row per case: medians of ours and the peer, their ratio, and whether the kept detections are equal."""
    boxes, scores = head_outputs()
    candidates = int((scores > SCORE_THRESHOLD).sum())
    rows = []
    for cap, label in ((CAP, f"top {CAP} per image"), (None, "no per-image cap")):
        seconds = median_seconds(
            {
                "ours": lambda: ours(boxes, scores, cap),
                "reference": lambda: reference(boxes, scores, cap),
                "peer": lambda: torchvision_loop(boxes, scores, cap),
                "floor": lambda: torch.gt(scores, SCORE_THRESHOLD),
            },
            repeats,
        )
        mine, peer = ours(boxes, scores, cap), torchvision_loop(boxes, scores, cap)
        rows.append(
            {
                "case": f"nms: {IMAGES}x{ROIS} boxes x{CLASSES} classes, {label}",
                "ours_s": seconds["ours"],
                "peer_s": seconds["peer"],
                "ratio": seconds["peer"] / seconds["ours"],
                "reference_s": seconds["reference"],
                "floor_s": seconds["floor"],
                "identical": _identical(mine, peer) and _identical(reference(boxes, scores, cap), peer),
                "note": f"{candidates} candidates > {SCORE_THRESHOLD}, {sum(len(m.scores) for m in mine)} kept; "
                "peer = per-image torchvision.ops.batched_nms loop",
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    for row in run(args.repeats):
        print(row)
