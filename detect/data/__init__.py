"""Detection data sets: Pascal VOC (:mod:`.voc`), COCO JSON (:mod:`.coco`), YOLO txt labels (:mod:`.yolo`), LabelMe
JSON (:mod:`.labelme`) and the built-in synthetic shapes (:mod:`.shapes`). :mod:`.layouts` recognises and opens data
on disk in any of the layouts people have them in; :mod:`.check` reports on a set before training.

Every data set yields ``(image, target)``: ``image`` RGB ``uint8`` ``HxWx3``; ``target`` a dict with at least
``boxes`` float32 ``(N, 4)`` xyxy pixels, ``labels`` int64 ``(N,)`` 1-based into ``class_names``, ``difficult`` bool
``(N,)`` and ``image_id``.

Annotation problems (a box outside its image or of zero size, an unknown class, a missing image) are handled per
the ``on_error`` flag of every reader: ``"raise"`` stops at the first with a
:class:`~detect.errors.DatasetError`; ``"skip"`` drops the faulty object (or the whole image, when the image itself
is at fault), logs a warning and records an :class:`AnnotationProblem` in the data set's ``problems``. Nothing is
dropped without a record.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from detect.errors import DatasetError, ImageError
from detect.io import decode_image

__all__ = ["AnnotationProblem", "ProblemLog", "OnError", "read_image", "copy_target"]

OnError = Literal["raise", "skip"]
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationProblem:
    """One skipped item: ``source`` the file at fault, ``message`` naming the file and the object."""

    source: str
    message: str


class ProblemLog:
    """Collects annotation problems per ``on_error``: raises the first one, or records and logs each."""

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise DatasetError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.problems: list[AnnotationProblem] = []

    def report(self, source: str, message: str) -> None:
        """``message`` already names the file and object; with ``on_error="raise"`` this raises it."""
        if self.on_error == "raise":
            raise DatasetError(message, path=source)
        _log.warning("skipped: %s", message)
        self.problems.append(AnnotationProblem(source, message))


def read_image(path: str | os.PathLike, source: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image as the CLI and the API do (:func:`detect.io.decode_image`: RGB ``uint8``, EXIF-upright).
    Its errors, and a decoded ``(H, W)`` other than ``size`` when given, become :class:`DatasetError` naming
    ``source`` (the annotation file) too."""
    try:
        image = decode_image(path)
    except ImageError as e:
        raise DatasetError(f"{source}: image {path}: {e.message}", path=source) from e
    if size is not None and image.shape[:2] != tuple(size):
        raise DatasetError(
            f"{source}: image {path} is {image.shape[1]}x{image.shape[0]} (EXIF-upright) but the annotation says "
            f"{size[1]}x{size[0]}",
            path=source,
        )
    return image


def copy_target(target: dict) -> dict:
    """A copy of a target dict whose arrays the caller may modify."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in target.items()}
