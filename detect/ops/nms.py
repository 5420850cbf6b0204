"""Exact greedy non-maximum suppression, batched across images and classes in one call.

Greedy NMS (as in R-CNN and every detector since) visits boxes in descending score order and keeps a box unless
an already-kept box of the same group overlaps it with IoU above the threshold. Every function here returns
exactly what ``torchvision.ops.nms``'s CPU kernel returns for each group, decision for decision:

- IoU is computed in float32 (float64 for float64 inputs; float16/bfloat16 are promoted to float32) with the
  kernel's operation order: ``area = (x2 - x1) * (y2 - y1)``, ``inter = max(0, min(x2) - max(x1)) *
  max(0, min(y2) - max(y1))``, ``iou = inter / (area_kept + area_other - inter)``.
- A box is suppressed iff ``iou > iou_threshold`` compared against the threshold as a float64 number, so an IoU
  exactly equal to the threshold keeps the box.
- Equal scores keep their input order (torchvision's CPU kernel sorts with a stable sort): the lower input index
  is visited, and returned, first.

On CUDA torchvision's own kernel compares against a float32-rounded threshold and sorts ties unstably, so its
results can differ from its CPU kernel's; ours are the same on every device.

:func:`grouped_nms` is the engine: NMS inside every (image, group) pair of one flat candidate list, with an
optional per-image cap. It has three exact strategies:

- ``"chunked"`` (vectorised, any device, the default on accelerators): each image's candidates are visited in
  score order across groups, ``chunk_size`` at a time, all images side by side as padded ``(B, S)`` tensors. A
  chunk's candidates are first tested against the boxes already kept (one dense IoU), then greedy NMS inside the
  chunk is resolved by a fixed-point iteration over the ``(S, S)`` "earlier, same group, IoU above threshold"
  matrix: a candidate whose overlapping predecessors are all removed is kept, a candidate overlapping a kept
  predecessor is removed; every iteration settles at least the first undecided candidate and usually many.
  Greedy decisions on a score-ordered prefix depend only on that prefix, so an image stops as soon as it has
  ``max_per_image`` kept boxes. Host synchronisations: one per chunk and one per fixed-point iteration (a few
  per chunk), none per image or group.
- ``"per_group"`` (the reference on the CPU): torchvision's C++ kernel on each (image, group) segment, over a
  score prefix of each image that grows geometrically until the image has ``max_per_image`` kept boxes. A new
  prefix round only re-runs the previous round's kept boxes plus the new candidates, which is exact because
  removed boxes never suppress anything. Small segments share kernel calls, four at a time, each mirrored into
  its own quadrant (see :func:`_segment_nms`). A Python loop over segments costs no synchronisation on the CPU,
  and the C++ kernel is the fastest exact choice there, large groups included.

Measured on the CPU (``python benchmarks/_case_nms.py``: 8 images x 1,000 boxes x 20 classes, top 100 per image)
the per-group route is 2-3x faster than a per-image loop of ``torchvision.ops.batched_nms``, mostly because it
stops each image at its 100th kept box and makes about a quarter of the kernel calls; without the cap, about
1.5x. The chunked route is slower on the CPU (with the cap and 64-candidate chunks about 1.7x faster than the
torchvision loop, without the cap several times slower): its dense ``(B, S, R)`` IoU blocks and per-chunk tensor
operations cost more there than the C++ loop they replace.

- ``"fused"`` (the default on the CPU, issue 16): one numba loop visits each image's candidates in score order
  and compares each only with the boxes already kept in its own (image, group) segment, stopping an image at
  ``max_per_image`` kept boxes; images are split over threads. :func:`multiclass_nms` goes further on the CPU:
  threshold, ordering (a heap, so a capped image never sorts all its candidates), top-k, NMS and the outputs
  are one loop per image. Measured (``python benchmarks/kernels.py``, same case as above) 13-58x faster than
  the torchvision loop on a loaded 2-core machine, against 2-3x for ``per_group``. On CUDA ``"fused"`` runs
  the same visit in a Triton kernel, one program per image.

:func:`multiclass_nms` is the detector-head post-processing (score threshold, per-class top-k, per-class NMS,
per-image cap) for B images x C classes in one call.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import Tensor

from detect.ops import dispatch

__all__ = ["NMSResult", "batched_nms", "grouped_nms", "multiclass_nms", "nms"]

_STRATEGIES = ("auto", "chunked", "fused", "per_group")
_PACK_LIMIT = 256  # at most this many boxes in one mirrored kernel call of the per-group strategy


class NMSResult(NamedTuple):
    """The detections :func:`multiclass_nms` keeps in one image, sorted by score (descending).

    ``labels`` is the class column index ``0..C-1`` of the input scores (callers map it to their own ids) and
    ``indices`` the source row of each detection in that image's input. Boxes and scores are float32 whatever the
    input precision.
    """

    boxes: Tensor  # (K, 4) float32 xyxy
    scores: Tensor  # (K,) float32
    labels: Tensor  # (K,) int64
    indices: Tensor  # (K,) int64


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes greedy NMS keeps, by descending score: exactly ``torchvision.ops.nms`` (CPU kernel).

    ``boxes (N, 4)`` xyxy and ``scores (N,)``; float16/bfloat16 are computed in float32. Returns int64 ``(K,)``.
    """
    zeros = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)  # (N,)
    return grouped_nms(boxes, scores, zeros, zeros, 1, iou_threshold)[0]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently for each value of ``idxs``; kept indices sorted by descending score.

    Exact per group, unlike torchvision's coordinate-offset trick, which shifts each group's boxes in float32 and
    can round an IoU across the threshold. Ties in score keep the lower index first.
    """
    zeros = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)  # (N,)
    return grouped_nms(boxes, scores, idxs, zeros, 1, iou_threshold)[0]


def grouped_nms(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    images: Tensor,
    num_images: int,
    iou_threshold: float,
    max_per_image: int | None = None,
    *,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> list[Tensor]:
    """Greedy NMS inside every (image, group) pair of ``K`` candidates, for all images in one call.

    Args:
        boxes: ``(K, 4)`` xyxy candidates of all images.
        scores: ``(K,)``.
        groups: ``(K,)`` integer group (e.g. class) of each candidate; only same-group boxes suppress each other.
        images: ``(K,)`` integer image index in ``[0, num_images)``.
        num_images: number of images ``B``; images without candidates get an empty result.
        iou_threshold: a box is suppressed by a kept one iff their IoU is strictly greater.
        max_per_image: keep at most this many per image (the highest-scoring ones); ``None`` for no cap.
        strategy: ``"fused"``, ``"chunked"``, ``"per_group"`` or ``"auto"`` (``fused`` on the CPU, ``chunked``
            elsewhere; ``per_group`` on the CPU when :func:`detect.ops.dispatch.use_backend` forces the torch
            reference). All give identical results; see the module docstring. ``fused`` is the numba loop on the
            CPU and a Triton kernel on CUDA (one sequential program per image: not yet measured on a GPU, hence
            not the CUDA default).
        chunk_size: candidates per image in the first step: the chunk of the ``chunked`` strategy (default 256),
            the first score prefix of ``per_group`` (default ``max(4 * max_per_image, 1024)``, all without a cap).
            It changes the speed, never the result.

    Returns:
        ``num_images`` int64 tensors of indices into the ``K`` candidates, each sorted by descending score (equal
        scores: lower index first).
    """
    _check_candidates(boxes, scores, groups, images)
    boxes, scores = boxes.detach(), scores.detach()  # the result is indices: nothing to differentiate
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cap = None if max_per_image is None else max(int(max_per_image), 0)
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    backend = dispatch.choose("nms", boxes.device, dtype)
    reference = "per_group" if boxes.device.type == "cpu" else "chunked"
    if strategy == "auto":  # Triton's NMS is opt-in on CUDA until it is measured against "chunked" on a GPU
        strategy = "fused" if backend == "numba" else reference
    elif strategy == "fused" and backend == "torch":  # no fused loop for these inputs (device, backend forced)
        strategy = reference
    if strategy == "per_group" and boxes.device.type != "cpu":
        raise ValueError("strategy 'per_group' runs torchvision's CPU kernel and needs CPU tensors")
    scores = scores.to(dtype) if scores.dtype in (torch.float16, torch.bfloat16) else scores
    images = images.to(torch.int64)
    ranked = _Ranked(
        boxes.to(dtype),
        _group_codes(groups),
        images,
        _score_order(scores, images),
        torch.bincount(images, minlength=num_images),
    )
    if ranked.counts.shape[0] != num_images:
        raise ValueError(f"images must lie in [0, {num_images}), got up to {ranked.counts.shape[0] - 1}")
    if strategy == "fused":
        kept, counts = _fused_nms(ranked, iou_threshold, cap, backend)
    elif strategy == "per_group":
        kept, counts = _per_group_nms(ranked, iou_threshold, cap, chunk_size)
    else:
        kept, counts = _chunked_nms(ranked, iou_threshold, cap, chunk_size or 256)
    return list(kept.split(counts))


class _Ranked(NamedTuple):
    """:func:`grouped_nms`'s candidates with what the strategies need."""

    boxes: Tensor  # (K, 4) float32, or float64 for float64 input
    codes: Tensor  # (K,) group codes, see _group_codes
    images: Tensor  # (K,) int64
    order: Tensor  # (K,) permutation sorting by (image, score descending, index)
    counts: Tensor  # (B,) candidates per image


def multiclass_nms(
    boxes: Sequence[Tensor] | Tensor,
    scores: Sequence[Tensor] | Tensor,
    *,
    iou_threshold: float,
    score_threshold: float = 0.0,
    topk_per_class: int | None = None,
    max_per_image: int | None = None,
    strategy: str = "auto",
    chunk_size: int | None = None,
) -> list[NMSResult]:
    """Detector-head post-processing for B images x C classes in one call.

    Args:
        boxes: per image ``(N_i, 4)`` (one box shared by all classes) or ``(N_i, C, 4)`` (class-specific boxes),
            as a list or stacked ``(B, N, 4)`` / ``(B, N, C, 4)``. Images may have different ``N_i``.
        scores: per image ``(N_i, C)``, as a list or a stacked ``(B, N, C)`` tensor.
        iou_threshold: per-class NMS threshold (suppress iff IoU is strictly greater).
        score_threshold: candidates need a score strictly greater than this (as torchvision's RoI heads do), so
            the default 0.0 drops zero scores.
        topk_per_class: before NMS keep only this many highest-scoring candidates per (image, class); equal
            scores keep the lower row first.
        max_per_image: after NMS keep only this many highest-scoring detections per image.
        strategy, chunk_size: passed to :func:`grouped_nms`. With ``"auto"`` or ``"fused"`` on the CPU (float32 or
            float64 scores, no autograd on the boxes) the whole post-processing is one fused loop per image
            instead (:func:`_multiclass_fused`), with the same results.

    Returns:
        One :class:`NMSResult` per image, sorted by descending score (equal scores: lower ``(row, class)`` first).
    """
    box_list, score_list = _per_image_inputs(boxes, scores)
    if strategy in ("auto", "fused"):
        fused = _multiclass_fused(
            boxes, scores, box_list, score_list, iou_threshold, score_threshold, topk_per_class, max_per_image
        )
        if fused is not None:
            return fused
    cand = _candidates(boxes, scores, box_list, score_list, score_threshold, topk_per_class)
    kept = grouped_nms(
        cand.boxes,
        cand.scores,
        cand.labels,
        cand.images,
        len(score_list),
        iou_threshold,
        max_per_image,
        strategy=strategy,
        chunk_size=chunk_size,
    )
    counts = [k.shape[0] for k in kept]
    flat_kept = torch.cat(kept) if kept else cand.rows  # (sum kept,) candidates kept, image by image
    fields = (cand.boxes.float(), cand.scores.float(), cand.labels, cand.rows)
    per_field = [f.index_select(0, flat_kept).split(counts) for f in fields]
    return [NMSResult(*image_fields) for image_fields in zip(*per_field)]


def _multiclass_fused(
    boxes: Sequence[Tensor] | Tensor,
    scores: Sequence[Tensor] | Tensor,
    box_list: Sequence[Tensor],
    score_list: Sequence[Tensor],
    iou_threshold: float,
    score_threshold: float,
    topk_per_class: int | None,
    max_per_image: int | None,
) -> list[NMSResult] | None:
    """:func:`multiclass_nms` as one fused CPU loop per image (threshold, sort, top-k, NMS, cap, outputs), or
    None where that loop does not apply (not the CPU, scores not float32/float64, autograd on the boxes).

    Same results as the composed path (see :func:`detect.ops._cpu._multiclass_image`); it skips the flat candidate
    tensors, the global sorts and the gathers, which cost several times the suppression itself.
    """
    if not score_list or score_list[0].dtype not in (torch.float32, torch.float64):
        return None
    box_dtype = torch.float64 if box_list[0].dtype == torch.float64 else torch.float32
    needs_grad = torch.is_grad_enabled() and any(b.requires_grad for b in box_list)
    if dispatch.choose("multiclass_nms", score_list[0].device, box_dtype, needs_grad=needs_grad) != "numba":
        return None
    num_classes = score_list[0].shape[1]
    row_counts = [s.shape[0] for s in score_list]
    flat_scores = _flatten(scores, score_list, ()).contiguous()  # (sum N_i * C,)
    flat_boxes = _flatten(boxes, box_list, (4,)).to(box_dtype).contiguous()  # (sum N_i [* C], 4)
    row_start = torch.tensor([0, *row_counts], dtype=torch.int64).cumsum(0)  # (B + 1,)
    largest = max(row_counts) * num_classes
    width = largest if max_per_image is None else min(max(int(max_per_image), 0), largest)
    num_images = len(score_list)
    out_boxes = torch.empty((num_images, width, 4), dtype=box_dtype)
    out_scores = torch.empty((num_images, width), dtype=flat_scores.dtype)
    out_labels = torch.empty((num_images, width), dtype=torch.int64)
    out_rows = torch.empty((num_images, width), dtype=torch.int64)
    counts = torch.zeros(num_images, dtype=torch.int64)
    score_kind = np.dtype(str(flat_scores.dtype).removeprefix("torch.")).type
    box_kind = np.dtype(str(box_dtype).removeprefix("torch.")).type
    cpu = dispatch.cpu()
    dispatch.run_cpu(
        cpu.multiclass,
        num_images,
        flat_scores.shape[0],
        flat_scores.numpy(),
        flat_boxes.numpy(),
        row_start.numpy(),
        num_classes,
        box_list[0].ndim == 3,
        score_kind(score_threshold),
        float(iou_threshold),
        -1 if topk_per_class is None else max(int(topk_per_class), 0),
        -1 if max_per_image is None else width,
        out_boxes.numpy(),
        out_scores.numpy(),
        out_labels.numpy(),
        out_rows.numpy(),
        counts.numpy(),
        box_kind(0),
    )
    out_boxes, out_scores = out_boxes.float(), out_scores.float()
    return [
        NMSResult(out_boxes[b, :n], out_scores[b, :n], out_labels[b, :n], out_rows[b, :n])
        for b, n in enumerate(counts.tolist())
    ]


class _Candidates(NamedTuple):
    """The (row, class) pairs of all images that pass the score threshold, as flat ``(K,)`` tensors."""

    boxes: Tensor  # (K, 4)
    scores: Tensor  # (K,)
    labels: Tensor  # (K,) class column
    images: Tensor  # (K,) image index
    rows: Tensor  # (K,) row inside its image


def _candidates(
    boxes: Sequence[Tensor] | Tensor,
    scores: Sequence[Tensor] | Tensor,
    box_list: Sequence[Tensor],
    score_list: Sequence[Tensor],
    score_threshold: float,
    topk_per_class: int | None,
) -> _Candidates:
    """Flatten B images x C classes into candidates: score threshold, then the optional per-class top-k."""
    device = score_list[0].device if score_list else torch.device("cpu")
    num_classes = score_list[0].shape[1] if score_list else 0
    row_counts = [s.shape[0] for s in score_list]
    rows = torch.tensor(row_counts, dtype=torch.int64, device=device)  # (B,)
    flat_scores = _flatten(scores, score_list, ())  # (sum N_i * C,)
    passing = torch.nonzero(flat_scores.view(sum(row_counts), num_classes) > score_threshold)  # (K, 2) row, class
    global_row, labels = passing.unbind(1)  # (K,) row among all images' rows, class column
    flat = global_row * num_classes + labels  # (K,) index of (row, class) in all images
    first_rows = (rows.cumsum(0) - rows)[1:]  # (B-1,) where images 1.. start
    image_of_row = torch.zeros(sum(row_counts) + 1, dtype=torch.int64, device=device)
    image_of_row = image_of_row.index_add_(0, first_rows, torch.ones_like(first_rows)).cumsum(0)  # (sum N_i + 1,)
    images = image_of_row.index_select(0, global_row)  # (K,)
    if topk_per_class is not None:
        segments = images * num_classes + labels  # (K,) one id per (image, class)
        keep = _top_k_per_segment(flat_scores.index_select(0, flat), segments, topk_per_class)  # (K',)
        flat, global_row, labels, images = (t.index_select(0, keep) for t in (flat, global_row, labels, images))
    class_specific = bool(box_list) and box_list[0].ndim == 3
    flat_boxes = _flatten(boxes, box_list, (4,))  # (sum N_i [* C], 4)
    cand_boxes = flat_boxes.index_select(0, flat if class_specific else global_row)  # (K, 4)
    local_row = global_row - (rows.cumsum(0) - rows).index_select(0, images)  # (K,)
    return _Candidates(cand_boxes, flat_scores.index_select(0, flat), labels, images, local_row)


def _flatten(stacked: Sequence[Tensor] | Tensor, per_image: Sequence[Tensor], tail: tuple[int, ...]) -> Tensor:
    """All images' rows (and classes) as one ``(M, *tail)`` tensor: a view of a stacked tensor, else a concat."""
    if isinstance(stacked, Tensor):
        return stacked.reshape(-1, *tail)
    if not per_image:
        return torch.zeros((0, *tail))
    return torch.cat([t.reshape(-1, *tail) for t in per_image])


# --- input handling ------------------------------------------------------------------------------------------


def _check_candidates(boxes: Tensor, scores: Tensor, groups: Tensor, images: Tensor) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4), got {tuple(boxes.shape)}")
    k = boxes.shape[0]
    for name, t in (("scores", scores), ("groups", groups), ("images", images)):
        if t.shape != (k,):
            raise ValueError(f"{name} must be ({k},) like boxes, got {tuple(t.shape)}")


def _per_image_inputs(
    boxes: Sequence[Tensor] | Tensor, scores: Sequence[Tensor] | Tensor
) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
    """Split stacked inputs into per-image tensors (views) and check their shapes agree."""
    box_list = boxes.unbind(0) if isinstance(boxes, Tensor) else boxes
    score_list = scores.unbind(0) if isinstance(scores, Tensor) else scores
    if len(box_list) != len(score_list):
        raise ValueError(f"got boxes for {len(box_list)} images and scores for {len(score_list)}")
    shapes = {(s.ndim, s.shape[1] if s.ndim == 2 else None) for s in score_list}
    if len(shapes) > 1 or any(ndim != 2 for ndim, _ in shapes):
        shapes_seen = [tuple(s.shape) for s in score_list]
        raise ValueError(f"scores must be (N_i, C) with one C for all images, got {shapes_seen}")
    box_ndims = {b.ndim for b in box_list}
    if len(box_ndims) > 1:
        raise ValueError("boxes must be all (N_i, 4) or all (N_i, C, 4)")
    for b, s in zip(box_list, score_list):
        expected = (s.shape[0], 4) if b.ndim == 2 else (s.shape[0], s.shape[1], 4)
        if tuple(b.shape) != expected:
            raise ValueError(f"boxes {tuple(b.shape)} do not match scores {tuple(s.shape)}: expected {expected}")
    return box_list, score_list


# --- shared pieces -------------------------------------------------------------------------------------------


def _score_order(scores: Tensor, images: Tensor) -> Tensor:
    """Permutation sorting candidates by (image, score descending, index).

    Scores of at most float32 precision are mapped to integers in the same order (IEEE bits, negatives
    mirrored, -0.0 folded into +0.0) and packed under the image index, so one stable integer sort does it;
    float64 scores take two stable sorts.
    """
    if scores.dtype == torch.float64:
        by_score = torch.sort(scores, descending=True, stable=True).indices  # (K,)
        return by_score.index_select(0, torch.sort(images.index_select(0, by_score), stable=True).indices)
    bits = (scores.float() + 0.0).view(torch.int32).long()  # (K,)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # increasing with the score
    key = images.long() * 2**32 + (2**31 - 1 - ordered)  # (K,) image major, then score descending
    return torch.sort(key, stable=True).indices


def _group_codes(groups: Tensor) -> Tensor:
    """Int64 codes in ``[0, 2**40)`` with the same equalities as ``groups``: ``groups - min``, or ranks if wider."""
    if groups.numel() == 0:
        return groups.long()
    low, high = (int(v) for v in torch.aminmax(groups))
    if high - low < 2**40:
        return groups.long() - low
    return torch.unique(groups, return_inverse=True)[1]


def _top_k_per_segment(scores: Tensor, segments: Tensor, k: int) -> Tensor:
    """Ascending indices of the ``k`` highest scores of each segment id (equal scores: lower index first)."""
    order = _score_order(scores, segments)  # (K,) grouped by segment, score descending
    seg_sorted = segments.index_select(0, order)
    is_start = torch.ones_like(seg_sorted, dtype=torch.bool)
    is_start[1:] = seg_sorted[1:] != seg_sorted[:-1]
    position = torch.arange(order.shape[0], device=order.device)  # (K,)
    start = torch.cummax(torch.where(is_start, position, 0), 0).values  # (K,) first position of the segment
    return torch.sort(order.masked_select(position - start < k)).values


def _strict_threshold(iou_threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value ``t`` with ``x > t  <=>  x > iou_threshold`` (float64) for every ``dtype`` x.

    torchvision compares its float IoU with the threshold as a double. A plain ``iou > 0.6`` on float32 rounds 0.6
    up to 0.6000000238 and keeps an IoU of exactly that float (3/5 rounded), which torchvision suppresses.
    Rounding the threshold down instead is exact.
    """
    t = torch.tensor(iou_threshold, dtype=torch.float64)
    low = t.to(dtype)
    if low.double() > t:
        low = torch.nextafter(low, torch.tensor(float("-inf"), dtype=dtype))
    return float(low)


# --- strategy "fused": one fused loop (numba on the CPU, Triton on CUDA) -----------------------------------


def _segments(codes: Tensor, images: Tensor, num_images: int) -> tuple[Tensor, int]:
    """Dense ``(K,)`` ids of the (image, group) pairs, in ``[0, S)``, and ``S``.

    ``image * G + code`` when that table (``G`` = largest code + 1) is not much larger than the candidate list,
    else the ranks of the distinct pairs (one sort).
    """
    groups = int(codes.max()) + 1
    if num_images * groups <= 4 * codes.shape[0] + 4096:
        return images * groups + codes, num_images * groups
    ids = torch.unique(images * 2**40 + codes, return_inverse=True)[1]
    return ids, int(ids.max()) + 1


def _fused_nms(ranked: _Ranked, thr: float, cap: int | None, backend: str) -> tuple[Tensor, list[int]]:
    """Kept candidates grouped by image (score order) and per-image counts, from one fused loop.

    The loop visits each image's candidates in ``ranked.order`` and compares each with the boxes already kept in
    its own (image, group) segment only, stopping an image at ``cap`` kept boxes; images run in parallel. This is
    greedy NMS per segment, decision for decision (see :func:`detect.ops._cpu._nms_image`): a box is kept iff no
    kept box of its segment, earlier in the order, overlaps it above the threshold, and the cap only truncates
    each image's score-ordered list. Working memory is ``O(K)``.
    """
    boxes, codes, images, order, counts = ranked
    k, num_images, device = boxes.shape[0], counts.shape[0], boxes.device
    if k == 0 or cap == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), [0] * num_images
    segment, num_segments = _segments(codes, images, num_images)
    sizes = torch.bincount(segment, minlength=num_segments)  # (S,)
    segment_start = sizes.cumsum(0) - sizes  # (S,) first slot of each segment's kept boxes
    image_start = torch.zeros(num_images + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=image_start[1:])  # (B + 1,) visiting positions of each image
    if backend == "triton":
        return dispatch.gpu().nms(boxes, order, segment, image_start, segment_start, sizes, thr, cap)
    keep = torch.zeros(k, dtype=torch.bool)  # (K,) over visiting positions
    kept_counts = torch.zeros(num_images, dtype=torch.int64)  # (B,)
    kind = np.dtype(str(boxes.dtype).removeprefix("torch.")).type
    args = [
        boxes.contiguous(),
        order,
        segment.contiguous(),
        image_start,
        segment_start,
    ]
    cpu = dispatch.cpu()
    dispatch.run_cpu(
        cpu.nms,
        num_images,
        k * 4,  # ~ IoU pairs
        *[a.numpy() for a in args],
        float(thr),
        -1 if cap is None else cap,
        np.empty((5, k), dtype=kind),
        np.zeros(num_segments, dtype=np.int64),
        keep.numpy(),
        kept_counts.numpy(),
        kind(0),
    )
    return order.masked_select(keep), kept_counts.tolist()


# --- strategy "per_group": torchvision's C++ kernel per (image, group) segment -------------------------------


def _per_group_nms(
    ranked: _Ranked, thr: float, cap: int | None, first_step: int | None
) -> tuple[Tensor, list[int]]:
    """Kept candidates grouped by image (score order) and per-image counts, via per-segment C++ NMS."""
    boxes, codes, images, order, counts = ranked
    k, num_images, device = boxes.shape[0], counts.shape[0], boxes.device
    position = torch.empty_like(order).index_copy_(0, order, torch.arange(k, device=device))  # (K,) inverse
    rank = position - (counts.cumsum(0) - counts).index_select(0, images)  # (K,) place in its image's order
    segment = images * 2**40 + codes  # (K,) one id per (image, group)
    by_segment = order.index_select(0, torch.sort(segment.index_select(0, order), stable=True).indices)
    segment_rank, segment_image, segment_sorted = (t.index_select(0, by_segment) for t in (rank, images, segment))
    segment_id = torch.zeros_like(segment_sorted)  # (K,) 0, 0, 1, 1, 1, 2, ... along the segment order
    segment_id[1:] = (segment_sorted[1:] != segment_sorted[:-1]).cumsum(0)
    kept = torch.zeros(k, dtype=torch.bool, device=device)  # (K,)
    active = torch.ones(num_images, dtype=torch.bool, device=device)  # (B,) images still short of the cap
    length = 0 if cap == 0 or k == 0 else int(counts.max())
    hi, step = 0, first_step or (length if cap is None else max(4 * cap, 1024))
    while hi < length:
        lo, hi, step = hi, hi + step, 2 * step
        fresh_or_kept = (segment_rank >= lo) | kept.index_select(0, by_segment)
        take = torch.nonzero(active.index_select(0, segment_image) & (segment_rank < hi) & fresh_or_kept)
        pool = by_segment.index_select(0, take[:, 0])  # (P,) this round's candidates, in segment order
        pool_segment = segment_id.index_select(0, take[:, 0])  # (P,)
        survivors = _segment_nms(boxes.index_select(0, pool), pool_segment, thr)
        kept.index_fill_(0, pool.index_select(0, survivors), True)
        active &= counts > hi
        if cap is not None:
            active &= torch.bincount(images.masked_select(kept), minlength=num_images) < cap
        if not bool(active.any()):
            break
    survivors = torch.nonzero(kept)[:, 0]
    survivors = survivors.index_select(0, torch.sort(position.index_select(0, survivors)).indices)
    return _cap_sorted(survivors, images, num_images, cap)


def _segment_nms(boxes: Tensor, segment: Tensor, thr: float) -> Tensor:
    """Indices kept by NMS inside each segment of ``boxes (P, 4)``, given sorted by ``segment (P,)`` and in
    score order inside a segment.

    Every kernel call has a fixed cost that dominates for the small segments of a detector head, so when all
    coordinates are non-negative and ``thr >= 0``, up to four consecutive segments share one call, each mirrored
    into its own quadrant (``x -> -x`` and/or ``y -> -y``). Mirroring is exact in floating point and leaves every
    IoU inside a segment bit for bit the same, while boxes of different quadrants have zero intersection, hence
    IoU 0 (or 0/0 = NaN), which suppresses nothing. Descending ranks serve as scores, so the kernel visits each
    segment in the given order; a part of one box is kept without a call.
    """
    sizes = torch.bincount(segment).tolist()  # boxes per segment id, zeros for ids absent from this pool
    if thr >= 0 and bool(boxes.min() >= 0):
        quadrants, parts = _pack_quadrants(sizes, _PACK_LIMIT)
        quadrant = torch.tensor(quadrants).index_select(0, segment)  # (P,)
        boxes = _mirror(boxes, quadrant & 1 > 0, quadrant & 2 > 0)
    else:
        parts = [size for size in sizes if size]
    ranks = -torch.arange(boxes.shape[0], dtype=boxes.dtype)  # (P,)
    kept, start = [], 0
    for size, part, part_ranks in zip(parts, boxes.split(parts), ranks.split(parts)):
        if size == 1:
            kept.append(torch.tensor([start]))
        else:
            kept.append(torch.ops.torchvision.nms(part, part_ranks, thr) + start)
        start += size
    return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)


def _pack_quadrants(sizes: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Consecutive non-empty segments grouped into parts of at most four segments and ``limit`` boxes (a larger
    segment stays alone): each segment's quadrant (its place in its part) and the parts' sizes.

    Packing saves kernel calls but makes the kernel compare boxes across the part's segments, so it pays only for
    small segments.
    """
    quadrants, parts = [], []
    fill = count = 0
    for size in sizes:
        if size and (count == 4 or (count and fill + size > limit)):
            parts.append(fill)
            fill = count = 0
        quadrants.append(count)
        fill, count = fill + size, count + (size > 0)
    if fill:
        parts.append(fill)
    return quadrants, parts


def _mirror(boxes: Tensor, flip_x: Tensor, flip_y: Tensor) -> Tensor:
    """``(P, 4)`` boxes reflected through the y axis where ``flip_x`` and through the x axis where ``flip_y``."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack(
        [
            torch.where(flip_x, -x2, x1),
            torch.where(flip_y, -y2, y1),
            torch.where(flip_x, -x1, x2),
            torch.where(flip_y, -y1, y2),
        ],
        1,
    )


def _cap_sorted(kept: Tensor, images: Tensor, num_images: int, cap: int | None) -> tuple[Tensor, list[int]]:
    """Drop all but the first ``cap`` of each image from candidates sorted by (image, score)."""
    kept_images = images.index_select(0, kept)  # (P,)
    counts = torch.bincount(kept_images, minlength=num_images)  # (B,)
    if cap is not None:
        start = (counts.cumsum(0) - counts).index_select(0, kept_images)  # (P,)
        kept = kept.masked_select(torch.arange(kept.shape[0], device=kept.device) - start < cap)
        counts = counts.clamp(max=cap)
    return kept, counts.tolist()


# --- strategy "chunked": vectorised over images, chunk by chunk ----------------------------------------------


def _chunked_nms(ranked: _Ranked, thr: float, cap: int | None, chunk: int) -> tuple[Tensor, list[int]]:
    """Kept candidates grouped by image (score order) and per-image counts, all images side by side."""
    boxes, codes, images, order, counts = ranked
    k, num_images, device = boxes.shape[0], counts.shape[0], boxes.device
    length = int(counts.max()) if k else 0
    if length == 0 or cap == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), [0] * num_images
    row = images.index_select(0, order)
    col = torch.arange(k, device=device) - (counts.cumsum(0) - counts).index_select(0, row)  # (K,) rank in image
    cell = row * length + col  # (K,) place in a (B, L) table
    x1, y1, x2, y2 = boxes.index_select(0, order).unbind(1)
    features = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)])  # (5, K): box and area, score order
    table = boxes.new_zeros(5, num_images * length).index_copy_(1, cell, features).view(5, num_images, length)
    # Group codes: >= 0 for candidates, -1 for empty kept slots, -2 for padding; padding never matches anything.
    code_table = torch.full((num_images * length,), -2, dtype=torch.int64, device=device)
    code_table = code_table.index_copy_(0, cell, codes.index_select(0, order)).view(num_images, length)  # (B, L)
    index_table = torch.zeros(num_images * length, dtype=torch.int64, device=device)
    index_table = index_table.index_copy_(0, cell, order).view(num_images, length)  # (B, L)
    width = length if cap is None else min(cap, length)
    kept_features = boxes.new_zeros(5, num_images, width + 1)  # slot `width` absorbs overflowing writes
    kept_codes = torch.full((num_images, width + 1), -1, dtype=torch.int64, device=device)
    kept_index = torch.zeros((num_images, width + 1), dtype=torch.int64, device=device)
    num_kept = torch.zeros(num_images, dtype=torch.int64, device=device)  # (B,)
    earlier = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril(-1)  # (S, S) j before i
    threshold = _strict_threshold(thr, boxes.dtype)
    used = 0  # filled kept slots in the fullest image
    for lo in range(0, length, chunk):
        hi = min(lo + chunk, length)
        cand = table[:, :, lo:hi]  # (5, B, S)
        cand_codes = code_table[:, lo:hi]  # (B, S)
        if cap is not None:
            cand_codes = cand_codes.masked_fill((num_kept >= cap)[:, None], -2)  # finished images sit out
        refs = torch.cat([kept_features[:, :, :used], cand], 2)  # (5, B, R=used+S)
        ref_codes = torch.cat([kept_codes[:, :used], cand_codes], 1)  # (B, R)
        over = _overlaps(cand, refs, threshold) & (cand_codes[:, :, None] == ref_codes[:, None, :])  # (B, S, R)
        removed = over[:, :, :used].any(2) | (cand_codes < 0)  # (B, S) suppressed by earlier chunks, or padding
        inside = (over[:, :, used:] & earlier[: hi - lo, : hi - lo]).float()  # (B, S, S) earlier j overlaps i
        kept = _resolve_chunk(inside, removed)  # (B, S)
        slot = num_kept[:, None] + kept.cumsum(1) - 1  # (B, S) kept-buffer slot of each kept candidate
        slot = torch.where(kept & (slot < width), slot, width)
        kept_features.scatter_(2, slot.expand(5, -1, -1), cand)
        kept_codes.scatter_(1, slot, cand_codes)
        kept_index.scatter_(1, slot, index_table[:, lo:hi])
        num_kept += kept.sum(1)
        more = (num_kept < cap) & (counts > hi) if cap is not None else counts > hi  # (B,)
        used, go_on = torch.stack([num_kept.max().clamp(max=width), more.any()]).tolist()  # one sync per chunk
        if not go_on:
            break
    num_kept = num_kept.clamp(max=width)  # (B,)
    valid = torch.arange(width + 1, device=device) < num_kept[:, None]  # (B, W+1)
    return kept_index.masked_select(valid), num_kept.tolist()


def _overlaps(cand: Tensor, refs: Tensor, threshold: float) -> Tensor:
    """``(B, S, R)`` IoU > threshold between ``cand (5, B, S)`` and ``refs (5, B, R)`` ([x1, y1, x2, y2, area]).

    Same operation order as torchvision's CPU kernel, so the comparisons agree bit for bit.
    """
    cx1, cy1, cx2, cy2, c_area = cand[:, :, :, None]  # each (B, S, 1)
    rx1, ry1, rx2, ry2, r_area = refs[:, :, None, :]  # each (B, 1, R)
    inter = (torch.minimum(cx2, rx2) - torch.maximum(cx1, rx1)).clamp_(min=0)  # (B, S, R) width
    inter *= (torch.minimum(cy2, ry2) - torch.maximum(cy1, ry1)).clamp_(min=0)  # times height
    union = (r_area + c_area) - inter
    return inter.div_(union) > threshold


def _resolve_chunk(inside: Tensor, removed: Tensor) -> Tensor:
    """Exact greedy NMS inside a chunk: ``(B, S)`` kept mask from the ``(B, S, S)`` predecessor-overlap matrix.

    ``removed`` marks candidates already suppressed by earlier chunks (or padding). Each iteration keeps every
    undecided candidate whose overlapping predecessors are all removed, then removes every candidate overlapping a
    kept predecessor; the first undecided candidate is always settled, so the loop ends.
    """
    kept = torch.zeros_like(removed)
    while True:
        alive_before = torch.bmm(inside, (~removed).float()[:, :, None])[:, :, 0]  # (B, S) live overlapping preds
        kept |= (alive_before == 0) & ~removed
        removed = removed | (torch.bmm(inside, kept.float()[:, :, None])[:, :, 0] > 0)
        if bool((kept | removed).all()):
            return kept
