"""YOLO txt labels: one ``<image stem>.txt`` per image, a line ``class cx cy w h`` per object.

Decisions:
- **Layouts.** ``root/images/[split/]`` with ``root/labels/[split/]`` (the Ultralytics layout: the label path is
  the image path with ``images`` replaced by ``labels``), or a flat folder of images and ``.txt`` files side by side.
- **Classes.** ``class_names`` when given, else ``root/classes.txt`` (one name a line), else ``names`` of
  ``root/data.yaml`` (a list, or a mapping from 0-based index to name). Class ``c`` of a label file is label
  ``c + 1``; a class at or beyond the number of names is an unknown class.
- **Boxes.** ``cx cy w h`` are fractions of the image width and height; ``xyxy = ((cx - w/2) W, (cy - h/2) H,
  (cx + w/2) W, (cy + h/2) H)`` in pixels, no ``+1``. ``w`` and ``h`` must be positive and the box inside the image
  (an overshoot of at most 1e-4 of the side, float rounding of exporters, is clipped). Lines with more than five
  values (segmentation polygons) are refused rather than guessed at.
- **Image sizes** come from each image's header (:func:`detect.io.probe_image`, nothing decoded) when the set is
  built, so :meth:`YoloDataset.annotation` gives pixel boxes without decoding. For the rare image with an EXIF
  rotation that swaps its sides, ``__getitem__`` recomputes the boxes from the upright decoded size (the
  normalised labels of such images refer to the upright image, as Ultralytics reads them).
- **Missing label file** = an image without objects (YOLO's background images). A label file without an image, or
  an image whose header cannot be read, is an image-level problem; other problems are per object (see
  :mod:`detect.data` for ``on_error``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from detect.data import OnError, ProblemLog, read_image
from detect.config import load_yaml
from detect.errors import ConfigError, DatasetError, ImageError
from detect.io import probe_image

__all__ = ["YoloDataset", "read_class_names", "list_images", "ultralytics_label_path"]

_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_TOLERANCE = 1e-4  # of the image side


class YoloDataset:
    """Images and YOLO labels on disk, index-addressable.

    ``dataset[i]`` is ``(image, target)``: ``target`` has ``boxes`` float32 ``(N, 4)`` xyxy pixels, ``labels`` int64
    ``(N,)`` 1-based into ``class_names``, ``difficult`` bool ``(N,)`` (YOLO has no such flag: all False) and
    ``image_id`` (the image's path relative to the images folder, without suffix). ``problems`` lists what
    ``on_error="skip"`` dropped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        class_names: Sequence[str] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        images_dir, labels_dir = _layout(Path(root), split)
        class_names = tuple(class_names) if class_names is not None else read_class_names(Path(root))
        self._load(list_images(images_dir), images_dir, labels_dir, class_names, on_error)

    @classmethod
    def from_files(
        cls,
        files: Sequence[str | os.PathLike],
        class_names: Sequence[str],
        labels_dir: str | os.PathLike | None = None,
        on_error: OnError = "raise",
    ) -> "YoloDataset":
        """A set over a list of image files (a ``data.yaml`` entry): each one's labels are ``labels_dir/<stem>.txt``,
        or without ``labels_dir`` at the Ultralytics place, the image path with its last ``images`` folder replaced
        by ``labels`` and the suffix by ``.txt``. ``image_id`` is the path relative to the files' common folder."""
        dataset = cls.__new__(cls)
        paths = [Path(f) for f in files]
        if not paths:
            raise DatasetError("no image files given")
        base = Path(os.path.commonpath([p.parent for p in paths]))
        dataset._load(paths, base, None if labels_dir is None else Path(labels_dir), tuple(class_names), on_error)
        return dataset

    def _load(
        self, images: list[Path], images_dir: Path, labels_dir: Path | None, class_names: tuple, on_error: OnError
    ) -> None:
        self.images_dir, self.labels_dir, self.class_names = images_dir, labels_dir, class_names
        if len(set(self.class_names)) != len(self.class_names) or not all(self.class_names):
            raise DatasetError(f"class_names must be unique and non-empty, got {list(self.class_names)}")
        log = ProblemLog(on_error)
        if not images:
            raise DatasetError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {self.images_dir}")
        if labels_dir is not None:
            stems = {p.stem for p in images}
            for label_file in sorted(labels_dir.glob("*.txt")):
                if label_file.stem not in stems and label_file.name != "classes.txt":
                    log.report(str(label_file), f"{label_file}: no image {label_file.stem}.* in {self.images_dir}")
        self.files: list[Path] = []
        self.sizes: list[tuple[int, int]] = []  # (H, W) from the header
        self._normalised: list[np.ndarray] = []  # (N, 4) float64 cx cy w h
        self._labels: list[np.ndarray] = []
        for path in images:
            size = _header_size(path, log)
            if size is None:
                continue
            label_file = self.label_path(path)
            boxes, labels = _read_labels(label_file, size, len(self.class_names), log)
            self.files.append(path)
            self.sizes.append(size)
            self._normalised.append(boxes)
            self._labels.append(labels)
        self.problems = tuple(log.problems)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        image = read_image(self.files[i], str(self.label_path(self.files[i])))
        return image, self._target(i, image.shape[:2])

    def label_path(self, image: Path) -> Path:
        """Where the labels of ``image`` are (the file need not exist: no file, no objects)."""
        if self.labels_dir is not None:
            return self.labels_dir / f"{image.stem}.txt"
        return ultralytics_label_path(image)

    def annotation(self, i: int) -> dict:
        """The target of image ``i`` from its header size, without decoding the image."""
        return self._target(i, self.sizes[i])

    def _target(self, i: int, size: tuple[int, int]) -> dict:
        height, width = size
        cxcy, wh = self._normalised[i][:, :2], self._normalised[i][:, 2:]  # (N, 2) each, fractions
        scale = np.array([width, height], dtype=np.float64)
        boxes = np.concatenate([(cxcy - wh / 2) * scale, (cxcy + wh / 2) * scale], axis=1)  # (N, 4) xyxy pixels
        boxes = np.clip(boxes, 0.0, np.concatenate([scale, scale]))
        return {
            "boxes": boxes.astype(np.float32),
            "labels": self._labels[i].copy(),
            "difficult": np.zeros(len(boxes), dtype=bool),
            "image_id": self.files[i].relative_to(self.images_dir).with_suffix("").as_posix(),
        }


def read_class_names(root: Path) -> tuple[str, ...]:
    """Class names from ``root/classes.txt`` or the ``names`` of ``root/data.yaml``; :class:`DatasetError` if
    neither is there or usable."""
    classes_txt, data_yaml = root / "classes.txt", root / "data.yaml"
    if classes_txt.is_file():
        return tuple(line.strip() for line in classes_txt.read_text(encoding="utf-8").splitlines() if line.strip())
    if not data_yaml.is_file():
        raise DatasetError(f"{root}: no classes.txt or data.yaml for the class names; pass class_names")
    try:
        names = (load_yaml(data_yaml.read_text(encoding="utf-8"), str(data_yaml)) or {}).get("names")
    except (ConfigError, AttributeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{data_yaml}: not a YAML mapping ({e})", path=str(data_yaml)) from e
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        message = f"{data_yaml}: 'names' must be a list of names or a mapping 0..K-1 -> name"
        raise DatasetError(message, path=str(data_yaml))
    return tuple(names)


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def ultralytics_label_path(image: Path) -> Path:
    """Ultralytics' rule: ``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` folder of the
    path); an image under no ``images`` folder has its labels beside it."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _layout(root: Path, split: str | None) -> tuple[Path, Path]:
    if (root / "images").is_dir():
        images_dir, labels_dir = root / "images", root / "labels"
        if split is not None:
            if Path(split).name != split:
                raise DatasetError(f"split {split!r} must be a plain folder name")
            images_dir, labels_dir = images_dir / split, labels_dir / split
    elif split is not None:
        raise DatasetError(f"split={split!r} needs the images/<split> and labels/<split> layout, not {root}")
    else:
        images_dir = labels_dir = root
    if not images_dir.is_dir():
        raise DatasetError(f"image folder {images_dir} does not exist")
    return images_dir, labels_dir


def _header_size(path: Path, log: ProblemLog) -> tuple[int, int] | None:
    """``(H, W)`` as stored, or ``None`` after reporting an unreadable image."""
    try:
        info = probe_image(path)
    except ImageError as e:
        log.report(str(path), f"{path}: {e.message}")
        return None
    return info.height, info.width


def _read_labels(path: Path, size: tuple[int, int], num_classes: int, log: ProblemLog) -> tuple[np.ndarray, np.ndarray]:
    """The valid objects of one label file: normalised ``(N, 4)`` cx cy w h and 1-based labels ``(N,)``."""
    boxes, labels = [], []
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            log.report(str(path), f"{path}: cannot read labels ({e})")
            lines = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parsed = _parse_line(line, size, num_classes)
            if isinstance(parsed, str):
                log.report(str(path), f"{path}: line {number} ({line.strip()!r}): {parsed}")
            else:
                boxes.append(parsed[1:])
                labels.append(parsed[0])
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64)


def _parse_line(line: str, size: tuple[int, int], num_classes: int) -> tuple[int, float, float, float, float] | str:
    """``(label, cx, cy, w, h)`` of one line, or what is wrong with it."""
    fields = line.split()
    if len(fields) != 5:
        return f"expected 5 values 'class cx cy w h', got {len(fields)}"
    try:
        cls, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        return "class must be an integer and cx cy w h numbers"
    if not 0 <= cls < num_classes:
        return f"class {cls} is not one of the {num_classes} classes (0..{num_classes - 1})"
    cx, cy, w, h = values
    if not all(math.isfinite(v) for v in values) or w <= 0 or h <= 0:
        return f"empty or non-finite box (w={w:g}, h={h:g})"
    height, width = size
    if min(cx - w / 2, cy - h / 2) < -_TOLERANCE or max(cx + w / 2, cy + h / 2) > 1 + _TOLERANCE:
        return f"box (cx={cx:g}, cy={cy:g}, w={w:g}, h={h:g}) is not inside the {width}x{height} image"
    return cls + 1, cx, cy, w, h
