"""SPP-Net for detection (He, Zhang, Ren & Sun, ECCV 2014 / TPAMI 2015): one conv pass per image, pooled per window.

Where R-CNN runs the CNN on thousands of warped crops, SPP-Net runs the conv layers once on the whole image (at one
or several scales), projects every proposal onto the last conv feature map and max-pools the window over a spatial
pyramid of 1x1, 2x2, 3x3 and 6x6 bins (50 bins per channel, whatever the window's size and aspect) with the shared
kernel :func:`detect.ops.pooling.spatial_pyramid_pool`. The fixed-length vector feeds the same heads as R-CNN
(:class:`detect.detectors.region.RegionHeads`: fc6, fc7, softmax, optional SVMs, box regressors), and training,
post-processing, SVM and regressor fitting and weights files are R-CNN's
(:class:`~detect.detectors.region.RegionDetector`).

Decisions:

- Scales: each image is normalised and resized so that its shorter side is ``s`` (the paper's single scale is 688;
  :data:`PAPER_SCALES` are its five), the longer side capped at ``max_size`` (2000; the paper set no cap). With
  several scales, each proposal is pooled at the one scale where its scaled box area is closest to 224 x 224
  pixels (the paper's rule).
- Batches: the images of one resized size run through the conv layers together, each size as its own batch, and
  nothing is padded, so an image's maps (and detections) never depend on its batchmates; zero padding would enter
  the GroupNorm statistics of the tiny backbone and, through the conv windows at the image's edge, every
  backbone's maps. Measured on ``sppnet_shapes`` (one CPU thread, 8 images a batch, proposals given): 8 of one
  size 51 images/s before and after; 8 mixed sizes 11 before (padded to the largest), 37 after. CPU inference
  goes further and runs each image through the conv layers alone: oneDNN picks its convolution algorithm by the
  batch size, so an image's maps at batch 1 and in a batch of 2 of its size differ in their last bits (issue 21).
  Regions are pooled and classified in chunks of one image's regions
  (:meth:`~detect.detectors.region.RegionDetector.classify`), for the same reason.
- Window projection (the paper's appendix): the paper pads every layer by ``floor(p/2)`` for a filter of size ``p``,
  so cell ``i`` is centred on image pixel ``S i`` (``S`` the stride), and maps a window's left/top edge to
  ``x' = floor(x / S) + 1`` and its right/bottom edge to ``x' = ceil(x / S) - 1``: the cells whose centres lie
  strictly inside the window. Our backbones' cells are centred at ``S i + o`` in continuous pixel coordinates (``o``
  = :attr:`detect.backbones.ReceptiveField.offset`: 15.5 for torchvision's AlexNet, 8 for VGG16), so ``o`` is
  subtracted first: ``x1' = floor((x1 - o) / S) + 1``, ``x2' = ceil((x2 - o) / S) - 1``; ``projection_offset=0``
  gives the paper's formula verbatim. A window too small to contain a cell centre (``x1' > x2'``) takes the one or
  two cells bracketing its centre, ``floor`` and ``ceil`` of ``(centre - o) / S``. Corners are then clamped into
  the image's own cells (the last cell whose centre lies inside the resized image) and the map. Exact for
  power-of-two strides.
- Fine-tuning (``forward`` with targets) follows the paper's: 25 % foreground (IoU >= 0.5 with a ground-truth box,
  ground truth included), background IoU in ``[0.1, 0.5)``, here 128 regions per image; the conv layers stay frozen
  by default (``trainable_layers=0``, the paper fine-tunes only the fully connected layers) and gradients flow
  through the pyramid pooling when they are not.
- Box regression is fitted post hoc by ridge regression on the pooled conv features, as the paper does
  (:meth:`~detect.detectors.region.RegionDetector.fit_box_regressor`), not learned in the fine-tuning loss.
- Backbones: ``"alexnet"`` stands in for the paper's ZF-5 (same five-conv layout, stride 16) and ``"vgg16"``;
  ImageNet weights initialise the conv layers only (fc6's input is the 50-bin pyramid, not pool5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from detect.backbones import TINY_LAYERS, Backbone, alexnet, load_imagenet_weights, tiny, vgg16
from detect.detectors.region import (
    BoxRegressionConfig,
    RegionDetector,
    RegionHeads,
    RegionOutputs,
    RegionPostprocessConfig,
    SamplingConfig,
    SVMConfig,
    SCORINGS,
    chunk_boxes,
)
from detect.errors import ConfigError
from detect.ops.boxes import box_area
from detect.ops.pooling import spatial_pyramid_pool
from detect.transform import IMAGENET_MEAN, IMAGENET_STD, RCNNTransform, TransformConfig, rescale_boxes, resized_size
from proposals.selective_search import SelectiveSearchConfig

__all__ = [
    "PAPER_SCALES",
    "SPPNetConfig",
    "ScaleFeatures",
    "SPPFeatures",
    "project_boxes",
    "SPPNet",
    "sppnet_alexnet",
    "sppnet_vgg16",
]

PAPER_SCALES = (480, 576, 688, 864, 1200)


@dataclass(frozen=True)
class SPPNetConfig:
    """SPP-Net's architecture and settings (paper defaults; see the module docstring). ``projection_offset``
    ``None`` takes the backbone's receptive-field offset. ``fc6_rank``/``fc7_rank``: a truncated-SVD head of those
    ranks (:meth:`~detect.detectors.region.RegionDetector.compress`); ``None`` a dense layer. ``chunk_size``:
    regions pooled and classified at a time at inference (:meth:`SPPNet.classify`)."""

    backbone: str = "alexnet"
    scales: tuple[int, ...] = (688,)
    max_size: int = 2000
    pyramid_levels: tuple[int, ...] = (1, 2, 3, 6)
    target_box_side: int = 224
    projection_offset: float | None = None
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    representation_size: int = 4096
    dropout: float = 0.5
    fc6_rank: int | None = None
    fc7_rank: int | None = None
    chunk_size: int = 256
    trainable_layers: int = 0
    scoring: str = "softmax"
    proposals: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(bg_iou_low=0.1, per_image=True))
    svm: SVMConfig = field(default_factory=SVMConfig)
    box_regression: BoxRegressionConfig = field(default_factory=BoxRegressionConfig)
    postprocess: RegionPostprocessConfig = field(default_factory=RegionPostprocessConfig)

    def __post_init__(self) -> None:
        if isinstance(self.scales, int):
            object.__setattr__(self, "scales", (self.scales,))
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not self.scales or min(self.scales) < 1 or not self.pyramid_levels or min(self.pyramid_levels) < 1:
            raise ConfigError(f"scales and pyramid levels must be positive, got {self.scales}, {self.pyramid_levels}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        for rank in (self.fc6_rank, self.fc7_rank):
            if rank is not None and not 1 <= rank <= self.representation_size:
                raise ConfigError(f"fc6/fc7 ranks must be in [1, {self.representation_size}], got {rank}")

    @property
    def bins(self) -> int:
        """Pyramid bins per channel (50 for the paper's levels)."""
        return sum(level * level for level in self.pyramid_levels)


@dataclass
class ScaleFeatures:
    """The conv maps of the batch at one scale: one ``(B_g, C, H_g, W_g)`` map per group of images of the same
    resized size (``groups[g]`` their positions in the batch), and each image's resized ``(h, w)``."""

    maps: list[Tensor]
    groups: list[list[int]]
    sizes: list[tuple[int, int]]

    @property
    def features(self) -> list[Tensor]:
        """Each image's ``(C, H_i, W_i)`` map, in batch order (views into :attr:`maps`)."""
        out: list[Tensor] = [None] * len(self.sizes)  # type: ignore[list-item]
        for group_map, members in zip(self.maps, self.groups):
            for index, image_map in zip(members, group_map):
                out[index] = image_map
        return out


@dataclass
class SPPFeatures:
    """The per-batch work of :meth:`SPPNet.prepare`: one :class:`ScaleFeatures` per scale, and the original sizes."""

    scales: list[ScaleFeatures]
    original_sizes: list[tuple[int, int]]


def project_boxes(boxes: Tensor, stride: int, offset: float = 0.0, last_cells: Tensor | None = None) -> Tensor:
    """Project image windows ``(K, 4)`` xyxy onto a feature map: ``(K, 4)`` inclusive cell corners
    ``[x1', y1', x2', y2']`` (integer-valued, boxes' dtype) by the paper's rule (see the module docstring).

    ``last_cells (K, 2)`` (or ``(2,)``): the largest valid ``(x, y)`` cell of each window's image; corners are
    clamped into ``[0, last]`` (only below 0 when ``None``). Always ``x1' <= x2'`` and ``y1' <= y2'``.
    """
    first = torch.floor((boxes[:, :2] - offset) / stride) + 1  # (K, 2) x1', y1'
    last = torch.ceil((boxes[:, 2:] - offset) / stride) - 1  # (K, 2) x2', y2'
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2 - offset) / stride  # (K, 2)
    empty = first > last  # (K, 2) no cell centre strictly inside
    first = torch.where(empty, torch.floor(centre), first).clamp(min=0)
    last = torch.where(empty, torch.ceil(centre), last).clamp(min=0)
    if last_cells is not None:
        limit = last_cells.to(boxes)
        first, last = torch.minimum(first, limit), torch.minimum(last, limit)
    return torch.cat([first, last], dim=1)  # (K, 4)


class SPPNet(RegionDetector):
    """SPP-Net: ``backbone`` maps ``(B, 3, H, W)`` images to ``(B, out_channels, H/stride, W/stride)`` conv maps
    whose cell ``i`` is centred at pixel ``stride * i + offset``; see the module docstring. Build the paper's with
    :func:`sppnet_alexnet` or :func:`sppnet_vgg16`."""

    title = "SPP-Net"  # the paper's name, in tables and pictures (detect compare)
    published = 2014.5  # orders the generations: R-CNN (CVPR 2014), SPP-Net (ECCV 2014), Faster R-CNN (NIPS 2015)


    def __init__(
        self,
        backbone: nn.Module,
        out_channels: int,
        stride: int,
        offset: float,
        class_names: Sequence[str],
        config: SPPNetConfig = SPPNetConfig(),
        name: str | None = None,
    ) -> None:
        heads = RegionHeads(
            out_channels * config.bins, len(class_names), config.representation_size, config.dropout,
            config.fc6_rank, config.fc7_rank,
        )
        super().__init__(class_names, config, heads, name or f"sppnet_{config.backbone}")
        self.backbone = backbone
        self.stride = stride
        self.offset = offset if config.projection_offset is None else config.projection_offset
        self.transform = RCNNTransform(
            TransformConfig(config.scales, config.max_size, config.image_mean, config.image_std, size_divisible=1)
        )

    def prepare(self, images: list[Tensor], with_grad: bool) -> SPPFeatures:
        """The conv maps of the batch at every scale (autograd only when a loss will need it). The images of one
        resized size form a batch of their own, so no image is padded and none depends on its batchmates."""
        original = [(int(t.shape[1]), int(t.shape[2])) for t in images]
        alone = images[0].device.type == "cpu" and not (torch.is_grad_enabled() and with_grad)
        scales = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_grad):
            for side in self.config.scales:
                sizes = [resized_size(size, side, self.config.max_size) for size in original]
                resized = self.transform.normalize_and_resize(images, sizes)
                groups = self.transform.padded_groups(resized)
                if alone:  # CPU inference: each image a batch of its own (see the module docstring)
                    groups = [(size, [index]) for size, members in groups for index in members]
                maps = [
                    self.backbone(self.transform.pad([resized[i] for i in members], size))  # (B_g, C, H_g, W_g)
                    for size, members in groups
                ]
                scales.append(ScaleFeatures(maps, [members for _, members in groups], sizes))
        return SPPFeatures(scales, original)

    def classify(self, prepared: SPPFeatures, boxes: Sequence[Tensor]) -> RegionOutputs:
        """The heads' outputs for the boxes, each image's regions alone, ``config.chunk_size`` at a time
        (:func:`~detect.detectors.region.chunk_boxes`), pooled into one reused buffer and classified: memory holds
        one chunk of pooled features (2,000 windows of AlexNet's conv5 take 100 MB, of VGG16's 200 MB) and the
        buffer's pages are faulted in once, not per region. Pooled features are the same as in one call; a
        region's heads' outputs depend on its own image's chunk only, never on the batch (see
        :meth:`~detect.detectors.region.RegionDetector.classify`)."""
        size = self.config.chunk_size
        buffer = prepared.scales[0].maps[0].new_empty((size, self.heads.in_features))  # (chunk, C * bins)
        parts = []
        for chunk in chunk_boxes(boxes, size):
            parts.append(self.heads(self.pool(prepared, chunk, out=buffer[: sum(len(b) for b in chunk)])))
        if not parts:  # no region in the batch: empty outputs of the right widths
            return self.heads(self.pool(prepared, boxes))
        return RegionOutputs(*(torch.cat(part) for part in zip(*parts)))

    def pool(self, prepared: SPPFeatures, boxes: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        """Pooled features ``(K, C * bins)`` of the per-image boxes (written into ``out`` when given)."""
        counts = [len(b) for b in boxes]
        device = prepared.scales[0].maps[0].device
        image = torch.arange(len(boxes), device=device).repeat_interleave(
            torch.tensor(counts, device=device), output_size=sum(counts)
        )  # (K,)
        original = prepared.original_sizes
        scaled = [torch.cat(rescale_boxes(boxes, original, s.sizes)) for s in prepared.scales]  # S x (K, 4)
        areas = torch.stack([box_area(b) for b in scaled])  # (S, K)
        choice = (areas - float(self.config.target_box_side**2)).abs().argmin(dim=0)  # (K,)
        single = len(prepared.scales) == 1 and len(prepared.scales[0].maps) == 1  # one map: its pooling, no copy
        if out is None:
            out = prepared.scales[0].maps[0].new_empty((sum(counts), self.heads.in_features))  # (K, C * bins)
        for index, (level, level_boxes) in enumerate(zip(prepared.scales, scaled)):
            last_cells = self._last_cells(level)  # (B, 2)
            for group_map, members in zip(level.maps, level.groups):
                slot = torch.full((len(boxes),), -1, dtype=torch.int64, device=device)  # (B,) place in the group
                slot[members] = torch.arange(len(members), device=device)
                rows = torch.nonzero((choice == index) & (slot[image] >= 0)).squeeze(1)  # (K_sg,)
                if len(rows) == 0:
                    continue
                cells = project_boxes(level_boxes[rows], self.stride, self.offset, last_cells[image[rows]])
                rois = torch.cat([slot[image[rows], None].to(cells), cells], dim=1)  # (K_sg, 5)
                if single:
                    return spatial_pyramid_pool(group_map, rois, self.config.pyramid_levels, out)
                out.index_copy_(0, rows, spatial_pyramid_pool(group_map, rois, self.config.pyramid_levels))
        return out

    def _last_cells(self, level: ScaleFeatures) -> Tensor:
        """``(B, 2)`` the last ``(x, y)`` cell of each image: the last whose centre lies inside the resized image,
        at most its map's last."""
        device = level.maps[0].device
        extent = torch.tensor([(w, h) for h, w in level.sizes], dtype=torch.float32, device=device)  # (B, 2)
        inside = (torch.ceil((extent - self.offset) / self.stride) - 1).clamp(min=0)
        map_last = [(0.0, 0.0)] * len(level.sizes)
        for group_map, members in zip(level.maps, level.groups):
            for index in members:
                map_last[index] = (group_map.shape[3] - 1.0, group_map.shape[2] - 1.0)
        return torch.minimum(inside, torch.tensor(map_last, device=device))


def _sppnet(backbone: Backbone, class_names: Sequence[str], config: SPPNetConfig, weights: str | Path | None) -> SPPNet:
    """An SPP-Net on a torchvision classifier's conv layers, ImageNet ``weights`` loaded into them."""
    if weights is not None:
        load_imagenet_weights(backbone.body, weights, prefix="features.")
    field_ = backbone.receptive_field
    return SPPNet(backbone, backbone.out_channels, field_.stride, field_.offset, class_names, config)


def sppnet_alexnet(
    class_names: Sequence[str], *, config: SPPNetConfig = SPPNetConfig(), backbone_weights: str | Path | None = None
) -> SPPNet:
    """SPP-Net on AlexNet conv1-conv5 (stride 16, 256 channels: 12,800 pooled features). ``backbone_weights``: a
    local torchvision ImageNet ``alexnet`` checkpoint for the conv layers."""
    config = dataclasses.replace(config, backbone="alexnet")
    return _sppnet(alexnet(trainable_layers=config.trainable_layers), class_names, config, backbone_weights)


def sppnet_vgg16(
    class_names: Sequence[str],
    *,
    config: SPPNetConfig = SPPNetConfig(backbone="vgg16"),
    backbone_weights: str | Path | None = None,
) -> SPPNet:
    """SPP-Net on VGG16 conv1_1-conv5_3 (stride 16, 512 channels: 25,600 pooled features). ``backbone_weights``: a
    local torchvision ImageNet ``vgg16`` checkpoint for the conv layers."""
    config = dataclasses.replace(config, backbone="vgg16")
    return _sppnet(vgg16(trainable_layers=config.trainable_layers), class_names, config, backbone_weights)


TINY_CONFIG = SPPNetConfig(
    backbone="tiny",
    scales=(160,),
    max_size=400,
    trainable_layers=len(TINY_LAYERS),
    representation_size=256,
    proposals=SelectiveSearchConfig(max_boxes=300),
    sampling=SamplingConfig(batch_size=64, bg_iou_low=0.1, per_image=True),
)


def sppnet_tiny(class_names: Sequence[str], *, config: SPPNetConfig = TINY_CONFIG) -> SPPNet:
    """SPP-Net on the from-scratch :func:`detect.backbones.tiny` backbone (the bundled shapes model): stride 8,
    128 channels, every layer trainable."""
    config = dataclasses.replace(config, backbone="tiny")
    return _sppnet(tiny(), class_names, config, None)

