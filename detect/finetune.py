"""Fine-tuning from a full detector: copy what fits, rebuild the class layers for the new classes, freeze stages.

A recipe's ``init: NAME_OR_FILE`` (``detect train --init``) starts a detector from a trained one, as torchvision's,
detectron2's and Ultralytics' users fine-tune a COCO Faster R-CNN on their own classes: the backbone, FPN, RPN and
box head come from the source, only the class-specific layers start afresh.

Decisions:

- The source is anything :func:`detect.weights.load_detector` reads: a registered name (e.g.
  ``fasterrcnn_resnet50_fpn_coco`` after ``detect weights pull``/``import``), a ``detect train`` model file, or a
  torchvision checkpoint (``.pth``, read with ``weights_only=True``; its 91 classes are COCO's).
- Every tensor whose name and shape are the same in both models is copied bit for bit, except the class-specific
  ones (the fully connected :data:`CLASS_LAYERS`: ``cls_score``, ``bbox_pred`` and the region detectors'
  ``svm``). Those keep the new model's initialisation, except the rows of classes the source also has: the background row (row 0, when the
  layer has one) and each class whose name the source knows (compared case-, space-, ``_`` and ``-`` blind, plus
  the few VOC names COCO spells otherwise, :data:`ALIASES`) take the source's rows, four per class in
  ``bbox_pred``. So a ``dog`` class starts by recognising COCO's dogs.
- Frozen BatchNorm's ``eps`` is not a tensor: it is copied module by module too (torchvision's COCO checkpoints
  were trained with 0.0).
- What was copied, re-initialised (the class layers), mapped (new class <- source class) and left out (tensors the
  source lacks or has in another shape) is returned as an :class:`InitReport`, whose :meth:`InitReport.summary`
  the trainer prints. A source of which nothing fits is a :class:`ConfigError`.
- ``trainable_backbone_layers`` is torchvision's: the number of backbone stages, counted from the top, whose
  parameters train (:func:`backbone_stages`: ResNet's ``conv1``, ``layer1``-``layer4``; VGG16's five conv blocks;
  AlexNet's five convs; the tiny backbone's seven conv layers). The FPN and the heads always train; frozen
  BatchNorm never does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detect import weights
from detect.backbones import ALEXNET_STAGE_STARTS, VGG16_STAGE_STARTS, Backbone, freeze_stages
from detect.errors import ConfigError
from detect.pretrain import find_backbone

__all__ = ["ALIASES", "CLASS_LAYERS", "InitReport", "backbone_stages", "freeze_backbone", "init_detector"]

CLASS_LAYERS: dict[str, int] = {"cls_score": 1, "bbox_pred": 4, "svm": 1}
"""Class-specific layers (the last module name) and their rows per class."""

ALIASES: dict[str, str] = {"aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv"}
"""VOC class names and COCO's for the same class (beyond spacing and case)."""


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_detector` did: tensor names ``copied`` whole, class-specific tensors ``reinitialised``
    (with the mapped rows copied), tensors ``skipped`` (missing in the source or of another shape), and
    ``mapped``: new class name -> source class name."""

    source: str
    copied: tuple[str, ...]
    reinitialised: tuple[str, ...]
    skipped: tuple[str, ...]
    mapped: dict[str, str] = field(default_factory=dict)
    new_classes: tuple[str, ...] = ()

    def summary(self) -> str:
        """A few lines for the log: counts per part, the class layers, the mapped and the new classes."""
        parts: dict[str, int] = {}
        for name in self.copied:
            part = _part(name)
            parts[part] = parts.get(part, 0) + 1
        counts = ", ".join(f"{part} {n}" for part, n in parts.items())
        mapped = ", ".join(f"{new} <- {old}" for new, old in self.mapped.items()) or "none"
        lines = [
            f"init from {self.source}: copied {len(self.copied)} tensors ({counts})",
            f"  re-initialised for the new classes: {', '.join(self.reinitialised) or 'none'}",
            f"  classes mapped from the source: {mapped}; new: {', '.join(self.new_classes) or 'none'}",
        ]
        if self.skipped:
            lines.append(f"  left at initialisation (not in the source or another shape): {', '.join(self.skipped)}")
        return "\n".join(lines)


def _part(name: str) -> str:
    """The part of the detector a tensor belongs to, for the summary (``backbone.fpn``, ``rpn``, ...)."""
    pieces = name.split(".")
    if pieces[0] == "backbone" and len(pieces) > 2:
        return "fpn" if pieces[1] == "fpn" else "backbone"
    if pieces[0] == "roi_heads" and len(pieces) > 2:
        return "box head" if pieces[1] == "box_head" else pieces[1]
    return pieces[0]


def _key(name: str) -> str:
    plain = re.sub(r"[\s_\-]+", "", name.lower())
    return ALIASES.get(plain, plain)


def class_map(new: Sequence[str], source: Sequence[str]) -> dict[int, int]:
    """0-based index in ``new`` -> 0-based index in ``source`` of the classes both name (see the module
    docstring); the first source class of a name wins."""
    known: dict[str, int] = {}
    for index, name in enumerate(source):
        known.setdefault(_key(name), index)
    return {i: known[_key(name)] for i, name in enumerate(new) if _key(name) in known}


def _class_rows(layer: torch.Tensor, classes: int, per_class: int) -> bool:
    """Whether ``layer`` (rows first) has a background block before the ``classes`` class blocks."""
    if layer.shape[0] == per_class * (classes + 1):
        return True
    if layer.shape[0] == per_class * classes:
        return False
    raise ConfigError(f"a class layer of {layer.shape[0]} rows does not fit {classes} classes x {per_class}")


def _map_rows(
    mine: torch.Tensor, theirs: torch.Tensor, per_class: int, sizes: tuple[int, int], mapping: dict[int, int]
) -> torch.Tensor:
    """``mine`` with the background block and the mapped classes' blocks of rows taken from ``theirs``."""
    out = mine.clone()
    background = _class_rows(mine, sizes[0], per_class)
    if background != _class_rows(theirs, sizes[1], per_class):
        raise ConfigError("the source's class layer has another layout (with/without a background row)")
    shift = 1 if background else 0
    pairs = [(0, 0)] if background else []
    pairs += [(new + shift, old + shift) for new, old in mapping.items()]
    for new, old in pairs:
        out[new * per_class : (new + 1) * per_class] = theirs[old * per_class : (old + 1) * per_class]
    return out


def _class_layers(model: nn.Module) -> dict[str, str]:
    """Module path -> layer kind of ``model``'s class-specific layers: the fully connected :data:`CLASS_LAYERS`
    (the RPN's ``bbox_pred`` is a convolution, per anchor, not per class)."""
    return {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in CLASS_LAYERS
    }


def init_detector(model: nn.Module, source: str | Path) -> InitReport:
    """Copy into ``model`` every tensor of the detector ``source`` whose name and shape fit, rebuild the class
    layers for ``model.class_names`` keeping the rows of classes the source has; see the module docstring."""
    donor = weights.load_detector(source)
    theirs, own = donor.state_dict(), model.state_dict()
    mapping = class_map(model.class_names, donor.class_names)
    sizes = (len(model.class_names), len(donor.class_names))
    layers = _class_layers(model)
    state, copied, reinitialised, skipped = {}, [], [], []
    for name, value in own.items():
        layer = layers.get(name.rsplit(".", 1)[0])
        if layer and name in theirs and theirs[name].shape[1:] == value.shape[1:]:
            state[name] = _map_rows(value, theirs[name], CLASS_LAYERS[layer], sizes, mapping)
            reinitialised.append(name)
        elif name in theirs and theirs[name].shape == value.shape:
            state[name] = theirs[name]
            copied.append(name)
        else:
            skipped.append(name)
    if not copied:
        raise ConfigError(f"init {source}: no tensor of {donor.name} fits {model.name} (names or shapes differ)")
    model.load_state_dict(state, strict=False)
    donor_modules = dict(donor.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d) and isinstance(donor_modules.get(name), FrozenBatchNorm2d):
            module.eps = donor_modules[name].eps
    names = model.class_names
    return InitReport(
        source=str(source),
        copied=tuple(copied),
        reinitialised=tuple(reinitialised),
        skipped=tuple(skipped),
        mapped={names[new]: donor.class_names[old] for new, old in mapping.items()},
        new_classes=tuple(n for i, n in enumerate(names) if i not in mapping),
    )


def backbone_stages(backbone: Backbone) -> list[list[nn.Module]]:
    """The stages of ``backbone``'s body, bottom first, as ``trainable_backbone_layers`` counts them."""
    body = backbone.body
    names = list(body)
    if "conv1" in names and "layer1" in names:  # ResNet: the stem (conv1 + bn1), then layer1..layer4 as present
        return [[body["conv1"], body["bn1"]]] + [[body[n]] for n in names if n.startswith("layer")]
    if all(re.fullmatch(r"conv\d+", n) for n in names):  # the tiny backbone: one conv layer per stage
        return [[body[n]] for n in names]
    modules = list(body.values())
    starts = {30: VGG16_STAGE_STARTS, 12: ALEXNET_STAGE_STARTS}.get(len(modules))
    if starts is None or not all(isinstance(modules[i], nn.Conv2d) for i in starts):
        raise ConfigError("trainable_backbone_layers: stages are known for ResNet, VGG16, AlexNet and tiny backbones")
    bounds = list(starts) + [len(modules)]
    return [modules[a:b] for a, b in zip(bounds, bounds[1:])]


def freeze_backbone(model: nn.Module, trainable_layers: int) -> int:
    """Make the top ``trainable_layers`` backbone stages of ``model`` train and freeze the others (torchvision's
    ``trainable_backbone_layers``); returns how many stages there are."""
    backbone = find_backbone(model)
    stages = backbone_stages(backbone)
    if not 0 <= trainable_layers <= len(stages):
        raise ConfigError(f"trainable_backbone_layers must lie in [0, {len(stages)}] here, got {trainable_layers}")
    backbone.body.requires_grad_(True)
    freeze_stages(stages, trainable_layers)
    return len(stages)
