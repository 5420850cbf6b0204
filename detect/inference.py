"""The one inference path: load a model for serving, run a batch, refine the results per request.

``detect predict`` (every batch engine), ``detect demo`` and the REST API all load models with
:func:`load_model`, run them with :func:`forward_batch` and apply a request's thresholds with :class:`Refinement`.

Decisions:

- **Loading** goes through :func:`detect.weights.load_detector` (the one reader of weights files) with frozen
  BatchNorm folded into the convolutions: a ResNet-50-FPN is about 10 % faster for the same detections up to float
  rounding. Without explicit weights a family uses its bundled ``<family>_shapes`` weights
  (:func:`default_weights`).
- **Backends.** ``load_model(..., backend="onnxruntime")`` returns an exported model run by ONNX Runtime,
  ``"pt2"`` a ``torch.export`` program and ``"aoti"`` an AOTInductor package (:mod:`detect.export`), behind the
  same interface, so the CLI, the API and every engine call them unchanged.
- **One batch, one forward; failures stay per image.** :func:`forward_batch` runs the batch in one forward pass;
  when it raises, the images are retried one by one so that only the culprit fails, with an
  :class:`~detect.errors.InferenceError`.
- **Threshold names.** Model configs call the per-class NMS overlap ``nms_thresh`` and the score cut
  ``score_thresh`` (torchvision's names, kept so that checkpoints' and manifests' configs stay loadable); the CLI
  and the API call a request's ``iou_threshold`` and ``score_threshold``. This module is where one maps onto the
  other: a request can only tighten the model's own (:class:`Refinement`), and both front ends validate the values
  here (:func:`check_thresholds`), so they refuse the same things.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detect import weights as registered_weights
from detect.detectors import DETECTORS, families
from detect.errors import ConfigError, DetectError, InferenceError, UnknownClassError, UnknownModelError
from detect.ops.nms import batched_nms
from detect.structures import Detections

__all__ = [
    "torch_device",
    "BACKENDS",
    "BUNDLED_SUFFIX",
    "DEFAULT_SCORE_THRESHOLD",
    "Refinement",
    "bundled_weights_name",
    "check_thresholds",
    "default_weights",
    "encode_png",
    "forward_batch",
    "load_model",
    "png_base64",
    "proposal_methods",
    "registered_names",
    "resolve_classes",
    "resolve_device",
]

BUNDLED_SUFFIX = "_shapes"
DEFAULT_SCORE_THRESHOLD = 0.25
"""The score threshold people get by default (``detect predict``, :class:`detect.Detector`, ``POST /detect``).
Models keep a low threshold of their own (0.01 for the bundled ones) because evaluation needs the whole
precision-recall curve; shown to a person, those low-scoring boxes are noise (32 boxes per photo on average
with the bundled Faster R-CNN at 0.01). A request's threshold can only tighten the model's, so 0 asks for
everything the model keeps."""


BACKENDS = ("torch", "onnxruntime", "pt2", "aoti")


def load_model(
    weights: str | os.PathLike,
    device: str | torch.device = "auto",
    family: str | None = None,
    backend: str = "torch",
) -> Any:
    """The detector of ``weights`` (a registered name or a file, see :func:`detect.weights.load_detector`) for
    inference: eval mode on ``device`` (``"auto"``: :func:`resolve_device`), frozen BatchNorm folded. ``family``, when given, must be a known family
    (:class:`UnknownModelError` otherwise); the weights themselves say which detector they hold.

    ``backend`` ``"onnxruntime"`` runs the model with ONNX Runtime (:mod:`detect.export`): ``weights`` is then an
    exported ``.onnx`` file, or weights that are exported once into the cache (:func:`detect.export.cached_onnx`).
    ``"pt2"`` and ``"aoti"`` load a ``.pt2`` file written by ``detect export --format pt2|aoti``.
    Either way the result has the detector interface (``name``, ``class_names``, ``__call__(images, **kw) ->
    (detections, losses)``), so callers do not know which runtime answers. An ``.onnx`` or ``.pt2`` file with the
    torch backend, or an unknown backend, is a :class:`ConfigError`."""
    if family is not None and family not in families():
        raise UnknownModelError(f"unknown detector family {family!r}; known: {', '.join(families())}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    suffix = Path(weights).suffix.lower()
    is_onnx = suffix == ".onnx"
    device = resolve_device(device)
    if backend == "torch":
        if is_onnx or suffix == ".pt2":
            runner = "the onnxruntime backend" if is_onnx else "the pt2 or aoti backend"
            raise ConfigError(f"{weights} is {'an ONNX' if is_onnx else 'a .pt2'} export: run it with {runner}")
        return registered_weights.load_detector(weights, device, fold_batchnorm=True)
    from detect import export

    if backend in ("pt2", "aoti"):
        if suffix != ".pt2":
            raise ConfigError(f"the {backend} backend runs a .pt2 file from `detect export --format {backend}`; "
                              f"got {weights}")
        return export.load_exported(weights, backend, device)
    return export.load_onnx(weights if is_onnx else export.cached_onnx(weights), device)


def resolve_device(device: str | torch.device) -> str:
    """``"auto"`` (the default everywhere): ``"cuda"`` when torch sees a GPU, else ``"cpu"``; any other name is
    returned as given (a device this machine lacks is refused when the model moves there)."""
    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def bundled_weights_name(family: str) -> str:
    """The registered name of a family's bundled weights (trained on the synthetic shapes set): ``<family>_shapes``."""
    return f"{family}{BUNDLED_SUFFIX}"


def registered_names() -> set[str]:
    """Names of the weights on the search path (:func:`detect.weights.list_weights`)."""
    return {entry.name for entry in registered_weights.list_weights()}


def default_weights(family: str) -> str:
    """The weights a family uses when none are given: its bundled name when registered, else a
    :class:`~detect.errors.WeightsError` saying how to find or give weights."""
    name = bundled_weights_name(family)
    if name not in registered_names():
        raise registered_weights.WeightsError(
            f"no --weights given and no registered weights named {name!r} (the default for --model {family}); "
            f"`detect weights list` shows the registered names; pass --weights NAME|PATH"
        )
    return name


def proposal_methods(detector: Any) -> tuple[str, ...]:
    """The proposal methods a model supports: its own ``proposal_methods`` when it declares them, else its
    registry entry's, else ``rpn`` / ``selective_search`` by the modules it has (a custom model)."""
    declared = getattr(detector, "proposal_methods", None)
    if declared is not None:
        return tuple(declared)
    name = getattr(detector, "name", None)
    if isinstance(name, str) and name in DETECTORS:
        return DETECTORS[name].proposal_methods
    return tuple(m for m, attr in (("rpn", "rpn"), ("selective_search", "proposer")) if hasattr(detector, attr))


def check_thresholds(
    score_threshold: float | None, iou_threshold: float | None, max_detections: int | None = None
) -> None:
    """The request-level limits both front ends enforce: ``0 <= score_threshold <= 1``, ``0 < iou_threshold <=
    1``, ``max_detections >= 1`` (NaN refused); :class:`ConfigError` otherwise (exit 2 in the CLI, 422 in the API)."""
    if score_threshold is not None and not (math.isfinite(score_threshold) and 0.0 <= score_threshold <= 1.0):
        raise ConfigError(f"score threshold must be between 0 and 1, got {score_threshold}")
    if iou_threshold is not None and not (math.isfinite(iou_threshold) and 0.0 < iou_threshold <= 1.0):
        raise ConfigError(f"IoU threshold must be above 0 and at most 1, got {iou_threshold}")
    if max_detections is not None and max_detections < 1:
        raise ConfigError(f"max detections must be at least 1, got {max_detections}")


_CLASS_ID = re.compile(r"[0-9]{1,6}")  # str.isdigit() takes "²" and "١", and int() of 5,000 digits raises


def resolve_classes(classes: Iterable[str | int], class_names: Sequence[str]) -> tuple[int, ...]:
    """1-based class ids for names or ids (``"3"`` counts as an id: ASCII digits only, so ``"²"`` or ``"١"`` are
    names, and unknown ones); :class:`UnknownClassError` otherwise. An empty filter would keep nothing, which no
    caller means: it is a :class:`ConfigError` (omit the filter to keep every class)."""
    classes = list(classes)
    if not classes:
        raise ConfigError("the class filter is empty; name at least one class, or omit the filter to keep all")
    ids = []
    for value in classes:
        text = str(value).strip()
        if _CLASS_ID.fullmatch(text) and 1 <= int(text) <= len(class_names):
            ids.append(int(text))
        elif text in class_names:
            ids.append(class_names.index(text) + 1)
        else:
            raise UnknownClassError(f"unknown class {text!r}; the model has {len(class_names)} classes")
    return tuple(sorted(set(ids)))


@dataclass(frozen=True)
class Refinement:
    """Per-request thresholds applied to what the detector returned.

    The detector has already thresholded and suppressed at its own settings, which cannot be undone, so each
    field can only tighten them: the effective score threshold is ``max(requested, model's)``, the effective
    IoU threshold ``min(requested, model's)``. NMS is re-run per class with
    :func:`detect.ops.nms.batched_nms` at the requested IoU: every pair the model kept overlaps by at most the
    model's threshold, so a looser request removes nothing and a stricter one suppresses more. ``class_ids``
    keeps only those classes; ``max_detections`` keeps the best-scoring ones.
    """

    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_detections: int | None = None
    class_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_thresholds(self.score_threshold, self.iou_threshold, self.max_detections)

    def apply(self, detections: Detections) -> Detections:
        keep = torch.ones_like(detections.scores, dtype=torch.bool)  # (N,)
        if self.score_threshold is not None:
            keep &= detections.scores >= self.score_threshold
        if self.class_ids is not None:
            wanted = torch.tensor(self.class_ids, dtype=detections.labels.dtype, device=detections.labels.device)
            keep &= torch.isin(detections.labels, wanted)
        result = detections.filter(keep)
        if self.iou_threshold is not None and len(result):
            result = result.filter(batched_nms(result.boxes, result.scores, result.labels, self.iou_threshold))
        else:
            result = result.filter(torch.argsort(result.scores, descending=True, stable=True))
        if self.max_detections is not None:
            result = result.filter(slice(0, self.max_detections))
        return result


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def forward_batch(
    detector: Any, images: list[np.ndarray], proposals: Sequence[torch.Tensor] | None = None, **kwargs: Any
) -> list[Detections | DetectError]:
    """One forward pass for the batch; image by image when it raises, so only the culprit fails (with an
    :class:`InferenceError`). ``proposals`` (one ``(N, 4)`` tensor per image, for region detectors) and ``kwargs``
    go to the detector's ``forward``."""
    if not images:
        return []
    extra = kwargs if proposals is None else {**kwargs, "proposals": list(proposals)}
    try:
        with torch.inference_mode():
            return list(detector(images, **extra)[0])
    except (RuntimeError, ValueError) as err:
        if len(images) == 1:
            return [InferenceError(f"the model failed on this image: {str(err).splitlines()[0][:200]}")]
        return [
            result
            for i, image in enumerate(images)
            for result in forward_batch(detector, [image], None if proposals is None else [proposals[i]], **kwargs)
        ]


def torch_device(name: str | torch.device) -> torch.device:
    """:func:`resolve_device` as a ``torch.device``, checked: :class:`ConfigError` for a name torch does not know
    or a CUDA device this machine lacks (training and evaluation want the error before anything is built)."""
    try:
        device = torch.device(resolve_device(name))
    except RuntimeError as err:
        raise ConfigError(f"device {str(name)!r}: {err}") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {str(name)!r}: no such CUDA device here ({torch.cuda.device_count()} found)")
    return device
