"""Box kernels: format conversion, area, clipping, size filtering and IoU, batched and device-agnostic.

Boxes are ``xyxy`` in pixels with no ``+1`` on widths (width = ``x2 - x1``). Every function keeps the device of its
inputs and accepts any number of leading dimensions unless its docstring says otherwise.

Decisions shared by the IoU functions:

- Arithmetic follows torchvision's operation order (area1, area2, ``lt = max``, ``rb = min``,
  ``wh = (rb - lt).clamp(min=0)``, ``inter = w * h``, ``union = area1 + area2 - inter``, ``inter / union``), so
  float32 and float64 results are bitwise equal to ``torchvision.ops.box_iou`` wherever that is defined.
- The union is clamped below at the dtype's smallest normal number before dividing. Where it is 0 (two empty boxes,
  which torchvision turns into ``0 / 0 = nan``) the IoU is therefore 0; for boxes with ``x1 <= x2`` and
  ``y1 <= y2`` nothing else changes (their union is either 0 or at least the larger area, far above that floor).
  Inverted boxes (``x2 < x1``) never intersect anything and get IoU 0 as well. NaN coordinates still give NaN.
- float16 / bfloat16 / integer boxes are computed and returned in float32; float64 stays float64 (a mixed pair
  promotes to float64). torchvision instead subtracts float16 corners in float16 before upcasting.
- Where :mod:`detect.ops.dispatch` picks a fused kernel (numba on the CPU, Triton on CUDA), the IoU matrix is one
  pass that writes the output and nothing else ``N x M``: the blocked torch-op path below is the reference and
  the fallback, and ``block`` only applies to it. Measured on 4,000 x 4,000 boxes (2-core CPU): about the time
  of allocating and filling the output once, 12-14x faster than ``torchvision.ops.box_iou``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from detect.ops import dispatch

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")

IOU_BLOCK = 2**22
"""Default IoU elements per block: 32 MiB of float32 scratch. On an idle CPU, cache-sized blocks (2**18) measured
about 1.5x faster, but every block costs a dozen multi-threaded kernels, and on a loaded machine each of those waits
for all its threads to be scheduled: there 2**18 fell behind torchvision while 2**22 stayed ahead (it is 3-5x ahead
on an idle machine). Few large blocks also mean few kernel launches on CUDA."""


def _to_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    """``(..., 4)`` boxes in ``fmt`` -> ``(..., 4)`` xyxy (same arithmetic as torchvision's converters)."""
    a, b, c, d = boxes.unbind(-1)  # 4 x (...)
    if fmt == "xywh":
        return torch.stack((a, b, a + c, b + d), dim=-1)
    half_w, half_h = 0.5 * c, 0.5 * d  # cxcywh
    return torch.stack((a - half_w, b - half_h, a + half_w, b + half_h), dim=-1)


def _from_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    """``(..., 4)`` xyxy boxes -> ``(..., 4)`` in ``fmt``."""
    x1, y1, x2, y2 = boxes.unbind(-1)  # 4 x (...)
    if fmt == "xywh":
        return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)  # cxcywh


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``(..., 4)`` boxes between ``"xyxy"`` (corners), ``"xywh"`` (top-left corner and size) and
    ``"cxcywh"`` (centre and size).

    Conversions between the two non-corner formats go through ``xyxy``, as torchvision's do, so results are
    bitwise equal to ``torchvision.ops.box_convert``. Equal formats return a copy.
    """
    if in_fmt not in BOX_FORMATS or out_fmt not in BOX_FORMATS:
        raise ValueError(f"box formats must be among {BOX_FORMATS}, got {in_fmt!r} -> {out_fmt!r}")
    if in_fmt == out_fmt:
        return boxes.clone()
    xyxy = boxes if in_fmt == "xyxy" else _to_xyxy(boxes, in_fmt)
    return xyxy if out_fmt == "xyxy" else _from_xyxy(xyxy, out_fmt)


def _upcast(boxes: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 and small integers -> int32, so products of pixel coordinates cannot overflow."""
    if boxes.is_floating_point():
        return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    return boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.int()


def box_area(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy boxes -> ``(...)`` areas ``(x2 - x1) * (y2 - y1)``.

    float16/bfloat16 are upcast to float32 first (as torchvision does); inverted boxes get negative areas.
    """
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def clip_boxes(boxes: Tensor, image_size: tuple[int, int] | Tensor) -> Tensor:
    """Clamp x to ``[0, W]`` and y to ``[0, H]``.

    ``image_size`` is either one ``(H, W)`` pair (ints, or a ``(2,)`` tensor) for all boxes, or a ``(B, 2)`` tensor of
    per-image ``(H, W)`` for boxes ``(B, ..., 4)``: row ``b`` of the sizes applies to ``boxes[b]`` and broadcasts over
    the middle dimensions. The result is bitwise equal to ``torchvision.ops.clip_boxes_to_image`` (clamping rounds
    nothing); NaN coordinates stay NaN.
    """
    fused = _clip_fused(boxes, image_size)
    if fused is not None:
        return fused
    if not isinstance(image_size, Tensor):
        height, width = image_size
        return torch.stack((boxes[..., 0::2].clamp(0, width), boxes[..., 1::2].clamp(0, height)), dim=-1).flatten(-2)
    size = image_size.to(device=boxes.device, dtype=boxes.dtype)  # (2,) or (B, 2) as (H, W)
    width_height = size.flip(-1)  # (..., 2) as (W, H)
    upper = torch.cat((width_height, width_height), dim=-1)  # (..., 4) as (W, H, W, H)
    if size.dim() == 2:
        upper = upper.view(size.shape[0], *[1] * (boxes.dim() - 2), 4)  # (B, 1, ..., 1, 4)
    return torch.minimum(boxes.clamp(min=0), upper)


def clip_sizes(image_size: tuple[int, int] | Tensor, boxes: Tensor) -> Tensor | None:
    """:func:`clip_boxes`' ``image_size`` for ``boxes (..., 4)`` as an ``(S, 2)`` tensor of ``(H, W)`` in the boxes'
    dtype and device, row ``k`` of the flattened boxes taking size ``k // (rows / S)``; None where the fused loops
    do not take that form (sizes broadcast over a unit leading dimension, or not pairs)."""
    if isinstance(image_size, Tensor):
        sizes = image_size.to(device=boxes.device, dtype=boxes.dtype)
        if sizes.dim() == 2 and (boxes.dim() < 2 or sizes.shape[0] != boxes.shape[0]):
            return None  # broadcasting the sizes over a unit leading dimension: leave it to the reference
        sizes = sizes.reshape(-1, 2)  # (S, 2) as (H, W)
    else:
        sizes = torch.tensor([list(image_size)], dtype=boxes.dtype, device=boxes.device)  # (1, 2)
    return sizes if sizes.shape[1] == 2 and sizes.shape[0] > 0 else None


def _clip_fused(boxes: Tensor, image_size: tuple[int, int] | Tensor) -> Tensor | None:
    """:func:`clip_boxes` as one fused loop over the rows (numba on the CPU, Triton on CUDA), or None where the
    reference runs instead (other dtypes, autograd, empty input, sizes that are neither one pair nor one per
    leading index)."""
    needs_grad = torch.is_grad_enabled() and boxes.requires_grad
    backend = dispatch.choose("clip_boxes", boxes.device, boxes.dtype, needs_grad=needs_grad)
    if backend == "torch" or boxes.numel() == 0 or boxes.shape[-1] != 4:
        return None
    sizes = clip_sizes(image_size, boxes)
    if sizes is None:
        return None
    rows = boxes.numel() // 4
    flat = boxes.contiguous().view(rows, 4)
    out = torch.empty_like(flat)
    if backend == "triton":
        dispatch.gpu().clip(out, flat, sizes.contiguous(), rows // sizes.shape[0])
        return out.view(boxes.shape)
    kind = np.dtype(str(boxes.dtype).removeprefix("torch.")).type
    args = (out.numpy(), flat.numpy(), sizes.contiguous().numpy(), rows // sizes.shape[0], kind(0))
    dispatch.run_cpu(dispatch.cpu().clip, rows, rows, *args)
    return out.view(boxes.shape)


def clip_boxes_list(boxes_list: Sequence[Tensor], sizes: Sequence[tuple[int, int]] | Tensor) -> list[Tensor]:
    """Clip each image's ``(N_i, ...)``-leading boxes to its own ``(H, W)`` in one fused call.

    The boxes are concatenated, every row gets its image's size, and the result is split back; ``sizes`` is a
    sequence of ``(H, W)`` pairs or a ``(B, 2)`` tensor.
    """
    if not boxes_list:
        return []
    counts = [len(b) for b in boxes_list]
    flat = torch.cat(list(boxes_list))  # (sum N_i, ..., 4)
    size = torch.as_tensor(sizes, device=flat.device).reshape(len(counts), 2)  # (B, 2)
    per_row = size.repeat_interleave(torch.tensor(counts, device=flat.device), dim=0, output_size=len(flat))
    return list(clip_boxes(flat, per_row).split(counts))  # (sum N_i, ..., 4) -> B x (N_i, ..., 4)


def min_size_mask(boxes: Tensor, min_size: float) -> Tensor:
    """``(..., 4)`` boxes -> ``(...)`` bool, True where the box is big enough to keep: both width and height are at
    least ``min_size`` (a NaN side compares False, so such a box is not kept)."""
    return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """``(N, 4)`` boxes -> int64 indices of the boxes :func:`min_size_mask` keeps, ascending (as torchvision)."""
    return torch.where(min_size_mask(boxes, min_size))[0]


def compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype box arithmetic on ``a`` and ``b`` runs in: float64 if either is float64, else float32."""
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def pairwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching rows: ``(..., 4)`` and ``(..., 4)`` (broadcastable) -> ``(...)``, row i against row i.

    Same arithmetic and zero-union rule as :func:`box_iou` (see the module docstring).
    """
    dtype = compute_dtype(boxes1, boxes2)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    area1, area2 = box_area(boxes1), box_area(boxes2)  # (...)
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])  # (..., 2)
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])  # (..., 2)
    wh = (rb - lt).clamp(min=0)  # (..., 2)
    inter = wh[..., 0] * wh[..., 1]  # (...)
    union = (area1 + area2 - inter).clamp(min=torch.finfo(dtype).tiny)
    return inter / union


def _block_shape(batch: int, rows: int, cols: int, block: int) -> tuple[int, int, int]:
    """(images, rows, columns) per block with ``images * rows * columns <= block`` (at least one element)."""
    cols_per = max(1, min(cols, block))
    rows_per = max(1, min(rows, block // cols_per))
    return max(1, min(batch, block // (rows_per * cols_per))), rows_per, cols_per


def batched_box_iou(boxes1: Tensor, boxes2: Tensor, *, block: int = IOU_BLOCK) -> Tensor:
    """IoU of every pair within each image: ``(B, N, 4)`` and ``(B, M, 4)`` -> ``(B, N, M)``.

    The output is filled block by block (up to ``block`` elements each, split over images, rows and, when one row
    is longer than ``block``, columns) with two reusable scratch buffers, so the memory used besides the output and
    the ``O(B * (N + M))`` per-box vectors is at most ``2 * block`` elements: ``8 * block`` bytes in float32
    (32 MiB for ``block = 2**22``), ``16 * block`` in float64, whatever N and M are. torchvision's ``box_iou``
    materialises about nine ``(N, M)`` float32 arrays instead. Results are bitwise equal to torchvision's on
    float32/float64 except where the union is 0 (IoU 0, not NaN); see the module docstring for dtypes. The result
    carries no gradient (it is for matching; :func:`pairwise_box_iou` is differentiable).
    """
    if boxes1.dim() != 3 or boxes2.dim() != 3 or boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(f"expected (B, N, 4) and (B, M, 4) boxes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    dtype = compute_dtype(boxes1, boxes2)
    boxes1, boxes2 = boxes1.detach().to(dtype), boxes2.detach().to(dtype)  # in-place kernels: no autograd
    batch, rows, cols = boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]
    out = boxes1.new_empty((batch, rows, cols))  # (B, N, M)
    if block < 1:
        raise ValueError(f"block must be a positive number of elements, got {block}")
    if out.numel() == 0:
        return out
    backend = dispatch.choose("box_iou", out.device, dtype)
    if backend == "numba":
        return _iou_numba(boxes1, boxes2, out)
    if backend == "triton":
        return dispatch.gpu().box_iou(boxes1, boxes2, out)
    area1, area2 = box_area(boxes1)[:, :, None], box_area(boxes2)[:, None, :]  # (B, N, 1), (B, 1, M)
    corners1 = boxes1.unsqueeze(2).unbind(-1)  # 4 x (B, N, 1)
    corners2 = boxes2.unsqueeze(1).unbind(-1)  # 4 x (B, 1, M)
    b_step, r_step, c_step = _block_shape(batch, rows, cols, block)
    scratch = out.new_empty((2, b_step * r_step * c_step))  # the only working memory besides `out`
    for b in range(0, batch, b_step):
        for r in range(0, rows, r_step):
            for c in range(0, cols, c_step):
                images, rows_, cols_ = slice(b, b + b_step), slice(r, r + r_step), slice(c, c + c_step)
                _iou_block(
                    out[images, rows_, cols_],
                    [v[images, rows_] for v in (*corners1, area1)],
                    [v[images, :, cols_] for v in (*corners2, area2)],
                    scratch,
                )
    return out


def _iou_numba(boxes1: Tensor, boxes2: Tensor, out: Tensor) -> Tensor:
    """The fused CPU loop: one pass writes ``out (B, N, M)``, no other ``N x M`` memory.

    The columns go in as a ``(B, 5, M)`` structure of arrays (x1, y1, x2, y2, area) so the inner loop over them
    vectorises; that and a contiguous copy of the rows are the only ``O(B * (N + M))`` working memory.
    """
    batch, cols = boxes2.shape[0], boxes2.shape[1]
    second = boxes2.new_empty((batch, 5, cols))  # (B, 5, M)
    second[:, :4] = boxes2.transpose(1, 2)
    torch.mul(boxes2[..., 2] - boxes2[..., 0], boxes2[..., 3] - boxes2[..., 1], out=second[:, 4])
    kind = np.dtype(str(out.dtype).removeprefix("torch.")).type
    cpu = dispatch.cpu()
    args = (out.numpy(), boxes1.contiguous().numpy(), second.numpy(), kind(0), kind(torch.finfo(out.dtype).tiny))
    dispatch.run_cpu(cpu.iou, out.shape[0] * out.shape[1], out.numel(), *args)
    return out


def _iou_block(out: Tensor, first: list[Tensor], second: list[Tensor], scratch: Tensor) -> None:
    """Write the IoU of one block into ``out (b, r, c)`` (a view of the full result).

    ``first`` is ``x1, y1, x2, y2, area`` of the block's rows, each ``(b, r, 1)``; ``second`` the same of its columns,
    each ``(b, 1, c)``; ``scratch (2, >= b*r*c)`` is the reusable working memory. The order of operations is
    torchvision's (see the module docstring); ``out`` holds the intersection until the final division.
    """
    x1a, y1a, x2a, y2a, area_a = first
    x1b, y1b, x2b, y2b, area_b = second
    tmp, heights = scratch[:, : out.numel()].view(2, *out.shape)  # (b, r, c) each
    torch.minimum(x2a, x2b, out=out)
    out.sub_(torch.maximum(x1a, x1b, out=tmp)).clamp_(min=0)  # widths of the intersections
    torch.minimum(y2a, y2b, out=heights)
    heights.sub_(torch.maximum(y1a, y1b, out=tmp)).clamp_(min=0)
    out.mul_(heights)  # intersection areas
    union = torch.add(area_a, area_b, out=tmp).sub_(out)
    out.div_(union.clamp_(min=torch.finfo(out.dtype).tiny))


def box_iou(boxes1: Tensor, boxes2: Tensor, *, block: int = IOU_BLOCK) -> Tensor:
    """IoU of every pair: ``(N, 4)`` and ``(M, 4)`` -> ``(N, M)``, computed in blocks of at most ``block`` elements.

    Memory besides the ``(N, M)`` output and ``O(N + M)`` per-box vectors: at most ``8 * block`` bytes in float32,
    ``16 * block`` in float64 (see :func:`batched_box_iou`). Equal to ``torchvision.ops.box_iou`` bitwise in
    float32/float64 except that a zero union gives 0 instead of NaN.
    """
    return batched_box_iou(boxes1[None], boxes2[None], block=block)[0]
