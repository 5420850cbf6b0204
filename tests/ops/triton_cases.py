"""The Triton kernels of :mod:`detect.ops._gpu` on CPU tensors, under ``TRITON_INTERPRET=1``.

Not collected on its own (no ``test_`` prefix): ``test_triton_interpret.py`` runs it in a fresh interpreter with
``TRITON_INTERPRET=1`` and ``DETECT_OPS_BACKEND=triton``, because Triton decides at decoration time (when
:mod:`detect.ops._gpu` is imported) whether a kernel is compiled or interpreted. The interpreter runs each
program's operations in numpy, one IEEE operation at a time, so everything here is bitwise: against the torch
reference, torchvision and (for NMS decisions) the float64 loop. Cases are small: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from detect.ops import _gpu, dispatch
from detect.ops.boxes import batched_box_iou, box_iou, clip_boxes
from detect.ops.coder import BoxCoder
from detect.ops.nms import grouped_nms, multiclass_nms, nms
from tests.ops.fused_cases import (
    degenerate_boxes,
    huge_boxes,
    nms64,
    random_boxes,
    same_with_nan,
    threshold_equal_boxes,
    tied_scores,
)


def reference(fn, *args, **kwargs):
    with dispatch.use_backend("torch"):
        return fn(*args, **kwargs)


def test_the_interpreter_is_on() -> None:
    assert dispatch.choose("box_iou", torch.device("cpu"), torch.float32) == "triton"
    assert type(_gpu._iou_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (random_boxes(37, seed=1), random_boxes(70, seed=2)),  # partial tiles on both axes
        (degenerate_boxes(), degenerate_boxes()),
        (huge_boxes(), torch.cat((huge_boxes(), degenerate_boxes()))),
    ],
)
def test_iou(a, b) -> None:
    ours = box_iou(a, b)
    assert same_with_nan(ours, reference(box_iou, a, b))
    peer = torchvision.ops.box_iou(a, b)
    defined = ~peer.isnan()
    assert torch.equal(ours[defined], peer[defined])


def test_batched_iou_broadcast() -> None:
    gt = torch.stack((random_boxes(5, seed=3), random_boxes(5, seed=4)))
    anchors = random_boxes(40, seed=5).expand(2, 40, 4)
    assert same_with_nan(batched_box_iou(gt, anchors), reference(batched_box_iou, gt, anchors))


def _nms_cases():
    boxes, scores, thr = threshold_equal_boxes()
    tied_b, tied_s = tied_scores(40, seed=6)
    deg = degenerate_boxes()
    return [
        (random_boxes(50, seed=7, max_size=400.0), torch.rand(50, generator=torch.Generator().manual_seed(8)), 0.5),
        (boxes, scores, thr),
        (tied_b, tied_s, 0.375),
        (deg, torch.linspace(1, 0, len(deg)), 0.0),
        (huge_boxes(), torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), 0.1),
        (torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6.0]]), torch.tensor([0.9, 0.8]), 0.6),
    ]


@pytest.mark.parametrize("case", range(6))
def test_nms(case) -> None:
    boxes, scores, thr = _nms_cases()[case]
    expected = torchvision.ops.nms(boxes, scores, thr).tolist()
    assert nms(boxes, scores, thr).tolist() == expected
    if case in (0, 1, 2, 3):  # exact in float64 too (the last case is float32 vs float64 on purpose)
        assert expected == nms64(boxes, scores, thr)


def test_grouped_nms_images_groups_caps() -> None:
    boxes, scores = tied_scores(60, seed=9)
    g = torch.Generator().manual_seed(10)
    groups, images = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 2, (60,), generator=g)
    for cap in (None, 2):
        ours = grouped_nms(boxes, scores, groups, images, 2, 0.5, cap, strategy="fused")
        ref = reference(grouped_nms, boxes, scores, groups, images, 2, 0.5, cap)
        assert [k.tolist() for k in ours] == [k.tolist() for k in ref]


def test_multiclass_nms() -> None:
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(30, seed=12, max_size=200.0)[:, None] + torch.randn(30, 3, 4, generator=g)
    scores = (torch.randint(0, 5, (30, 3), generator=g) / 4.0) ** 2
    kwargs = dict(iou_threshold=0.5, score_threshold=0.05, max_per_image=10)
    ours = multiclass_nms([boxes, boxes[:10]], [scores, scores[:10]], **kwargs)
    ref = reference(multiclass_nms, [boxes, boxes[:10]], [scores, scores[:10]], **kwargs)
    for o, r in zip(ours, ref):
        assert all(torch.equal(x, y) for x, y in zip(o, r))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.3, 7.0, 3.3, 1.7)])
def test_coder(weights) -> None:
    g = torch.Generator().manual_seed(13)
    boxes = torch.cat((random_boxes(30, seed=14, scale=20_000.0), degenerate_boxes(), huge_boxes()))
    deltas = torch.randn(len(boxes), 3 * 4, generator=g) * 4
    deltas[::7] = float("nan")
    coder = BoxCoder(weights)
    assert same_with_nan(coder.decode_per_class(deltas, boxes), reference(coder.decode_per_class, deltas, boxes))
    batch = deltas[:20, :4].view(2, 10, 4)
    assert same_with_nan(coder.decode(batch, boxes[:10]), reference(coder.decode, batch, boxes[:10]))
    proposals = random_boxes(40, seed=15) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    targets = proposals + torch.randn(40, 4, generator=g)
    assert same_with_nan(coder.encode(targets, proposals), reference(coder.encode, targets, proposals))


def test_decode_with_cuda_reciprocal_division() -> None:
    """On CUDA torch divides by a Python number as ``x * (1 / w)``; the kernels' CUDA mode does the same."""
    g = torch.Generator().manual_seed(16)
    deltas = torch.randn(300, 4, generator=g) * 3
    boxes = random_boxes(300, seed=17)
    weights = (0.3, 7.0, 3.3, 1.7)
    inverse = [1.0 / torch.tensor(w, dtype=torch.float32) for w in weights]  # float32 reciprocals, as on CUDA
    scaled = torch.empty(2, 300)
    _gpu.decode_prepare(deltas, scaled, weights[2], weights[3], 4.135, reciprocal=True)
    dw, dh = (deltas[:, 2] * inverse[2]).clamp(max=4.135), (deltas[:, 3] * inverse[3]).clamp(max=4.135)
    assert torch.equal(scaled[0], dw) and torch.equal(scaled[1], dh)
    scaled.exp_()
    out = torch.empty(300, 4)
    _gpu.decode_finish(out, deltas, scaled, boxes, 1, 1, 0, weights[0], weights[1], reciprocal=True)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px = deltas[:, 0] * inverse[0] * w + (boxes[:, 0] + 0.5 * w)
    py = deltas[:, 1] * inverse[1] * h + (boxes[:, 1] + 0.5 * h)
    hw, hh = 0.5 * (scaled[0] * w), 0.5 * (scaled[1] * h)
    assert torch.equal(out, torch.stack((px - hw, py - hh, px + hw, py + hh), 1))


def test_clip() -> None:
    boxes = random_boxes(60, seed=18, scale=900.0, max_size=400.0) - 150.0
    boxes[::7, 2] = float("nan")
    assert same_with_nan(clip_boxes(boxes, (480, 640)), torchvision.ops.clip_boxes_to_image(boxes, (480, 640)))
    sizes = torch.tensor([[480, 640], [30, 20], [1000, 5]])
    per_image = boxes.view(3, 20, 4)
    assert same_with_nan(clip_boxes(per_image, sizes), reference(clip_boxes, per_image, sizes))
