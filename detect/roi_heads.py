"""The Fast R-CNN head of a two-stage detector: pool each proposal's features, classify it and refine its box.

:class:`RoIHeads` keeps torchvision's module names (``box_roi_pool``, ``box_head.fc6``/``fc7``,
``box_predictor.cls_score``/``bbox_pred``) so a ``fasterrcnn_resnet50_fpn`` state dict loads under ``roi_heads.``.

Decisions:

- Training samples follow torchvision (and so its checkpoints' recipe): the ground-truth boxes are appended to
  each image's proposals; a proposal whose best IoU with a ground-truth box is ``>= fg_iou_thresh`` takes that
  box's class, one below ``bg_iou_thresh`` is background (``[0, 0.5)``: torchvision's choice; Fast R-CNN used
  ``[0.1, 0.5)``), anything between is ignored; no low-quality matches. ``batch_size_per_image`` proposals are
  drawn per image, at most ``positive_fraction`` of them foreground, with the RNG calls of torchvision's
  ``BalancedPositiveNegativeSampler`` (per image, ``randperm`` over positives then negatives), so a seed draws
  the same RoIs. Sampled RoIs keep their index order within each image.
- Matching and sampling are batched over images (proposals and ground truth padded to ``(B, P, 4)`` and
  ``(B, G, 4)``); the only per-image work is the sampler's RNG calls and one host read of the sample counts.
- Losses: cross-entropy over the sampled RoIs, plus smooth-L1 (``beta = 1/9``) between the foreground RoIs'
  class-specific deltas and their targets, summed and divided by the number of sampled RoIs. Deltas are encoded
  with weights ``(10, 10, 5, 5)``.
- Post-processing is ONE :func:`detect.ops.nms.multiclass_nms` call for the whole batch: softmax, drop the
  background column, class-specific decode of the others, then :func:`postprocess_detections`: clip to each image,
  drop boxes with a side below ``min_box_size`` (``1e-2``; their scores become ``-inf``, which no threshold
  passes, as torchvision removes them), per-class NMS keeping scores above ``score_thresh`` and the best
  ``detections_per_img`` per image. The region detectors (R-CNN, SPP-Net) finish the same way with the same
  :class:`PostprocessConfig` fields, so that logic and its settings are written once, here.
- The box pooling of the builders is wrapped in :class:`ThreadedRoIPool`, which spreads torchvision's
  single-core CPU RoI kernels over all intra-op threads (same output, no parameters).
- Thread-count invariance: at inference on the CPU the heads' matrix products (fc6, fc7, the predictors) run on
  one intra-op thread (:func:`detect.ops.threads.one_thread`): MKL's multi-threaded SGEMM splits the reduction
  between threads, so with 1 or 2 threads a region's fc6 output differs in its last bits (issue 21).
- Losses are computed whenever targets are given. In training the detections come from the same forward pass
  over the sampled RoIs (cheap, handy for monitoring); in evaluation with targets the detections come from all
  proposals as usual and the validation losses from a second, sampled pass through the head.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detect.errors import WeightsError
from detect.ops.boxes import batched_box_iou, clip_boxes, min_size_mask
from detect.ops.coder import BoxCoder
from detect.ops.nms import multiclass_nms
from detect.ops.nms_op import nms_table
from detect.ops.pooling import roi_align, roi_pool
from detect.ops.sampling import pad_boxes, sample_balanced
from detect.ops.threads import one_thread
from detect.structures import Detections

Features = Mapping[str, Tensor] | Tensor


@dataclass(frozen=True)
class PostprocessConfig:
    """From class-specific boxes and scores to detections (:func:`postprocess_detections`): boxes with a side below
    ``min_box_size`` pixels are dropped, candidates need a score above ``score_thresh``, per-class NMS suppresses
    at IoU ``nms_thresh``, and at most ``detections_per_img`` remain per image. Defaults: torchvision's
    ``fasterrcnn_resnet50_fpn``."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_box_size: float = 1e-2


@dataclass(frozen=True)
class RoIHeadsConfig(PostprocessConfig):
    """Training and inference settings of the box head; defaults are torchvision's ``fasterrcnn_resnet50_fpn``.
    The post-processing fields are :class:`PostprocessConfig`'s, inherited so that they stay flat (as in
    torchvision's arguments and the weights manifests)."""

    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)


def postprocess_detections(
    boxes: Tensor,
    scores: Tensor,
    counts: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    config: PostprocessConfig,
    score_thresh: float | None = None,
) -> list[Detections]:
    """Per-image detections from the class-specific boxes ``(K, C, 4)`` and scores ``(K, C)`` (foreground
    classes only, label ``c`` is column ``c - 1``) of ``K = sum(counts)`` regions, image-major: clip each box to
    its image's ``(h, w)``, drop the too small, then one :func:`detect.ops.nms.multiclass_nms` call for the batch.
    ``score_thresh`` replaces ``config.score_thresh`` for scores on another scale (SVM margins)."""
    sizes = torch.as_tensor(image_sizes, device=boxes.device)  # (B, 2)
    per_box = sizes.repeat_interleave(torch.tensor(counts, device=boxes.device), dim=0, output_size=len(boxes))
    boxes = clip_boxes(boxes.float(), per_box)  # (K, C, 4), each row clipped to its image's (K, 2) size
    scores = scores.float().masked_fill(~min_size_mask(boxes, config.min_box_size), float("-inf"))  # too small
    results = multiclass_nms(
        list(boxes.split(counts)),
        list(scores.split(counts)),
        iou_threshold=config.nms_thresh,
        score_threshold=config.score_thresh if score_thresh is None else score_thresh,
        max_per_image=config.detections_per_img,
    )
    return [
        Detections(r.boxes, r.scores, r.labels + 1, (int(h), int(w))) for r, (h, w) in zip(results, image_sizes)
    ]


class SingleLevelRoIPool(nn.Module):
    """RoI max pooling (Fast R-CNN) or RoI Align over one feature map, with ``MultiScaleRoIAlign``'s call
    signature ``(features, proposals, image_sizes)``. ``spatial_scale`` is ``1 / stride`` of the map."""

    def __init__(self, output_size: int, spatial_scale: float, method: str = "pool", sampling_ratio: int = 2) -> None:
        super().__init__()
        if method not in ("pool", "align"):
            raise ValueError(f"method must be 'pool' or 'align', got {method!r}")
        self.output_size = (output_size, output_size)
        self.spatial_scale = spatial_scale
        self.method = method
        self.sampling_ratio = sampling_ratio

    def forward(
        self, features: Features, proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """``(B, C, H, W)`` map (or a one-entry mapping) and per-image ``(P_i, 4)`` boxes -> ``(sum P_i, C, s, s)``."""
        feature = features if isinstance(features, Tensor) else next(iter(features.values()))
        if self.method == "pool":
            return roi_pool(feature, proposals, self.output_size, self.spatial_scale)
        return roi_align(feature, proposals, self.output_size, self.spatial_scale, self.sampling_ratio)


class ThreadedRoIPool(nn.Module):
    """Run an RoI pooler (``MultiScaleRoIAlign``, :class:`SingleLevelRoIPool`) over contiguous chunks of the RoIs
    in parallel threads, on the CPU.

    torchvision's CPU RoI Align and RoI Pool kernels loop over the RoIs on one core, so with ``N`` intra-op threads
    they leave ``N - 1`` cores idle while the rest of the detector uses them all (on 2 cores the box pooling is
    about a third of a Faster R-CNN forward). The kernels release the GIL, so ``torch.get_num_threads()`` Python
    threads, each pooling ``1/N`` of the RoIs (at least ``min_rois_per_thread``), run side by side. The output is
    the same tensor as one call's (each RoI is pooled independently); gradients flow as usual. On other devices,
    or for few RoIs, the pooler runs as is. The wrapper has no parameters, so state dicts are unchanged.
    """

    def __init__(self, pooler: nn.Module, min_rois_per_thread: int = 128) -> None:
        super().__init__()
        self.pooler = pooler
        self.min_rois_per_thread = min_rois_per_thread

    @property
    def output_size(self) -> tuple[int, int]:
        return tuple(self.pooler.output_size)

    def forward(
        self, features: Features, proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """Same inputs and output as the wrapped pooler: ``(sum P_i, C, s, s)``, image-major."""
        if isinstance(proposals, Tensor) or torch.compiler.is_compiling():  # (K, 5) RoIs, or a graph being traced
            return self.pooler(features, proposals, image_sizes)
        first = features if isinstance(features, Tensor) else next(iter(features.values()))
        total = sum(len(p) for p in proposals)
        workers = min(torch.get_num_threads(), total // max(self.min_rois_per_thread, 1))
        if first.device.type != "cpu" or workers < 2:
            return self.pooler(features, proposals, image_sizes)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def pool(chunk: list[Tensor]) -> Tensor:  # worker threads start with default grad modes: copy ours
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return self.pooler(features, chunk, image_sizes)

        chunks = _contiguous_chunks(proposals, workers)
        return torch.cat(list(_pool_executor().map(pool, chunks)))  # chunk order is image-major order


def pool_rois(pooler: nn.Module, features: Features, rois: Tensor, image_sizes: Tensor) -> Tensor:
    """``(K, C, s, s)`` features of ``(K, 5)`` RoIs ``[image, x1, y1, x2, y2]`` from a detector's box pooler (a
    :class:`SingleLevelRoIPool` or torchvision's ``MultiScaleRoIAlign``, maybe in a :class:`ThreadedRoIPool`),
    for callers without per-image box lists (the exportable inference path). A multi-scale pooler learns its
    scales on its first eager call, as torchvision's does, from the images' ``(B, 2)`` sizes; each level's RoIs
    are pooled by torchvision's level rule."""
    pooler = pooler.pooler if isinstance(pooler, ThreadedRoIPool) else pooler
    if isinstance(pooler, SingleLevelRoIPool):
        return pooler(features, rois, [])
    if getattr(pooler, "scales", None) is None:
        if torch.compiler.is_compiling():
            raise ValueError("a multi-scale RoI pooler learns its scales on its first call: run the detector once")
        from torchvision.ops.poolers import _setup_scales

        shapes = [tuple(int(v) for v in image_sizes.max(dim=0).values)]
        maps = [features[name] for name in pooler.featmap_names]
        pooler.scales, pooler.map_levels = _setup_scales(maps, shapes, pooler.canonical_scale, pooler.canonical_level)
    maps = [features[name] for name in pooler.featmap_names]
    level = pooler.map_levels([rois[:, 1:]])  # (K,) level of each RoI
    members, parts = [], []
    for index, (feature, scale) in enumerate(zip(maps, pooler.scales)):
        members.append(torch.nonzero(level == index).squeeze(1))  # (K_l,)
        parts.append(roi_align(feature, rois[members[-1]], pooler.output_size, scale, pooler.sampling_ratio))
    # the levels' rows in RoI order: one gather of the concatenated parts (in ONNX a Concat and a Gather, where
    # writing each level into a zero tensor was a ConstantOfShape and four ScatterND, each copying the whole
    # (K, C, s, s) tensor: 42 of 570 ms of the R50-FPN's ONNX Runtime forward)
    order = torch.cat(members)  # (K,): which RoI each row of the concatenation is
    position = torch.zeros_like(level).scatter(0, order, torch.arange(order.shape[0], device=order.device))
    return torch.cat(parts).index_select(0, position)


def _contiguous_chunks(proposals: Sequence[Tensor], parts: int) -> list[list[Tensor]]:
    """Cut the image-major concatenation of per-image boxes into ``parts`` contiguous, nearly equal ranges, each
    as a per-image list (images outside a range contribute empty tensors)."""
    counts = [len(p) for p in proposals]
    bounds = [round(j * sum(counts) / parts) for j in range(parts + 1)]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [
        [p[max(lo - s, 0) : max(min(hi - s, len(p)), 0)] for p, s in zip(proposals, starts)]
        for lo, hi in zip(bounds, bounds[1:])
    ]


_EXECUTOR: list[ThreadPoolExecutor] = []


def _pool_executor() -> ThreadPoolExecutor:
    """One process-wide pool of worker threads for :class:`ThreadedRoIPool`, created on first use."""
    if not _EXECUTOR:
        _EXECUTOR.append(ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="roi-pool"))
    return _EXECUTOR[0]


class TwoMLPHead(nn.Module):
    """Flatten the pooled features and apply fc6 and fc7, each with a ReLU (and dropout in training when
    ``dropout > 0``, as VGG16's fc layers were trained)."""

    def __init__(self, in_features: int, representation_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)  # (K, C, s, s) -> (K, C*s*s)
        x = F.dropout(F.relu(self.fc6(x)), self.dropout, self.training)
        return F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)


class LowRankLinear(nn.Module):
    """A linear layer ``W x + b`` stored as its rank-``t`` factors: ``up(down(x))`` with ``down`` ``(t, in)`` without
    bias and ``up`` ``(out, t)`` with the layer's bias (Fast R-CNN's truncated SVD, section 3.1: ``W ~ U_t S_t V_t^T``,
    ``down = S_t V_t^T``, ``up = U_t``). It costs ``t (in + out)`` multiply-adds per row instead of ``in x out``.
    :meth:`from_linear` computes the factors; a freshly built one (what a weights file's state dict is loaded
    into) has nn.Linear's random initialisation."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def weight(self) -> Tensor:
        """The dense ``(out, in)`` product ``up.weight @ down.weight`` (a new tensor)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor:
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (K, in) -> (K, t) -> (K, out)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, rank: int) -> "LowRankLinear":
        """The best rank-``rank`` approximation of ``linear`` (an ``nn.Linear`` or a :class:`LowRankLinear`): by the
        Eckart-Young theorem ``|W x - W_t x| <= s_{t+1} |x|`` for every ``x``, ``s_{t+1}`` the largest discarded
        singular value. The SVD runs in float64 on ``linear``'s device; the factors take its dtype."""
        weight = linear.weight.detach()
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)  # (out, r), (r,), (r, in)
        layer = cls(weight.shape[1], weight.shape[0], rank).to(device=weight.device, dtype=weight.dtype)
        layer.down.weight.copy_(s[:rank, None] * vh[:rank])
        layer.up.weight.copy_(u[:, :rank])
        if linear.bias is None:
            layer.up.bias.zero_()
        else:
            layer.up.bias.copy_(linear.bias)
        return layer


def factorise_fc67(head: TwoMLPHead, fc6_rank: int | None, fc7_rank: int | None, *, compute: bool = True) -> None:
    """Replace ``head``'s fc6 and/or fc7 (``None``: leave it) by :class:`LowRankLinear` layers of the given ranks:
    their truncated SVDs when ``compute``, else freshly initialised factors of the right shapes (for a state dict
    to be loaded into, as when rebuilding a compressed model from its weights file)."""
    for name, rank in (("fc6", fc6_rank), ("fc7", fc7_rank)):
        if rank is None:
            continue
        layer = getattr(head, name)
        if compute:
            setattr(head, name, LowRankLinear.from_linear(layer, rank))
        else:
            setattr(head, name, LowRankLinear(layer.in_features, layer.out_features, rank))


def load_fc67(head: TwoMLPHead, imagenet: Mapping[str, Tensor], indices: tuple[int, int], source: str | Path) -> None:
    """Initialise ``head``'s fc6 and fc7 from an ImageNet classifier checkpoint's ``classifier.{indices[0]}`` and
    ``classifier.{indices[1]}`` (torchvision's VGG16: 0 and 3, AlexNet: 1 and 4), as R-CNN and Fast R-CNN did.
    Raises :class:`WeightsError` naming ``source`` when a layer is missing or has another shape."""
    keys = {f"{fc}.{p}": f"classifier.{i}.{p}" for fc, i in zip(("fc6", "fc7"), indices) for p in ("weight", "bias")}
    ours = head.state_dict()
    if not all(theirs in imagenet and imagenet[theirs].shape == ours[key].shape for key, theirs in keys.items()):
        raise WeightsError(f"{source} lacks fc6/fc7 ({', '.join(keys.values())}) of the head's shapes")
    head.load_state_dict({key: imagenet[theirs] for key, theirs in keys.items()})


class FastRCNNPredictor(nn.Module):
    """Class logits ``(K, C)`` and class-specific box deltas ``(K, C*4)`` (C includes background). Initialised
    as in Fast R-CNN: N(0, 0.01) for the classifier, N(0, 0.001) for the regressor, zero biases."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


@dataclass
class RoISample:
    """The RoIs drawn for training, image-major: per-image boxes, and over all of them the class labels
    ``(S,)`` (0 background) and the regression targets ``(S, 4)`` (meaningful where the label is positive)."""

    proposals: list[Tensor]
    labels: Tensor
    regression_targets: Tensor


class RoIHeads(nn.Module):
    """Pool, classify and regress the proposals; sample and compute losses when targets are given.

    ``forward(features, proposals, image_sizes, targets=None)`` returns ``(detections, losses)``: one
    :class:`Detections` per image in the coordinates of the resized image (``image_size`` the resized size,
    labels 1-based), and ``{"loss_classifier", "loss_box_reg"}`` when targets are given.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        config: RoIHeadsConfig = RoIHeadsConfig(),
    ) -> None:
        super().__init__()
        if config.bg_iou_thresh > config.fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh {config.bg_iou_thresh} is above fg_iou_thresh {config.fg_iou_thresh}")
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.config = config
        self.box_coder = BoxCoder(weights=config.bbox_reg_weights)

    def forward(
        self,
        features: Features,
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        losses: dict[str, Tensor] = {}
        if targets is not None:
            sample = self.sample_proposals(proposals, targets)
            logits, deltas = self.predict(features, sample.proposals, image_sizes)
            losses = self.loss(logits, deltas, sample)
            if self.training:
                return self.postprocess(logits.detach(), deltas.detach(), sample.proposals, image_sizes), losses
        logits, deltas = self.predict(features, proposals, image_sizes)
        return self.postprocess(logits, deltas, proposals, image_sizes), losses

    def predict(
        self, features: Features, proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Class logits ``(K, C)`` and box deltas ``(K, C*4)`` for the ``K = sum P_i`` proposals, image-major."""
        pooled = self.box_roi_pool(features, list(proposals), list(image_sizes))  # (K, C_feat, s, s)
        with one_thread(pooled, not self.training):  # thread-count-free products (detect.ops.threads)
            return self.box_predictor(self.box_head(pooled))

    def padded_detections(
        self, features: Features, proposals: Tensor, valid: Tensor, image_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inference on padded proposals ``(B, P, 4)`` (``valid (B, P)`` marks the real ones), the form
        ``torch.export`` captures (see :mod:`detect.export`): boxes ``(B, D, 4)`` in resized pixels, scores ``(B, D)``,
        1-based labels ``(B, D)`` and which are detections ``(B, D)``, each image's best first. The same
        post-processing as :meth:`postprocess`, with the per-class NMS as one ``detect::nms_table`` call over
        ``(image, class)`` pairs and the per-image cap as one top-k."""
        cfg = self.config
        batch, count = proposals.shape[0], proposals.shape[1]
        flat = proposals.reshape(-1, 4)  # (B*P, 4)
        image_of = torch.arange(batch, device=flat.device, dtype=flat.dtype)[:, None].expand(batch, count)
        rois = torch.cat([image_of.reshape(-1, 1), flat], dim=1)  # (B*P, 5)
        pooled = pool_rois(self.box_roi_pool, features, rois, image_sizes)  # (B*P, C_feat, s, s)
        with one_thread(pooled, not self.training):  # as forward's (detect.ops.threads); a no-op while exporting
            logits, deltas = self.box_predictor(self.box_head(pooled))
        classes = logits.shape[1] - 1
        boxes = self.box_coder.decode_per_class(deltas[:, 4:], flat).reshape(batch, count, classes, 4)  # no bg
        boxes = clip_boxes(boxes, image_sizes)  # (B, P, C-1, 4)
        scores = F.softmax(logits, dim=-1)[:, 1:].reshape(batch, count, classes)  # (B, P, C-1)
        usable = min_size_mask(boxes, cfg.min_box_size) & valid[:, :, None]
        scores = scores.masked_fill(~usable, -1.0)  # never passes the score threshold
        by_class = boxes.permute(0, 2, 1, 3).reshape(batch * classes, count, 4)  # (B*(C-1), P, 4)
        class_scores = scores.permute(0, 2, 1).reshape(batch * classes, 1, count)  # (B*(C-1), 1, P)
        selected = nms_table(by_class, class_scores, cfg.detections_per_img, cfg.nms_thresh, cfg.score_thresh)
        flat_scores = class_scores.reshape(batch, classes * count)  # (B, (C-1)*P) class-major
        image, column = torch.div(selected[:, 0], classes, rounding_mode="floor"), selected[:, 0] % classes * count
        column = column + selected[:, 2]  # (M,) class-major column of each kept (image, class, proposal)
        ranked = torch.full_like(flat_scores, -1.0).index_put((image, column), flat_scores[image, column])
        best, order = ranked.topk(torch.sym_min(cfg.detections_per_img, ranked.shape[1]), dim=1)  # (B, D)
        chosen = by_class.reshape(batch, classes * count, 4).gather(1, order[:, :, None].expand(-1, -1, 4))
        return chosen, best, torch.div(order, count, rounding_mode="floor") + 1, best > -0.5

    def match(
        self, proposals: Tensor, valid: Tensor, targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """Class label ``(B, P)`` (-1 ignored or padding, 0 background) and matched ground-truth box
        ``(B, P, 4)`` of every padded proposal ``(B, P, 4)`` (``valid`` marks the real ones)."""
        gt, gt_valid = pad_boxes([t["boxes"].to(proposals.dtype) for t in targets], proposals)  # (B, G, 4), (B, G)
        gt_labels = proposals.new_zeros(gt_valid.shape, dtype=torch.int64)  # (B, G)
        for i, target in enumerate(targets):  # B small copies
            gt_labels[i, : len(target["labels"])] = target["labels"]
        iou = batched_box_iou(gt, proposals).masked_fill(~gt_valid[:, :, None], -1.0)  # (B, G, P)
        best_iou, best_gt = iou.max(dim=1)  # (B, P)
        labels = gt_labels.gather(1, best_gt)  # (B, P)
        labels = labels.masked_fill(best_iou < self.config.fg_iou_thresh, -1)
        labels = labels.masked_fill(best_iou < self.config.bg_iou_thresh, 0).masked_fill(~valid, -1)
        matched = gt.gather(1, best_gt[:, :, None].expand(*best_gt.shape, 4))  # (B, P, 4)
        return labels, matched

    def sample_proposals(self, proposals: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> RoISample:
        """Append the ground truth to the proposals, match, and draw each image's training RoIs."""
        with_gt = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]  # (P_i + G_i, 4)
        padded, valid = pad_boxes(with_gt, with_gt[0])  # (B, P, 4), (B, P)
        labels, matched = self.match(padded, valid, targets)  # (B, P), (B, P, 4)
        ternary = torch.where(labels > 0, 1, labels)  # the sampler's 1 / 0 / -1
        positive, negative = sample_balanced(ternary, self.config.batch_size_per_image, self.config.positive_fraction)
        sampled = positive | negative  # (B, P)
        counts = sampled.sum(dim=1).tolist()  # one host read
        rois = padded[sampled]  # (S, 4) image-major, index order within each image
        regression = self.box_coder.encode(matched[sampled], rois)  # (S, 4)
        return RoISample(list(rois.split(counts)), labels[sampled], regression)

    def loss(self, logits: Tensor, deltas: Tensor, sample: RoISample) -> dict[str, Tensor]:
        """Cross-entropy over the sampled RoIs and smooth-L1 over the foreground ones' class-specific deltas."""
        labels = sample.labels  # (S,)
        foreground = torch.nonzero(labels > 0).squeeze(1)  # (F,)
        class_deltas = deltas.reshape(deltas.shape[0], -1, 4)[foreground, labels[foreground]]  # (S, C*4) -> (F, 4)
        box_loss = F.smooth_l1_loss(
            class_deltas, sample.regression_targets[foreground], beta=1 / 9, reduction="sum"
        ) / labels.numel()
        return {"loss_classifier": F.cross_entropy(logits, labels), "loss_box_reg": box_loss}

    def postprocess(
        self, logits: Tensor, deltas: Tensor, proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[Detections]:
        """Per-class boxes and scores of every proposal -> detections per image, one NMS call for the batch."""
        boxes = self.box_coder.decode_per_class(deltas[:, 4:], torch.cat(list(proposals)))  # (K, C-1, 4), no bg
        scores = F.softmax(logits, dim=-1)[:, 1:]  # (K, C) -> (K, C-1) without background
        return postprocess_detections(boxes, scores, [len(p) for p in proposals], image_sizes, self.config)
