"""NMS as one custom operator, ``detect::nms_table``: how the detectors' exportable inference path suppresses boxes.

The operator has ONNX ``NonMaxSuppression``'s contract, so that an ONNX export is one node and every other runtime
gets the same answer from its own kernel:

    ``boxes (B, N, 4)`` xyxy, ``scores (B, C, N)`` -> ``(M, 3)`` int64 rows ``[b, c, n]``: the boxes greedy NMS keeps
    in each ``(b, c)`` (suppress at ``IoU > iou``; a candidate needs ``score > score``), at most ``max_out`` per
    ``(b, c)``, ordered by ``(b, c)`` and then by descending score.

Its registrations are where the runtimes differ (nothing else of the model does):

- **Eager** (the kernel): :func:`detect.ops.nms.grouped_nms`, each ``(b, c)`` pair one of its "images", so the cap
  is per pair and the suppression is exact (decision for decision torchvision's CPU kernel; the numba loop on the
  CPU, the Triton or chunked path on CUDA).
- **Fake** (torch.export, torch.compile): an ``(M, 3)`` int64 tensor with ``M`` a new unbacked size.
- **ONNX** (:data:`ONNX_TRANSLATION`, for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``):
  one ``NonMaxSuppression`` node (opset >= 11), which ONNX Runtime's CPU and CUDA providers both implement with
  the same strict comparisons.
- **Without our code** (a ``.pt2`` file or an AOTInductor package that must load where only torch and torchvision
  are installed): inside :func:`torchvision_form`, :func:`nms_table` traces as torchvision's ``nms`` on boxes
  shifted apart per ``(b, c)`` (torchvision's ``batched_nms`` coordinate trick) plus the per-pair cap. The shift
  can move an IoU within float rounding of the threshold across it; the parity tests bound the effect.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms and its fake kernel)
from torch import Tensor

from detect.ops.nms import grouped_nms

__all__ = ["ONNX_TRANSLATION", "nms_table", "torchvision_form"]

_TORCHVISION_FORM: ContextVar[bool] = ContextVar("detect_nms_torchvision_form", default=False)


@torch.library.custom_op("detect::nms_table", mutates_args=())
def _nms_table_op(boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
    """The eager kernel: :func:`grouped_nms` with every ``(b, c)`` pair its own image (see the module docstring)."""
    batch, classes, count = scores.shape
    flat = scores.reshape(-1)  # (B*C*N,) in (b, c, n) order
    candidates = torch.nonzero(flat > score).squeeze(1)  # (K,)
    pair = torch.div(candidates, count, rounding_mode="floor")  # (K,) b * C + c
    box = candidates - pair * count  # (K,) n
    image = torch.div(pair, classes, rounding_mode="floor")  # (K,) b
    kept = grouped_nms(
        boxes[image, box], flat[candidates], torch.zeros_like(pair), pair, batch * classes, iou, max_per_image=max_out
    )
    keep = torch.cat(kept) if kept else candidates  # (M,) by pair, then score
    return torch.stack([image[keep], pair[keep] - image[keep] * classes, box[keep]], dim=1)  # (M, 3)


@_nms_table_op.register_fake
def _(boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
    rows = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((rows, 3), dtype=torch.int64)


def _torchvision_nms_table(boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
    """:func:`nms_table` in torch and torchvision ops only (see the module docstring)."""
    classes, count = scores.shape[1], scores.shape[2]
    flat = scores.reshape(-1)  # (B*C*N,)
    candidates = torch.nonzero(flat > score).squeeze(1)  # (K,)
    pair = torch.div(candidates, count, rounding_mode="floor")  # (K,) b * C + c
    box = candidates - pair * count
    image = torch.div(pair, classes, rounding_mode="floor")
    chosen = boxes[image, box]  # (K, 4)
    largest = torch.cat([chosen.reshape(-1), chosen.new_zeros(1)]).max()  # 0-d, defined for no candidates too
    # Two sentinel boxes in pairs -1 and -2 (no real box reaches there after the shift), always kept: torchvision's
    # fake nms promises at least two kept boxes (pytorch/pytorch#121036), which the program then asserts at run
    # time, so a real result of 0 or 1 boxes would fail. They are dropped right after.
    count_in = candidates.shape[0]
    sentinel = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=chosen.dtype, device=chosen.device).expand(2, 4)
    chosen = torch.cat([chosen, sentinel])  # (K + 2, 4)
    codes = torch.cat([pair, torch.tensor([-1, -2], dtype=pair.dtype, device=pair.device)])  # (K + 2,)
    ranked = torch.cat([flat[candidates], torch.full((2,), float("inf"), dtype=flat.dtype, device=flat.device)])
    shift = (largest + 1) * codes.to(chosen.dtype)  # (K + 2,) pairs never overlap after the shift
    keep = torch.ops.torchvision.nms(chosen + shift[:, None], ranked, iou)  # (P + 2,) by score
    keep = keep[keep < count_in]  # (P,) the real ones
    keep = keep[torch.sort(pair[keep], stable=True).indices]  # (P,) by pair, then score
    kept_pair = pair[keep]
    rank = torch.arange(kept_pair.shape[0], device=keep.device) - torch.searchsorted(kept_pair, kept_pair)
    keep = keep[rank < max_out]  # (M,) at most max_out per pair
    return torch.stack([image[keep], pair[keep] - image[keep] * classes, box[keep]], dim=1)


def nms_table(boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
    """``detect::nms_table`` (see the module docstring): ``boxes (B, N, 4)``, ``scores (B, C, N)`` -> ``(M, 3)``."""
    if _TORCHVISION_FORM.get():
        return _torchvision_nms_table(boxes, scores, int(max_out), float(iou), float(score))
    return torch.ops.detect.nms_table(boxes, scores, int(max_out), float(iou), float(score))


@contextlib.contextmanager
def torchvision_form() -> Iterator[None]:
    """Within the block, :func:`nms_table` runs (and traces) as torchvision ops, not as the custom op."""
    token = _TORCHVISION_FORM.set(True)
    try:
        yield
    finally:
        _TORCHVISION_FORM.reset(token)


def _onnx_nms_table(boxes: Any, scores: Any, max_out: int, iou: float, score: float) -> Any:
    """``detect::nms_table`` as ONNX: one ``NonMaxSuppression`` node (traced by the onnxscript-based exporter)."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[int(max_out)]),
        op.Constant(value_floats=[float(iou)]),
        op.Constant(value_floats=[float(score)]),
        center_point_box=0,
    )


ONNX_TRANSLATION = {torch.ops.detect.nms_table.default: _onnx_nms_table}
"""``custom_translation_table`` entry of ``detect::nms_table`` for ``torch.onnx.export(..., dynamo=True)``."""
