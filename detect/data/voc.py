"""Pascal VOC annotations: parsing, writing and a data set over a VOC folder.

Box convention. VOC XML stores 1-based, inclusive pixel indices: ``<xmin>1</xmin><xmax>10</xmax>`` covers the first
ten columns. The library's boxes are 0-based ``xyxy`` with an exclusive right edge (no ``+1`` on widths), so

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax        (reading)
    xmin = x1 + 1,  ymin = y1 + 1,  xmax = x2,  ymax = y2        (writing)

and the ten columns above become ``[0, 10)``: width 10 either way. Integral boxes survive a round trip exactly.

Decisions:
- Parsing is strict: a missing or non-numeric field, a box that is empty or leaves its image, an unknown class
  (when a class list is given) raises :class:`~detect.errors.DatasetError` naming the file and the object. A data
  set that is silently "repaired" gives evaluation numbers nobody can reproduce.
- ``defusedxml`` is not a dependency, so any ``<!DOCTYPE`` or ``<!ENTITY`` declaration is refused before the
  standard parser sees the bytes: VOC files never have one, and that shuts out entity-expansion bombs and external
  entities alike.
- :class:`VocDataset` parses every annotation when it is built (errors surface at once, the class list can be taken
  from the data) but decodes an image only when it is asked for one, so evaluation code can read ground truth
  through :meth:`VocDataset.annotation` without any image on disk.
- ``on_error="skip"`` (see :mod:`detect.data`) lists every problem instead of stopping at the first: a file that
  cannot be parsed drops its image, a bad object (empty box, box outside the image, unknown class) only itself, and
  an image file that is not there drops its image (checked when the set is built, in this mode only).
- A file that states no image size (``0 x 0``, as labelling tools write when they did not open the image, or no
  ``<size>``) takes its image's size from the image's header in :class:`VocDataset`: that is a fact the data
  holds, not a repair. A negative size is still an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from detect.data import OnError, ProblemLog
from detect.errors import DatasetError, ImageError
from detect.io import decode_image, upright_size

__all__ = ["VocObject", "VocAnnotation", "parse_voc_xml", "voc_xml", "VocDataset"]

_MAX_XML_BYTES = 8 << 20  # a VOC annotation is a few kB; refuse anything absurd before parsing it
_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True, eq=False)
class VocObject:
    """One annotated object. ``box`` is float32 ``(4,)`` ``xyxy`` in the library's 0-based convention."""

    name: str
    box: np.ndarray
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True, eq=False)
class VocAnnotation:
    """One VOC annotation file. ``source`` names where it was read from (for error messages)."""

    filename: str
    width: int
    height: int
    objects: tuple[VocObject, ...]
    source: str = "<bytes>"


# --- reading -----------------------------------------------------------------------------------------------
def parse_voc_xml(
    source: str | os.PathLike | bytes,
    problems: list[str] | None = None,
    image_size: Callable[[str], tuple[int, int]] | None = None,
) -> VocAnnotation:
    """Parse one VOC annotation from a path or from the XML bytes themselves.

    Raises :class:`DatasetError` for unreadable, empty, oversized, malformed or unsafe XML, missing fields,
    non-numeric values, and boxes that are empty or not inside the image. With a ``problems`` list, an object at
    fault is left out and its message appended there instead (the file's own faults still raise).
    ``image_size(filename)``, when given, is asked for the image's ``(width, height)`` where the file states a
    size of zero or none (labelling tools write ``0 x 0`` when they did not read the image); it raises
    :class:`DatasetError` when it cannot tell.
    """
    if isinstance(source, bytes):
        data, where = source, "<bytes>"
    else:
        where = os.fspath(source)
        try:
            with open(where, "rb") as f:
                data = f.read(_MAX_XML_BYTES + 1)
        except OSError as e:
            raise DatasetError(f"{where}: cannot read annotation ({e.strerror or e})", path=where) from e
    if not data.strip():
        raise DatasetError(f"{where}: malformed XML: the file is empty, expected a VOC <annotation>", path=where)
    if len(data) > _MAX_XML_BYTES:
        raise DatasetError(f"{where}: annotation larger than {_MAX_XML_BYTES} bytes", path=where)
    if _DECLARATION.search(data):
        raise DatasetError(f"{where}: DOCTYPE/ENTITY declarations are refused in annotation XML", path=where)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"{where}: malformed XML ({e})", path=where) from e
    if root.tag != "annotation":
        raise DatasetError(f"{where}: root element is <{root.tag}>, expected <annotation>", path=where)

    size = root.find("size")
    if size is None and image_size is not None:
        width = height = 0
    else:
        size = _child(root, "size", where)
        width = _integer(_text(size, "width", where), "size/width", where)
        height = _integer(_text(size, "height", where), "size/height", where)
    if (width <= 0 or height <= 0) and image_size is not None and width >= 0 and height >= 0:
        width, height = image_size(_text(root, "filename", where))
    if width <= 0 or height <= 0:
        raise DatasetError(f"{where}: image size {width}x{height} is not positive", path=where)
    objects = []
    for j, node in enumerate(root.findall("object")):
        try:
            objects.append(_parse_object(node, j, width, height, where))
        except DatasetError as e:
            if problems is None:
                raise
            problems.append(e.message)
    return VocAnnotation(_text(root, "filename", where), width, height, tuple(objects), where)


def _parse_object(node: ET.Element, j: int, width: int, height: int, where: str) -> VocObject:
    name = _text(node, "name", where, f"object {j}")
    at = f"object {j} ({name!r})"
    box_node = _child(node, "bndbox", where, at)
    xmin, ymin, xmax, ymax = (_number(_text(box_node, k, where, at), f"bndbox/{k}", where, at) for k in _BOX_KEYS)
    box = np.array([xmin - 1.0, ymin - 1.0, xmax, ymax], dtype=np.float32)
    x1, y1, x2, y2 = box.tolist()
    if not (x2 > x1 and y2 > y1):
        raise DatasetError(
            f"{where}: {at}: empty box (xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g})", path=where
        )
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise DatasetError(
            f"{where}: {at}: box (xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g}) is not inside "
            f"the {width}x{height} image",
            path=where,
        )
    return VocObject(name, box, _flag(node, "difficult", where, at), _flag(node, "truncated", where, at))


def _child(node: ET.Element, tag: str, where: str, at: str | None = None) -> ET.Element:
    child = node.find(tag)
    if child is None:
        raise DatasetError(f"{where}: {at + ': ' if at else ''}missing <{tag}>", path=where)
    return child


def _text(node: ET.Element, tag: str, where: str, at: str | None = None) -> str:
    text = (_child(node, tag, where, at).text or "").strip()
    if not text:
        raise DatasetError(f"{where}: {at + ': ' if at else ''}empty <{tag}>", path=where)
    return text


def _number(text: str, field: str, where: str, at: str | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise DatasetError(f"{where}: {at + ': ' if at else ''}{field} is {text!r}, not a number", path=where)
    return value


def _integer(text: str, field: str, where: str) -> int:
    value = _number(text, field, where)
    if value != int(value):
        raise DatasetError(f"{where}: {field} is {text!r}, not a whole number", path=where)
    return int(value)


def _flag(node: ET.Element, tag: str, where: str, at: str) -> bool:
    """An optional 0/1 field; absent or empty means 0 (VOC files written by labelling tools often omit them)."""
    child = node.find(tag)
    text = (child.text or "").strip() if child is not None else ""
    if text in ("", "0"):
        return False
    if text == "1":
        return True
    raise DatasetError(f"{where}: {at}: <{tag}> is {text!r}, expected 0 or 1", path=where)


# --- writing -----------------------------------------------------------------------------------------------
def voc_xml(annotation: VocAnnotation, folder: str = "VOC") -> bytes:
    """Serialise an annotation to VOC XML (UTF-8 bytes), converting boxes back to 1-based inclusive indices."""
    root = ET.Element("annotation")
    _leaf(root, "folder", folder)
    _leaf(root, "filename", annotation.filename)
    size = ET.SubElement(root, "size")
    for tag, value in (("width", annotation.width), ("height", annotation.height), ("depth", 3)):
        _leaf(size, tag, str(value))
    _leaf(root, "segmented", "0")
    for obj in annotation.objects:
        node = ET.SubElement(root, "object")
        _leaf(node, "name", obj.name)
        _leaf(node, "pose", "Unspecified")
        _leaf(node, "truncated", str(int(obj.truncated)))
        _leaf(node, "difficult", str(int(obj.difficult)))
        box = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = np.asarray(obj.box, dtype=np.float32)
        for tag, value in zip(_BOX_KEYS, (x1 + 1, y1 + 1, x2, y2)):
            _leaf(box, tag, np.format_float_positional(np.float32(value), trim="-"))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def _leaf(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text


# --- data set ----------------------------------------------------------------------------------------------
class VocDataset:
    """Images and VOC annotations on disk, index-addressable.

    ``root`` is either

    - a VOC folder (``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/<split>.txt``): ``split`` picks the list of
      image ids; without it every ``Annotations/*.xml`` is used;
    - a flat folder holding images and their ``.xml`` files side by side (``split`` must be ``None``);
    - a pair ``(images_dir, annotations_dir)`` (``split`` must be ``None``).

    ``class_names`` fixes the label order (label ``k`` is ``class_names[k-1]``); an object of any other class is an
    error. Without it the classes are the sorted unique names found in the selected annotations. ``on_error``:
    see the module docstring; ``problems`` lists what ``"skip"`` dropped.

    ``dataset[i]`` is ``(image, target)``: ``image`` RGB ``uint8`` ``HxWx3``; ``target`` a dict with ``boxes``
    float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` (1-based), ``difficult`` bool ``(N,)`` and ``image_id``
    (the VOC id: the annotation file's stem). The image file is the annotation's ``<filename>`` in the images
    folder, else ``<id>`` with a common image suffix.
    """

    def __init__(
        self,
        root: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike],
        split: str | None = None,
        class_names: Sequence[str] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        self.images_dir, self.annotations_dir, image_ids = _layout(root, split)
        log = ProblemLog(on_error)
        records, kept = _parse_all(self.annotations_dir, image_ids, log, self.images_dir)
        if class_names is None:
            class_names = sorted({obj.name for record in records for obj in record.objects})
        elif len(set(class_names)) != len(class_names) or not all(class_names):
            raise DatasetError(f"class_names must be unique and non-empty, got {list(class_names)}")
        self.class_names: tuple[str, ...] = tuple(class_names)
        if on_error == "skip":
            records = [_known_objects(record, self.class_names, log) for record in records]
        self.records: tuple[VocAnnotation, ...] = tuple(records)
        self.image_ids: tuple[str, ...] = tuple(kept)
        if on_error == "skip":
            self._drop_missing_images(log)
        index = {name: k + 1 for k, name in enumerate(self.class_names)}
        self._targets = [_target(record, image_id, index) for record, image_id in zip(self.records, self.image_ids)]
        self.problems = tuple(log.problems)

    def _drop_missing_images(self, log: ProblemLog) -> None:
        present = []
        for i in range(len(self.image_ids)):
            try:
                self.image_path(i)
                present.append(i)
            except DatasetError as e:
                log.report(self.records[i].source, e.message)
        self.records = tuple(self.records[i] for i in present)
        self.image_ids = tuple(self.image_ids[i] for i in present)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        target, record, path = self.annotation(i), self.records[i], self.image_path(i)
        image = _read_rgb(path, record.source)
        if image.shape[:2] != (record.height, record.width):
            raise DatasetError(
                f"{record.source}: image {path} is {image.shape[1]}x{image.shape[0]} (EXIF-upright) but the "
                f"annotation says {record.width}x{record.height}",
                path=record.source,
            )
        return image, target

    def annotation(self, i: int) -> dict:
        """The target of image ``i`` without decoding the image (a fresh copy the caller may modify)."""
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in self._targets[i].items()}

    def image_path(self, i: int) -> Path:
        """The image file of image ``i``; :class:`DatasetError` naming the annotation when there is none."""
        return _find_image(self.images_dir, self.records[i].filename, self.image_ids[i], self.records[i].source)


def _find_image(images_dir: Path, filename: str, image_id: str, source: str) -> Path:
    """The image an annotation names (``filename`` in ``images_dir``, else ``<image_id>`` with a common suffix)."""
    candidates = [images_dir / filename] if Path(filename).name == filename else []
    candidates += [images_dir / f"{image_id}{suffix}" for suffix in _IMAGE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(f"{source}: image {filename!r} not found in {images_dir}", path=source)


def _header_size(images_dir: Path, image_id: str, source: str) -> Callable[[str], tuple[int, int]]:
    """For :func:`parse_voc_xml`: the upright ``(width, height)`` of the annotation's image, from its header."""

    def size(filename: str) -> tuple[int, int]:
        path = _find_image(images_dir, filename, image_id, source)
        try:
            return upright_size(path)
        except ImageError as e:
            raise DatasetError(f"{source}: states no image size, and image {path}: {e.message}", path=source) from e

    return size


def _parse_all(
    folder: Path, image_ids: Sequence[str], log: ProblemLog, images_dir: Path | None = None
) -> tuple[list[VocAnnotation], list[str]]:
    """Every annotation of ``image_ids`` and the ids kept; per ``log``, a faulty file or object raises or is
    reported and dropped. With ``images_dir``, a file stating no image size takes its image's."""
    records, kept = [], []
    for image_id in image_ids:
        object_problems: list[str] | None = [] if log.on_error == "skip" else None
        xml = folder / f"{image_id}.xml"
        try:
            size = _header_size(images_dir, image_id, str(xml)) if images_dir is not None else None
            record = parse_voc_xml(xml, object_problems, size)
        except DatasetError as e:
            log.report(str(folder / f"{image_id}.xml"), e.message)
            continue
        for message in object_problems or ():
            log.report(record.source, message)
        records.append(record)
        kept.append(image_id)
    return records, kept


def _known_objects(record: VocAnnotation, class_names: Sequence[str], log: ProblemLog) -> VocAnnotation:
    """``record`` without the objects whose class is not in ``class_names`` (each reported)."""
    kept = []
    for obj in record.objects:
        if obj.name in class_names:
            kept.append(obj)
        else:
            x1, y1, x2, y2 = obj.box.tolist()
            box = f"xmin={x1 + 1:g}, ymin={y1 + 1:g}, xmax={x2:g}, ymax={y2:g}"
            message = f"{record.source}: object ({box}) has class {obj.name!r}, not one of {list(class_names)}"
            log.report(record.source, message)
    return dataclasses.replace(record, objects=tuple(kept))


def _target(record: VocAnnotation, image_id: str, index: dict[str, int]) -> dict:
    """The target dict of one record; ``index`` maps a class name to its 1-based label."""
    for j, obj in enumerate(record.objects):
        if obj.name not in index:
            raise DatasetError(
                f"{record.source}: object {j} has class {obj.name!r}, not one of {list(index)}", path=record.source
            )
    return {
        "boxes": np.array([obj.box for obj in record.objects], dtype=np.float32).reshape(-1, 4),
        "labels": np.array([index[obj.name] for obj in record.objects], dtype=np.int64),
        "difficult": np.array([obj.difficult for obj in record.objects], dtype=bool),
        "image_id": image_id,
    }


def _layout(root: str | os.PathLike | tuple, split: str | None) -> tuple[Path, Path, tuple[str, ...]]:
    """Resolve ``(images_dir, annotations_dir, image_ids)`` for the three accepted layouts."""
    if isinstance(root, tuple):
        images_dir, annotations_dir = (Path(p) for p in root)
        split_file = None
    elif (Path(root) / "Annotations").is_dir():
        images_dir, annotations_dir = Path(root) / "JPEGImages", Path(root) / "Annotations"
        split_file = Path(root) / "ImageSets" / "Main" / f"{split}.txt" if split is not None else None
    else:
        images_dir = annotations_dir = Path(root)
        split_file = None
    if split is not None and split_file is None:
        raise DatasetError(f"split={split!r} needs the VOC layout (ImageSets/Main/), not {root}")
    if not annotations_dir.is_dir():
        raise DatasetError(f"annotation folder {annotations_dir} does not exist")
    if split_file is None:
        image_ids = tuple(sorted(p.stem for p in annotations_dir.glob("*.xml")))
    else:
        image_ids = _read_split(split_file, split)
    if not image_ids:
        raise DatasetError(f"no annotations found in {annotations_dir}")
    return images_dir, annotations_dir, image_ids


def _read_split(path: Path, split: str) -> tuple[str, ...]:
    if Path(split).name != split or not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DatasetError(f"split {split!r} not found: no {path} (available: {available})")
    lines = path.read_text(encoding="utf-8").split("\n")
    return tuple(line.split()[0] for line in lines if line.strip())


def _read_rgb(path: Path, source: str) -> np.ndarray:
    """Decode an image file exactly as the CLI and the API do (:func:`detect.io.decode_image`: RGB ``uint8``,
    EXIF-upright), so evaluation sees the pixels a user's request would; its errors become :class:`DatasetError`
    naming the annotation too."""
    try:
        return decode_image(path)
    except ImageError as e:
        raise DatasetError(f"{source}: image {path}: {e.message}", path=source) from e
