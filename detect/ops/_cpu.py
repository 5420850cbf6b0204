"""Fused CPU loops (numba) behind the box kernels: IoU, greedy NMS, the box coder and clipping.

Each loop computes, element by element, exactly the operations the torch-op reference performs on whole tensors,
in the same order and in the same precision, so its results are bitwise equal to the reference's. Nothing here
is public: :mod:`detect.ops.dispatch` decides when a loop runs, and the op modules (:mod:`detect.ops.boxes`,
:mod:`detect.ops.nms`, :mod:`detect.ops.coder`) convert tensors to the arrays these loops take.

Decisions:

- No ``fastmath`` (it would let LLVM reassociate, contract into FMA and assume no NaN) and ``error_model="numpy"``
  (a float division by zero gives inf/NaN instead of a Python exception check in the inner loop, which would
  block vectorisation).
- Python float literals are never mixed with array values: numba would promote ``float32 op 0.5`` to float64.
  Every constant a loop needs (``zero``, ``half``, ``tiny``, the coder's weights) arrives as an argument of the
  array's own dtype, built by the caller with ``dtype.type(value)``.
- Minimum and maximum are written as comparisons (``b if b < a else a``), which LLVM turns into vector selects.
  For the IoU matrix they agree with ``torch.minimum``/``maximum`` on every NaN-free input, and a NaN coordinate
  still gives NaN (its box's area is NaN). For NMS they reproduce torchvision's ``std::max``/``std::min``
  argument order exactly, NaN included.
- Every loop exists twice, serial and ``parallel=True`` (``prange`` over rows, images or elements), as two
  separate functions: numba keys its on-disk cache by function, not by compile flags, so one Python function
  compiled both ways could load the wrong variant. Small inputs take the serial one (no thread wake-up).
- ``cache=True`` everywhere. When no cache location is writable (a read-only install with an unwritable home and
  no ``NUMBA_CACHE_DIR``), numba refuses to create a cached function; :func:`_jit` then compiles without a cache
  instead of failing the import.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

__all__ = [
    "clip_parallel",
    "clip_serial",
    "decode_finish_parallel",
    "decode_finish_serial",
    "decode_prepare_parallel",
    "decode_prepare_serial",
    "encode_finish_parallel",
    "encode_finish_serial",
    "encode_prepare_parallel",
    "encode_prepare_serial",
    "iou_parallel",
    "iou_serial",
    "nms_parallel",
    "nms_serial",
]


def _jit(parallel: bool):
    """``numba.njit`` with this module's options, cached on disk when a cache location is writable."""

    def wrap(fn):
        options = dict(nogil=True, parallel=parallel, error_model="numpy", fastmath=False)
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, **options)(fn)

    return wrap


# --- IoU ------------------------------------------------------------------------------------------------------


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _iou_row(out, image, row, first, second, zero, tiny):
    """``out[image, row, :]`` = IoU of box ``first[image, row]`` (x1, y1, x2, y2) with every column box.

    ``second[image]`` is ``(5, M)``: x1, y1, x2, y2 and area of the columns (structure of arrays, so the inner
    loop vectorises). Operation order as :mod:`detect.ops.boxes` documents.
    """
    ax1, ay1, ax2, ay2 = first[image, row, 0], first[image, row, 1], first[image, row, 2], first[image, row, 3]
    area_a = (ax2 - ax1) * (ay2 - ay1)
    bx1, by1, bx2, by2, area_b = second[image, 0], second[image, 1], second[image, 2], second[image, 3], second[image, 4]
    dest = out[image, row]
    for j in range(dest.shape[0]):
        w = (bx2[j] if bx2[j] < ax2 else ax2) - (bx1[j] if bx1[j] > ax1 else ax1)
        h = (by2[j] if by2[j] < ay2 else ay2) - (by1[j] if by1[j] > ay1 else ay1)
        if w < zero:
            w = zero
        if h < zero:
            h = zero
        inter = w * h
        union = (area_a + area_b[j]) - inter
        if union < tiny:
            union = tiny
        dest[j] = inter / union


@_jit(parallel=True)
def iou_parallel(out, first, second, zero, tiny):
    """``out (B, N, M)`` = IoU of ``first (B, N, 4)`` against the columns ``second (B, 5, M)``; rows in parallel."""
    rows = first.shape[1]
    for task in prange(first.shape[0] * rows):
        _iou_row(out, task // rows, task % rows, first, second, zero, tiny)


@_jit(parallel=False)
def iou_serial(out, first, second, zero, tiny):
    """:func:`iou_parallel` on one thread."""
    rows = first.shape[1]
    for task in range(first.shape[0] * rows):
        _iou_row(out, task // rows, task % rows, first, second, zero, tiny)


# --- greedy NMS -----------------------------------------------------------------------------------------------


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _nms_image(image, boxes, order, segment, image_start, segment_start, threshold, cap, kept_boxes, fill, keep,
               counts, zero):
    """Greedy NMS of one image, torchvision's CPU kernel decision for decision.

    The image's candidates are ``order[image_start[image]:image_start[image + 1]]`` (indices into ``boxes``), in
    visiting order (score descending, index ascending). A candidate is kept unless an already kept box of its
    segment (same image and group) overlaps it with IoU above ``threshold`` (compared in float64, as
    torchvision compares). Kept boxes of segment ``s`` are appended to ``kept_boxes[:, segment_start[s]:]``
    (x1, y1, x2, y2, area), so a candidate is compared with its own segment's kept boxes only. The image stops at
    ``cap`` kept boxes (``cap < 0``: no cap). ``keep[p]`` marks kept visiting positions, ``counts[image]`` their
    number.

    The pair arithmetic is the kernel's, with the kept box as its first operand: ``xx1 = std::max(kx1, cx1)``
    is ``cx1 if kx1 < cx1 else kx1``, ``std::min(kx2, cx2)`` is ``cx2 if cx2 < kx2 else kx2``, ``w =
    std::max(0, xx2 - xx1)`` is ``w if 0 < w else 0`` (NaN -> 0), and ``iou = inter / (area_k + area_c -
    inter)``.
    """
    kept = 0
    for p in range(image_start[image], image_start[image + 1]):
        if kept == cap:
            break
        i = order[p]
        cx1, cy1, cx2, cy2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        area_c = (cx2 - cx1) * (cy2 - cy1)
        s = segment[i]
        base = segment_start[s]
        suppressed = False
        for q in range(base, base + fill[s]):
            kx1, ky1, kx2, ky2 = kept_boxes[0, q], kept_boxes[1, q], kept_boxes[2, q], kept_boxes[3, q]
            w = (cx2 if cx2 < kx2 else kx2) - (cx1 if kx1 < cx1 else kx1)
            h = (cy2 if cy2 < ky2 else ky2) - (cy1 if ky1 < cy1 else ky1)
            w = w if zero < w else zero
            h = h if zero < h else zero
            inter = w * h
            if inter / ((kept_boxes[4, q] + area_c) - inter) > threshold:
                suppressed = True
                break
        if not suppressed:
            slot = base + fill[s]
            kept_boxes[0, slot], kept_boxes[1, slot], kept_boxes[2, slot], kept_boxes[3, slot] = cx1, cy1, cx2, cy2
            kept_boxes[4, slot] = area_c
            fill[s] += 1
            keep[p] = True
            kept += 1
    counts[image] = kept


@_jit(parallel=True)
def nms_parallel(boxes, order, segment, image_start, segment_start, threshold, cap, kept_boxes, fill, keep, counts,
                 zero):
    """:func:`_nms_image` for every image, images in parallel (segments never span images)."""
    for image in prange(image_start.shape[0] - 1):
        _nms_image(image, boxes, order, segment, image_start, segment_start, threshold, cap, kept_boxes, fill, keep,
                   counts, zero)


@_jit(parallel=False)
def nms_serial(boxes, order, segment, image_start, segment_start, threshold, cap, kept_boxes, fill, keep, counts,
               zero):
    """:func:`nms_parallel` on one thread."""
    for image in range(image_start.shape[0] - 1):
        _nms_image(image, boxes, order, segment, image_start, segment_start, threshold, cap, kept_boxes, fill, keep,
                   counts, zero)


# --- box coder ------------------------------------------------------------------------------------------------
#
# The coder's exp (decode) and log (encode) stay torch's: the loops below prepare their arguments as the same
# contiguous arrays the reference passes to torch.exp / torch.log, and finish the arithmetic afterwards. torch's
# CPU exp/log mix a SIMD polynomial with libm at the tails of each thread's chunk, so recomputing them here could
# differ in the last bit; applying torch's own function to the same array in the same layout cannot.


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _clamp_max(value, upper):
    """``value.clamp(max=upper)`` of torch: NaN stays NaN."""
    return upper if value > upper else value


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _decode_prepare(k, deltas, scaled, ww, wh, clip):
    scaled[0, k] = _clamp_max(deltas[k, 2] / ww, clip)
    scaled[1, k] = _clamp_max(deltas[k, 3] / wh, clip)


@_jit(parallel=True)
def decode_prepare_parallel(deltas, scaled, ww, wh, clip):
    """``scaled[0] = (deltas[:, 2] / ww).clamp(max=clip)``, ``scaled[1]`` the same of column 3 with ``wh``."""
    for k in prange(deltas.shape[0]):
        _decode_prepare(k, deltas, scaled, ww, wh, clip)


@_jit(parallel=False)
def decode_prepare_serial(deltas, scaled, ww, wh, clip):
    """:func:`decode_prepare_parallel` on one thread."""
    for k in range(deltas.shape[0]):
        _decode_prepare(k, deltas, scaled, ww, wh, clip)


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _decode_row(out, row, deltas, exps, boxes, box_row, wx, wy, half):
    """One decoded box: the reference's ``pred = d / w * size + centre`` and ``half = 0.5 * (exp * size)``."""
    x1, y1, x2, y2 = boxes[box_row, 0], boxes[box_row, 1], boxes[box_row, 2], boxes[box_row, 3]
    widths = x2 - x1
    heights = y2 - y1
    ctr_x = x1 + half * widths
    ctr_y = y1 + half * heights
    pred_x = deltas[row, 0] / wx * widths + ctr_x
    pred_y = deltas[row, 1] / wy * heights + ctr_y
    half_w = half * (exps[0, row] * widths)
    half_h = half * (exps[1, row] * heights)
    out[row, 0] = pred_x - half_w
    out[row, 1] = pred_y - half_h
    out[row, 2] = pred_x + half_w
    out[row, 3] = pred_y + half_h


@_jit(parallel=True)
def decode_finish_parallel(out, deltas, exps, boxes, outer_stride, inner, inner_stride, wx, wy, half):
    """Decode rows ``r = o * inner + i`` of ``out (R, 4)``; their reference box is ``boxes[o * outer_stride + i *
    inner_stride]`` (the broadcast of the boxes against the deltas, collapsed to two dimensions)."""
    for o in prange(out.shape[0] // inner):
        for i in range(inner):
            _decode_row(out, o * inner + i, deltas, exps, boxes, o * outer_stride + i * inner_stride, wx, wy, half)


@_jit(parallel=False)
def decode_finish_serial(out, deltas, exps, boxes, outer_stride, inner, inner_stride, wx, wy, half):
    """:func:`decode_finish_parallel` on one thread."""
    for o in range(out.shape[0] // inner):
        for i in range(inner):
            _decode_row(out, o * inner + i, deltas, exps, boxes, o * outer_stride + i * inner_stride, wx, wy, half)


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _encode_row(k, out, gt, proposals, ratios, wx, wy, half):
    """The reference's ``dx = wx * (gt_x - ex_x) / ex_w`` (same for y) and ``gt_w / ex_w`` for the log."""
    ex_w = proposals[k, 2] - proposals[k, 0]
    ex_h = proposals[k, 3] - proposals[k, 1]
    ex_x = proposals[k, 0] + half * ex_w
    ex_y = proposals[k, 1] + half * ex_h
    gt_w = gt[k, 2] - gt[k, 0]
    gt_h = gt[k, 3] - gt[k, 1]
    gt_x = gt[k, 0] + half * gt_w
    gt_y = gt[k, 1] + half * gt_h
    out[k, 0] = wx * (gt_x - ex_x) / ex_w
    out[k, 1] = wy * (gt_y - ex_y) / ex_h
    ratios[0, k] = gt_w / ex_w
    ratios[1, k] = gt_h / ex_h


@_jit(parallel=True)
def encode_prepare_parallel(out, gt, proposals, ratios, wx, wy, half):
    """Columns 0-1 of the deltas ``out (R, 4)`` and the size ratios ``ratios (2, R)`` whose logs give 2-3."""
    for k in prange(out.shape[0]):
        _encode_row(k, out, gt, proposals, ratios, wx, wy, half)


@_jit(parallel=False)
def encode_prepare_serial(out, gt, proposals, ratios, wx, wy, half):
    """:func:`encode_prepare_parallel` on one thread."""
    for k in range(out.shape[0]):
        _encode_row(k, out, gt, proposals, ratios, wx, wy, half)


@_jit(parallel=True)
def encode_finish_parallel(out, logs, ww, wh):
    """Columns 2-3 of the deltas: ``ww * log(gt_w / ex_w)`` and ``wh * log(gt_h / ex_h)``."""
    for k in prange(out.shape[0]):
        out[k, 2] = ww * logs[0, k]
        out[k, 3] = wh * logs[1, k]


@_jit(parallel=False)
def encode_finish_serial(out, logs, ww, wh):
    """:func:`encode_finish_parallel` on one thread."""
    for k in range(out.shape[0]):
        out[k, 2] = ww * logs[0, k]
        out[k, 3] = wh * logs[1, k]


# --- clipping -------------------------------------------------------------------------------------------------


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _clip_row(k, out, boxes, sizes, rows_per_size, zero):
    """``min(max(v, 0), bound)`` with NaN kept, bound W for x and H for y of the row's ``sizes`` entry (H, W)."""
    s = k // rows_per_size
    for c in range(4):
        v = boxes[k, c]
        bound = sizes[s, 1 - (c & 1)]
        if v < zero:
            v = zero
        if v > bound:
            v = bound
        out[k, c] = v


@_jit(parallel=True)
def clip_parallel(out, boxes, sizes, rows_per_size, zero):
    """Clip rows of ``boxes (R, 4)`` into ``out``; row ``k`` uses ``sizes[k // rows_per_size]`` as (H, W)."""
    for k in prange(boxes.shape[0]):
        _clip_row(k, out, boxes, sizes, rows_per_size, zero)


@_jit(parallel=False)
def clip_serial(out, boxes, sizes, rows_per_size, zero):
    """:func:`clip_parallel` on one thread."""
    for k in range(boxes.shape[0]):
        _clip_row(k, out, boxes, sizes, rows_per_size, zero)
