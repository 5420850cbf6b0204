"""The detector registry: one plain dict from a detector name to its :class:`DetectorEntry`.

Everything else that lists detectors derives from :data:`DETECTORS`: the CLI's ``--model`` choices and the
families the service serves (:func:`families`), the tiny detectors the bundled weights and the tests use
(:func:`tiny_detector`), training's default configs (:attr:`DetectorEntry.default_config`) and the rebuilding of a
weights file from the detector name in its metadata (:mod:`detect.weights`).

Adding a detector is one module plus one line here: write ``detect/detectors/mine.py`` with an ``nn.Module`` that
has ``name``, ``class_names`` and ``forward(images, targets=None) -> (detections, losses)``, and a builder
``mine_small(class_names, *, config=MineConfig()) -> Mine`` (keyword ``config``, a frozen dataclass, whose default
is the paper's); then add ``_entry(mine_small, "mine", Mine, ("rpn",))`` to :data:`DETECTORS`.

Decisions:
- An entry is callable and calls its builder, so ``DETECTORS["sppnet_alexnet"](class_names=SHAPES_CLASSES)``
  builds a model as the builders do (Faster R-CNN builders default to COCO's 90 names).
- The default config is read from the builder's ``config`` default, so it is written once, in the builder.
- A family is the detector kind a user picks (``faster_rcnn``, ``sppnet``, ``rcnn``); the order of first appearance
  here is the order the service serves them in, the first being the default model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from detect.detectors.faster_rcnn import FasterRCNN, fasterrcnn_resnet50_fpn, fasterrcnn_tiny, fasterrcnn_vgg16
from detect.detectors.rcnn import RCNN, rcnn_alexnet, rcnn_tiny, rcnn_vgg16
from detect.detectors.sppnet import SPPNet, sppnet_alexnet, sppnet_tiny, sppnet_vgg16
from detect.errors import ConfigError

__all__ = ["DETECTORS", "DetectorEntry", "build", "entry", "families", "family_of", "tiny_detector"]


@dataclass(frozen=True)
class DetectorEntry:
    """One detector: its ``name``, ``family``, model class, builder, default config and proposal methods.

    ``tiny`` marks the from-scratch CPU-sized variant of a family (the bundled ``<family>_shapes`` weights)."""

    name: str
    family: str
    cls: type[nn.Module]
    builder: Callable[..., nn.Module]
    default_config: Any
    proposal_methods: tuple[str, ...]
    tiny: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.builder(*args, **kwargs)

    def build(self, class_names: Sequence[str], config: Any = None) -> nn.Module:
        """A freshly initialised model for ``class_names`` (background excluded) with ``config`` (default:
        :attr:`default_config`)."""
        config = self.default_config if config is None else config
        if not isinstance(config, type(self.default_config)):
            raise ConfigError(f"{self.name} takes a {type(self.default_config).__name__}, got {type(config).__name__}")
        return self.builder(class_names=tuple(class_names), config=config)


def _entry(builder: Callable[..., nn.Module], family: str, cls: type[nn.Module], proposals: tuple[str, ...]) -> DetectorEntry:
    default = inspect.signature(builder).parameters["config"].default
    name = builder.__name__
    return DetectorEntry(name, family, cls, builder, default, proposals, tiny=name.endswith("_tiny"))


DETECTORS: dict[str, DetectorEntry] = {
    e.name: e
    for e in (
        _entry(fasterrcnn_resnet50_fpn, "faster_rcnn", FasterRCNN, ("rpn",)),
        _entry(fasterrcnn_vgg16, "faster_rcnn", FasterRCNN, ("rpn",)),
        _entry(fasterrcnn_tiny, "faster_rcnn", FasterRCNN, ("rpn",)),
        _entry(sppnet_alexnet, "sppnet", SPPNet, ("selective_search",)),
        _entry(sppnet_vgg16, "sppnet", SPPNet, ("selective_search",)),
        _entry(sppnet_tiny, "sppnet", SPPNet, ("selective_search",)),
        _entry(rcnn_alexnet, "rcnn", RCNN, ("selective_search",)),
        _entry(rcnn_vgg16, "rcnn", RCNN, ("selective_search",)),
        _entry(rcnn_tiny, "rcnn", RCNN, ("selective_search",)),
    )
}



def families() -> tuple[str, ...]:
    """Detector families in registry order, the service's serving order (the first present is its default)."""
    return tuple(dict.fromkeys(e.family for e in DETECTORS.values()))


def generations() -> tuple[tuple[str, str], ...]:
    """``(family, paper title)`` in the order the papers appeared (R-CNN, SPP-Net, Faster R-CNN): the columns of
    ``detect compare``; read from each family's model class (``title``, ``published``)."""
    first = {}
    for e in DETECTORS.values():
        first.setdefault(e.family, e.cls)
    ordered = sorted(first.items(), key=lambda item: item[1].published)
    return tuple((family, cls.title) for family, cls in ordered)


def entry(name: str) -> DetectorEntry:
    """The registry entry of detector ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in DETECTORS:
        raise ConfigError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]


def build(name: str, class_names: Sequence[str], config: Any = None) -> nn.Module:
    """A freshly initialised detector ``name`` (see :meth:`DetectorEntry.build`)."""
    return entry(name).build(class_names, config)


def family_of(model: nn.Module) -> str:
    """The family of a built detector, from its registered name."""
    return entry(model.name).family


def tiny_detector(family: str) -> DetectorEntry:
    """The tiny detector of ``family`` (the architecture of the bundled ``<family>_shapes`` weights)."""
    found = [e for e in DETECTORS.values() if e.family == family and e.tiny]
    if not found:
        raise ConfigError(f"unknown detector family {family!r}; known: {', '.join(families())}")
    return found[0]
