"""LabelMe JSON annotations: one ``<image stem>.json`` per image (written by LabelMe, X-AnyLabeling and others).

Decisions:
- **Shapes.** A ``rectangle`` (two opposite corners, in any order) is a box; a ``polygon`` becomes its tight box
  (people often outline objects); any other ``shape_type`` (point, line, circle, ...) is not a detection object and
  is a problem. Points are continuous pixel coordinates, the library's convention already (no ``+1``).
- **Sizes.** ``imageWidth``/``imageHeight`` are required; a box must lie inside them (an overshoot of at most
  :data:`~detect.data.coco.EDGE_TOLERANCE` pixels is clipped).
- **Images** are found in ``images_dir`` by the file's stem (``imagePath`` may point anywhere, often to the
  labeller's own disk, so it is not followed). Embedded ``imageData`` is ignored.
- **Classes.** ``class_names`` when given (a shape of another label is an unknown class), else the sorted labels.
- Problems follow ``on_error`` (see :mod:`detect.data`): a file that is not LabelMe JSON drops its image, a bad
  shape drops itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from detect.data import OnError, ProblemLog, copy_target, read_image
from detect.data.coco import EDGE_TOLERANCE
from detect.errors import DatasetError

__all__ = ["LabelmeDataset"]

_MAX_JSON_BYTES = 64 << 20  # embedded imageData makes these files large, but not this large


class LabelmeDataset:
    """Images and LabelMe JSON files in two folders (may be one), index-addressable.

    ``dataset[i]`` is ``(image, target)``: ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` 1-based into
    ``class_names``, ``difficult`` bool ``(N,)`` (LabelMe's ``difficult`` flag when present, else False) and
    ``image_id`` (the stem). Every JSON needs its image; ``problems`` lists what ``on_error="skip"`` dropped.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        on_error: OnError = "raise",
        image_suffixes: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"),
    ) -> None:
        self.images_dir, self.annotations_dir = Path(images_dir), Path(annotations_dir)
        log = ProblemLog(on_error)
        images = {p.stem: p for p in sorted(self.images_dir.iterdir()) if p.suffix.lower() in image_suffixes}
        parsed = []
        for path in sorted(self.annotations_dir.glob("*.json")):
            if path.stem not in images:
                log.report(str(path), f"{path}: no image {path.stem}.* in {self.images_dir}")
                continue
            record = _parse(path, log)
            if record is not None:
                parsed.append((images[path.stem], record))
        if not parsed and not log.problems:
            raise DatasetError(f"no LabelMe .json files in {self.annotations_dir}")
        if class_names is None:
            class_names = sorted({shape[0] for _, record in parsed for shape in record["shapes"]})
        self.class_names: tuple[str, ...] = tuple(class_names)
        index = {name: k + 1 for k, name in enumerate(self.class_names)}
        self.files = tuple(image for image, _ in parsed)
        self.sizes = tuple((record["height"], record["width"]) for _, record in parsed)  # (H, W)
        self._targets = [_target(record, index, log) for _, record in parsed]
        self.problems = tuple(log.problems)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        return read_image(self.files[i], self._targets[i]["source"], self.sizes[i]), self.annotation(i)

    def annotation(self, i: int) -> dict:
        """The target of image ``i`` without decoding the image."""
        target = copy_target(self._targets[i])
        del target["source"]
        return target


def _parse(path: Path, log: ProblemLog) -> dict | None:
    """``{"width", "height", "shapes": [(label, box, difficult, where)], "source"}``, or ``None`` after reporting a
    file that is not usable."""
    where = str(path)
    try:
        data = path.read_bytes()[: _MAX_JSON_BYTES + 1]
        document = json.loads(data) if len(data) <= _MAX_JSON_BYTES else None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.report(where, f"{where}: not readable JSON ({e})")
        return None
    if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
        log.report(where, f"{where}: not a LabelMe file (expected an object with a 'shapes' list)")
        return None
    width, height = document.get("imageWidth"), document.get("imageHeight")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        log.report(where, f"{where}: imageWidth and imageHeight must be positive integers, got {width!r}x{height!r}")
        return None
    shapes = []
    for j, shape in enumerate(document["shapes"]):
        parsed = _shape(shape, width, height)
        at = f"{where}: shape {j} ({shape.get('label') if isinstance(shape, dict) else None!r})"
        if isinstance(parsed, str):
            log.report(where, f"{at}: {parsed}")
        else:
            shapes.append((*parsed, at))
    return {"width": width, "height": height, "shapes": shapes, "source": where}


def _shape(shape: object, width: int, height: int) -> tuple[str, list[float], bool] | str:
    """``(label, xyxy box, difficult)`` of one shape, or what is wrong with it."""
    if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or not shape["label"].strip():
        return "needs a non-empty 'label'"
    kind = shape.get("shape_type") or "polygon"
    points = shape.get("points")
    if kind not in ("rectangle", "polygon"):
        return f"shape_type {kind!r} is not a box (only rectangle and polygon are)"
    try:
        xy = np.array(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return f"points {points!r} are not [[x, y], ...]"
    if len(xy) < 2 or not np.isfinite(xy).all():
        return f"points {points!r} need at least two finite [x, y]"
    x1, y1 = xy.min(axis=0)
    x2, y2 = xy.max(axis=0)
    if not (x2 > x1 and y2 > y1):
        return f"empty box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})"
    tol = EDGE_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return f"box (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) is not inside the {width}x{height} image"
    box = [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]
    return shape["label"], box, bool((shape.get("flags") or {}).get("difficult", False))


def _target(record: dict, index: dict[str, int], log: ProblemLog) -> dict:
    """The target dict of one parsed file; a shape of a class not in ``index`` is reported and left out."""
    kept = []
    for label, box, difficult, at in record["shapes"]:
        if label in index:
            kept.append((index[label], box, difficult))
        else:
            log.report(record["source"], f"{at}: class {label!r} is not one of {list(index)}")
    return {
        "boxes": np.array([box for _, box, _ in kept], dtype=np.float32).reshape(-1, 4),
        "labels": np.array([label for label, _, _ in kept], dtype=np.int64),
        "difficult": np.array([hard for _, _, hard in kept], dtype=bool),
        "image_id": Path(record["source"]).stem,
        "source": record["source"],
    }

