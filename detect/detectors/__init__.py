"""Detectors by name: a plain dict from a detector name to its builder.

Every builder takes the public class list as ``class_names=`` (background excluded) plus its own keyword options,
e.g. ``DETECTORS["sppnet_alexnet"](class_names=SHAPES_CLASSES)``; Faster R-CNN builders default to COCO's 90 names.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from detect.detectors.faster_rcnn import fasterrcnn_resnet50_fpn, fasterrcnn_tiny, fasterrcnn_vgg16
from detect.detectors.rcnn import rcnn_alexnet, rcnn_tiny, rcnn_vgg16
from detect.detectors.sppnet import sppnet_alexnet, sppnet_tiny, sppnet_vgg16

DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_tiny": fasterrcnn_tiny,
    "fasterrcnn_vgg16": fasterrcnn_vgg16,
    "rcnn_alexnet": rcnn_alexnet,
    "rcnn_tiny": rcnn_tiny,
    "rcnn_vgg16": rcnn_vgg16,
    "sppnet_alexnet": sppnet_alexnet,
    "sppnet_tiny": sppnet_tiny,
    "sppnet_vgg16": sppnet_vgg16,
}
