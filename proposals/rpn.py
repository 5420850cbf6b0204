"""Region Proposal Network (Ren et al. 2015): a small conv head that scores and refines anchors into proposals.

Decisions:

- Module and parameter names are torchvision's (``anchor_generator``, ``head.conv.0.0.weight``, ``head.cls_logits``,
  ``head.bbox_pred``), so an RPN state dict from torchvision, or a whole ``fasterrcnn_resnet50_fpn`` one under
  ``rpn.``, loads unchanged; the head's old flat ``conv.weight``/``conv.bias`` keys are renamed on load.
- Numbers follow torchvision so that its checkpoints give the same proposals and a seed gives the same losses:
  per-level pre-NMS top-k on the logits, sigmoid scores, clipping to each image's own size, boxes with a side
  below :data:`MIN_SIZE` and scores below ``score_thresh`` dropped, NMS per feature level, post-NMS top-k. Anchors
  crossing the image border are kept during training (the paper ignores them; torchvision and its checkpoints
  do not).
- The proposal layer is batched: top-k over ``(B, A_l)`` per level, one decode, masks instead of per-image
  filtering, and one grouped NMS call for the whole batch. Only the top-k candidates are decoded.
- Matching is batched over images with the ground truth padded to ``(B, G, 4)``. One departure from torchvision:
  a ground-truth box that overlaps no anchor at all (IoU 0 everywhere: degenerate, or outside the image) gets no
  low-quality match; torchvision would turn every anchor it ties with at IoU 0 into a positive.
- Sampling is :func:`detect.ops.sampling.sample_balanced`, which calls ``torch.randperm`` exactly as
  torchvision's ``BalancedPositiveNegativeSampler`` does, so the same seed draws the same anchors.
- Losses are computed whenever targets are given, in training or evaluation mode (validation loss), as the
  detectors' ``(detections, losses)`` convention asks; ``training`` only picks the top-k sizes.
- Settings are one frozen :class:`RPNConfig`, the project's config convention, nested in a detector's config:
  its fields and defaults are torchvision's ``FasterRCNN(rpn_*=...)`` arguments without the prefix. The minimum
  proposal side, :data:`MIN_SIZE`, is torchvision's fixed 1e-3 and not a setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation

from detect.ops.boxes import batched_box_iou, min_size_mask
from detect.ops.coder import BoxCoder
from detect.ops.nms import grouped_nms
from detect.ops.nms_op import nms_table
from detect.ops.sampling import pad_boxes, sample_balanced
from detect.ops.threads import one_thread
from proposals.anchors import AnchorGenerator, ImageBatch

MIN_SIZE = 1e-3  # proposals with a side below this many pixels are dropped (torchvision's value)


@dataclass(frozen=True)
class RPNConfig:
    """Region Proposal Network settings; defaults are torchvision's ``fasterrcnn_resnet50_fpn``. An anchor is
    positive at IoU ``>= fg_iou_thresh`` with a ground-truth box (or as its best anchor), negative below
    ``bg_iou_thresh``; ``batch_size_per_image`` anchors are sampled per image, at most ``positive_fraction``
    positive. The proposal layer keeps the ``pre_nms_top_n_*`` best logits per level, drops scores below
    ``score_thresh``, suppresses at IoU ``nms_thresh`` and keeps ``post_nms_top_n_*`` per image (``_train`` in
    training mode, ``_test`` otherwise)."""

    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0

    def __post_init__(self) -> None:
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh {self.bg_iou_thresh} is above fg_iou_thresh {self.fg_iou_thresh}")


class RPNHead(nn.Module):
    """A 3x3 conv (``conv_depth`` of them) + ReLU shared by all levels, then 1x1 convs for one objectness logit
    and four box deltas per anchor. Weights start as N(0, 0.01), biases at 0, as in the paper.
    """

    _version = 2  # version 1 stored the single conv flat as ``conv.weight``; see _load_from_state_dict

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *(Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=None) for _ in range(conv_depth))
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Rename the flat keys of old checkpoints (``conv.weight``) to ``conv.0.0.weight``.

        The rename keys on the old name being present rather than on the stored version, because safetensors
        files carry no per-module version metadata.
        """
        for name in ("weight", "bias"):
            old, new = f"{prefix}conv.{name}", f"{prefix}conv.0.0.{name}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: logits ``(B, A, H, W)`` and deltas ``(B, A*4, H, W)``."""
        logits, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            with one_thread(hidden, not self.training):  # 1x1 conv kernel follows threads (detect.ops.threads)
                logits.append(self.cls_logits(hidden))
                deltas.append(self.bbox_pred(hidden))
        return logits, deltas


def flatten_predictions(logits: Sequence[Tensor], deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
    """Head outputs in anchor order: objectness ``(B, N)``, deltas ``(B, N, 4)``, and anchors per level.

    Index order per level is (row, column, anchor), matching ``AnchorGenerator``; channel ``a*4 + k`` of the
    deltas is coordinate ``k`` of anchor ``a``.
    """
    batch = logits[0].shape[0]
    objectness = [level.permute(0, 2, 3, 1).reshape(batch, -1) for level in logits]  # (B, A, H, W) -> (B, H*W*A)
    box_deltas = [level.permute(0, 2, 3, 1).reshape(batch, -1, 4) for level in deltas]  # (B, 4A, H, W) -> (B, H*W*A, 4)
    return torch.cat(objectness, dim=1), torch.cat(box_deltas, dim=1), [o.shape[1] for o in objectness]


def match_anchors(
    anchors: Tensor, gt_boxes: Sequence[Tensor], fg_iou_thresh: float, bg_iou_thresh: float
) -> tuple[Tensor, Tensor]:
    """Label every anchor of every image: 1 positive, 0 negative, -1 ignored; and its best ground-truth box.

    ``anchors (N, 4)`` are shared by the batch; ``gt_boxes`` is one ``(G_i, 4)`` per image (``G_i`` may be 0).
    An anchor is positive when its best IoU is ``>= fg_iou_thresh`` or when it is, for some ground truth, among
    the anchors of highest IoU with that box (ties included, IoU > 0); negative when its best IoU is
    ``< bg_iou_thresh``; ignored in between. Returns labels ``(B, N)`` in ``anchors``' dtype and matched boxes
    ``(B, N, 4)`` (the argmax ground truth; meaningful for positives only).
    """
    gt, valid = pad_boxes(gt_boxes, anchors)  # (B, G, 4), (B, G)
    batch, num_anchors = gt.shape[0], anchors.shape[0]
    iou = batched_box_iou(gt, anchors.expand(batch, num_anchors, 4))  # (B, G, N)
    iou = iou.masked_fill(~valid[:, :, None], -1.0)  # padding never matches
    best_iou, best_gt = iou.max(dim=1)  # (B, N)
    gt_best = iou.max(dim=2, keepdim=True).values  # (B, G, 1)
    low_quality = ((iou == gt_best) & (gt_best > 0)).any(dim=1)  # (B, N)
    positive = (best_iou >= fg_iou_thresh) | low_quality
    labels = torch.where(best_iou < bg_iou_thresh, 0.0, -1.0).to(anchors.dtype)  # (B, N)
    labels = labels.masked_fill(positive, 1.0)
    matched = gt.gather(1, best_gt[:, :, None].expand(batch, num_anchors, 4))  # (B, N, 4)
    return labels, matched


class RegionProposalNetwork(nn.Module):
    """Anchors + head -> proposals per image, and the RPN losses when ground truth is given.

    ``forward(images, features, targets=None)``:

    - ``images``: an ``ImageBatch`` (``.tensors (B, C, H, W)`` padded, ``.image_sizes`` ``[(h, w)]`` unpadded);
    - ``features``: the feature maps, a mapping (e.g. an FPN's ``OrderedDict``), a sequence, or one tensor;
    - ``targets``: optional, one dict per image with ``"boxes" (G_i, 4)`` xyxy (``G_i`` may be 0).

    Returns ``(proposals, losses)``: ``proposals`` one detached ``(P_i, 4)`` tensor per image, sorted by
    objectness; ``losses`` ``{"loss_objectness", "loss_rpn_box_reg"}`` when targets are given, else empty.
    Settings (thresholds, sampling, top-k sizes) are ``config``, an :class:`RPNConfig`.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, config: RPNConfig = RPNConfig()) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.config = config
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16))

    def pre_nms_top_n(self) -> int:
        return self.config.pre_nms_top_n_train if self.training else self.config.pre_nms_top_n_test

    def post_nms_top_n(self) -> int:
        return self.config.post_nms_top_n_train if self.training else self.config.post_nms_top_n_test

    def forward(
        self,
        images: ImageBatch,
        features: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        if isinstance(features, Tensor):
            features = [features]
        elif isinstance(features, Mapping):
            features = list(features.values())
        level_logits, level_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)  # (N, 4)
        objectness, deltas, num_per_level = flatten_predictions(level_logits, level_deltas)  # (B, N), (B, N, 4)
        image_sizes = torch.as_tensor(images.image_sizes, device=anchors.device)  # (B, 2)
        proposals, _ = self.filter_proposals(anchors, objectness.detach(), deltas.detach(), image_sizes, num_per_level)
        losses = {}
        if targets is not None:
            losses = self.compute_loss(anchors, objectness, deltas, [t["boxes"] for t in targets])
        return proposals, losses

    def top_per_level(self, objectness: Tensor, num_per_level: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Indices ``(B, K)`` of each image's ``pre_nms_top_n`` best logits per level, and each column's level
        ``(K,)``."""
        indices, levels, offset = [], [], 0
        for level, level_scores in enumerate(objectness.split(list(num_per_level), dim=1)):  # (B, A_l)
            top = level_scores.topk(torch.sym_min(self.pre_nms_top_n(), level_scores.shape[1]), dim=1).indices
            indices.append(top + offset)
            levels.append(torch.full((top.shape[1],), level, dtype=torch.int64, device=top.device))
            offset += level_scores.shape[1]
        return torch.cat(indices, dim=1), torch.cat(levels)

    def candidates(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, image_sizes: Tensor, num_per_level: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The proposal layer before NMS: each level's top-k decoded and clipped boxes ``(B, K, 4)``, their
        sigmoid scores ``(B, K)``, which may be kept ``(B, K)`` (big enough, confident) and each column's level."""
        top, levels = self.top_per_level(objectness, num_per_level)  # (B, K), (K,)
        rows = torch.arange(objectness.shape[0], device=top.device)[:, None]  # (B, 1)
        boxes = self.box_coder.decode(deltas[rows, top], anchors[top], clip_to=image_sizes)  # (B, K, 4), clipped
        scores = torch.sigmoid(objectness[rows, top])  # (B, K)
        keep = min_size_mask(boxes, MIN_SIZE) & (scores >= self.config.score_thresh)  # (B, K) big enough, confident
        return boxes, scores, keep, levels

    def padded_proposals(
        self, images: ImageBatch, features: Sequence[Tensor], image_sizes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Inference proposals as padded tensors, the form ``torch.export`` captures (no per-image lists, no host
        reads; see :mod:`detect.export`): boxes ``(B, P, 4)``, each image's best first, and which are real
        ``(B, P)``. The same proposals as :meth:`forward`'s; the per-level NMS is one ``detect::nms_table`` call
        whose classes are the levels (a candidate scores -1 outside its own level and where it may not be kept)."""
        level_logits, level_deltas = self.head(list(features))
        anchors = self.anchor_generator(images, list(features))  # (N, 4)
        objectness, deltas, num_per_level = flatten_predictions(level_logits, level_deltas)  # (B, N), (B, N, 4)
        boxes, scores, keep, levels = self.candidates(anchors, objectness, deltas, image_sizes, num_per_level)
        scores = scores.masked_fill(~keep, -1.0)  # (B, K)
        own_level = levels[None, :] == torch.arange(len(num_per_level), device=levels.device)[:, None]  # (L, K)
        table = scores[:, None, :].masked_fill(~own_level[None], -1.0)  # (B, L, K)
        cap = self.post_nms_top_n()
        selected = nms_table(boxes, table, cap, self.config.nms_thresh, -0.5)  # (M, 3) [b, level, k]
        image, column = selected[:, 0], selected[:, 2]  # (M,) each
        ranked = torch.full_like(scores, -1.0).index_put((image, column), scores[image, column])  # (B, K) kept only
        best, order = ranked.topk(torch.sym_min(cap, ranked.shape[1]), dim=1)  # (B, P) best first
        return boxes.gather(1, order[:, :, None].expand(-1, -1, 4)), best > -0.5

    def filter_proposals(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, image_sizes: Tensor, num_per_level: Sequence[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The proposal layer: ``anchors (N, 4)``, ``objectness (B, N)`` logits, ``deltas (B, N, 4)``,
        ``image_sizes (B, 2)`` as ``(h, w)`` -> per image boxes ``(P_i, 4)`` and sigmoid scores ``(P_i,)``,
        best first, at most ``post_nms_top_n()`` each."""
        batch = objectness.shape[0]
        boxes, scores, keep, levels = self.candidates(anchors, objectness, deltas, image_sizes, num_per_level)
        image_of, column = keep.nonzero(as_tuple=True)  # (M,) each
        boxes, scores = boxes[keep], scores[keep]  # (M, 4), (M,)
        kept = grouped_nms(
            boxes, scores, levels[column], image_of, batch, self.config.nms_thresh, max_per_image=self.post_nms_top_n()
        )
        order = torch.cat(kept)  # (sum P_i,)
        sizes = [len(k) for k in kept]
        return list(boxes[order].split(sizes)), list(scores[order].split(sizes))

    def compute_loss(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, gt_boxes: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Objectness BCE over the sampled anchors and smooth-L1 (beta 1/9) over the sampled positives, both
        normalised by the number of sampled anchors (the box loss as a sum over positives / that number)."""
        if len(gt_boxes) != objectness.shape[0]:
            raise ValueError(f"{len(gt_boxes)} targets for a batch of {objectness.shape[0]} images")
        cfg = self.config
        labels, matched = match_anchors(anchors, gt_boxes, cfg.fg_iou_thresh, cfg.bg_iou_thresh)  # (B, N), (B, N, 4)
        positive, negative = sample_balanced(labels, cfg.batch_size_per_image, cfg.positive_fraction)
        sampled = positive | negative  # (B, N)
        targets = self.box_coder.encode(matched[positive], anchors.expand_as(matched)[positive])  # (P, 4)
        num_sampled = sampled.sum()
        box_loss = F.smooth_l1_loss(deltas[positive], targets, beta=1 / 9, reduction="sum") / num_sampled
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
