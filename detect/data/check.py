"""``detect data check``: what a data set on disk holds and every annotation problem in it, before any training.

Decisions:
- The set is opened with ``on_error="skip"`` so that every problem is listed, not only the first; the statistics
  cover what a training run with ``on_error: skip`` would use.
- Every image is decoded in full, as training will (a truncated JPEG has a valid header and fails only when its
  pixels are read): a missing, unreadable or truncated file, or a size other than the annotation's, is a problem.
  The header (:func:`detect.io.probe_image`) gives the stored size; an image whose stored sides are the
  annotation's swapped is compared after its EXIF rotation.
- Class names that differ only in case, or by one or two letters in a long name (``racoon`` beside ``raccoon``),
  are flagged as likely typos (:func:`likely_typos`, ``likely_typos`` in the report): each silently becomes a
  class of its own in training. They are warnings, not problems (``cat`` and ``car`` are both real classes), so
  they do not change the exit code.
- Box sizes use COCO's area ranges on the box area: small below 32², medium below 96², large from 96² pixels.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detect.data import read_image
from detect.data.layouts import detect_layout, open_dataset
from detect.errors import DetectError, ImageError
from detect.io import probe_image

__all__ = ["check_dataset", "format_check", "likely_typos", "scan_dataset", "SMALL_AREA", "LARGE_AREA"]

SMALL_AREA = 32**2
LARGE_AREA = 96**2


def check_dataset(
    path: str | os.PathLike | None,
    images: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A report (plain JSON values) on the data set at ``path`` (or ``images`` + ``annotations``): ``layout``,
    ``images``, ``objects_per_class``, ``box_sizes``, ``image_sizes`` and ``problems`` (``{"file", "message"}``
    each). A layout that is not recognised or a set that cannot be opened raises :class:`DatasetError`."""
    layout = detect_layout(path, images, annotations)
    scan = scan_dataset(open_dataset(layout, split, class_names, on_error="skip"))
    dataset, targets, problems = scan["dataset"], scan["targets"], scan["problems"]
    sizes = [size for size in scan["sizes"] if size is not None]
    labels = np.concatenate([t["labels"] for t in targets] or [np.zeros(0, np.int64)])
    boxes = np.concatenate([t["boxes"] for t in targets] or [np.zeros((0, 4), np.float32)]).astype(np.float64)
    counts = np.bincount(labels - 1, minlength=len(dataset.class_names)) if labels.size else [0] * len(dataset.class_names)
    return {
        "path": os.fspath(path) if path is not None else None,
        "layout": layout.kind,
        "format": layout.format,
        "description": layout.describe(),
        "split": split,
        "class_names": list(dataset.class_names),
        "images": len(dataset),
        "images_without_objects": sum(1 for t in targets if len(t["labels"]) == 0),
        "objects": int(labels.size),
        "difficult": int(sum(int(np.sum(t["difficult"])) for t in targets)),
        "objects_per_class": {name: int(c) for name, c in zip(dataset.class_names, counts)},
        "box_sizes": _box_sizes(boxes),
        "image_sizes": _image_sizes(sizes),
        "problems": problems,
        "likely_typos": likely_typos(dataset.class_names, counts),
    }


def scan_dataset(dataset: Any) -> dict[str, Any]:
    """One pass over an opened data set (each image decoded once, in full): ``targets`` (each image's annotation), ``sizes`` (its
    ``(H, W)`` from the file's header, ``None`` where unreadable) and ``problems``. :func:`check_dataset` reports
    on it; ``detect train --data`` derives its recipe from it (:mod:`detect.training.auto`)."""
    problems = [{"file": p.source, "message": p.message} for p in getattr(dataset, "problems", ())]
    targets, sizes = [], []
    for i in range(len(dataset)):
        targets.append(dataset.annotation(i))
        sizes.append(_image_size(dataset, i, problems))
    return {"dataset": dataset, "targets": targets, "sizes": sizes, "problems": problems}


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), by the two-row dynamic programme."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def likely_typos(class_names: Sequence[str], counts: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Pairs of class names that are probably one class spelt twice: equal but for case, spaces, ``-`` and ``_``;
    or one edit apart where the shorter has at least 5 letters; or two apart from 8 letters. Each entry has both
    names, their object counts (when given) and a message."""
    found = []
    counts = list(counts) if counts is not None else [None] * len(class_names)
    norm = lambda name: "".join(c for c in name.casefold() if c not in " -_")  # noqa: E731
    for i, a in enumerate(class_names):
        for j in range(i + 1, len(class_names)):
            b = class_names[j]
            shorter = min(len(a), len(b))
            distance = _edit_distance(a.casefold(), b.casefold())
            if norm(a) == norm(b) or (distance == 1 and shorter >= 5) or (distance == 2 and shorter >= 8):
                how = "differ only in case or separators" if norm(a) == norm(b) else f"are {distance} letter(s) apart"
                objects = f" ({counts[i]} and {counts[j]} objects)" if counts[i] is not None else ""
                found.append({"classes": [a, b], "objects": [counts[i], counts[j]],
                              "message": f"classes {a!r} and {b!r} {how}{objects}: one class spelt twice?"})
    return found


def _image_size(dataset: Any, i: int, problems: list[dict]) -> tuple[int, int] | None:
    """``(H, W)`` of image ``i`` as the annotation gives it, after checking the file's header against it."""
    try:
        path, expected = _path_and_size(dataset, i)
    except DetectError as e:
        problems.append({"file": str(e.details.get("path", "")), "message": e.message})
        return None
    try:
        info = probe_image(path)
        upright = read_image(path, str(path)).shape[:2]  # in full: a truncated file fails only here
    except ImageError as e:
        problems.append({"file": str(path), "message": f"{path}: {e.message}"})
        return None
    except DetectError as e:  # read_image's DatasetError around the decoder's error
        problems.append({"file": str(path), "message": e.message})
        return None
    stored = (info.height, info.width)
    if expected is None or stored == expected:
        return stored
    if stored[::-1] == expected and upright == expected:  # an EXIF rotation
        return expected
    problems.append({
        "file": str(path),
        "message": f"{path}: image is {stored[1]}x{stored[0]} but its annotation says {expected[1]}x{expected[0]}",
    })
    return stored


def _path_and_size(dataset: Any, i: int) -> tuple[Path, tuple[int, int] | None]:
    """The image file of image ``i`` and the ``(H, W)`` its annotation states (``None`` where it states none)."""
    if hasattr(dataset, "image_path"):  # VOC
        record = dataset.records[i]
        return dataset.image_path(i), (record.height, record.width)
    if hasattr(dataset, "label_path"):  # YOLO: sizes come from the headers themselves
        return dataset.files[i], None
    return dataset.files[i], tuple(dataset.sizes[i])


def _spread(values: np.ndarray) -> dict[str, float | None]:
    if not values.size:
        return {"min": None, "median": None, "max": None}
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


def _box_sizes(boxes: np.ndarray) -> dict[str, Any]:
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # (N,) each
    areas = widths * heights
    return {
        "small": int(np.sum(areas < SMALL_AREA)),
        "medium": int(np.sum((areas >= SMALL_AREA) & (areas < LARGE_AREA))),
        "large": int(np.sum(areas >= LARGE_AREA)),
        "width": _spread(widths),
        "height": _spread(heights),
    }


def _image_sizes(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    array = np.array(sizes, dtype=np.float64).reshape(-1, 2)  # (N, 2) H, W
    common = Counter(f"{w}x{h}" for h, w in sizes).most_common(3)
    return {
        "width": _spread(array[:, 1]),
        "height": _spread(array[:, 0]),
        "distinct": len({tuple(s) for s in sizes}),
        "most_common": {size: n for size, n in common},
    }


def format_check(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [
        f"layout: {report['description']}" + (f" (split {report['split']})" if report["split"] else ""),
        f"images: {report['images']} ({report['images_without_objects']} without objects)",
        f"objects: {report['objects']} ({report['difficult']} difficult)",
    ]
    width = max([5, *(len(name) for name in report["objects_per_class"])])
    lines += [f"  {name:<{width}} {count:>7}" for name, count in report["objects_per_class"].items()]
    boxes = report["box_sizes"]
    lines.append(
        f"box sizes (COCO areas): small {boxes['small']}, medium {boxes['medium']}, large {boxes['large']}; "
        f"width {_fmt(boxes['width'])}; height {_fmt(boxes['height'])}"
    )
    images = report["image_sizes"]
    common = ", ".join(f"{size} ({n})" for size, n in images["most_common"].items())
    lines.append(
        f"image sizes: width {_fmt(images['width'])}; height {_fmt(images['height'])}; "
        f"{images['distinct']} distinct, most common {common or '-'}"
    )
    problems = report["problems"]
    lines.append(f"problems: {len(problems)}" + ("" if problems else " (clean)"))
    lines += [f"  {p['message']}" for p in problems]
    typos = report.get("likely_typos") or []
    if typos:
        lines.append(f"likely typos in class names: {len(typos)}")
        lines += [f"  {t['message']}" for t in typos]
    return "\n".join(lines)


def _fmt(spread: dict[str, float | None]) -> str:
    if spread["min"] is None:
        return "-"
    return f"min {spread['min']:g} / median {spread['median']:g} / max {spread['max']:g}"
