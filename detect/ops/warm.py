"""Start-up warm-up of the fused kernels (:func:`warmup`), apart from :mod:`detect.ops.dispatch` so that the
dispatch point imports none of the kernels that import it."""

from __future__ import annotations

import time

import torch

from detect.ops.boxes import batched_box_iou, clip_boxes
from detect.ops.coder import BoxCoder
from detect.ops.dispatch import _FAST_DTYPES, PARALLEL_WORK
from detect.ops.nms import grouped_nms, multiclass_nms
from detect.ops.pooling import roi_align_grad, spatial_pyramid_pool

__all__ = ["warmup"]


def warmup(devices: tuple[str, ...] | None = None) -> dict[str, float]:
    """Load (or compile, on a cold cache) every fused kernel, so that no request pays for it.

    Runs each public kernel on tiny float32 and float64 inputs on every device in ``devices`` (default: the CPU,
    and CUDA when available), once in the calling thread and once split over the worker threads. Returns the
    seconds spent per device, e.g. ``{"cpu": 0.4}`` with a warm numba cache (several seconds on a cold one).
    Idempotent and cheap once warm; a service calls it at start-up, before it reports ready.
    """
    if devices is None:
        devices = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
    spent = {}
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    for name in devices:
        device = torch.device(name)
        start = time.perf_counter()
        with torch.no_grad():
            for dtype in _FAST_DTYPES:
                for n in (4, PARALLEL_WORK // 4 + 1):  # one range in this thread; split over the workers
                    g = torch.Generator().manual_seed(0)
                    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 100
                    boxes = torch.cat((xy, xy + 1 + torch.rand(n, 2, generator=g, dtype=dtype) * 50), -1).to(device)
                    scores = torch.rand(n, generator=g, dtype=dtype).to(device)
                    small = boxes[:64]
                    batched_box_iou(small[None], boxes[None, : max(1, PARALLEL_WORK // 64 + 1)] if n > 4 else small[None])
                    zeros = torch.zeros(n, dtype=torch.int64, device=device)
                    grouped_nms(boxes, scores, zeros, zeros.remainder(2), 2, 0.5, 10)
                    classes = torch.rand(n // 2 + 1, 3, generator=g, dtype=dtype).to(device)
                    multiclass_nms([boxes[: n // 2 + 1], boxes[: n // 2 + 1]], [classes, classes], iou_threshold=0.5)
                    deltas = coder.encode(boxes + 1, boxes)
                    coder.decode(deltas, boxes)
                    coder.decode_per_class(deltas.repeat(1, 2), boxes)
                    clip_boxes(boxes, (50, 60))
                    clip_boxes(boxes[None], torch.tensor([[50, 60]], device=device))
                    maps = torch.rand(1, 2, 8, 8, generator=g, dtype=dtype).to(device)
                    rois = torch.tensor([[0.0, 0.0, 0.0, 5.0, 7.0]], dtype=dtype, device=device)
                    spatial_pyramid_pool(maps, rois)
                    if device.type == "cpu" and dtype == torch.float32:  # the training gradient's loop
                        roi_align_grad(torch.ones(1, 2, 2, 2), rois.cpu(), (1, 2, 8, 8), 1.0, 2, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent[name] = time.perf_counter() - start
    return spent
