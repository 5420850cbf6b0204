"""COCO JSON detection data sets (``images``, ``annotations``, ``categories``).

Decisions:
- **Boxes.** COCO's ``bbox`` is ``[x, y, w, h]`` in continuous pixel coordinates, the library's convention already,
  so ``xyxy = [x, y, x + w, y + h]`` with no ``+1``. A box must have ``w > 0`` and ``h > 0`` and lie inside its
  image; an overshoot of at most :data:`EDGE_TOLERANCE` pixels (float rounding of labelling tools) is clipped.
- **Labels.** Category ids need not be contiguous (COCO's own run 1..90 with gaps): without ``class_names`` the
  categories sorted by id become labels 1..K, named by their ``name``. With ``class_names`` the labels follow
  that list and categories are matched by name; an annotation of any other category is an unknown class.
- **Crowds.** ``iscrowd`` annotations are kept, flagged in ``target["iscrowd"]``: a trainer drops them (their
  boxes cover many objects), COCO evaluation treats them as regions to ignore. ``difficult`` comes from an
  optional per-annotation ``difficult`` field (written by :func:`detect.data.shapes.write_coco`), else False.
- **Images without annotations** are kept (background images) with empty targets.
- **Validation** happens when the set is built (every annotation, and that every image file exists), per
  ``on_error`` (see :mod:`detect.data`). An image with an invalid entry (missing, duplicate id, bad size, a file name
  leaving the images folder) is an image-level problem: with ``"skip"`` the image and its annotations go. Pixels
  are decoded only in ``__getitem__``, so :meth:`CocoDataset.annotation` serves evaluation without decoding.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from detect.data import OnError, ProblemLog, copy_target, read_image
from detect.errors import DatasetError

__all__ = ["CocoDataset", "EDGE_TOLERANCE", "first_file_name"]

EDGE_TOLERANCE = 0.01
"""Pixels a box may overshoot its image before it is an error (it is clipped instead)."""


class CocoDataset:
    """Images and a COCO detection JSON on disk, index-addressable.

    ``images_dir`` defaults to an ``images/`` folder beside the JSON when there is one (the layout
    :func:`~detect.data.shapes.write_coco` writes), else the JSON's folder. ``dataset[i]`` is ``(image, target)``
    with ``target``: ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` 1-based into ``class_names``,
    ``difficult`` bool ``(N,)``, ``iscrowd`` bool ``(N,)``, ``area`` float32 ``(N,)`` (COCO's ``area``, else the
    box area) and ``image_id`` (COCO's id). ``category_ids[k-1]`` is the COCO id of label ``k`` (for writing
    results back in COCO ids); ``problems`` lists what ``on_error="skip"`` dropped.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        images_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        self.source = os.fspath(annotation_file)
        json_path = Path(annotation_file)
        if images_dir is None:
            images_dir = json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
        self.images_dir = Path(images_dir)
        log = ProblemLog(on_error)
        document = _read_json(json_path)
        categories = _categories(document, self.source)
        self.class_names, self.category_ids, label_of = _label_space(categories, class_names, self.source)
        images = _images(document, self.images_dir, self.source, log)
        grouped = _annotations(document, images, label_of, categories, self.source, log)
        self.image_ids: tuple[int, ...] = tuple(images)
        self.files: tuple[Path, ...] = tuple(images[i]["path"] for i in self.image_ids)
        self.sizes = tuple((images[i]["height"], images[i]["width"]) for i in self.image_ids)  # (H, W) each
        self._targets = [_target(grouped.get(i, []), i) for i in self.image_ids]
        self.problems = tuple(log.problems)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        return read_image(self.files[i], self.source, self.sizes[i]), self.annotation(i)

    def annotation(self, i: int) -> dict:
        """The target of image ``i`` without decoding the image (a fresh copy the caller may modify)."""
        return copy_target(self._targets[i])


def first_file_name(path: str | os.PathLike) -> str | None:
    """The ``file_name`` of the first image entry of a COCO JSON, ``None`` when it cannot be read (the data set
    then reports why)."""
    try:
        entry = _read_json(Path(path))["images"][0]
    except (DatasetError, IndexError):
        return None
    name = entry.get("file_name") if isinstance(entry, dict) else None
    return name if isinstance(name, str) and _is_relative(name) else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            document = json.load(f)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotations ({e.strerror or e})", path=str(path)) from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})", path=str(path)) from e
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DatasetError(f"{path}: expected a JSON object with an 'images' list", path=str(path))
    for key in ("annotations", "categories"):
        if not isinstance(document.get(key, []), list):
            raise DatasetError(f"{path}: '{key}' must be a list", path=str(path))
    return document


def _categories(document: dict, where: str) -> dict[int, str]:
    """COCO category id -> name. Malformed or duplicate categories are errors whatever ``on_error`` says: the
    label space of the whole set depends on them."""
    categories: dict[int, str] = {}
    for j, category in enumerate(document.get("categories", [])):
        cid = category.get("id") if isinstance(category, dict) else None
        name = category.get("name") if isinstance(category, dict) else None
        if not _is_int(cid) or not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: category {j} needs an integer 'id' and a non-empty 'name'", path=where)
        if cid in categories or name in categories.values():
            raise DatasetError(f"{where}: category {j} ({cid}, {name!r}) repeats an id or a name", path=where)
        categories[cid] = name
    return categories


def _label_space(
    categories: dict[int, str], class_names: Sequence[str] | None, where: str
) -> tuple[tuple[str, ...], tuple[int | None, ...], dict[int, int]]:
    """``(class_names, category id per label, label per known category id)``."""
    if class_names is None:
        ids = sorted(categories)
        return tuple(categories[c] for c in ids), tuple(ids), {c: k + 1 for k, c in enumerate(ids)}
    if len(set(class_names)) != len(class_names) or not all(class_names):
        raise DatasetError(f"class_names must be unique and non-empty, got {list(class_names)}")
    id_of = {name: cid for cid, name in categories.items()}
    label_of = {id_of[name]: k + 1 for k, name in enumerate(class_names) if name in id_of}
    return tuple(class_names), tuple(id_of.get(name) for name in class_names), label_of


def _images(document: dict, images_dir: Path, where: str, log: ProblemLog) -> dict[int, dict[str, Any]]:
    """COCO image id -> ``{"path", "width", "height", "file_name"}`` for every valid image entry, in file order."""
    images: dict[int, dict[str, Any]] = {}
    for j, entry in enumerate(document["images"]):
        entry = entry if isinstance(entry, dict) else {}
        image_id, file_name = entry.get("id"), entry.get("file_name")
        width, height = entry.get("width"), entry.get("height")
        at = f"{where}: image {j} (id {image_id!r}, {file_name!r})"
        if not _is_int(image_id) or not isinstance(file_name, str) or not file_name:
            log.report(where, f"{at}: needs an integer 'id' and a 'file_name'")
        elif image_id in images:
            log.report(where, f"{at}: repeats image id {image_id}")
        elif not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            log.report(where, f"{at}: width and height must be positive integers, got {width!r}x{height!r}")
        elif not _is_relative(file_name):
            log.report(where, f"{at}: file_name must be a relative path inside the images folder")
        elif not (images_dir / file_name).is_file():
            log.report(where, f"{at}: image file {images_dir / file_name} not found")
        else:
            images[image_id] = dict(path=images_dir / file_name, width=width, height=height, file_name=file_name)
    return images


def _annotations(
    document: dict,
    images: dict[int, dict[str, Any]],
    label_of: dict[int, int],
    categories: dict[int, str],
    where: str,
    log: ProblemLog,
) -> dict[int, list[dict]]:
    """Image id -> its valid annotations as ``{"box", "label", "iscrowd", "difficult", "area"}``. Annotations of
    images dropped as invalid go with them (that image's problem was reported once)."""
    entries = [entry for entry in document["images"] if isinstance(entry, dict)]
    image_refs = {entry.get("id") for entry in entries if _is_int(entry.get("id"))}
    grouped: dict[int, list[dict]] = {}
    for j, ann in enumerate(document.get("annotations", [])):
        ann = ann if isinstance(ann, dict) else {}
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in image_refs:
            log.report(where, f"{where}: annotation {j} (id {ann.get('id')!r}): image_id {image_id!r} is no image")
            continue
        if image_id not in images:
            continue
        image = images[image_id]
        at = f"{where}: annotation {j} (id {ann.get('id')!r}, image {image_id} {image['file_name']!r})"
        parsed = _parse_annotation(ann, image["width"], image["height"], label_of, categories, at)
        if isinstance(parsed, str):
            log.report(where, parsed)
        else:
            grouped.setdefault(image_id, []).append(parsed)
    return grouped


def _parse_annotation(
    ann: dict, width: int, height: int, label_of: dict[int, int], categories: dict[int, str], at: str
) -> dict | str:
    """The parsed annotation, or the message of what is wrong with it."""
    category = ann.get("category_id")
    if category not in label_of:
        known = ", ".join(f"{c} ({categories[c]})" for c in label_of)
        name = f" ({categories[category]})" if category in categories else ""
        return f"{at}: category_id {category!r}{name} is not one of the classes: {known}"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_finite(v) for v in bbox):
        return f"{at}: bbox {bbox!r} is not [x, y, w, h] of four finite numbers"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return f"{at}: empty bbox [x={x:g}, y={y:g}, w={w:g}, h={h:g}]"
    if x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + w > width + EDGE_TOLERANCE or y + h > height + EDGE_TOLERANCE:
        return f"{at}: bbox [x={x:g}, y={y:g}, w={w:g}, h={h:g}] is not inside the {width}x{height} image"
    flags = {key: ann.get(key, 0) for key in ("iscrowd", "difficult")}
    if any(value not in (0, 1, True, False) for value in flags.values()):
        return f"{at}: iscrowd and difficult must be 0 or 1, got {flags}"
    area = ann.get("area", w * h)
    if not _is_finite(area) or area < 0:
        return f"{at}: area {area!r} is not a non-negative number"
    box = [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]
    return {"box": box, "label": label_of[category], "area": float(area), **{k: bool(v) for k, v in flags.items()}}


def _target(annotations: list[dict], image_id: int) -> dict:
    return {
        "boxes": np.array([a["box"] for a in annotations], dtype=np.float32).reshape(-1, 4),
        "labels": np.array([a["label"] for a in annotations], dtype=np.int64),
        "difficult": np.array([a["difficult"] for a in annotations], dtype=bool),
        "iscrowd": np.array([a["iscrowd"] for a in annotations], dtype=bool),
        "area": np.array([a["area"] for a in annotations], dtype=np.float32),
        "image_id": image_id,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_relative(file_name: str) -> bool:
    """A relative path that stays inside its folder (no ``..``, no drive or root)."""
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    return bool(parts) and not PurePosixPath(file_name).is_absolute() and ".." not in parts and ":" not in parts[0]
