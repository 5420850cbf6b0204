"""Fused GPU kernels (Triton) behind the box kernels: IoU, greedy NMS, the box coder and clipping.

:mod:`detect.ops.dispatch` sends float32 CUDA tensors here; float64 on CUDA stays on the torch reference (Triton
types Python float arguments as float32, and float64 boxes on a GPU are rare). The kernels mirror the reference's
operations one by one, as the numba loops of :mod:`detect.ops._cpu` do on the CPU, with these CUDA specifics:

- Launched with ``enable_fp_fusion=False``: no multiply-add is contracted into an FMA (torch's CUDA ops each
  round their own result; ``pred_x = dx * widths + ctr_x`` is two kernels there).
- Divisions use ``tl.math.div_rn`` (IEEE round to nearest); Triton's ``/`` on float32 is an approximate
  division on NVIDIA GPUs.
- torch's CUDA ``tensor / python_number`` multiplies by the float32 reciprocal instead of dividing, so the
  coder's ``deltas / weight`` does the same here on CUDA (and divides on the CPU, under the interpreter).
- exp and log stay torch's own (as on the CPU; see :mod:`detect.ops._cpu`).
- Clamps are written ``where(v < 0, 0, v)`` so a NaN stays NaN, as torch's ``clamp`` keeps it (``tl.maximum``
  would return the other operand on CUDA).

With those, results are expected to be bitwise equal to the torch reference on CUDA too. This has been verified
under ``TRITON_INTERPRET=1`` (which runs these kernels with numpy on CPU tensors, the way the tests check them)
but could not be on a GPU when this was written; the CUDA tests therefore compare within a few float32 ulps,
with exact equality of NMS decisions, and the CPU and interpreter tests are bitwise.

The NMS kernel runs one program per image that visits the image's candidates in order, as the CPU loop does,
comparing each with the kept boxes of its segment ``BLOCK`` at a time; images run in parallel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["box_iou", "clip", "decode_finish", "decode_prepare", "encode_finish", "encode_prepare", "nms"]

_BLOCK = 1024


def _launch_options(device: torch.device) -> dict:
    return {"enable_fp_fusion": False} if device.type == "cuda" else {}


@triton.jit
def _div(a, b):
    return tl.math.div_rn(a, b)


# --- IoU ------------------------------------------------------------------------------------------------------


@triton.jit
def _iou_kernel(first, second, out, rows, cols, tiny, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    image = tl.program_id(2).to(tl.int64)
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_n, in_m = rn < rows, rm < cols
    a = first + (image * rows + rn) * 4
    b = second + (image * cols + rm) * 4
    ax1, ay1 = tl.load(a, mask=in_n, other=0.0), tl.load(a + 1, mask=in_n, other=0.0)
    ax2, ay2 = tl.load(a + 2, mask=in_n, other=0.0), tl.load(a + 3, mask=in_n, other=0.0)
    bx1, by1 = tl.load(b, mask=in_m, other=0.0), tl.load(b + 1, mask=in_m, other=0.0)
    bx2, by2 = tl.load(b + 2, mask=in_m, other=0.0), tl.load(b + 3, mask=in_m, other=0.0)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = tl.minimum(ax2[:, None], bx2[None, :]) - tl.maximum(ax1[:, None], bx1[None, :])
    h = tl.minimum(ay2[:, None], by2[None, :]) - tl.maximum(ay1[:, None], by1[None, :])
    w = tl.where(w < 0.0, 0.0, w)
    h = tl.where(h < 0.0, 0.0, h)
    inter = w * h
    union = (area_a[:, None] + area_b[None, :]) - inter
    union = tl.where(union < tiny, tiny, union)
    dest = out + (image * rows + rn[:, None]) * cols + rm[None, :]
    tl.store(dest, _div(inter, union), mask=in_n[:, None] & in_m[None, :])


def box_iou(boxes1: Tensor, boxes2: Tensor, out: Tensor) -> Tensor:
    """``out (B, N, M)`` = IoU of ``boxes1 (B, N, 4)`` and ``boxes2 (B, M, 4)`` (float32), one pass."""
    batch, rows, cols = out.shape
    block_n, block_m = 32, 64
    grid = (triton.cdiv(rows, block_n), triton.cdiv(cols, block_m), batch)
    _iou_kernel[grid](
        boxes1.contiguous(), boxes2.contiguous(), out, rows, cols, torch.finfo(out.dtype).tiny,
        BLOCK_N=block_n, BLOCK_M=block_m, **_launch_options(out.device),
    )
    return out


# --- greedy NMS -----------------------------------------------------------------------------------------------


@triton.jit
def _nms_kernel(boxes, order, segment, image_start, segment_start, fill, kept_boxes, keep, counts, threshold, cap,
                BLOCK: tl.constexpr):
    """One image: visit its candidates in order, keep one unless a kept box of its segment has IoU > threshold.

    The comparison is torchvision's CPU kernel's (kept box first: ``max(kx1, cx1)`` as ``kx1 < cx1 ? cx1 :
    kx1``, ``w = 0 < w ? w : 0``), in float32, against ``threshold``, the largest float32 not above the float64
    threshold (so ``iou > threshold`` in float32 decides as torchvision's float64 comparison does).
    """
    image = tl.program_id(0)
    lo = tl.load(image_start + image)
    hi = tl.load(image_start + image + 1)
    kept = 0
    for p in range(lo, hi):
        if kept != cap:
            i = tl.load(order + p)
            cx1, cy1 = tl.load(boxes + i * 4), tl.load(boxes + i * 4 + 1)
            cx2, cy2 = tl.load(boxes + i * 4 + 2), tl.load(boxes + i * 4 + 3)
            area_c = (cx2 - cx1) * (cy2 - cy1)
            s = tl.load(segment + i)
            first = tl.load(segment_start + s)
            n = tl.load(fill + s)
            hits = 0
            for q0 in range(first, first + n, BLOCK):
                q = q0 + tl.arange(0, BLOCK)
                live = q < first + n
                kx1, ky1 = tl.load(kept_boxes + q * 5, mask=live, other=0.0), tl.load(kept_boxes + q * 5 + 1, mask=live, other=0.0)
                kx2, ky2 = tl.load(kept_boxes + q * 5 + 2, mask=live, other=0.0), tl.load(kept_boxes + q * 5 + 3, mask=live, other=0.0)
                area_k = tl.load(kept_boxes + q * 5 + 4, mask=live, other=0.0)
                w = tl.where(cx2 < kx2, cx2, kx2) - tl.where(kx1 < cx1, cx1, kx1)
                h = tl.where(cy2 < ky2, cy2, ky2) - tl.where(ky1 < cy1, cy1, ky1)
                w = tl.where(0.0 < w, w, 0.0)
                h = tl.where(0.0 < h, h, 0.0)
                inter = w * h
                iou = _div(inter, (area_k + area_c) - inter)
                hits += tl.sum(((iou > threshold) & live).to(tl.int32), axis=0)
            if hits == 0:
                slot = first + n
                tl.store(kept_boxes + slot * 5, cx1)
                tl.store(kept_boxes + slot * 5 + 1, cy1)
                tl.store(kept_boxes + slot * 5 + 2, cx2)
                tl.store(kept_boxes + slot * 5 + 3, cy2)
                tl.store(kept_boxes + slot * 5 + 4, area_c)
                tl.store(fill + s, n + 1)
                tl.store(keep + p, 1)
                kept += 1
            tl.debug_barrier()  # the stores above are read back by the next candidate
    tl.store(counts + image, kept)


def _float32_threshold(threshold: float) -> float:
    """The largest float32 ``t`` with ``x > t  <=>  x > threshold`` for every float32 ``x``."""
    t = torch.tensor(threshold, dtype=torch.float64)
    low = t.float()
    if low.double() > t:
        low = torch.nextafter(low, torch.tensor(float("-inf")))
    return float(low)


def nms(boxes: Tensor, order: Tensor, segment: Tensor, image_start: Tensor, segment_start: Tensor, sizes: Tensor,
        threshold: float, cap: int | None) -> tuple[Tensor, list[int]]:
    """Greedy NMS per (image, segment) of float32 ``boxes (K, 4)``; see :func:`detect.ops.nms._fused_nms`.

    Returns the kept candidates (image by image, in visiting order) and the per-image counts.
    """
    k, num_images, device = boxes.shape[0], image_start.shape[0] - 1, boxes.device
    keep = torch.zeros(k, dtype=torch.int8, device=device)
    counts = torch.zeros(num_images, dtype=torch.int32, device=device)
    fill = torch.zeros_like(sizes, dtype=torch.int32)
    kept_boxes = boxes.new_empty((k, 5))
    _nms_kernel[(num_images,)](
        boxes.contiguous(), order, segment, image_start, segment_start, fill, kept_boxes, keep, counts,
        _float32_threshold(threshold), -1 if cap is None else cap, BLOCK=64, **_launch_options(device),
    )
    return order.masked_select(keep.bool()), counts.tolist()


# --- box coder ------------------------------------------------------------------------------------------------


@triton.jit
def _scale(x, weight, RECIPROCAL: tl.constexpr):
    """``x / weight`` as torch computes ``tensor / python_number``: times the float32 reciprocal on CUDA."""
    if RECIPROCAL:
        return x * _div(1.0, weight)
    else:
        return _div(x, weight)


@triton.jit
def _decode_prepare_kernel(deltas, scaled, rows, ww, wh, clip, RECIPROCAL: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = k < rows
    dw = _scale(tl.load(deltas + k * 4 + 2, mask=live, other=0.0), ww, RECIPROCAL)
    dh = _scale(tl.load(deltas + k * 4 + 3, mask=live, other=0.0), wh, RECIPROCAL)
    tl.store(scaled + k, tl.where(dw > clip, clip, dw), mask=live)
    tl.store(scaled + rows + k, tl.where(dh > clip, clip, dh), mask=live)


def decode_prepare(
    deltas: Tensor, scaled: Tensor, ww: float, wh: float, clip: float, reciprocal: bool | None = None
) -> None:
    """``scaled (2, R)`` = ``(deltas[:, 2:] / (ww, wh)).clamp(max=clip)`` of ``deltas (R, 4)``, transposed.

    ``reciprocal`` (default: on CUDA) divides as torch's CUDA kernel does, by multiplying with ``1 / w``.
    """
    rows = deltas.shape[0]
    reciprocal = deltas.device.type == "cuda" if reciprocal is None else reciprocal
    _decode_prepare_kernel[(triton.cdiv(rows, _BLOCK),)](
        deltas, scaled, rows, ww, wh, clip, RECIPROCAL=reciprocal, BLOCK=_BLOCK,
        **_launch_options(deltas.device),
    )


@triton.jit
def _decode_finish_kernel(out, deltas, exps, boxes, rows, outer_stride, inner, inner_stride, wx, wy,
                          RECIPROCAL: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = r < rows
    b = (r // inner) * outer_stride + (r % inner) * inner_stride
    x1, y1 = tl.load(boxes + b * 4, mask=live, other=0.0), tl.load(boxes + b * 4 + 1, mask=live, other=0.0)
    x2, y2 = tl.load(boxes + b * 4 + 2, mask=live, other=0.0), tl.load(boxes + b * 4 + 3, mask=live, other=0.0)
    widths = x2 - x1
    heights = y2 - y1
    ctr_x = x1 + 0.5 * widths
    ctr_y = y1 + 0.5 * heights
    pred_x = _scale(tl.load(deltas + r * 4, mask=live, other=0.0), wx, RECIPROCAL) * widths + ctr_x
    pred_y = _scale(tl.load(deltas + r * 4 + 1, mask=live, other=0.0), wy, RECIPROCAL) * heights + ctr_y
    half_w = 0.5 * (tl.load(exps + r, mask=live, other=0.0) * widths)
    half_h = 0.5 * (tl.load(exps + rows + r, mask=live, other=0.0) * heights)
    tl.store(out + r * 4, pred_x - half_w, mask=live)
    tl.store(out + r * 4 + 1, pred_y - half_h, mask=live)
    tl.store(out + r * 4 + 2, pred_x + half_w, mask=live)
    tl.store(out + r * 4 + 3, pred_y + half_h, mask=live)


def decode_finish(out: Tensor, deltas: Tensor, exps: Tensor, boxes: Tensor, outer_stride: int, inner: int,
                  inner_stride: int, wx: float, wy: float, reciprocal: bool | None = None) -> None:
    """Decoded corners into ``out (R, 4)``; see :func:`detect.ops._cpu.decode_finish` for the box indexing and
    :func:`decode_prepare` for ``reciprocal``."""
    rows = out.shape[0]
    reciprocal = out.device.type == "cuda" if reciprocal is None else reciprocal
    _decode_finish_kernel[(triton.cdiv(rows, _BLOCK),)](
        out, deltas, exps, boxes, rows, outer_stride, inner, inner_stride, wx, wy,
        RECIPROCAL=reciprocal, BLOCK=_BLOCK, **_launch_options(out.device),
    )


@triton.jit
def _encode_prepare_kernel(out, gt, proposals, ratios, rows, wx, wy, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = k < rows
    p0, p1 = tl.load(proposals + k * 4, mask=live, other=0.0), tl.load(proposals + k * 4 + 1, mask=live, other=0.0)
    p2, p3 = tl.load(proposals + k * 4 + 2, mask=live, other=1.0), tl.load(proposals + k * 4 + 3, mask=live, other=1.0)
    g0, g1 = tl.load(gt + k * 4, mask=live, other=0.0), tl.load(gt + k * 4 + 1, mask=live, other=0.0)
    g2, g3 = tl.load(gt + k * 4 + 2, mask=live, other=1.0), tl.load(gt + k * 4 + 3, mask=live, other=1.0)
    ex_w = p2 - p0
    ex_h = p3 - p1
    ex_x = p0 + 0.5 * ex_w
    ex_y = p1 + 0.5 * ex_h
    gt_w = g2 - g0
    gt_h = g3 - g1
    gt_x = g0 + 0.5 * gt_w
    gt_y = g1 + 0.5 * gt_h
    tl.store(out + k * 4, _div(wx * (gt_x - ex_x), ex_w), mask=live)
    tl.store(out + k * 4 + 1, _div(wy * (gt_y - ex_y), ex_h), mask=live)
    tl.store(ratios + k, _div(gt_w, ex_w), mask=live)
    tl.store(ratios + rows + k, _div(gt_h, ex_h), mask=live)


def encode_prepare(out: Tensor, gt: Tensor, proposals: Tensor, ratios: Tensor, wx: float, wy: float) -> None:
    """Deltas' columns 0-1 into ``out (R, 4)``, size ratios into ``ratios (2, R)``."""
    rows = out.shape[0]
    _encode_prepare_kernel[(triton.cdiv(rows, _BLOCK),)](
        out, gt, proposals, ratios, rows, wx, wy, BLOCK=_BLOCK, **_launch_options(out.device)
    )


@triton.jit
def _encode_finish_kernel(out, logs, rows, ww, wh, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = k < rows
    tl.store(out + k * 4 + 2, ww * tl.load(logs + k, mask=live, other=0.0), mask=live)
    tl.store(out + k * 4 + 3, wh * tl.load(logs + rows + k, mask=live, other=0.0), mask=live)


def encode_finish(out: Tensor, logs: Tensor, ww: float, wh: float) -> None:
    """Deltas' columns 2-3: ``ww * log(gt_w / ex_w)``, ``wh * log(gt_h / ex_h)``."""
    rows = out.shape[0]
    _encode_finish_kernel[(triton.cdiv(rows, _BLOCK),)](
        out, logs, rows, ww, wh, BLOCK=_BLOCK, **_launch_options(out.device)
    )


# --- clipping -------------------------------------------------------------------------------------------------


@triton.jit
def _clip_kernel(out, boxes, sizes, rows, rows_per_size, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # element of the (R, 4) boxes
    live = e < rows * 4
    column = e % 4
    size = (e // 4) // rows_per_size
    bound = tl.load(sizes + size * 2 + 1 - (column % 2), mask=live, other=0.0)  # W for x, H for y
    v = tl.load(boxes + e, mask=live, other=0.0)
    v = tl.where(v < 0.0, 0.0, v)
    v = tl.where(v > bound, bound, v)
    tl.store(out + e, v, mask=live)


def clip(out: Tensor, boxes: Tensor, sizes: Tensor, rows_per_size: int) -> None:
    """Clip ``boxes (R, 4)`` into ``out``; row ``k`` uses ``sizes[k // rows_per_size]`` as (H, W)."""
    rows = boxes.shape[0]
    _clip_kernel[(triton.cdiv(rows * 4, _BLOCK),)](
        out, boxes, sizes, rows, rows_per_size, BLOCK=_BLOCK, **_launch_options(out.device)
    )
