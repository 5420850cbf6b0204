"""Region pooling kernels: RoI Align / RoI Pool wrappers, SPP over RoIs, and R-CNN region warping.

Three papers meet here:

- Fast/Faster R-CNN pool each RoI of a shared feature map to a fixed grid. :func:`roi_align` and :func:`roi_pool`
  are thin wrappers over ``torchvision.ops`` that also accept per-image box lists and take care of dtypes.
  RoI Align's gradient for float32 CPU features (training) is our own loop, bitwise torchvision's
  (:func:`roi_align_grad`): torchvision's took 170 of the tiny Faster R-CNN's 600 ms training step.
- SPP-Net (He et al. 2014) max-pools each window of the conv5 map over a pyramid of ``l x l`` grids.
  :func:`spatial_pyramid_pool` does it for all RoIs of all images in one call with exact integer bin edges.
- R-CNN (Girshick et al. 2014, appendix A) warps every proposal, dilated by a context margin, to a fixed-size
  image crop. :func:`warp_regions` does it for all boxes of all images with one RoI-Align call.

RoIs everywhere are ``(K, 5)`` rows ``[image_index, x1, y1, x2, y2]`` (torchvision's format); boxes are ``xyxy``
in pixels, no ``+1`` on widths.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from detect.ops import dispatch

__all__ = ["boxes_to_rois", "roi_align", "roi_align_grad", "roi_pool", "spatial_pyramid_pool", "warp_regions"]

_WARP_MODES = ("anisotropic", "isotropic")


def boxes_to_rois(
    boxes: Sequence[Tensor], *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Concatenate per-image ``(N_i, 4)`` boxes into ``(sum N_i, 5)`` RoIs ``[image_index, x1, y1, x2, y2]``.

    The result takes ``dtype``/``device`` from the first box tensor unless given; an empty list gives a ``(0, 5)``
    tensor (float32 on the CPU unless given). Images with no boxes simply contribute no rows. The image indices
    come from one ``repeat_interleave`` over the per-image counts: the counts are read from the tensors' shapes
    (host metadata) and reach the device in one small non-blocking copy, so nothing waits for the device.
    """
    if len(boxes) == 0:
        return torch.zeros((0, 5), dtype=dtype or torch.float32, device=device)
    dtype = dtype or boxes[0].dtype
    device = device or boxes[0].device
    coords = torch.cat([b.reshape(-1, 4) for b in boxes]).to(device=device, dtype=dtype)  # (K, 4)
    counts = torch.tensor([b.shape[0] for b in boxes]).to(device, non_blocking=True)  # (B,)
    index = torch.arange(len(boxes), device=device, dtype=dtype)  # (B,)
    index = index.repeat_interleave(counts, output_size=coords.shape[0])  # (B,) -> (K,)
    return torch.cat([index[:, None], coords], dim=1)  # (K, 5)


def _kernel_dtype(features: Tensor) -> torch.dtype:
    """The dtype torchvision's RoI kernels should run in for ``features``.

    float32/float64 run as they are, and so does float16 on CUDA (native half kernels). Anything else runs in
    float32 and the result is cast back: bfloat16 (no CPU kernel) and half on the CPU, whose kernel computes in
    half (measured: 23x slower than float32 and off by 0.13 on unit-variance features for 2,000 RoIs).
    """
    if features.dtype in (torch.float32, torch.float64):
        return features.dtype
    if features.dtype == torch.float16 and features.device.type == "cuda":
        return torch.float16
    return torch.float32


def _as_rois(boxes: Sequence[Tensor] | Tensor, features: Tensor, dtype: torch.dtype) -> Tensor:
    """``(K, 5)`` RoIs on ``features``' device in ``dtype``, from a ``(K, 5)`` tensor or a list of ``(N_i, 4)``."""
    if isinstance(boxes, Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(f"rois must be (K, 5) [image_index, x1, y1, x2, y2], got {tuple(boxes.shape)}")
        return boxes.to(device=features.device, dtype=dtype)
    if len(boxes) != features.shape[0]:
        raise ValueError(f"got {len(boxes)} box tensors for a batch of {features.shape[0]} feature maps")
    return boxes_to_rois(boxes, dtype=dtype, device=features.device)


def roi_align(
    features: Tensor,
    boxes: Sequence[Tensor] | Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` over ``(B, C, H, W)`` features for per-image boxes or ``(K, 5)`` RoIs.

    Returns ``(K, C, oh, ow)`` in ``features``' dtype, rows in RoI order (image-major for a list). Half features
    on the CPU and bfloat16 run in float32 (see :func:`_kernel_dtype`); half on CUDA runs natively, which makes
    the RoI coordinates half too (torchvision needs one dtype): exact integers up to 2048, 1 px steps above 1024.
    """
    dtype = _kernel_dtype(features)
    rois = _as_rois(boxes, features, dtype)
    inputs = features.to(dtype)
    if (dtype == torch.float32 and inputs.device.type == "cpu" and inputs.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and dispatch.choose("roi_align", inputs.device, dtype) == "numba"):
        pooled = _RoIAlignGrad.apply(inputs, rois, output_size, spatial_scale, sampling_ratio, aligned)
    else:
        pooled = torchvision.ops.roi_align(inputs, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return pooled.to(features.dtype)  # (K, C, oh, ow)


class _RoIAlignGrad(torch.autograd.Function):
    """torchvision's RoI Align forward with the gradient of :func:`detect.ops._cpu.roi_align_backward`: float32
    features on the CPU, the path training takes. The same gradient bit for bit, computed once per sampling point
    for all channels and in parallel over images instead of once per channel on one core (see the kernel)."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, size: int | tuple[int, int], scale: float, sampling: int,
                aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = (features.shape, scale, sampling, aligned)  # the bins come back with the gradient's shape
        return torchvision.ops.roi_align(features, rois, size, scale, sampling, aligned)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        return roi_align_grad(grad, rois, *ctx.settings), None, None, None, None, None


def roi_align_grad(grad: Tensor, rois: Tensor, shape: Sequence[int], spatial_scale: float, sampling_ratio: int,
                   aligned: bool) -> Tensor:
    """The gradient of RoI Align's float32 CPU output ``(K, C, PH, PW)`` with respect to its ``shape`` ``(B, C, H,
    W)`` input: torchvision's ``_roi_align_backward``, bitwise, from :func:`detect.ops._cpu.roi_align_backward`."""
    batch, channels, height, width = (int(v) for v in shape)
    grad_in = torch.zeros((batch, height, width, channels), dtype=torch.float32)
    if grad.numel() and batch:
        images = rois[:, 0].to(torch.int64)  # (K,), as torchvision truncates the float index
        order = torch.argsort(images, stable=True)  # each image's RoIs, in their own order
        first = torch.searchsorted(images[order], torch.arange(batch + 1))  # (B + 1,)
        grad_out = grad.to(torch.float32).permute(0, 2, 3, 1).contiguous()  # (K, PH, PW, C)
        offset = np.float32(0.5 if aligned else 0.0)
        dispatch.run_cpu(
            dispatch.cpu().roi_align_backward, batch, grad_out.numel(), grad_in.numpy(), grad_out.numpy(),
            rois.to(torch.float32).contiguous().numpy(), order.numpy(), first.numpy(), np.float32(spatial_scale),
            offset, max(sampling_ratio, 0), max(sampling_ratio, 0),
        )
    return grad_in.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def roi_pool(
    features: Tensor,
    boxes: Sequence[Tensor] | Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
) -> Tensor:
    """``torchvision.ops.roi_pool`` (Fast R-CNN max pooling) with the same inputs and dtype rules as
    :func:`roi_align`. Returns ``(K, C, oh, ow)``."""
    dtype = _kernel_dtype(features)
    rois = _as_rois(boxes, features, dtype)
    pooled = torchvision.ops.roi_pool(features.to(dtype), rois, output_size, spatial_scale)
    return pooled.to(features.dtype)  # (K, C, oh, ow)


# --- SPP over RoIs -------------------------------------------------------------------------------------------


def _window_cells(coords: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Half-open integer cell ranges ``[lo, hi)`` of inclusive window corners ``coords`` (K, 2) on an axis of
    ``size`` cells: corners are rounded, clipped into the map, and ``hi - lo >= 1`` always."""
    corners = coords.round().long().clamp(0, size - 1)  # (K, 2)
    lo = corners[:, 0]
    hi = torch.maximum(corners[:, 1], lo) + 1
    return lo, hi


def _bin_edges(lo: Tensor, hi: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Split each ``[lo, hi)`` (K,) into ``bins`` bins ``[start, end)`` (K, bins) with integer arithmetic:
    ``start_i = lo + floor(i n / l)``, ``end_i = lo + ceil((i + 1) n / l)`` for ``n = hi - lo`` cells."""
    n = (hi - lo)[:, None]  # (K, 1)
    i = torch.arange(bins, device=lo.device)[None, :]  # (1, l)
    start = lo[:, None] + (i * n) // bins
    end = lo[:, None] + ((i + 1) * n + bins - 1) // bins
    return start, end  # (K, l) each


def _pyramid_bins(
    y_lo: Tensor, y_hi: Tensor, x_lo: Tensor, x_hi: Tensor, levels: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cell ranges ``y_start, y_end, x_start, x_end`` of every bin of every level, each (K, sum l*l), ordered by
    level, then bin row, then bin column."""
    parts = []
    for level in levels:
        ys, ye = _bin_edges(y_lo, y_hi, level)  # (K, l) each
        xs, xe = _bin_edges(x_lo, x_hi, level)
        grid, flat = (len(y_lo), level, level), (len(y_lo), level * level)
        rows = [t[:, :, None].expand(grid).reshape(flat) for t in (ys, ye)]  # (K, l*l) each
        cols = [t[:, None, :].expand(grid).reshape(flat) for t in (xs, xe)]
        parts.append(rows + cols)
    return tuple(torch.cat(edges, dim=1) for edges in zip(*parts))


def _gather_max(rows: Tensor, indices: Sequence[Tensor]) -> Tensor:
    """Element-wise max of ``rows[i]`` over the index tensors ``indices`` (each (M,)), giving (M, C). Works in
    place (one result buffer, one scratch buffer) unless autograd needs the graph."""
    result = rows.index_select(0, indices[0])  # (M, C)
    if rows.requires_grad:
        for index in indices[1:]:
            result = torch.maximum(result, rows.index_select(0, index))
        return result
    scratch = torch.empty_like(result)
    for index in indices[1:]:
        torch.maximum(result, torch.index_select(rows, 0, index, out=scratch), out=result)
    return result


def _floor_log2(n: Tensor, bits: int) -> Tensor:
    """Exact ``floor(log2(n))`` for integer ``n >= 1`` below ``2**bits``, by comparison with powers of two."""
    powers = 2 ** torch.arange(1, bits, device=n.device)  # (bits - 1,)
    return (n[..., None] >= powers).sum(-1)


def _doubling_maxima(x: Tensor, dim: int) -> list[Tensor]:
    """``m[k][..., j, ...] = max(x[..., j : j + 2**k, ...])`` along ``dim`` (windows cut at the end of the axis),
    for every ``k`` with ``2**k <= x.shape[dim]``. Each step is one out-of-place maximum, so autograd works."""
    size = x.shape[dim]
    maxima = [x]
    step = 1
    while 2 * step <= size:
        prev = maxima[-1]
        head = torch.maximum(prev.narrow(dim, 0, size - step), prev.narrow(dim, step, size - step))
        maxima.append(torch.cat([head, prev.narrow(dim, size - step, step)], dim))
        step *= 2
    return maxima


def _range_max_table(features: Tensor) -> Tensor:
    """2-D sparse table of ``(B, C, H, W)`` features: ``(Ly, Lx, B, H, W, C)`` where entry ``[ky, kx, b, y, x]`` is
    the max over the ``2**ky x 2**kx`` cells starting at ``(y, x)``. Costs ``Ly * Lx`` (about ``log2 H * log2 W``)
    copies of the map; any rectangle's max is then the max of 4 overlapping entries."""
    channels_last = features.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
    rows = _doubling_maxima(channels_last, dim=1)  # Ly x (B, H, W, C)
    return torch.stack([torch.stack(_doubling_maxima(r, dim=2)) for r in rows])  # (Ly, Lx, B, H, W, C)


def spatial_pyramid_pool(
    features: Tensor, rois: Tensor, levels: Sequence[int] = (1, 2, 3, 6), out: Tensor | None = None
) -> Tensor:
    """Spatial pyramid max pooling of RoIs (SPP-Net, He et al. 2014), all RoIs of all images in one call.

    Args:
        features: ``(B, C, H, W)`` feature maps, any float dtype and device.
        rois: ``(K, 5)`` rows ``[image_index, x1, y1, x2, y2]`` in feature-map *cell* coordinates with inclusive
            corners (the caller projects image boxes to cells; SPP-Net's detector does the paper's projection).
        levels: pyramid levels; level ``l`` max-pools the window over an ``l x l`` grid of bins.
        out: an optional ``(K, C * P)`` tensor of ``features``' dtype and device to write the result into (and
            return), e.g. a buffer reused from chunk to chunk; it must not require grad.

    Returns:
        ``(K, C * sum(l * l for l in levels))`` in ``features``' dtype: for each level in order, the ``(C, l, l)``
        bin maxima flattened, then concatenated (default levels: 50 bins per channel).

    Decisions:
        - Corners are rounded (half to even) to whole cells and clipped into the map; ``x2 < x1`` counts as
          ``x2 = x1``. So every window has at least one cell (a window off the map becomes its nearest edge cells).
        - An axis of ``n`` window cells starting at ``lo`` is split into ``l`` bins
          ``[lo + floor(i n / l), lo + ceil((i + 1) n / l))``, computed in exact integer arithmetic. This is
          ``torch.nn.AdaptiveMaxPool2d``'s partition of the window: bins cover every cell and are never empty;
          neighbouring bins overlap by one cell when ``l`` does not divide ``n``, and when ``n < l`` cells repeat
          (a 1-cell window gives the same value in all ``l * l`` bins). ``torchvision.ops.roi_pool`` uses the same
          formula in floating point, where rounding sometimes stretches a bin one cell past the window (e.g.
          57 cells, 7 bins in float32), and it returns 0 for bins that clipping empties; hence this kernel.
        - On the CPU (float32/float64, no autograd) a fused numba loop pools the windows
          (:func:`detect.ops.spp.pool_windows`: the finest level from the map, the levels dividing it from its bins;
          bitwise equal; 2,000 windows of a 256-channel AlexNet map: 25x faster than the table below).
          Elsewhere (CUDA, half precision, autograd), and as the reference the loop is tested against, each bin's
          max is read from a 2-D range-max sparse table of the maps (:func:`_range_max_table`), four gathers per
          bin, so the cost does not grow with the window size; the table costs about ``log2 H * log2 W`` copies
          of the feature maps in memory. Differentiable (gathers and maxima).
    """
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) [image_index, x1, y1, x2, y2], got {tuple(rois.shape)}")
    if not levels or min(levels) < 1:
        raise ValueError(f"levels must be positive integers, got {tuple(levels)}")
    batch, channels, height, width = features.shape
    shape = (len(rois), channels * sum(level * level for level in levels))
    if out is not None and (out.shape != shape or out.dtype != features.dtype or out.device != features.device):
        raise ValueError(f"out must be {shape} {features.dtype} on {features.device}, got {tuple(out.shape)}")
    if out is not None and not out.is_contiguous():
        return out.copy_(spatial_pyramid_pool(features, rois, levels))
    rois = rois.to(features.device)
    image = rois[:, 0].long()  # (K,)
    x_lo, x_hi = _window_cells(rois[:, 1::2], width)  # (K,), (K,)
    y_lo, y_hi = _window_cells(rois[:, 2::2], height)
    needs_grad = torch.is_grad_enabled() and features.requires_grad
    if len(rois) and dispatch.choose("spp", features.device, features.dtype, needs_grad=needs_grad) == "numba":
        if bool((image < 0).any() | (image >= batch).any()):
            raise IndexError(f"rois name images outside the batch of {batch}")
        from detect.ops.spp import pool_windows  # numba loads on first use

        return pool_windows(features, torch.stack([image, y_lo, y_hi, x_lo, x_hi], dim=1), levels, out)
    table = _range_max_table(features)  # (Ly, Lx, B, H, W, C)
    ly, lx = table.shape[:2]
    ys, ye, xs, xe = _pyramid_bins(y_lo, y_hi, x_lo, x_hi, levels)  # (K, P) each, P = sum(l * l)
    ky, kx = _floor_log2(ye - ys, ly), _floor_log2(xe - xs, lx)  # (K, P)
    # Two overlapping power-of-two spans per axis cover each bin: [s, s + 2^k) and [e - 2^k, e).
    base = ((ky * lx + kx) * batch + image[:, None]) * height  # (K, P) -> row 0 of the bin's table entry
    corners = [((base + y) * width + x).reshape(-1) for y in (ys, ye - 2**ky) for x in (xs, xe - 2**kx)]
    bins = _gather_max(table.reshape(-1, channels), corners).view(*ys.shape, channels)  # (K, P, C)
    pooled = features.new_empty(shape) if out is None else out  # (K, C * P)
    start = 0
    for level in levels:  # level-major (C, l, l) blocks
        n = level * level
        pooled[:, channels * start : channels * (start + n)].view(len(rois), channels, n).copy_(
            bins[:, start : start + n].transpose(1, 2)
        )
        start += n
    return pooled


# --- R-CNN region warping ------------------------------------------------------------------------------------


def _sampling_windows(boxes: Tensor, output_size: int, context_padding: int, mode: str) -> tuple[Tensor, Tensor]:
    """The region each warped crop samples (K, 4) and the region its pixels may show (K, 4), both xyxy.

    The box is scaled about its centre by ``S / (S - 2p)`` (the dilated box). Anisotropic: both are the dilated
    box. Isotropic: the window is the square on the dilated box's longer side, same centre, and the content is
    the dilated box (samples outside it become ``fill``).
    """
    x1, y1, x2, y2 = boxes.unbind(1)
    half_w = (x2 - x1).clamp(min=0) / 2  # (K,)
    half_h = (y2 - y1).clamp(min=0) / 2
    cx, cy = x1 + half_w, y1 + half_h
    scale = output_size / (output_size - 2 * context_padding)
    half_w, half_h = half_w * scale, half_h * scale
    content = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)  # (K, 4)
    if mode == "anisotropic":
        return content, content
    half = torch.maximum(half_w, half_h)
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1), content


def _hidden(lo: Tensor, hi: Tensor, output_size: int, bounds: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Whether each of the S output pixel centres spread over ``[lo, hi]`` (K,) falls outside any of the
    inclusive ``bounds`` (pairs of (K,) limits). Returns (K, S)."""
    steps = (torch.arange(output_size, device=lo.device, dtype=lo.dtype) + 0.5) / output_size  # (S,)
    centres = lo[:, None] + (hi - lo)[:, None] * steps  # (K, S)
    hidden = torch.zeros_like(centres, dtype=torch.bool)
    for low, high in bounds:
        hidden |= (centres < low[:, None]) | (centres > high[:, None])
    return hidden


def _padded_batch(images: Sequence[Tensor] | Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(B, C, H_max, W_max)`` images in ``dtype`` and their true sizes ``(B, 2)`` as ``[W, H]``.

    List images are padded right and bottom by replicating their last column and row: bilinear samples within
    half a pixel of an image's own edge then read the edge pixel, exactly as at the border of the padded batch.
    """
    if isinstance(images, Tensor):
        sizes = [tuple(images.shape[:-3:-1])] * images.shape[0]
        batch = images.to(dtype)
    else:
        sizes = [tuple(img.shape[:-3:-1]) for img in images]
        width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
        pads = [(0, width - w, 0, height - h) for w, h in sizes]
        batch = torch.stack([F.pad(img.to(dtype), pad, mode="replicate") for img, pad in zip(images, pads)])
    return batch, torch.tensor(sizes, dtype=dtype).to(batch.device, non_blocking=True)


def warp_regions(
    images: Sequence[Tensor] | Tensor,
    boxes: Sequence[Tensor],
    output_size: int = 224,
    context_padding: int = 16,
    mode: str = "anisotropic",
    fill: float | tuple[float, ...] = 0.0,
) -> Tensor:
    """Warp every box to an ``S x S`` crop with context, as R-CNN feeds its CNN (Girshick et al. 2014, app. A).

    Args:
        images: list of ``(C, H_i, W_i)`` float tensors (sizes may differ) or a ``(B, C, H, W)`` tensor.
        boxes: one ``(N_i, 4)`` xyxy pixel tensor per image.
        output_size: ``S``, the side of every crop (227 in the paper's AlexNet, 224 for most backbones).
        context_padding: ``p``, warped pixels of image context around the box on each side (paper: 16).
        mode: ``"anisotropic"`` stretches width and height independently to ``S`` (the paper's choice);
            ``"isotropic"`` keeps the aspect ratio: the longer side of the dilated box spans ``S``, the crop is
            centred and the rest is ``fill``.
        fill: value (or one per channel) for crop pixels outside the image or outside the isotropic content.
            Callers pass mean-subtracted images and ``fill=0``, i.e. the paper's mean fill.

    Returns:
        ``(sum N_i, C, S, S)`` crops in the images' dtype, image-major.

    Decisions:
        - Context: the box is scaled about its centre by ``S / (S - 2p)``, so at size ``S`` exactly ``p`` warped
          pixels surround the original box (requires ``2p < S``).
        - Sampling: output pixel ``j`` shows the image at ``u = x1' + (j + 0.5) * w' / S`` (``x1', w'``: the
          sampled window), bilinearly interpolated between pixel centres at ``k + 0.5``, like ``cv2.resize``
          with ``INTER_LINEAR`` and no antialiasing. Samples within half a pixel of the image border take the edge
          pixel (clamped, as cv2's replicate border); samples outside ``[0, W] x [0, H]`` are ``fill``.
        - Boxes with ``x2 < x1`` or ``y2 < y1`` count as zero-size; a zero-size side samples one line repeatedly
          (anisotropic) or shows only ``fill`` beside the content (isotropic). No NaN in either case.
        - One ``torchvision.ops.roi_align`` call (``aligned=True``, ``sampling_ratio=1``: exactly one bilinear
          sample at each output pixel centre) for all boxes of all images, over the images padded to one batch
          (:func:`_padded_batch`), then two in-place fills by row and column; no per-box loop. Sampling runs in
          float32 (float64 for float64 images) whatever the images' dtype; crops come back in the images' dtype.
          The output for thousands of boxes is large (2,000 boxes at 224 px: 1.2 GB float32): chunk the boxes.
    """
    if mode not in _WARP_MODES:
        raise ValueError(f"mode must be one of {_WARP_MODES}, got {mode!r}")
    if not 0 <= 2 * context_padding < output_size:
        raise ValueError(f"need 0 <= 2 * context_padding < output_size, got {context_padding} and {output_size}")
    if len(images) != len(boxes):
        raise ValueError(f"got {len(boxes)} box tensors for {len(images)} images")
    if len(images) == 0:
        like = images if isinstance(images, Tensor) else torch.zeros(0, 3)
        return like.new_zeros((0, like.shape[1], output_size, output_size))
    if not all(img.is_floating_point() for img in images):
        raise ValueError("images must be float tensors")
    fills = torch.as_tensor(fill, dtype=torch.float64).reshape(-1).tolist()
    if len(fills) not in (1, images[0].shape[-3]):
        raise ValueError(f"fill needs 1 value or one per channel, got {len(fills)}")
    out_dtype = images[0].dtype
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, sizes = _padded_batch(images, dtype)  # (B, C, H, W), (B, 2)
    rois = boxes_to_rois(boxes, dtype=dtype, device=batch.device)  # (K, 5)
    window, content = _sampling_windows(rois[:, 1:], output_size, context_padding, mode)  # (K, 4) each
    crops = torchvision.ops.roi_align(batch, torch.cat([rois[:, :1], window], 1), output_size, 1.0, 1, True)
    image_w, image_h = sizes[rois[:, 0].long()].unbind(1)  # (K,) each
    zero = torch.zeros_like(image_w)
    hide_x = _hidden(window[:, 0], window[:, 2], output_size, [(zero, image_w), (content[:, 0], content[:, 2])])
    hide_y = _hidden(window[:, 1], window[:, 3], output_size, [(zero, image_h), (content[:, 1], content[:, 3])])
    channels = crops.split(1, dim=1) if len(fills) > 1 else (crops,)  # each (K, 1 or C, S, S)
    for channel, value in zip(channels, fills):
        channel.masked_fill_(hide_y[:, None, :, None], value)  # whole rows
        channel.masked_fill_(hide_x[:, None, None, :], value)  # whole columns
    return crops.to(out_dtype)  # (K, C, S, S)
