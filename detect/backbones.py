"""Convolutional backbones for the detectors, assembled from torchvision's public model blocks.

Every backbone is a :class:`Backbone`: ``body``, the network's stages under their torchvision names, and for a
feature pyramid ``fpn``, a ``torchvision.ops.FeaturePyramidNetwork`` with a ``LastLevelMaxPool`` on top. So a
ResNet-50-FPN's keys are torchvision's (``body.conv1.weight``, ``body.layer1.0.conv1.weight``,
``fpn.inner_blocks.0.0.weight``, ...) and its detection checkpoints load unchanged.

A single-level backbone returns one ``(B, C, H, W)`` tensor and exposes ``out_channels``, ``stride`` and its
``receptive_field`` (see :class:`ReceptiveField`, which SPP-Net's window projection needs); a pyramid returns an
``OrderedDict`` ``{"0": finest, ..., "pool": coarsest}`` with ``out_channels`` and one stride per level.

Decisions:

- Normalisation: ``FrozenBatchNorm2d`` (statistics and affine frozen, the standard for detection fine-tuning with
  a few images per batch) or ``BatchNorm2d`` when training from scratch (``frozen_bn=False``). VGG16 and AlexNet
  have no normalisation.
- ``trainable_layers`` counts stages from the top whose parameters train; the rest are frozen. ResNet stages are
  ``conv1`` (with ``bn1``), ``layer1`` .. ``layer4`` (torchvision's convention); VGG16's are its five conv blocks
  (the paper fine-tunes conv3_1 and up: 3); AlexNet's are its five conv layers (Fast R-CNN trains conv2 and up:
  4); MobileNetV3's are torchvision's (the stem and the blocks that downsample).
- Single-level features: VGG16 and AlexNet end at conv5 after its ReLU, stride 16, as in the papers; a
  single-level ResNet ends at ``layer3`` (C4, stride 16) by default, as He et al. (2016) ran Faster R-CNN;
  MobileNetV3-Large at its last conv, stride 32. Pyramids use torchvision's levels (ResNet C2-C5; MobileNetV3's
  last two stages), 256 channels.
- ImageNet weights are read only from a local file the caller names (``torch.load(weights_only=True)`` or
  safetensors); nothing is ever downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detect.errors import WeightsError

RESNET_BUILDERS: dict[int, Callable[..., torchvision.models.ResNet]] = {
    18: torchvision.models.resnet18,
    50: torchvision.models.resnet50,
}
FPN_CHANNELS = 256
VGG16_STAGE_STARTS = (0, 5, 10, 17, 24)  # conv1_1 .. conv5_1 in torchvision's vgg16().features
ALEXNET_STAGE_STARTS = (0, 3, 6, 8, 10)  # conv1 .. conv5 in torchvision's alexnet().features


@dataclass(frozen=True)
class ReceptiveField:
    """Where a single-level feature map's cells look in the image.

    Cell ``i`` (along either axis) is computed from image pixels centred on the continuous coordinate
    ``stride * i + offset``, pixel ``k`` spanning ``[k, k + 1)`` as in our boxes; ``size`` is the side of its
    theoretical receptive field in pixels. So the cells whose centres fall inside ``[x1, x2]`` run from
    ``ceil((x1 - offset) / stride)`` to ``floor((x2 - offset) / stride)``: SPP-Net's corner projection.
    """

    stride: int
    size: int
    offset: float


def receptive_field(module: nn.Module) -> ReceptiveField:
    """The receptive field of ``module``'s output, from its convolutions and max-pools in registration order.

    Residual shortcuts (modules under a ``downsample`` name) are skipped: they run beside the main path, with the
    same stride and a smaller window. Assumes the registration order is the order of the main path, as in
    torchvision's ResNet, VGG, AlexNet and MobileNet.
    """
    jump, size, centre = 1, 1, 0.0  # centre of cell 0 in pixel-index coordinates (pixel k centred at k)
    for name, layer in module.named_modules():
        if "downsample" in name.split(".") or not isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            continue
        kernel, stride, padding, dilation = (
            _first(layer.kernel_size), _first(layer.stride), _first(layer.padding), _first(layer.dilation)
        )
        span = dilation * (kernel - 1) + 1
        size += (span - 1) * jump
        centre += ((span - 1) / 2 - padding) * jump
        jump *= stride
    return ReceptiveField(stride=jump, size=size, offset=centre + 0.5)


def _first(value: int | tuple[int, ...]) -> int:
    """The first entry of a torch layer's per-axis setting (our layers are square)."""
    return value[0] if isinstance(value, tuple) else int(value)


class StageExtractor(nn.ModuleDict):
    """Runs its children in order and returns the outputs of those named in ``return_layers`` under their new
    names, as an ``OrderedDict``. Children after the last returned one are not kept."""

    def __init__(self, layers: "OrderedDict[str, nn.Module]", return_layers: dict[str, str]) -> None:
        names = list(layers)
        missing = set(return_layers) - set(names)
        if missing:
            raise ValueError(f"return layers {sorted(missing)} are not among {names}")
        last = max(names.index(name) for name in return_layers)
        super().__init__(OrderedDict((name, layers[name]) for name in names[: last + 1]))
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, layer in self.items():
            x = layer(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class Backbone(nn.Module):
    """``body`` (+ ``fpn``): single-level (``fpn is None``, returns a tensor) or a feature pyramid (returns an
    ``OrderedDict``). ``strides`` has one entry per output level; ``receptive_field`` is the last body output's."""

    def __init__(self, body: StageExtractor, out_channels: int, fpn: FeaturePyramidNetwork | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        returned = [name for name in body if name in body.return_layers]
        prefixes = [nn.Sequential(*list(body.values())[: list(body).index(name) + 1]) for name in returned]
        self.strides = tuple(receptive_field(prefix).stride for prefix in prefixes)
        if fpn is not None:
            self.strides += (2 * self.strides[-1],)  # LastLevelMaxPool: a stride-2 subsampling of the top level
        self.receptive_field = receptive_field(prefixes[-1])

    @property
    def stride(self) -> int:
        """The stride of a single-level backbone's output."""
        if self.fpn is not None:
            raise AttributeError("a feature pyramid has one stride per level: see .strides")
        return self.strides[0]

    def forward(self, x: Tensor) -> Tensor | "OrderedDict[str, Tensor]":
        features = self.body(x)
        return features["0"] if self.fpn is None else self.fpn(features)


def freeze_stages(stages: Sequence[Sequence[nn.Module]], trainable_layers: int) -> None:
    """Freeze the parameters of every stage but the last ``trainable_layers`` ones."""
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"trainable_layers must be in [0, {len(stages)}], got {trainable_layers}")
    for stage in stages[: len(stages) - trainable_layers]:
        for module in stage:
            module.requires_grad_(False)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` file or a ``.pth``/``.pt`` checkpoint, read without running
    pickled code (``weights_only=True``); a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped.
    Raises :class:`WeightsError` when the file is missing or unreadable. A pickle that needs more than tensors and
    plain containers is refused as not a safe checkpoint; torch's advice for that case (retry with
    ``weights_only=False``, or allow-list the class) is never passed on, since following it runs the file's code."""
    import pickle
    import re

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the safe unpickler met code or an object it does not allow
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        needs = f" (it refers to {named.group(1)})" if named else ""
        raise WeightsError(
            f"cannot read weights from {path}: not a safe checkpoint, loading it would need objects other than "
            f"tensors{needs} and detect never runs a file's pickled code; save the weights as .safetensors, or as "
            f"a .pth state dict of tensors only"
        ) from None
    except Exception as err:  # any parse failure of an untrusted file is the file's fault
        raise WeightsError(f"cannot read weights from {path}: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def load_imagenet_weights(body: nn.Module, path: str | Path, prefix: str = "") -> dict[str, Tensor]:
    """Load a torchvision ImageNet classifier checkpoint into ``body``: its keys starting with ``prefix`` (e.g.
    ``"features."``), prefix removed; keys the body does not have (the classifier, later stages) are ignored.
    Every body key must be found with its shape, else :class:`WeightsError`. Returns the whole checkpoint so that
    a caller can take more from it (VGG16's fc6/fc7 for the box head)."""
    state = read_state_dict(path)
    wanted = body.state_dict()
    found = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    found = {key: value for key, value in found.items() if key in wanted}
    missing = sorted(set(wanted) - set(found) - {k for k in wanted if k.endswith("num_batches_tracked")})
    wrong = sorted(k for k in found if found[k].shape != wanted[k].shape)
    if missing or wrong:
        raise WeightsError(
            f"{path} does not fit this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"wrong shapes {[(k, tuple(found[k].shape), tuple(wanted[k].shape)) for k in wrong[:5]]}"
        )
    body.load_state_dict(found, strict=False)
    return state


def _norm_layer(frozen_bn: bool) -> Callable[[int], nn.Module]:
    return FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d


def resnet(
    depth: int = 50,
    *,
    fpn: bool = True,
    frozen_bn: bool = True,
    trainable_layers: int = 3,
    weights: str | Path | None = None,
    single_level_stage: int = 3,
) -> Backbone:
    """ResNet-18 or -50, with a feature pyramid over C2-C5 (torchvision's ``resnet_fpn_backbone``) or ending at
    ``layer{single_level_stage}`` (C4 by default: stride 16, 1024 channels for ResNet-50)."""
    if depth not in RESNET_BUILDERS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BUILDERS)}, got {depth}")
    net = RESNET_BUILDERS[depth](weights=None, norm_layer=_norm_layer(frozen_bn))
    stem = ("conv1", "bn1", "relu", "maxpool")
    stages = [[net.conv1, net.bn1]] + [[getattr(net, f"layer{k}")] for k in range(1, 5)]
    children = OrderedDict((name, getattr(net, name)) for name in stem + ("layer1", "layer2", "layer3", "layer4"))
    widths = [_stage_channels(net, k) for k in range(1, 5)]
    if fpn:
        body = StageExtractor(children, {f"layer{k}": str(k - 1) for k in range(1, 5)})
        pyramid = FeaturePyramidNetwork(widths, FPN_CHANNELS, extra_blocks=LastLevelMaxPool())
        backbone = Backbone(body, FPN_CHANNELS, pyramid)
    else:
        body = StageExtractor(children, {f"layer{single_level_stage}": "0"})
        stages = stages[: single_level_stage + 1]
        backbone = Backbone(body, widths[single_level_stage - 1])
    if weights is not None:
        load_imagenet_weights(backbone.body, weights)
    freeze_stages(stages, trainable_layers)
    return backbone


def _stage_channels(net: torchvision.models.ResNet, stage: int) -> int:
    """Output channels of ResNet ``layer{stage}``: its last block's last conv."""
    block = getattr(net, f"layer{stage}")[-1]
    last_conv = [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]
    return last_conv.out_channels


def _conv_layers(features: nn.Sequential, end: int) -> "OrderedDict[str, nn.Module]":
    """The first ``end`` children of a torchvision ``features`` Sequential under their own names ("0", "1"...)."""
    return OrderedDict((str(i), features[i]) for i in range(end))


def _classifier_features(build: Callable[..., nn.Module]) -> nn.Sequential:
    """The ``features`` of a torchvision classifier, built on the meta device so that its large fully connected
    layers cost neither time nor memory, then materialised on the CPU with He initialisation (normal, fan-out,
    zero biases: torchvision's VGG init)."""
    with torch.device("meta"):
        features = build(weights=None).features
    features = features.to_empty(device="cpu")
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def _stages(layers: "OrderedDict[str, nn.Module]", starts: Sequence[int]) -> list[list[nn.Module]]:
    """Cut the layers into stages, stage ``k`` running from index ``starts[k]`` to the next start."""
    modules = list(layers.values())
    return [modules[a:b] for a, b in zip(starts, list(starts[1:]) + [len(modules)])]


def _classifier_backbone(
    build: Callable[..., nn.Module],
    end: int,
    channels: int,
    stage_starts: Sequence[int],
    trainable_layers: int,
    weights: str | Path | None,
) -> Backbone:
    """A single-level backbone from the first ``end`` layers of a torchvision classifier's ``features``."""
    layers = _conv_layers(_classifier_features(build), end)
    backbone = Backbone(StageExtractor(layers, {str(end - 1): "0"}), channels)
    if weights is not None:
        load_imagenet_weights(backbone.body, weights, prefix="features.")
    freeze_stages(_stages(layers, stage_starts), trainable_layers)
    return backbone


def vgg16(*, trainable_layers: int = 3, weights: str | Path | None = None) -> Backbone:
    """VGG16 up to conv5_3 + ReLU (stride 16, 512 channels), the paper's Faster R-CNN feature map. Stages are
    the five conv blocks (a block ends at its max-pool). ``weights``: torchvision's ImageNet ``vgg16`` checkpoint
    (``features.*`` keys); the detectors' builders also take fc6/fc7 from it."""
    return _classifier_backbone(torchvision.models.vgg16, 30, 512, VGG16_STAGE_STARTS, trainable_layers, weights)


def alexnet(*, trainable_layers: int = 4, weights: str | Path | None = None) -> Backbone:
    """AlexNet (torchvision's single-tower variant) up to conv5 + ReLU: stride 16, 256 channels. Stages are the
    five conv layers (each with the ReLU and pool after it)."""
    return _classifier_backbone(torchvision.models.alexnet, 12, 256, ALEXNET_STAGE_STARTS, trainable_layers, weights)


def mobilenet_v3_large(
    *, fpn: bool = False, frozen_bn: bool = True, trainable_layers: int = 3, weights: str | Path | None = None
) -> Backbone:
    """MobileNetV3-Large ``features``: single-level up to the last conv (stride 32, 960 channels), or a pyramid
    over the last two stages as torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` (both stride 32, plus the
    pooled level). Stages are torchvision's: the stem, each block that downsamples with the blocks after it, and
    the last conv."""
    features = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(frozen_bn)).features
    layers = _conv_layers(features, len(features))
    starts = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    stages = _stages(layers, starts)
    if fpn:
        returned = starts[-2:]
        body = StageExtractor(layers, {str(i): str(k) for k, i in enumerate(returned)})
        pyramid = FeaturePyramidNetwork(
            [features[i].out_channels for i in returned], FPN_CHANNELS, extra_blocks=LastLevelMaxPool()
        )
        backbone = Backbone(body, FPN_CHANNELS, pyramid)
    else:
        backbone = Backbone(StageExtractor(layers, {str(len(features) - 1): "0"}), features[-1].out_channels)
    if weights is not None:
        load_imagenet_weights(backbone.body, weights, prefix="features.")
    freeze_stages(stages, trainable_layers)
    return backbone


TINY_LAYERS = ((1, 2, 1), (2, 2, 1), (2, 1, 1), (4, 2, 1), (4, 1, 1), (4, 1, 2), (4, 1, 4))
"""The tiny backbone's conv layers as (width multiple, stride, dilation)."""


def tiny(*, width: int = 32, groups: int = 8) -> Backbone:
    """A small stride-8 backbone that trains from scratch on a CPU (the bundled shapes models use it).

    Seven 3x3 conv + GroupNorm + ReLU layers (:data:`TINY_LAYERS`): three stride-2 layers, then dilations 2 and 4
    at stride 8, so each output cell sees 135 pixels while the map keeps an 8-pixel grid. GroupNorm rather than
    BatchNorm because detection batches hold one or two images; it behaves the same in training and inference.
    ``4 * width`` output channels.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = 3
    for index, (multiple, stride, dilation) in enumerate(TINY_LAYERS, 1):
        out = multiple * width
        conv = nn.Conv2d(channels, out, 3, stride, padding=dilation, dilation=dilation, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        layers[f"conv{index}"] = nn.Sequential(conv, nn.GroupNorm(min(groups, out), out), nn.ReLU(inplace=True))
        channels = out
    return Backbone(StageExtractor(layers, {f"conv{len(TINY_LAYERS)}": "0"}), channels)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": lambda **kw: resnet(18, **kw),
    "resnet50": lambda **kw: resnet(50, **kw),
    "vgg16": vgg16,
    "alexnet": alexnet,
    "mobilenet_v3_large": mobilenet_v3_large,
    "tiny": tiny,
}


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every ``FrozenBatchNorm2d`` into the convolution it follows, for inference; returns how many.

    A frozen BN is the per-channel affine map ``y = x * s + t`` with ``s = weight / sqrt(running_var + eps)`` and
    ``t = bias - running_mean * s``, so ``bn(conv(x))`` equals a conv with weight ``W * s`` and bias
    ``b * s + t``; the BN becomes ``nn.Identity``. Exact up to float rounding (about 1e-6 relative), and it saves
    a full pass over every activation. A BN is folded when it directly follows a ``Conv2d`` in its parent's
    registration order, which is the data flow in torchvision's ResNet, MobileNet and ``Conv2dNormActivation``.
    The folded model's state dict no longer has the BN keys: fold after loading weights, never before saving.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                _fold_into(conv, bn)
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    """Rewrite ``conv`` in place to compute ``bn(conv(x))``."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C,)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
