"""The R-CNN box parametrisation (Girshick et al. 2014, appendix C): regression targets between boxes and back.

A proposal ``P`` (centre ``px, py``, size ``pw, ph``) and a target box ``G`` give the deltas

    tx = wx * (gx - px) / pw,   ty = wy * (gy - py) / ph,   tw = ww * log(gw / pw),   th = wh * log(gh / ph)

and decoding inverts them, with ``tw, th`` clamped at ``bbox_xform_clip`` before ``exp`` so that a wild prediction
cannot overflow (the default caps the scale-up at 1000 / 16).

Decisions:

- The operation order (widths ``x2 - x1`` with no ``+1``, centres ``x1 + 0.5 * w``, divide the deltas by the
  weights, multiply-then-add for centres, half-sizes ``0.5 * w``) replicates torchvision's
  ``models.detection._utils.BoxCoder``, so float32 results are bitwise equal to it on the same device; the Faster
  R-CNN parity tests rely on this.
- Everything broadcasts over leading dimensions: one call encodes or decodes a whole batch, with no per-image list.
- float16 / bfloat16 inputs are computed and returned in float32; float64 stays float64 (a mixed pair promotes to
  float64). torchvision instead decodes in the deltas' own dtype.
- Proposals must have positive width and height to be encoded (a zero size divides by zero, as in torchvision).
- Decoding is memory-bound: on the CPU, float32 decodes in one pass (:func:`detect.ops._cpu.decode`) that reads
  the deltas and boxes once and writes the result once, the clamp of ``dw, dh`` and, with ``clip_to``, the clip
  to the image included. Its exponentials come from the function torch's own exp runs (MKL's ``vmsExp``, called
  on blocks that stay in the L1 cache), so it stays bitwise equal to torchvision on every input, at every thread
  count and CPU capability (``benchmarks/kernels.py``: 3-5x torchvision's ``BoxCoder``). Where torch has no MKL,
  and for float64 and CUDA, two fused passes run around ``torch.exp`` itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

import numpy as np

from detect.ops import dispatch
from detect.ops.boxes import clip_boxes, clip_sizes, compute_dtype


def _size_and_centre(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(..., 4)`` xyxy -> width, height, centre x, centre y, each ``(...)``."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return widths, heights, boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights


def _corners(ctr_x: Tensor, ctr_y: Tensor, half_w: Tensor, half_h: Tensor) -> Tensor:
    """``(...)`` centres and half sizes -> ``(..., 4)`` xyxy.

    Written straight into the result (about 5x faster than ``torch.stack`` on CPU), unless autograd needs the graph
    or torch.export traces (an exported program may run with autograd on, where ``out=`` is refused).
    """
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in (ctr_x, ctr_y, half_w, half_h))
    ):
        return torch.stack((ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=-1)
    out = ctr_x.new_empty((*ctr_x.shape, 4))
    torch.sub(ctr_x, half_w, out=out[..., 0])
    torch.sub(ctr_y, half_h, out=out[..., 1])
    torch.add(ctr_x, half_w, out=out[..., 2])
    torch.add(ctr_y, half_h, out=out[..., 3])
    return out


@dataclass(frozen=True)
class BoxCoder:
    """Encode boxes as deltas relative to reference boxes and decode deltas back to boxes.

    ``weights`` scale ``(tx, ty, tw, th)``: ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for Fast/Faster R-CNN
    box heads. ``bbox_xform_clip`` caps ``tw, th`` before ``exp`` when decoding.
    """

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    bbox_xform_clip: float = math.log(1000.0 / 16)

    def __post_init__(self) -> None:
        if len(self.weights) != 4:
            raise ValueError(f"BoxCoder needs 4 weights (wx, wy, ww, wh), got {self.weights!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    def encode(self, gt_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Regression targets: ``gt_boxes (..., 4)`` relative to ``proposals (..., 4)`` (broadcastable) ->
        deltas ``(..., 4)`` as ``(tx, ty, tw, th)``."""
        dtype = compute_dtype(gt_boxes, proposals)
        backend = dispatch.choose("box_encode", proposals.device, dtype, needs_grad=_needs_grad(gt_boxes, proposals))
        if backend != "torch" and gt_boxes.numel() and proposals.numel():
            return _encode_fused(self, gt_boxes.to(dtype), proposals.to(dtype), backend)
        ex_w, ex_h, ex_x, ex_y = _size_and_centre(proposals.to(dtype))  # 4 x (...)
        gt_w, gt_h, gt_x, gt_y = _size_and_centre(gt_boxes.to(dtype))  # 4 x (...)
        wx, wy, ww, wh = self.weights
        dx = wx * (gt_x - ex_x) / ex_w
        dy = wy * (gt_y - ex_y) / ex_h
        dw = ww * torch.log(gt_w / ex_w)
        dh = wh * torch.log(gt_h / ex_h)
        return torch.stack((dx, dy, dw, dh), dim=-1)  # (..., 4)

    def decode(self, deltas: Tensor, boxes: Tensor, clip_to: tuple[int, int] | Tensor | None = None) -> Tensor:
        """Apply ``deltas (..., 4)`` to reference ``boxes (..., 4)`` (broadcastable) -> xyxy boxes ``(..., 4)``.

        ``clip_to`` clips the result into the image(s) in the same pass: the result is then bitwise equal to
        ``clip_boxes(decode(deltas, boxes), clip_to)`` (see :func:`detect.ops.boxes.clip_boxes` for its forms).
        """
        dtype = compute_dtype(deltas, boxes)
        backend = dispatch.choose("box_decode", deltas.device, dtype, needs_grad=_needs_grad(deltas, boxes))
        if backend != "torch":
            fused = _decode_fused(self, _as(deltas, dtype), _as(boxes, dtype), backend, clip_to)
            if fused is not None:
                return fused
        deltas = deltas.to(dtype)
        widths, heights, ctr_x, ctr_y = _size_and_centre(boxes.to(dtype))  # 4 x (...)
        wx, wy, ww, wh = self.weights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        pred_x = dx * widths + ctr_x
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        decoded = _corners(pred_x, pred_y, half_w, half_h)
        return decoded if clip_to is None else clip_boxes(decoded, clip_to)

    def decode_per_class(
        self, deltas: Tensor, boxes: Tensor, clip_to: tuple[int, int] | Tensor | None = None
    ) -> Tensor:
        """Class-specific deltas ``(..., C*4)`` on one reference box each ``(..., 4)`` -> boxes ``(..., C, 4)``.

        ``(N, C*4), (N, 4) -> (N, C, 4)`` for one image or a concatenated batch, ``(B, N, C*4), (B, N, 4) ->
        (B, N, C, 4)`` for a padded one. ``clip_to`` as in :meth:`decode` (sizes per leading index of the result).
        """
        if deltas.shape[-1] % 4:
            raise ValueError(f"class-specific deltas need a multiple of 4 columns, got {tuple(deltas.shape)}")
        per_class = deltas.unflatten(-1, (deltas.shape[-1] // 4, 4))  # (..., C*4) -> (..., C, 4)
        return self.decode(per_class, boxes.unsqueeze(-2), clip_to)  # (..., C, 4)


# --- fused paths (see detect.ops.dispatch) --------------------------------------------------------------------


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, without the call's cost when it already has that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _needs_grad(a: Tensor, b: Tensor) -> bool:
    return (a.requires_grad or b.requires_grad) and torch.is_grad_enabled()


_NO_SIZES = np.empty((0, 2), dtype=np.float32)  # the one-pass decode's "no clip"
_ZERO32 = np.float32(0.0)


@functools.lru_cache(maxsize=64)
def _decode_constants(coder: BoxCoder) -> tuple[np.float32, ...]:
    """``wx, wy, ww, wh, bbox_xform_clip, 0.5`` as float32 scalars for :func:`detect.ops._cpu.decode`."""
    return tuple(np.float32(v) for v in (*coder.weights, coder.bbox_xform_clip, 0.5))


def _scalar(dtype: torch.dtype):
    """The numpy scalar type of ``dtype`` (constants enter the numba loops in the arrays' own precision)."""
    return np.dtype(str(dtype).removeprefix("torch.")).type


def _broadcast_rows(box_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Strides, in rows of 4, of contiguous boxes of ``box_shape`` broadcast to the deltas' ``shape`` (leading
    dimensions only; 0 where broadcast), or None where the boxes do not broadcast to exactly that shape. Plain
    Python: ``torch.broadcast_shapes`` and ``expand`` cost more than a small decode."""
    if len(box_shape) > len(shape) or not box_shape or box_shape[-1] != 4 or shape[-1] != 4:
        return None
    padded = (1,) * (len(shape) - len(box_shape)) + box_shape
    strides, step = [], 1
    for size, target in zip(reversed(padded[:-1]), reversed(shape[:-1])):
        if size != target and size != 1:
            return None
        strides.append(step if size == target else 0)
        step *= size
    return tuple(reversed(strides))


def _collapse(sizes: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """Leading dimensions ``(size, stride)`` with unit sizes dropped and mergeable neighbours merged; None if
    more than two remain."""
    dims: list[tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims if len(dims) <= 2 else None


@functools.lru_cache(maxsize=256)
def _decode_layout(box_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """``(outer, outer_stride, inner, inner_stride)`` in rows of the boxes, for deltas of ``shape`` on boxes of
    ``box_shape`` (see :func:`detect.ops._cpu.decode`), or None where the fused loops do not apply (broadcast
    deltas, shapes that do not broadcast, or more than two leading dimensions left). Cached by shape: a detector
    decodes the same few shapes call after call."""
    box_rows = _broadcast_rows(box_shape, shape)
    lead = None if box_rows is None else _collapse(shape[:-1], box_rows)
    if lead is None:
        return None
    if len(lead) == 1 and lead[0][1] == 1:  # a box per row, in order (the RPN's): the loop's one-run-a-block path
        lead = [lead[0], (1, 0)]
    (outer, outer_stride), (inner, inner_stride) = ([(1, 0)] * (2 - len(lead)) + lead)[-2:]
    return outer, outer_stride, inner, inner_stride


def _decode_fused(
    coder: BoxCoder, deltas: Tensor, boxes: Tensor, backend: str, clip_to: tuple[int, int] | Tensor | None
) -> Tensor | None:
    """:meth:`BoxCoder.decode` through the fused loops, or None where the deltas are broadcast (their shape is not
    the result's) or the boxes' broadcast does not collapse to two dimensions.

    float32 on a CPU whose torch has MKL: one pass (:func:`detect.ops._cpu.decode`), clip included. Otherwise two
    fused passes around torch's own exp: pass one writes ``dw, dh`` (scaled, clamped) as two contiguous arrays of
    the deltas' leading shape, exactly the tensors the reference exponentiates; ``torch.exp`` runs on them in
    place, so the exponentials are the reference's bit for bit (see :mod:`detect.ops._cpu`); pass two writes the
    corners, and a clip follows as its own pass. Working memory: those two arrays, half the size of the output.
    """
    shape = tuple(deltas.shape)
    layout = _decode_layout(tuple(boxes.shape), shape)
    if layout is None or deltas.numel() == 0:
        return None  # the reference decides
    outer, outer_stride, inner, inner_stride = layout
    boxes = boxes.contiguous()
    rows = deltas.numel() // 4
    flat_deltas = deltas.contiguous().view(rows, 4)
    flat_boxes = boxes.view(-1, 4)
    cpu = dispatch.cpu() if backend == "numba" else None
    if cpu is not None and cpu.TORCH_EXP is not None and deltas.dtype == torch.float32:
        out = torch.empty(shape, dtype=torch.float32)  # a CPU tensor (faster than new_empty)
        sizes = None if clip_to is None else clip_sizes(clip_to, deltas)
        if sizes is None and clip_to is not None:
            return clip_boxes(_decode_fused(coder, deltas, boxes, backend, None), clip_to)
        size_args = (_NO_SIZES, 1) if sizes is None else (sizes.contiguous().numpy(), rows // sizes.shape[0])
        args = (out.view(-1).numpy(), flat_deltas.view(-1).numpy(), flat_boxes.view(-1).numpy(), outer_stride, inner,
                inner_stride)
        dispatch.run_cpu(cpu.decode, outer, rows, *args, *_decode_constants(coder), *size_args, _ZERO32)
        return out
    out = deltas.new_empty(shape)
    wx, wy, ww, wh = coder.weights
    kind = _scalar(deltas.dtype)
    scaled = deltas.new_empty((2, rows))  # (2, R): dw, dh, then their exponentials
    if backend == "triton":
        gpu = dispatch.gpu()
        gpu.decode_prepare(flat_deltas, scaled, ww, wh, coder.bbox_xform_clip)
        torch.exp(scaled[0], out=scaled[0])
        torch.exp(scaled[1], out=scaled[1])
        gpu.decode_finish(out.view(rows, 4), flat_deltas, scaled, flat_boxes, outer_stride, inner, inner_stride, wx, wy)
    else:
        d = flat_deltas.numpy()
        clip = kind(coder.bbox_xform_clip)
        dispatch.run_cpu(cpu.decode_prepare, rows, rows, d, scaled.numpy(), kind(ww), kind(wh), clip)
        torch.exp(scaled[0], out=scaled[0])
        torch.exp(scaled[1], out=scaled[1])
        args = (out.view(rows, 4).numpy(), d, scaled.numpy(), flat_boxes.numpy(), outer_stride, inner, inner_stride)
        dispatch.run_cpu(cpu.decode_finish, outer, rows, *args, kind(wx), kind(wy), kind(0.5))
    return out if clip_to is None else clip_boxes(out, clip_to)


def _encode_fused(coder: BoxCoder, gt_boxes: Tensor, proposals: Tensor, backend: str) -> Tensor:
    """:meth:`BoxCoder.encode` in two fused passes around torch's own log (as :func:`_decode_fused` does for
    exp): the size ratios ``gt_w / ex_w`` and ``gt_h / ex_h`` are written as contiguous arrays of the broadcast
    leading shape, the tensors the reference takes the log of."""
    shape = torch.broadcast_shapes(gt_boxes.shape, proposals.shape)
    rows = math.prod(shape[:-1])
    gt = gt_boxes.expand(shape).contiguous().view(rows, 4)
    ex = proposals.expand(shape).contiguous().view(rows, 4)
    out = gt.new_empty((rows, 4))
    ratios = gt.new_empty((2, rows))  # (2, R): gt_w / ex_w, gt_h / ex_h, then their logs
    wx, wy, ww, wh = coder.weights
    if backend == "triton":
        gpu = dispatch.gpu()
        gpu.encode_prepare(out, gt, ex, ratios, wx, wy)
        torch.log(ratios[0], out=ratios[0])
        torch.log(ratios[1], out=ratios[1])
        gpu.encode_finish(out, ratios, ww, wh)
        return out.view(shape)
    kind = _scalar(gt.dtype)
    cpu = dispatch.cpu()
    o, r = out.numpy(), ratios.numpy()
    dispatch.run_cpu(cpu.encode_prepare, rows, rows, o, gt.numpy(), ex.numpy(), r, kind(wx), kind(wy), kind(0.5))
    torch.log(ratios[0], out=ratios[0])
    torch.log(ratios[1], out=ratios[1])
    dispatch.run_cpu(cpu.encode_finish, rows, rows, o, r, kind(ww), kind(wh))
    return out.view(shape)
