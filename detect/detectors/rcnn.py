"""R-CNN (Girshick, Donahue, Darrell & Malik, CVPR 2014): classify warped proposals with a CNN.

Every proposal (selective search by default) is dilated by 16 pixels of context, warped to the network's square
input (227 for AlexNet, 224 otherwise) by the shared kernel :func:`detect.ops.pooling.warp_regions`, and run through
the CNN up to pool5, fc6 and fc7. The paper's three heads read those features: a softmax classifier, optional
per-class linear SVMs on fc7 and class-specific ridge-regression box regressors on pool5.

The heads and everything after them (sampling, losses, post-processing, SVM and ridge fitting, weights files) are
shared with SPP-Net and live in :mod:`detect.detectors.region` (:class:`~detect.detectors.region.RegionHeads`,
:class:`~detect.detectors.region.RegionDetector`), whose docstring gives R-CNN's numbers for them; this module
only says how a region's pooled features are computed.

Decisions:

- Pixels: images are normalised with ImageNet's mean and standard deviation (what torchvision's ImageNet weights
  expect; the paper's Caffe net subtracted the mean only) *before* warping, and crop pixels outside the image are
  filled with 0, i.e. the mean, as in the paper.
- Warping: anisotropic (the paper's best), context ``p = 16`` warped pixels on each side; see ``warp_regions`` for the
  exact sampling. The CNN runs on the crops in chunks of ``chunk_size`` regions, so memory is bounded by one chunk
  whatever the number of proposals. A chunk holds the regions of one image only (its first ``chunk_size``, the
  next ``chunk_size``, ...), and at inference the heads classify each chunk as it comes
  (:meth:`~detect.detectors.region.RegionDetector.classify`): a region's chunk mates, and with them the CNN's and
  the heads' choice of kernel blocking, are fixed by its own image. Chunks that crossed images (before issue 21)
  made a region's features, and the JSON's fifth decimal, depend on the other images of the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from detect.backbones import Backbone, alexnet, load_imagenet_weights, tiny, vgg16
from detect.detectors.region import (
    SCORINGS,
    BoxRegressionConfig,
    RegionDetector,
    RegionHeads,
    RegionPostprocessConfig,
    SamplingConfig,
    SVMConfig,
)
from detect.errors import ConfigError
from detect.ops.pooling import warp_regions
from detect.roi_heads import load_fc67
from detect.transform import IMAGENET_MEAN, IMAGENET_STD
from proposals.selective_search import SelectiveSearchConfig

__all__ = ["RCNNConfig", "RCNN", "rcnn_alexnet", "rcnn_vgg16", "rcnn_tiny", "TINY_CONFIG"]

DEFAULT_INPUT_SIZE = {"alexnet": 227}  # every other backbone: 224


@dataclass(frozen=True)
class RCNNConfig:
    """R-CNN's architecture and settings. ``backbone``: ``"alexnet"`` (the paper's) or ``"vgg16"`` (its later VGG
    results); ``input_size`` ``None`` means 227 for AlexNet and 224 otherwise; ``trainable_layers`` counts conv
    stages from the top that fine-tune (R-CNN fine-tunes all). ``scoring`` picks the softmax or the SVMs."""

    backbone: str = "alexnet"
    input_size: int | None = None
    context_padding: int = 16
    warp_mode: str = "anisotropic"
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    representation_size: int = 4096
    dropout: float = 0.5
    trainable_layers: int = 5
    chunk_size: int = 128
    scoring: str = "softmax"
    proposals: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    box_regression: BoxRegressionConfig = field(default_factory=BoxRegressionConfig)
    postprocess: RegionPostprocessConfig = field(default_factory=RegionPostprocessConfig)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}")

    @property
    def crop_size(self) -> int:
        """The side of the warped crops."""
        return self.input_size or DEFAULT_INPUT_SIZE.get(self.backbone, 224)


def _chunks(boxes: Sequence[Tensor], size: int) -> Iterator[tuple[list[int], list[Tensor]]]:
    """Each image's ``boxes`` ``size`` rows at a time, image after image: each step gives the image it belongs to
    (a one-element list) and its slice. A chunk never mixes images (see the module docstring)."""
    for index, image_boxes in enumerate(boxes):
        for lo in range(0, len(image_boxes), size):
            yield [index], [image_boxes[lo : lo + size]]


class RCNN(RegionDetector):
    """R-CNN: ``features`` (the conv layers) and ``pool5`` turn each warped crop into ``pooled_dim`` features for
    :class:`RegionHeads`; see the module docstring. Build the paper's with :func:`rcnn_alexnet` or
    :func:`rcnn_vgg16`, or pass any conv net that maps ``(k, 3, S, S)`` crops to a map ``pool5`` reduces to a fixed
    size."""

    title = "R-CNN"  # the paper's name, in tables and pictures (detect compare)
    published = 2014  # orders the generations: R-CNN (CVPR 2014), SPP-Net (ECCV 2014), Faster R-CNN (NIPS 2015)


    def __init__(
        self,
        features: nn.Module,
        pool5: nn.Module,
        pooled_dim: int,
        class_names: Sequence[str],
        config: RCNNConfig = RCNNConfig(),
        name: str | None = None,
    ) -> None:
        heads = RegionHeads(pooled_dim, len(class_names), config.representation_size, config.dropout)
        super().__init__(class_names, config, heads, name or f"rcnn_{config.backbone}")
        self.features = features
        self.pool5 = pool5

    def prepare(self, images: list[Tensor], with_grad: bool) -> list[Tensor]:
        """Normalise each image (crops are warped from normalised pixels, so the fill 0 is the mean)."""
        mean = torch.tensor(self.config.image_mean, device=images[0].device)[:, None, None]
        std = torch.tensor(self.config.image_std, device=images[0].device)[:, None, None]
        return [(image - mean) / std for image in images]

    def warped_chunks(self, images: list[Tensor], boxes: Sequence[Tensor]) -> Iterator[Tensor]:
        """The warped crops ``(k, 3, S, S)`` of all boxes, image-major, ``chunk_size`` at a time, one image a chunk."""
        cfg = self.config
        for members, parts in _chunks(boxes, cfg.chunk_size):
            yield warp_regions([images[i] for i in members], parts, cfg.crop_size, cfg.context_padding, cfg.warp_mode)

    def pool(self, prepared: list[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        parts = [self.pool5(self.features(crops)).flatten(1) for crops in self.warped_chunks(prepared, boxes)]
        return torch.cat(parts) if parts else prepared[0].new_zeros((0, self.heads.in_features))  # (K, D)


def _rcnn(
    backbone: Backbone,
    pool5: nn.Module,
    pooled_dim: int,
    class_names: Sequence[str],
    config: RCNNConfig,
    weights: str | Path | None,
    fc_indices: tuple[int, int],
) -> RCNN:
    """An R-CNN on a torchvision classifier's conv layers; ImageNet ``weights`` also give fc6/fc7."""
    model = RCNN(backbone, pool5, pooled_dim, class_names, config)
    if weights is not None:
        imagenet = load_imagenet_weights(backbone.body, weights, prefix="features.")
        load_fc67(model.heads.box_head, imagenet, fc_indices, weights)
    return model


def rcnn_alexnet(
    class_names: Sequence[str], *, config: RCNNConfig = RCNNConfig(), backbone_weights: str | Path | None = None
) -> RCNN:
    """The paper's R-CNN: AlexNet conv1-conv5, pool5 (3x3, stride 2: 256 x 6 x 6 on 227-pixel crops), fc6, fc7.
    ``backbone_weights``: a local torchvision ImageNet ``alexnet`` checkpoint (conv layers and fc6/fc7)."""
    config = dataclasses.replace(config, backbone="alexnet")
    backbone = alexnet(trainable_layers=config.trainable_layers)
    return _rcnn(backbone, nn.MaxPool2d(3, 2), 256 * 6 * 6, class_names, config, backbone_weights, (1, 4))


def rcnn_vgg16(
    class_names: Sequence[str],
    *,
    config: RCNNConfig = RCNNConfig(backbone="vgg16"),
    backbone_weights: str | Path | None = None,
) -> RCNN:
    """R-CNN with VGG16 (the paper's "O-Net"): conv1_1-conv5_3, pool5 (512 x 7 x 7 on 224-pixel crops), fc6,
    fc7. ``backbone_weights``: a local torchvision ImageNet ``vgg16`` checkpoint (conv layers and fc6/fc7)."""
    config = dataclasses.replace(config, backbone="vgg16")
    backbone = vgg16(trainable_layers=config.trainable_layers)
    return _rcnn(backbone, nn.MaxPool2d(2, 2), 512 * 7 * 7, class_names, config, backbone_weights, (0, 3))


TINY_POOL5 = 4  # the tiny R-CNN max-pools each crop's stride-8 map to 4 x 4
TINY_CONFIG = RCNNConfig(
    backbone="tiny", input_size=64, representation_size=256, proposals=SelectiveSearchConfig(max_boxes=300)
)


def rcnn_tiny(class_names: Sequence[str], *, config: RCNNConfig = TINY_CONFIG) -> RCNN:
    """R-CNN on the from-scratch :func:`detect.backbones.tiny` backbone (the bundled shapes model): crops of
    ``input_size`` pixels (64 by default), pool5 an adaptive 4 x 4 max pool, two ``representation_size`` fc layers."""
    config = dataclasses.replace(config, backbone="tiny")
    backbone = tiny()
    pooled_dim = backbone.out_channels * TINY_POOL5**2
    return RCNN(backbone, nn.AdaptiveMaxPool2d(TINY_POOL5), pooled_dim, class_names, config)

