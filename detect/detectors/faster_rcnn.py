"""Faster R-CNN (Ren et al. 2015): a backbone shared by a Region Proposal Network and a Fast R-CNN head.

One forward pass: resize and normalise the images (:mod:`detect.transform`), compute the features
(:mod:`detect.backbones`), propose regions (:mod:`proposals.rpn`), classify and refine them
(:mod:`detect.roi_heads`), and map the detections back to the original pixels.

Decisions:

- Module and parameter names are torchvision's ``fasterrcnn_resnet50_fpn`` (``transform`` without parameters,
  ``backbone``, ``rpn``, ``roi_heads``), so its published COCO checkpoints load with ``strict=True`` and give the
  same detections (:func:`detect.weights.load_detector` loads them, renaming the flat key names of old ones).
- ``forward(images, targets=None)`` always returns ``(detections, losses)``: detections in original image pixels
  with 1-based labels into ``class_names``; losses (RPN and head) whenever targets are given, in training or
  evaluation mode (validation loss). In training the detections come from the head's outputs on the sampled
  RoIs (a by-product, for monitoring); in evaluation from all proposals.
- Two builders: :func:`fasterrcnn_resnet50_fpn` (torchvision's configuration) and :func:`fasterrcnn_vgg16`, the
  paper's single-level model: VGG16 conv5_3 (stride 16), 3 scales x 3 aspect ratios of anchors, 7x7 RoI max
  pooling, fc6/fc7 of 4096 with dropout, a 600-pixel short side (1000 at most), 6000/300 proposals before/after
  NMS at test time and 128 RoIs per image in training.
- Frozen batch norm of torchvision's COCO checkpoints uses ``eps = 0`` (they were converted from Detectron);
  :func:`detect.weights.load_detector` sets it as torchvision's builder does, unless told otherwise or a safetensors
  file's metadata says (``frozen_bn_eps``: a model fine-tuned here from ImageNet weights keeps 1e-5).
- CPU speed with the same arithmetic: the box pooling runs on all cores (:class:`detect.roi_heads.ThreadedRoIPool`;
  torchvision's RoI Align kernel uses one), and the post-processing is batched over images. For inference,
  :func:`detect.backbones.fold_frozen_batchnorm` folds the frozen BN into the convolutions (outputs change by
  float rounding only) and ``torch.inference_mode()`` skips autograd bookkeeping.
- Batch invariance: an image's detections equal its detections alone, whatever else is in the batch. torchvision
  pads a batch to its largest image, and the padding changes what a CNN computes inside the image (GroupNorm
  statistics include it; a stride-2 conv or any norm or bias turns the zeros into activations that the next
  layers read where, alone, they read the conv's zero padding), and the RPN scores anchors over it. So
  ``forward`` cuts the batch by padded size (:meth:`detect.transform.RCNNTransform.grouped`: each image padded
  only to its own size rounded up to ``size_divisible``) and runs each group through backbone, RPN and head as
  its own batch. On the CPU at inference each image goes alone (below), so not even float rounding remains. Padding-aware
  normalisation alone would not do (the conv windows at the image's edge still read the padding), masking after
  every layer would need hooks in every backbone and still differ where RoI Align samples past the map's edge.
  With targets each loss is the image-weighted mean of the groups' (:func:`mean_losses`); a batch of one padded
  size (the usual training batch, and torchvision's parity tests) is one group and unchanged. Cost, measured with
  ``faster_rcnn_shapes`` on one CPU thread (CPU time, 8 shapes images a batch): 8 of one size 81.5 images/s
  before and 81.4 after (one group); 8 mixed sizes (portrait and landscape, 7 padded sizes) 20.8 before, 45.7
  after (less padding); the worst case, 8 widths 160-384 at one height (8 groups, little padding saved), 46.7
  before, 44.4 after (-5 %). SPP-Net groups the same way (same size: 51 before and after; mixed: 11 to 37).
- CPU inference runs each image through backbone, RPN and head alone (:func:`sub_batches` of one image). Grouping
  by padded size keeps batch mates of other sizes out, but not the batch size of a group's kernels: oneDNN picks
  a convolution's algorithm by the batch size and MKL a matrix product's blocking by its rows, so an image's
  features at batch 1 and in a group of 2 differ in their last bits, and a score's fifth decimal followed
  ``--batch-size`` (issue 21). One image a pass makes an image's arithmetic a function of the image alone.
  Before, a pass took up to 2^18 padded pixels (issue 15): large images already ran alone (8 of 480 x 640 in one
  pass took 1.4-1.6x batch 1's time per image, no cache holds their activations), and small ones gained from
  batching. The cost, measured by ``python benchmarks/invariance_cost.py`` on the bundled models: 0.92x the
  grouped throughput at batch 8 on 2 threads (R-CNN 0.81x, SPP-Net 0.92x). Training, evaluation with targets (losses) and other devices (a GPU gains from large
  batches) run each padded-size group as one batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from detect.backbones import Backbone, load_imagenet_weights, resnet, tiny, vgg16
from detect.errors import ConfigError
from detect.roi_heads import (
    FastRCNNPredictor,
    RoIHeads,
    RoIHeadsConfig,
    SingleLevelRoIPool,
    ThreadedRoIPool,
    TwoMLPHead,
    load_fc67,
)
from detect.structures import Detections
from detect.transform import ImageBatch, ImageInput, PaddedGroup, RCNNTransform, TransformConfig, as_target
from proposals.anchors import AnchorGenerator
from proposals.rpn import RegionProposalNetwork, RPNConfig, RPNHead

# COCO category ids 1..90 that name a class; the ten ids COCO left unused are "N/A" in torchvision's label space.
_COCO_NAMES_BY_ID: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich",
    55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}
COCO_CLASS_NAMES: tuple[str, ...] = tuple(_COCO_NAMES_BY_ID.get(i, "N/A") for i in range(1, 91))
"""The 90 foreground names of torchvision's COCO label space (label ``k`` is ``COCO_CLASS_NAMES[k-1]``)."""


@dataclass(frozen=True)
class FasterRCNNConfig:
    """Everything but the architecture: input sizes, proposal and head settings. ``anchor_sizes`` and
    ``anchor_ratios`` (height / width) replace a single-level builder's anchors (``detect train --data`` fits them
    to the training boxes); empty keeps the builder's own."""

    transform: TransformConfig = field(default_factory=TransformConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    anchor_sizes: tuple[float, ...] = ()
    anchor_ratios: tuple[float, ...] = ()


VGG16_FC67 = (0, 3)  # fc6 and fc7 are classifier.0 and classifier.3 in torchvision's vgg16 checkpoint
VGG16_PAPER_CONFIG = FasterRCNNConfig(
    transform=TransformConfig(min_size=(600,), max_size=1000),
    rpn=RPNConfig(pre_nms_top_n_train=12000, pre_nms_top_n_test=6000, post_nms_top_n_test=300),
    roi_heads=RoIHeadsConfig(batch_size_per_image=128),
)


class FasterRCNN(nn.Module):
    """A Faster R-CNN detector; see the module docstring. Build one with a builder of the registry (:mod:`detect.detectors`); load trained weights with
    :func:`detect.weights.load_detector`."""

    title = "Faster R-CNN"  # the paper's name, in tables and pictures (detect compare)
    published = 2015  # orders the generations: R-CNN (CVPR 2014), SPP-Net (ECCV 2014), Faster R-CNN (NIPS 2015)

    def __init__(
        self,
        backbone: Backbone,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        transform: RCNNTransform,
        class_names: Sequence[str],
        name: str = "faster_rcnn",
    ) -> None:
        super().__init__()
        num_classes = roi_heads.box_predictor.cls_score.out_features
        if len(class_names) != num_classes - 1:
            raise ValueError(f"{len(class_names)} class names for {num_classes - 1} foreground classes")
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.class_names = tuple(class_names)
        self.name = name

    def forward(
        self,
        images: Sequence[ImageInput] | ImageInput,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """Detect objects in ``images`` (RGB ``uint8`` ``HxWx3`` arrays or float ``(3, H, W)`` tensors in [0, 1],
        one or a list); with ``targets`` (per image ``"boxes" (G, 4)`` float xyxy in original pixels and
        ``"labels" (G,)`` int64 1-based, tensors or NumPy arrays) also return the losses."""
        device = self.backbone_device()
        if targets is not None:
            targets = [as_target(t, device) for t in targets]
            check_targets(targets)
        groups = self.transform.grouped(images, targets, device=device)  # one batch per padded size
        if targets is None and device.type == "cpu":  # CPU inference: one image a pass (see the module docstring)
            groups = [part for group in groups for part in sub_batches(group, 1)]
        outputs = [self.forward_batch(group.batch, group.targets) for group in groups]
        detections: list[Detections | None] = [None] * sum(len(group.indices) for group in groups)
        for group, (group_detections, _) in zip(groups, outputs):
            for index, image_detections in zip(group.indices, group_detections):
                detections[index] = image_detections
        return detections, mean_losses([losses for _, losses in outputs], [len(group.indices) for group in groups])

    def forward_batch(
        self, batch: ImageBatch, targets: Sequence[Mapping[str, Tensor]] | None
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """Detections (original pixels) and losses of one padded batch of images and their resized targets."""
        features = self.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, head_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        boxes = self.transform.postprocess([d.boxes for d in detections], batch)
        detections = [
            Detections(b.detach(), d.scores.detach(), d.labels, size)
            for b, d, size in zip(boxes, detections, batch.original_sizes)
        ]
        return detections, {**rpn_losses, **head_losses}

    def detect_padded(
        self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inference on one padded batch as tensors only, the entry point :mod:`detect.export` captures with
        ``torch.export``: ``images (B, 3, H, W)`` normalised, resized and padded (:meth:`RCNNTransform.grouped`),
        ``image_sizes`` and ``original_sizes`` int64 ``(B, 2)`` as ``(h, w)`` -> detections flat over the batch,
        image-major and best first: boxes ``(N, 4)`` in original pixels, scores ``(N,)``, 1-based labels ``(N,)``
        and each one's image ``(N,)``. Same modules and kernels as :meth:`forward_batch`; proposals and detections
        stay padded tensors (:meth:`RegionProposalNetwork.padded_proposals`, :meth:`RoIHeads.padded_detections`)."""
        features = self.backbone(images)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        batch = ImageBatch(images, [], [])
        proposals, valid = self.rpn.padded_proposals(batch, list(features.values()), image_sizes)  # (B, P, 4)
        boxes, scores, labels, keep = self.roi_heads.padded_detections(features, proposals, valid, image_sizes)
        ratios = (original_sizes.to(torch.float32) / image_sizes.to(torch.float32))[:, [1, 0, 1, 0]]  # (B, 4)
        image, column = torch.nonzero(keep, as_tuple=True)  # (N,) each, image-major, best first
        return (boxes * ratios[:, None, :])[image, column], scores[image, column], labels[image, column], image

    def backbone_device(self) -> torch.device:
        return next(self.backbone.parameters()).device



def sub_batches(group: PaddedGroup, size: int) -> list[PaddedGroup]:
    """A padded group cut into groups of at most ``size`` images, in order (views of its tensors, no copy)."""
    if len(group.indices) <= size:
        return [group]
    batch, parts = group.batch, []
    for lo in range(0, len(group.indices), size):
        part = slice(lo, lo + size)
        images = ImageBatch(batch.tensors[part], batch.image_sizes[part], batch.original_sizes[part])
        parts.append(PaddedGroup(group.indices[part], images, None if group.targets is None else group.targets[part]))
    return parts


def mean_losses(parts: Sequence[Mapping[str, Tensor]], counts: Sequence[int]) -> dict[str, Tensor]:
    """The losses of a batch run as several sub-batches of ``counts`` images: each loss the image-weighted mean
    of the sub-batches' (each is a mean over its sampled anchors or RoIs, a fixed number per image). One part is
    returned as it is."""
    if len(parts) == 1:
        return dict(parts[0])
    total = sum(counts)
    return {name: sum(part[name] * (count / total) for part, count in zip(parts, counts)) for name in parts[0]}


def check_targets(targets: Sequence[Mapping[str, Tensor]]) -> None:
    """Training targets must have float ``boxes (G, 4)`` with positive width and height and int64 ``labels
    (G,)``; raises ``ValueError`` naming the first bad image."""
    for i, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i} needs 'boxes' and 'labels'")
        if not boxes.is_floating_point() or boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target {i}: boxes must be float (G, 4), got {boxes.dtype} {tuple(boxes.shape)}")
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"target {i}: labels must be int64 ({len(boxes)},), got {labels.dtype} {tuple(labels.shape)}"
            )
    if not targets:
        return
    boxes = torch.cat([t["boxes"].to(targets[0]["boxes"].device) for t in targets])  # (G, 4) over the batch
    degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)  # (G,)
    if bool(degenerate.any()):
        first = int(degenerate.nonzero()[0])
        raise ValueError(f"target boxes need positive width and height; got {boxes[first].tolist()}")


def _class_names(num_classes: int | None, class_names: Sequence[str] | None) -> tuple[int, tuple[str, ...]]:
    """``(num_classes incl. background, public names)``: the given names (``num_classes`` then follows from them and,
    if also given, must agree), COCO's for 91 classes (the default), else ``class_1 .. class_{n-1}``."""
    if class_names is not None:
        names = tuple(class_names)
        if num_classes is not None and num_classes != len(names) + 1:
            raise ConfigError(f"num_classes={num_classes} does not match {len(names)} class names (+1 background)")
        return len(names) + 1, names
    num_classes = len(COCO_CLASS_NAMES) + 1 if num_classes is None else num_classes
    if num_classes == len(COCO_CLASS_NAMES) + 1:
        return num_classes, COCO_CLASS_NAMES
    return num_classes, tuple(f"class_{k}" for k in range(1, num_classes))


def fasterrcnn_resnet50_fpn(
    num_classes: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    config: FasterRCNNConfig = FasterRCNNConfig(),
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
    frozen_bn: bool = True,
) -> FasterRCNN:
    """torchvision's Faster R-CNN ResNet-50-FPN: FPN anchors 32-512 x 3 ratios, RoI Align 7x7 (sampling 2)
    over levels P2-P5, a 1024-wide two-layer MLP head. ``backbone_weights``: a local torchvision ImageNet
    ``resnet50`` checkpoint; ``trainable_layers`` ResNet stages train (with ``frozen_bn``, BN never does)."""
    num_classes, names = _class_names(num_classes, class_names)
    backbone = resnet(50, fpn=True, frozen_bn=frozen_bn, trainable_layers=trainable_layers, weights=backbone_weights)
    anchors = AnchorGenerator()
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    rpn = RegionProposalNetwork(anchors, rpn_head, config.rpn)
    roi_pool = ThreadedRoIPool(MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2))
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, 1024)
    roi_heads = RoIHeads(roi_pool, box_head, FastRCNNPredictor(1024, num_classes), config.roi_heads)
    return FasterRCNN(
        backbone, rpn, roi_heads, RCNNTransform(config.transform), names,
        name="fasterrcnn_resnet50_fpn",
    )


def fasterrcnn_vgg16(
    num_classes: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    config: FasterRCNNConfig = VGG16_PAPER_CONFIG,
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
) -> FasterRCNN:
    """The paper's VGG16 Faster R-CNN (see the module docstring). ``backbone_weights``: a local torchvision
    ImageNet ``vgg16`` checkpoint, which initialises conv1_1-conv5_3 and, as in the paper, fc6 and fc7."""
    num_classes, names = _class_names(num_classes, class_names)
    backbone = vgg16(trainable_layers=trainable_layers)
    anchors = AnchorGenerator.single_level(
        config.anchor_sizes or (128, 256, 512), config.anchor_ratios or (0.5, 1.0, 2.0), backbone.stride
    )
    rpn = RegionProposalNetwork(anchors, RPNHead(512, anchors.num_anchors_per_location()[0]), config.rpn)
    box_head = TwoMLPHead(512 * 7 * 7, 4096, dropout=0.5)
    if backbone_weights is not None:
        imagenet = load_imagenet_weights(backbone.body, backbone_weights, prefix="features.")
        load_fc67(box_head, imagenet, VGG16_FC67, backbone_weights)
    roi_heads = RoIHeads(
        ThreadedRoIPool(SingleLevelRoIPool(7, 1.0 / backbone.stride, method="pool")),
        box_head,
        FastRCNNPredictor(4096, num_classes),
        config.roi_heads,
    )
    return FasterRCNN(
        backbone, rpn, roi_heads, RCNNTransform(config.transform), names,
        name="fasterrcnn_vgg16",
    )


TINY_ANCHORS = ((16, 32, 64, 128), (0.5, 1.0, 2.0))  # sizes, aspect ratios
TINY_REPRESENTATION = 256
TINY_CONFIG = FasterRCNNConfig(
    transform=TransformConfig(min_size=(160,), max_size=400),
    rpn=RPNConfig(
        pre_nms_top_n_train=600,
        post_nms_top_n_train=300,
        pre_nms_top_n_test=300,
        post_nms_top_n_test=100,
        batch_size_per_image=128,
    ),
    roi_heads=RoIHeadsConfig(batch_size_per_image=64),
)


def fasterrcnn_tiny(
    num_classes: int | None = None,
    *,
    class_names: Sequence[str] | None = None,
    config: FasterRCNNConfig = TINY_CONFIG,
) -> FasterRCNN:
    """Faster R-CNN on the from-scratch :func:`detect.backbones.tiny` backbone (the bundled shapes model): one
    stride-8 level, anchors 16-128 pixels x 3 ratios, RoI Align 7 x 7 and a 256-wide two-layer head."""
    num_classes, names = _class_names(num_classes, class_names)
    backbone = tiny()
    sizes, ratios = config.anchor_sizes or TINY_ANCHORS[0], config.anchor_ratios or TINY_ANCHORS[1]
    anchors = AnchorGenerator.single_level(sizes, ratios, stride=backbone.stride)
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    rpn = RegionProposalNetwork(anchors, rpn_head, config.rpn)
    roi_pool = ThreadedRoIPool(SingleLevelRoIPool(7, 1.0 / backbone.stride, method="align"))
    head = TwoMLPHead(backbone.out_channels * 7 * 7, TINY_REPRESENTATION)
    roi_heads = RoIHeads(roi_pool, head, FastRCNNPredictor(TINY_REPRESENTATION, num_classes), config.roi_heads)
    return FasterRCNN(backbone, rpn, roi_heads, RCNNTransform(config.transform), names, name="fasterrcnn_tiny")
