"""Export detectors to ONNX and TorchScript, quantise the ONNX graphs to int8, and run them with ONNX Runtime.

``detect export`` writes what :func:`export` makes; ``detect predict --backend onnxruntime`` and the API with
``DETECT_BACKEND=onnxruntime`` load it through :func:`detect.inference.load_model`, which returns an object with
the detector interface (``name``, ``class_names``, ``__call__(images, **kw) -> (detections, losses)``), so no
caller knows which runtime answers.

Decisions:

- **What a Faster R-CNN graph holds.** Everything with parameters or data-dependent shapes: backbone, RPN head,
  anchors, the proposal layer (per-level top-k, decoding, clipping, per-level NMS, post-NMS top-k), RoI pooling,
  the box head and the detection post-processing (decoding, clipping, minimum size, per-class NMS, per-image cap),
  and the mapping back to original pixels. Inputs: ``images (B, 3, H, W)`` float32, normalised, resized and
  zero-padded at the bottom and right; ``image_sizes (B, 2)`` and ``original_sizes (B, 2)`` int64 ``(h, w)``.
  Outputs, flat over the batch, image-major and best first: ``boxes (N, 4)`` xyxy original pixels, ``scores
  (N,)``, ``labels (N,)`` int64 1-based, ``image_index (N,)`` int64. No detection is ``N = 0``.
- **Resizing stays outside the graph**, as :mod:`detect.transform` does it (and as the ``preprocessing`` metadata
  spells it out for other runtimes): the target size is a float function of the input shape that exporters trace
  in float32 (torchvision's exported model resizes some images one row short of eager PyTorch), and ONNX's Resize
  and torch's bilinear kernel differ in the last bits. Everything after it is in the graph.
- **Batches.** The ONNX Runtime backend cuts a batch by padded size exactly as
  :meth:`detect.detectors.faster_rcnn.FasterRCNN.forward` does (:meth:`detect.transform.RCNNTransform.grouped`) and
  runs one session call per group, so an image's detections never depend on its batchmates with either backend.
  The graph itself takes any ``B >= 1`` of one padded size.
- **NMS** is ONNX's ``NonMaxSuppression``, used the way it is exact here: its batch axis carries (image, class)
  pairs for the head (class-specific boxes) and images for the RPN, whose levels are its classes (a candidate
  scores -1 outside its own level). It suppresses at ``IoU > threshold`` and keeps ``score > threshold``, as
  :mod:`detect.ops.nms` does. The per-image caps are one ``TopK`` over an image's kept candidates (a kept
  candidate's score, -1 elsewhere). Padding rows (proposals beyond an image's count) score -1 and never pass.
- **Tracing** uses torch's TorchScript-based ONNX exporter (``dynamo=False``), which turns shape reads into graph
  ops (dynamic ``H``, ``W``, ``B``, and the ``min(k, available)`` of each top-k), and the pure-torch kernels of
  :mod:`detect.ops` (:func:`detect.ops.dispatch.use_backend`: the numba loops cannot be traced). RoI Align and
  RoI Pool export as ONNX's ``RoiAlign``/``MaxRoiPool`` (torchvision's symbolics); an FPN pooler pools each level's
  RoIs and scatters them back (torchvision's ``LevelMapper`` and scales, fixed at export time).
- **TorchScript** is the same traced graph, with NMS as torchvision's ``batched_nms`` (NMS per (image, class)
  group, then each group's cap); it loads with ``torch.jit.load`` wherever torchvision is imported.
- **Region detectors** (R-CNN, SPP-Net) export their networks only; selective search, region warping or pyramid
  pooling and the post-processing stay in Python. The graph has two independent parts, run as two sessions:
  ``features`` (R-CNN: warped crops ``(K, 3, S, S)`` -> pooled ``(K, D)``; SPP-Net: images ``(B, 3, H, W)`` ->
  conv maps) and ``heads`` (pooled ``(K, D)`` -> ``logits``, ``svm_scores``, ``deltas``). The backend is the
  PyTorch detector rebuilt from the metadata with those two modules replaced by the sessions.
- **Metadata** (ONNX ``metadata_props``): ``detect.detector`` (registry name), ``detect.class_names`` and
  ``detect.config`` (JSON), ``detect.preprocessing`` (JSON), ``detect.source_sha256`` (the weights file's
  SHA-256), ``detect.source``, ``detect.kind`` (``faster_rcnn`` or ``region``), ``detect.format_version`` and,
  for quantised files, ``detect.quantization``.
- **int8** (:func:`quantize`): ONNX Runtime's static quantiser, QDQ format, of the convolutions and fully
  connected layers only (never the box arithmetic or NMS): per-channel int8 weights and uint8 asymmetric
  activations (U8S8, the x86 kernels' fast path: signed activations measured 1.8x slower than fp32 on the
  project's AVX512-VNNI CPU, U8S8 on a par with it), calibrated (MinMax) on images of the shapes set. Its mAP
  change is measured by ``benchmarks/runtime.py`` and bounded by :data:`INT8_MAX_MAP_DROP`.
- **Without an ``.onnx`` file**, ``--backend onnxruntime`` exports the weights once into the cache
  (``$XDG_CACHE_HOME/detect/onnx/<detector>-<sha256[:16]>-v<format>.onnx``) and loads that.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from detect import weights as registered_weights
from detect.config import from_dict, to_json
from detect.detectors import DETECTORS, build
from detect.detectors.faster_rcnn import FasterRCNN
from detect.detectors.rcnn import RCNN
from detect.detectors.region import RegionDetector, RegionOutputs
from detect.detectors.sppnet import SPPNet
from detect.errors import ConfigError, WeightsError
from detect.ops import dispatch
from detect.ops.boxes import clip_boxes, min_size_mask
from detect.ops.coder import BoxCoder
from detect.roi_heads import SingleLevelRoIPool, ThreadedRoIPool
from detect.structures import Detections
from detect.transform import RCNNTransform, TransformConfig, as_image_list
from proposals.rpn import MIN_SIZE

__all__ = [
    "BACKENDS",
    "FORMATS",
    "FORMAT_VERSION",
    "INT8_MAX_MAP_DROP",
    "OnnxFasterRCNN",
    "OnnxPart",
    "cached_onnx",
    "export",
    "load_onnx",
    "quantize",
    "read_metadata",
]

FORMATS = ("onnx", "torchscript")
BACKENDS = ("torch", "onnxruntime")
FORMAT_VERSION = 1
OPSET = 17
ONNX_MISSING = "the ONNX backend needs onnxruntime and onnx: pip install 'detect[onnx]'"
INT8_MAX_MAP_DROP = 0.01
"""The stated accuracy cost of :func:`quantize`: VOC mAP@0.5 on the held-out shapes split drops by at most this
(measured on ``faster_rcnn_shapes``: 0.9361 fp32, 0.9367 int8; ``benchmarks/runtime.py`` prints it)."""
_INVALID = -1.0  # the score of a candidate that must never be kept (real scores are probabilities, >= 0)


# --- graph pieces that trace to ONNX and TorchScript ------------------------------------------------------------


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX's ``NonMaxSuppression`` while exporting (see :func:`nms_table`)."""

    @staticmethod
    def forward(ctx: Any, boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
        return _nms_table_torch(boxes, scores, max_out, iou, score)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_out: int, iou: float, score: float) -> Any:
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score], dtype=torch.float32)),
        )


def nms_table(boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
    """ONNX ``NonMaxSuppression``'s contract: ``boxes (B, N, 4)`` xyxy, ``scores (B, C, N)`` -> ``(M, 3)`` int64
    rows ``[b, c, n]`` of the boxes greedy NMS keeps in each ``(b, c)`` (suppress at ``IoU > iou``, candidates need
    ``score > score``), at most ``max_out`` per ``(b, c)``."""
    if torch.onnx.is_in_onnx_export():
        return _NonMaxSuppression.apply(boxes, scores, max_out, iou, score)
    return _nms_table_torch(boxes, scores, max_out, iou, score)


def _nms_table_torch(boxes: Tensor, scores: Tensor, max_out: int, iou: float, score: float) -> Tensor:
    """:func:`nms_table` with torchvision's ``batched_nms`` (what a TorchScript export runs)."""
    classes, count = scores.shape[1], scores.shape[2]
    flat = scores.reshape(-1)  # (B*C*N,) in (b, c, n) order
    candidates = torch.nonzero(flat > score).squeeze(1)  # (K,)
    group = torch.div(candidates, count, rounding_mode="floor")  # (K,) b * C + c
    box = torch.remainder(candidates, count)  # (K,) n
    image = torch.div(group, classes, rounding_mode="floor")
    keep = torchvision.ops.batched_nms(boxes[image, box], flat[candidates], group, iou)  # (P,) by score
    keep = keep[torch.sort(group[keep], stable=True).indices]  # (P,) by group, then score
    kept_group = group[keep]
    rank = torch.arange(kept_group.shape[0]) - torch.searchsorted(kept_group, kept_group)  # (P,) place in its group
    keep = keep[rank < max_out]
    return torch.stack([image[keep], torch.remainder(group[keep], classes), box[keep]], dim=1)  # (M, 3)


def _kept_mask(selected: Tensor, rows: int, columns: int) -> Tensor:
    """``(rows, columns)`` bool, True at ``selected``'s ``[row, _, column]`` triples."""
    flat = selected[:, 0] * columns + selected[:, 2]  # (M,)
    mask = torch.zeros(rows * columns, dtype=torch.float32)
    mask = mask.scatter(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return mask.reshape(rows, columns) > 0


def _dynamic_k(values: Tensor, k: int) -> Tensor:
    """``min(k, values.shape[1])`` as a 0-d int64 tensor, so that a trace keeps it dynamic."""
    available = torch._shape_as_tensor(values)[1:2]  # (1,)
    return torch.min(torch.cat([torch.tensor([k], dtype=torch.int64), available]))


def _decode(coder: BoxCoder, deltas: Tensor, boxes: Tensor) -> Tensor:
    """:meth:`BoxCoder.decode`'s reference arithmetic, step for step, written without ``out=`` views."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = coder.weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=coder.bbox_xform_clip)
    dh = (deltas[..., 3] / wh).clamp(max=coder.bbox_xform_clip)
    pred_x = dx * widths + ctr_x
    pred_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), dim=-1)


class FasterRCNNGraph(nn.Module):
    """A :class:`FasterRCNN`'s inference from the padded batch to detections in original pixels, written in
    traceable ops (see the module docstring). Shares the detector's modules; has no state of its own."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        generator = model.rpn.anchor_generator
        self.cell_anchors = [base.clone() for base in generator.cell_anchors]
        self.anchor_strides = generator.strides
        self.rpn_config = model.rpn.config
        self.rpn_coder = model.rpn.box_coder
        self.head_config = model.roi_heads.config
        self.head_coder = model.roi_heads.box_coder
        pooler = model.roi_heads.box_roi_pool
        self.pooler = pooler.pooler if isinstance(pooler, ThreadedRoIPool) else pooler
        self.levels = self._pool_levels()

    def _pool_levels(self) -> tuple[list[str], list[float], Any]:
        """Feature names, scales and torchvision's level mapper of a multi-scale pooler (``None`` for one level)."""
        if isinstance(self.pooler, SingleLevelRoIPool):
            return None
        from torchvision.ops.poolers import _setup_scales

        side = 256
        with torch.no_grad():
            features = self.backbone(torch.zeros(1, 3, side, side, device=next(self.backbone.parameters()).device))
        maps = [features[name] for name in self.pooler.featmap_names]
        scales, mapper = _setup_scales(maps, [(side, side)], self.pooler.canonical_scale, self.pooler.canonical_level)
        return list(self.pooler.featmap_names), scales, mapper

    def forward(self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(images)
        named = features if isinstance(features, Mapping) else {"0": features}
        maps = list(named.values())
        boxes, valid = self.proposals(images, maps, image_sizes)  # (B, P, 4), (B, P)
        return self.detect(named, boxes, valid, image_sizes, original_sizes)

    def anchors(self, images: Tensor, maps: Sequence[Tensor]) -> list[Tensor]:
        """Each level's ``(H_l * W_l * A_l, 4)`` anchors, as :class:`proposals.anchors.AnchorGenerator` lays them."""
        out = []
        for level, (base, feature) in enumerate(zip(self.cell_anchors, maps)):
            height, width = feature.shape[-2], feature.shape[-1]
            if self.anchor_strides is not None:
                stride_h = stride_w = self.anchor_strides[level]
            else:
                stride_h, stride_w = images.shape[-2] // height, images.shape[-1] // width
            ys = torch.arange(height, dtype=torch.int64) * stride_h  # (H,)
            xs = torch.arange(width, dtype=torch.int64) * stride_w  # (W,)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
            out.append((shifts.to(base.dtype) + base.reshape(1, -1, 4)).reshape(-1, 4))  # (H*W*A, 4)
        return out

    def proposals(self, images: Tensor, maps: Sequence[Tensor], image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """The RPN's proposals, padded: boxes ``(B, P, 4)`` best first and which are real ``(B, P)``."""
        cfg = self.rpn_config
        logits, deltas = self.rpn_head(maps)
        batch = images.shape[0]
        level_boxes, level_scores, level_ids = [], [], []
        for level, (logit, delta, anchors) in enumerate(zip(logits, deltas, self.anchors(images, maps))):
            objectness = logit.permute(0, 2, 3, 1).reshape(batch, -1)  # (B, A, H, W) -> (B, H*W*A)
            delta = delta.permute(0, 2, 3, 1).reshape(batch, -1, 4)  # (B, 4A, H, W) -> (B, H*W*A, 4)
            top = objectness.topk(_dynamic_k(objectness, cfg.pre_nms_top_n_test), dim=1).indices  # (B, k)
            decoded = _decode(
                self.rpn_coder, delta.gather(1, top[:, :, None].expand(-1, -1, 4)), anchors[top]
            )  # (B, k, 4)
            boxes = clip_boxes(decoded, image_sizes)
            scores = torch.sigmoid(objectness.gather(1, top))  # (B, k)
            keep = min_size_mask(boxes, MIN_SIZE) & (scores >= cfg.score_thresh)
            level_boxes.append(boxes)
            level_scores.append(torch.where(keep, scores, torch.full_like(scores, _INVALID)))
            level_ids.append(torch.full_like(top[0], level))
        boxes, scores, levels = torch.cat(level_boxes, 1), torch.cat(level_scores, 1), torch.cat(level_ids)
        num_levels = len(level_ids)
        own_level = levels[None, None, :] == torch.arange(num_levels)[None, :, None]  # (1, L, K)
        table = torch.where(own_level, scores[:, None, :], torch.full_like(scores[:, None, :], _INVALID))  # (B, L, K)
        selected = nms_table(boxes, table, cfg.post_nms_top_n_test, cfg.nms_thresh, _INVALID / 2)
        kept = _kept_mask(selected, batch, scores.shape[1])  # (B, K)
        ranked = torch.where(kept, scores, torch.full_like(scores, _INVALID))
        best, order = ranked.topk(_dynamic_k(ranked, cfg.post_nms_top_n_test), dim=1)  # (B, P)
        return boxes.gather(1, order[:, :, None].expand(-1, -1, 4)), best > _INVALID / 2

    def head(self, named: Mapping[str, Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits ``(K, C)`` and deltas ``(K, C*4)`` of ``rois (K, 5)``, pooled as the detector's pooler does.

        An FPN pooler pools each level's RoIs from its map (torchvision's level rule) and the head runs on them in
        level order; only the small outputs are put back in RoI order (moving the pooled ``(K, 256, 7, 7)``
        features back instead costs more than the head's first layer)."""
        pooler = self.pooler
        if self.levels is None:
            feature = next(iter(named.values()))
            if pooler.method == "pool":
                pooled = torchvision.ops.roi_pool(feature, rois, pooler.output_size, pooler.spatial_scale)
            else:
                pooled = torchvision.ops.roi_align(
                    feature, rois, pooler.output_size, pooler.spatial_scale, pooler.sampling_ratio, aligned=False
                )
            return self.box_predictor(self.box_head(pooled))
        names, scales, mapper = self.levels
        target = mapper([rois[:, 1:]])  # (K,) level of each RoI
        output_size = tuple(pooler.output_size)
        rows, pooled = [], []
        for level, (name, scale) in enumerate(zip(names, scales)):
            members = torch.nonzero(target == level).squeeze(1)  # (K_l,)
            rows.append(members)
            pooled.append(
                torchvision.ops.roi_align(named[name], rois[members], output_size, scale, pooler.sampling_ratio, aligned=False)
            )
        logits, deltas = self.box_predictor(self.box_head(torch.cat(pooled)))  # level order
        order = torch.cat(rows)  # (K,) RoI of each level-ordered row
        back = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0]))  # (K,) row of each RoI
        return logits[back], deltas[back]

    def detect(
        self,
        named: Mapping[str, Tensor],
        boxes: Tensor,
        valid: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The head on the padded proposals ``(B, P, 4)`` -> flat detections in original pixels."""
        cfg = self.head_config
        batch, count = boxes.shape[0], boxes.shape[1]
        image_of = torch.arange(batch)[:, None].expand(batch, count).reshape(-1, 1)  # (B*P, 1)
        rois = torch.cat([image_of.to(boxes.dtype), boxes.reshape(-1, 4)], dim=1)  # (B*P, 5)
        logits, deltas = self.head(named, rois)  # (B*P, C), (B*P, C*4)
        classes = logits.shape[1] - 1
        per_class = deltas[:, 4:].reshape(batch, count, classes, 4)  # (B, P, C-1, 4), no background
        decoded = clip_boxes(_decode(self.head_coder, per_class, boxes[:, :, None, :]), image_sizes)
        scores = F.softmax(logits, dim=-1)[:, 1:].reshape(batch, count, classes)  # (B, P, C-1)
        usable = min_size_mask(decoded, cfg.min_box_size) & valid[:, :, None]
        scores = torch.where(usable, scores, torch.full_like(scores, _INVALID))
        by_class = decoded.permute(0, 2, 1, 3).reshape(batch * classes, count, 4)  # (B*(C-1), P, 4)
        class_scores = scores.permute(0, 2, 1).reshape(batch * classes, 1, count)  # (B*(C-1), 1, P)
        selected = nms_table(by_class, class_scores, cfg.detections_per_img, cfg.nms_thresh, cfg.score_thresh)
        kept = _kept_mask(selected, batch * classes, count).reshape(batch, classes * count)  # (B, (C-1)*P)
        flat_scores = class_scores.reshape(batch, classes * count)
        ranked = torch.where(kept, flat_scores, torch.full_like(flat_scores, _INVALID))
        best, order = ranked.topk(_dynamic_k(ranked, cfg.detections_per_img), dim=1)  # (B, D) class-major index
        label = torch.div(order, count, rounding_mode="floor")  # (B, D) 0-based foreground class
        flat_boxes = by_class.reshape(batch, classes * count, 4)
        chosen = flat_boxes.gather(1, order[:, :, None].expand(-1, -1, 4))  # (B, D, 4)
        ratios = (original_sizes.to(torch.float32) / image_sizes.to(torch.float32))[:, [1, 0, 1, 0]]  # (B, 4)
        chosen = chosen * ratios[:, None, :]
        image, column = torch.nonzero(best > _INVALID / 2, as_tuple=True)  # (N,) each, image-major, best first
        return chosen[image, column], best[image, column], label[image, column] + 1, image


class RegionGraph(nn.Module):
    """A region detector's networks as two independent parts: ``features`` (crops -> pooled for R-CNN, images ->
    conv maps for SPP-Net) and ``heads`` (pooled -> logits, SVM scores, deltas)."""

    def __init__(self, model: RegionDetector) -> None:
        super().__init__()
        if isinstance(model, RCNN):
            self.features = nn.Sequential(model.features, model.pool5, nn.Flatten(1))
        elif isinstance(model, SPPNet):
            self.features = model.backbone
        else:
            raise ConfigError(f"no export for region detector {type(model).__name__}")
        self.heads = model.heads

    def forward(self, inputs: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.features(inputs), *self.heads(pooled))


# --- export ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export` wrote: the file, its format, the detector and the source weights' SHA-256."""

    path: Path
    format: str
    detector: str
    source_sha256: str
    seconds: float


def _source(weights: str | os.PathLike) -> tuple[str, str]:
    """``(name, sha256)`` of the weights: the manifest's for a registered name or listed file, else the file's."""
    try:
        entry = registered_weights.resolve(weights)
        return entry.name, entry.sha256
    except WeightsError:
        if Path(weights).is_file():
            return Path(weights).name, registered_weights.sha256_file(weights)
        raise


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """How the exported graph's inputs are made from RGB images (the ``detect.preprocessing`` metadata)."""
    if isinstance(model, FasterRCNN):
        cfg = model.transform.config
        return {
            "input": "images: float32 (B, 3, H, W), RGB / 255",
            "normalize": {"mean": list(cfg.image_mean), "std": list(cfg.image_std), "order": "before resizing"},
            "resize": {
                "short_side": cfg.min_size[-1],
                "max_long_side": cfg.max_size,
                "rule": "scale = min(short_side / min(h, w), max_long_side / max(h, w)); (int(h * scale), "
                "int(w * scale)) in float64; bilinear, align_corners=False, no antialias",
            },
            "pad": {"size_divisible": cfg.size_divisible, "where": "bottom and right, zeros after normalising"},
            "image_sizes": "int64 (B, 2): resized (h, w)",
            "original_sizes": "int64 (B, 2): (h, w) as given; output boxes are in these pixels",
        }
    cfg = model.config
    return {
        "input": "region networks only: proposals, warping or pyramid pooling, post-processing run in Python",
        "normalize": {"mean": list(cfg.image_mean), "std": list(cfg.image_std)},
    }


def metadata(model: nn.Module, source: str, sha256: str) -> dict[str, str]:
    """The ``metadata_props`` of an export of ``model`` (see the module docstring)."""
    return {
        "detect.format_version": str(FORMAT_VERSION),
        "detect.kind": "faster_rcnn" if isinstance(model, FasterRCNN) else "region",
        "detect.detector": model.name,
        "detect.class_names": json.dumps(list(model.class_names)),
        "detect.config": to_json(_config_of(model)),
        "detect.preprocessing": json.dumps(preprocessing(model)),
        "detect.source": source,
        "detect.source_sha256": sha256,
    }


def _config_of(model: nn.Module) -> Any:
    """The frozen config a detector was built with (Faster R-CNN keeps its parts' configs on its modules)."""
    if isinstance(model, FasterRCNN):
        from detect.detectors.faster_rcnn import FasterRCNNConfig

        return FasterRCNNConfig(model.transform.config, model.rpn.config, model.roi_heads.config)
    return model.config


def _example(model: nn.Module) -> tuple[tuple[Tensor, ...], list[str], list[str], dict[str, dict[int, str]]]:
    """Example inputs, input and output names and dynamic axes of ``model``'s graph."""
    if isinstance(model, FasterRCNN):
        generator = torch.Generator().manual_seed(0)
        image = (torch.rand(300, 400, 3, generator=generator) * 255).to(torch.uint8).numpy()
        (group,) = model.transform.grouped([image, image])
        batch = group.batch
        inputs = (
            batch.tensors,
            torch.tensor(batch.image_sizes, dtype=torch.int64),
            torch.tensor(batch.original_sizes, dtype=torch.int64),
        )
        names = ["images", "image_sizes", "original_sizes"]
        outputs = ["boxes", "scores", "labels", "image_index"]
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"},
                "original_sizes": {0: "batch"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
                "labels": {0: "detections"}, "image_index": {0: "detections"}}
        return inputs, names, outputs, axes
    pooled = torch.zeros(3, model.heads.in_features)
    if isinstance(model, RCNN):
        side = model.config.crop_size
        regions = torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(0))
        axes = {"inputs": {0: "regions"}}
    else:
        regions = torch.rand(2, 3, 160, 224, generator=torch.Generator().manual_seed(0))
        axes = {"inputs": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch", 2: "rows", 3: "columns"}}
    axes.update({name: {0: "regions"} for name in ("pooled", "logits", "svm_scores", "deltas")})
    return (regions, pooled), ["inputs", "pooled"], ["features", "logits", "svm_scores", "deltas"], axes


def graph_of(model: nn.Module) -> nn.Module:
    """The traceable module that an export of ``model`` holds."""
    if isinstance(model, FasterRCNN):
        return FasterRCNNGraph(model).eval()
    if isinstance(model, RegionDetector):
        return RegionGraph(model).eval()
    raise ConfigError(f"no export for {type(model).__name__}")


def export(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    format: str = "onnx",
    *,
    model: nn.Module | None = None,
    int8: bool = False,
    calibration_images: int = 16,
) -> ExportInfo:
    """Export the detector of ``weights`` (registered name or file) to ``out`` as ONNX or TorchScript.

    ``model``: the loaded detector when the caller already has it (it must come from ``weights``). ``int8``
    (ONNX only) quantises the graph after export (:func:`quantize`) with ``calibration_images`` shapes images.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {format!r}")
    if int8 and format != "onnx":
        raise ConfigError("--int8 applies to ONNX exports only")
    start = time.perf_counter()
    source, sha256 = _source(weights)
    model = model if model is not None else registered_weights.load_detector(weights, fold_batchnorm=True)
    model = model.cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = graph_of(model)
    inputs, names, outputs, axes = _example(model)
    with torch.no_grad(), dispatch.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the parity tests are the judge
        if format == "torchscript":
            traced = torch.jit.trace(graph, inputs, check_trace=False)
            extra = {k: v.encode() for k, v in metadata(model, source, sha256).items()}
            torch.jit.save(traced, str(out), _extra_files=extra)
        else:
            _export_onnx(graph, inputs, names, outputs, axes, out, metadata(model, source, sha256))
    if int8:
        quantize(out, out, calibration_images=calibration_images)
    return ExportInfo(out, format, model.name, sha256, time.perf_counter() - start)


def _export_onnx(
    graph: nn.Module,
    inputs: tuple[Tensor, ...],
    names: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
    out: Path,
    props: Mapping[str, str],
) -> None:
    """Trace ``graph`` to ONNX at ``out`` (written atomically) with ``props`` as its metadata."""
    onnx = _require("onnx")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        path = Path(scratch) / "model.onnx"
        torch.onnx.export(
            graph, inputs, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
        proto = onnx.load(str(path))
        _set_metadata(proto, props)
        onnx.save(proto, str(path))
        os.replace(path, out)


def _set_metadata(proto: Any, props: Mapping[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``detect.*`` metadata of an exported ONNX file; :class:`WeightsError` when it has none."""
    onnx = _require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # a truncated or foreign file: onnx raises its own DecodeError types
        raise WeightsError(f"{path}: not a readable ONNX file ({str(err).splitlines()[0][:200]})") from err
    props = {p.key: p.value for p in proto.metadata_props}
    if "detect.detector" not in props:
        raise WeightsError(f"{path}: an ONNX file without detect metadata; export it with `detect export`")
    if int(props.get("detect.format_version", "0")) != FORMAT_VERSION:
        raise WeightsError(f"{path}: export format {props.get('detect.format_version')} is not {FORMAT_VERSION}; "
                           f"export it again with this version of detect")
    return props


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(ONNX_MISSING) from None


# --- int8 ------------------------------------------------------------------------------------------------


def calibration_batches(path: str | os.PathLike, count: int, seed: int = 1234) -> list[dict[str, np.ndarray]]:
    """Graph inputs for ``count`` images of the shapes set (a seed apart from the training and held-out ones)."""
    from detect.data.shapes import ShapesConfig, ShapesDataset

    props = read_metadata(path)
    if props["detect.kind"] != "faster_rcnn":
        raise ConfigError("int8 quantisation is for Faster R-CNN exports (the region detectors' graphs are parts)")
    config = from_dict(type(DETECTORS[props["detect.detector"]].default_config), json.loads(props["detect.config"]))
    transform = RCNNTransform(config.transform).eval()
    dataset = ShapesDataset(ShapesConfig(num_images=count, image_size=160, image_size_max=320, seed=seed))
    feeds = []
    for index in range(count):
        image = dataset[index][0]
        for group in transform.grouped([np.asarray(image)]):
            feeds.append(_feeds(group.batch))
    return feeds


def quantize(source: str | os.PathLike, out: str | os.PathLike, *, calibration_images: int = 16) -> Path:
    """Static int8 quantisation of an exported Faster R-CNN ONNX file (see the module docstring); the metadata is
    kept, with ``detect.quantization`` added. ``out`` may be ``source``."""
    _require("onnxruntime")
    onnx = _require("onnx")
    from onnxruntime import quantization as q

    props = read_metadata(source)
    feeds = calibration_batches(source, calibration_images)

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        target = Path(scratch) / "int8.onnx"
        q.quantize_static(
            str(source), str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"], activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(target))
        _set_metadata(proto, {**props, "detect.quantization": json.dumps(
            {"method": "static QDQ, uint8 activations, per-channel int8 weights, MinMax", "calibration_images": calibration_images,
             "calibration_set": "shapes seed 1234", "ops": ["Conv", "Gemm", "MatMul"]})})
        onnx.save(proto, str(target))
        os.replace(target, out)
    return out


# --- running exported files with ONNX Runtime ------------------------------------------------------------------


def _session(model: bytes | str, device: str | torch.device) -> Any:
    """An ONNX Runtime session on ``device`` (``cpu``, or ``cuda[:N]`` with the CUDA provider) that uses as many
    intra-op threads as torch does (the service's ``torch_threads`` knob sizes both)."""
    ort = _require("onnxruntime")
    device = torch.device(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if device.type == "cpu":
        providers: list[Any] = ["CPUExecutionProvider"]
    elif device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        raise ConfigError(f"onnxruntime cannot use device {str(device)!r} here (providers: "
                          f"{', '.join(ort.get_available_providers())})")
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as err:  # ORT's own exception types: a broken or foreign graph
        raise WeightsError(f"onnxruntime cannot load the model: {str(err).splitlines()[0][:200]}") from err


def _run(session: Any, outputs: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` with ORT's failures as ``RuntimeError`` (what :func:`detect.inference.forward_batch` retries
    image by image, as it does for torch's)."""
    try:
        return session.run(outputs, dict(feeds))
    except Exception as err:
        raise RuntimeError(f"onnxruntime: {str(err).splitlines()[0]}") from err


def _feeds(batch: Any) -> dict[str, np.ndarray]:
    return {
        "images": batch.tensors.numpy(),
        "image_sizes": np.asarray(batch.image_sizes, dtype=np.int64).reshape(-1, 2),
        "original_sizes": np.asarray(batch.original_sizes, dtype=np.int64).reshape(-1, 2),
    }


class OnnxFasterRCNN:
    """An exported Faster R-CNN behind the detector interface: preprocessing and grouping by padded size as
    :class:`FasterRCNN` does (:mod:`detect.transform`), one session call per group."""

    proposal_methods = ("rpn",)

    def __init__(self, session: Any, props: Mapping[str, str]) -> None:
        self.session = session
        self.metadata = dict(props)
        self.name = props["detect.detector"]
        self.class_names = tuple(json.loads(props["detect.class_names"]))
        config = from_dict(type(DETECTORS[self.name].default_config), json.loads(props["detect.config"]))
        self.config = config
        self.transform = RCNNTransform(config.transform).eval()
        self.version = props["detect.source_sha256"][:12]

    def __call__(self, images: Any, targets: Any = None, **kwargs: Any) -> tuple[list[Detections], dict[str, Tensor]]:
        if targets is not None:
            raise ConfigError("the onnxruntime backend runs inference only (no targets, no losses)")
        if kwargs.get("proposals") is not None:
            raise ValueError("Faster R-CNN proposes its own regions (rpn); it takes no proposals")
        groups = self.transform.grouped(as_image_list(images), device="cpu")
        results: list[Detections | None] = [None] * sum(len(g.indices) for g in groups)
        for group in groups:
            boxes, scores, labels, image = (
                torch.from_numpy(np.ascontiguousarray(a)) for a in _run(self.session, None, _feeds(group.batch))
            )
            counts = torch.bincount(image, minlength=len(group.indices)).tolist()
            parts = zip(boxes.split(counts), scores.split(counts), labels.split(counts))
            for index, (b, s, l), size in zip(group.indices, parts, group.batch.original_sizes):
                results[index] = Detections(b, s, l.to(torch.int64), size)
        return results, {}

    forward = __call__
    training = False

    def eval(self) -> "OnnxFasterRCNN":
        """Already inference-only (``nn.Module``'s call, for callers that make sure)."""
        return self

    def train(self, mode: bool = True) -> "OnnxFasterRCNN":
        if mode:
            raise ConfigError("an ONNX Runtime model cannot train; train the PyTorch weights and export again")
        return self


class OnnxPart(nn.Module):
    """One part of a region detector's exported graph run by ONNX Runtime, standing in for the PyTorch module.

    ``heads`` parts return :class:`RegionOutputs` and carry ``in_features`` and ``num_classes`` as
    :class:`detect.detectors.region.RegionHeads` does. A region detector reads its device from its parameters, so
    the part holds one empty parameter on the CPU (the only device its outputs live on)."""

    def __init__(self, session: Any, input_name: str, outputs: Sequence[str], **attributes: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = input_name
        self.outputs = list(outputs)
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        for key, value in attributes.items():
            setattr(self, key, value)

    def forward(self, inputs: Tensor) -> Tensor | RegionOutputs:
        feed = {self.input_name: inputs.detach().to("cpu", torch.float32).contiguous().numpy()}
        results = [torch.from_numpy(a) for a in _run(self.session, self.outputs, feed)]
        return results[0] if len(results) == 1 else RegionOutputs(*results)


def _region_detector(proto: Any, props: Mapping[str, str], device: str | torch.device) -> RegionDetector:
    """The PyTorch region detector of ``props`` with its ``features`` and ``heads`` networks run by sessions of the
    two parts of ``proto``."""
    onnx = _require("onnx")
    from onnx.utils import Extractor

    name = props["detect.detector"]
    config = from_dict(type(DETECTORS[name].default_config), json.loads(props["detect.config"]))
    detector = build(name, json.loads(props["detect.class_names"]), config).eval()
    extractor = Extractor(proto)

    def part(inputs: list[str], outputs: list[str]) -> Any:
        sub = extractor.extract_model(inputs, outputs)
        return _session(sub.SerializeToString(), device)

    features = OnnxPart(part(["inputs"], ["features"]), "inputs", ["features"])
    heads = OnnxPart(
        part(["pooled"], ["logits", "svm_scores", "deltas"]), "pooled", ["logits", "svm_scores", "deltas"],
        in_features=detector.heads.in_features, num_classes=detector.heads.num_classes,
    )
    if isinstance(detector, RCNN):
        detector.features, detector.pool5 = features, nn.Identity()
    else:
        detector.backbone = features
    detector.heads = heads
    detector.metadata = dict(props)
    detector.version = props["detect.source_sha256"][:12]
    del onnx
    return detector


def load_onnx(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The detector of an exported ONNX file, run by ONNX Runtime (see the module docstring)."""
    onnx = _require("onnx")
    _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX file not found: {path}")
    props = read_metadata(path)
    if props["detect.detector"] not in DETECTORS:
        raise WeightsError(f"{path}: unknown detector {props['detect.detector']!r}")
    if props["detect.kind"] == "faster_rcnn":
        return OnnxFasterRCNN(_session(str(path), device), props)
    return _region_detector(onnx.load(str(path)), props, device)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "detect" / "onnx"


def cached_onnx(weights: str | os.PathLike) -> Path:
    """An ONNX export of ``weights`` from the cache, made on first use (keyed by the weights' SHA-256)."""
    _require("onnx")
    detector, sha256 = _builder_and_sha(weights)
    path = cache_dir() / f"{detector}-{sha256[:16]}-v{FORMAT_VERSION}.onnx"
    if not path.is_file():
        export(weights, path, "onnx")
    return path


def _builder_and_sha(weights: str | os.PathLike) -> tuple[str, str]:
    try:
        entry = registered_weights.resolve(weights)
        return entry.architecture["builder"], entry.sha256
    except WeightsError:
        if not Path(weights).is_file():
            raise
        return registered_weights.saved_architecture(weights)[0], registered_weights.sha256_file(weights)
