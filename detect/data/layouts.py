"""Data on disk in the layouts people have: one place that recognises a layout (:func:`detect_layout`) and opens it
(:func:`open_dataset`), and the seeded hold-out split used when a run has no validation data (:func:`holdout`).

Accepted layouts (:data:`LAYOUTS`):

- ``voc``: a Pascal VOC devkit folder, ``Annotations/*.xml`` + ``JPEGImages/`` (``ImageSets/Main/<split>.txt``
  optional); a ``VOCdevkit/`` above it is stepped into.
- ``flat``: images and annotation files side by side in one folder, matched by stem (VOC ``.xml``, LabelMe
  ``.json``, or YOLO ``.txt`` with ``classes.txt``/``data.yaml`` for the names).
- ``pair``: a folder of images and a folder of annotation files (VOC ``.xml``, LabelMe ``.json`` or YOLO ``.txt``)
  under any names (``images/`` + ``annotations/``, ``JPEGImages/`` + ``labels/``, ...), recognised by content: the
  pair whose file stems match best; or given explicitly (``--images`` / ``--annotations``).
- ``coco``: a COCO JSON (``images``, ``annotations``, ``categories``) with its image folder: ``images/`` beside the
  JSON, else the folder (beside the JSON or its parent) that holds the files it names. A folder with several COCO
  JSONs (``annotations/instances_train2017.json``, ``..._val2017.json``) offers each as a split.
- ``yolo``: an Ultralytics ``data.yaml`` (``path``, ``train``/``val``/``test`` as folders, ``.txt`` lists of images,
  or lists of those, ``names`` as a list or a mapping); labels at the Ultralytics place (``labels/`` beside
  ``images/``).

Decisions:
- Detection looks at names and a few bytes, never parses every annotation: opening the set does that, with its
  own precise errors. When nothing matches, the error lists the accepted layouts and what the folder holds.
- A folder holding a single folder and nothing else (an unpacked archive) is stepped into.
- The hold-out split ranks images by a hash of ``(seed, image id)`` and holds out the ``round(fraction * n)``
  first (at least one when ``n >= 2``): the same images for the same seed and data on every machine, whatever the
  file order, and adding images moves few others. Train and validation parts never share an image.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


from detect.data import OnError
from detect.config import load_yaml
from detect.errors import ConfigError, DatasetError

__all__ = ["LAYOUTS", "Layout", "Subset", "detect_layout", "holdout", "open_dataset", "yolo_data_yaml"]

LAYOUTS: dict[str, str] = {
    "voc": "Pascal VOC devkit: DIR/Annotations/*.xml + DIR/JPEGImages/ (+ ImageSets/Main/<split>.txt)",
    "flat": "one folder of images and annotation files side by side, same stems (VOC .xml, LabelMe .json, "
    "YOLO .txt + classes.txt)",
    "pair": "an image folder + an annotation folder under any names, same stems (VOC .xml, LabelMe .json, "
    "YOLO .txt); or --images DIR --annotations DIR",
    "coco": "COCO JSON (images, annotations, categories) with its image folder (images/ beside it, or the folder "
    "holding its file names)",
    "yolo": "Ultralytics data.yaml (train/val folders or .txt lists, names), labels/ beside images/",
}

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_ANNOTATION_FORMATS = {".xml": "voc", ".json": "labelme", ".txt": "yolo"}
_NOT_LABELS = {"classes", "labels", "notes", "readme", "license"}  # .txt stems that are never YOLO label files


@dataclass(frozen=True)
class Layout:
    """A recognised layout: ``kind`` (a key of :data:`LAYOUTS`), ``format`` of the annotations (``voc``, ``coco``,
    ``yolo``, ``labelme``), ``root`` (what was given, or the folder stepped into), ``images`` (the image folder;
    ``None`` for a ``data.yaml``, whose splits name their own), ``annotations`` (the annotation folder, the COCO
    JSON or the ``data.yaml``) and ``splits`` (named subsets the data ships: VOC image sets, data.yaml keys, COCO
    JSON stems)."""

    kind: str
    format: str
    root: Path
    images: Path | None
    annotations: Path
    splits: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f"images {self.images}, annotations {self.annotations}" if self.images else f"{self.annotations}"
        splits = f"; splits: {', '.join(self.splits)}" if self.splits else ""
        return f"{self.kind} ({self.format}): {where}{splits}"


# --- detection ---------------------------------------------------------------------------------------------
def detect_layout(
    path: str | os.PathLike | None, images: str | os.PathLike | None = None, annotations: str | os.PathLike | None = None
) -> Layout:
    """The layout of ``path`` (a folder, a COCO ``.json`` or a ``data.yaml``), or of the explicit ``images`` +
    ``annotations`` pair (``annotations`` a folder, or a COCO JSON). :class:`DatasetError` listing the accepted
    layouts and what was found when nothing matches."""
    if images is not None or annotations is not None:
        return _explicit(path, images, annotations)
    if path is None:
        raise DatasetError("no data given: pass a data folder, or --images and --annotations")
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if root.is_file():
        return _from_file(root)
    for folder in _descend(root):
        found = _from_folder(folder)
        if found is not None:
            return found
    raise DatasetError(_nothing_matched(root))


def _explicit(path: Any, images: Any, annotations: Any) -> Layout:
    if images is None or annotations is None:
        raise DatasetError("--images and --annotations go together: give both folders")
    images, annotations = Path(images), Path(annotations)
    root = Path(path) if path is not None else annotations.parent
    if not images.is_dir():
        raise DatasetError(f"image folder {images} does not exist")
    if annotations.is_file() and annotations.suffix.lower() == ".json":
        return Layout("coco", "coco", root, images, annotations, ())
    if not annotations.is_dir():
        raise DatasetError(f"annotation folder {annotations} does not exist")
    found = _annotation_format(annotations, _stems(images))
    if found is None:
        raise DatasetError(
            f"{annotations} holds no .xml, .json or .txt files named like the images in {images} "
            f"({_summary(annotations)})"
        )
    return Layout("pair", found, root, images, annotations)


def _from_file(path: Path) -> Layout:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return Layout("coco", "coco", path.parent, _coco_images(path, path.parent), path, ())
    if suffix in (".yaml", ".yml"):
        return Layout("yolo", "yolo", path.parent, None, path, _yaml_splits(path))
    raise DatasetError(f"{path}: a data file must be a COCO .json or a YOLO data.yaml, not {suffix or 'no suffix'}")


def _descend(root: Path) -> list[Path]:
    """``root``, then the folders an unpacked archive nests it in (a lone subfolder; ``VOCdevkit/VOC20xx``)."""
    folders, folder = [root], root
    for _ in range(3):
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        subfolders = [p for p in entries if p.is_dir()]
        if len(subfolders) != 1 or (len(entries) > 1 and folder.name.lower() != "vocdevkit"):
            break
        folder = subfolders[0]
        folders.append(folder)
    return folders


def _from_folder(folder: Path) -> Layout | None:
    if (folder / "Annotations").is_dir():
        image_sets = folder / "ImageSets" / "Main"
        splits = tuple(sorted(p.stem for p in image_sets.glob("*.txt"))) if image_sets.is_dir() else ()
        return Layout("voc", "voc", folder, folder / "JPEGImages", folder / "Annotations", splits)
    yamls = [p for p in sorted(folder.glob("*.y*ml")) if _is_yolo_yaml(p)]
    if yamls:
        chosen = next((p for p in yamls if p.stem == "data"), yamls[0])
        return Layout("yolo", "yolo", folder, None, chosen, _yaml_splits(chosen))
    found = _annotation_format(folder, _stems(folder))
    if found is not None:
        return Layout("flat", found, folder, folder, folder)
    pair = _best_pair(folder)
    if pair is not None:
        return pair
    cocos = [p for p in sorted([*folder.glob("*.json"), *folder.glob("annotations/*.json")]) if _looks_like_coco(p)]
    if cocos:
        chosen = next((p for p in cocos if "train" in p.stem), cocos[0])
        return Layout("coco", "coco", folder, _coco_images(chosen, folder), chosen, tuple(p.stem for p in cocos))
    return None


def _stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def _annotation_format(folder: Path, image_stems: set[str]) -> str | None:
    """The annotation format of ``folder``: the suffix (.xml, .json, .txt) with most files named like an image."""
    if not image_stems:
        return None
    counts = Counter(
        _ANNOTATION_FORMATS[p.suffix.lower()]
        for p in folder.iterdir()
        if p.suffix.lower() in _ANNOTATION_FORMATS and p.stem in image_stems and p.stem.lower() not in _NOT_LABELS
    )
    return counts.most_common(1)[0][0] if counts else None


def _best_pair(folder: Path) -> Layout | None:
    """The (image folder, annotation folder) pair among ``folder``'s subfolders with most matching stems."""
    subfolders = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    best, best_count = None, 0
    for images in subfolders:
        stems = _stems(images)
        if not stems:
            continue
        for annotations in subfolders:
            if annotations == images:
                continue
            found = _annotation_format(annotations, stems)
            count = sum(1 for p in annotations.iterdir() if p.stem in stems) if found else 0
            if count > best_count:
                best, best_count = Layout("pair", found, folder, images, annotations), count
    return best


def _looks_like_coco(path: Path) -> bool:
    """A cheap sniff (the first 64 kB): a JSON object naming ``images`` and ``annotations`` or ``categories``."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.lstrip()[:1] == b"{" and b'"images"' in head and (b'"annotations"' in head or b'"categories"' in head)


def _coco_images(json_path: Path, root: Path) -> Path:
    """The image folder of a COCO JSON: ``images/`` beside it, else the first folder (beside it, or subfolders of
    ``root``) holding the first file it names, else the JSON's folder (the data set then reports what is missing)."""
    beside = json_path.parent / "images"
    if beside.is_dir():
        return beside
    from detect.data.coco import first_file_name

    name = first_file_name(json_path)
    if name is not None:
        candidates = [json_path.parent, root, *sorted(p for p in root.iterdir() if p.is_dir())]
        candidates += [p / "images" for p in candidates]
        for folder in candidates:
            if (folder / name).is_file():
                return folder
    return json_path.parent


def _is_yolo_yaml(path: Path) -> bool:
    try:
        document = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ConfigError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and "names" in document and "train" in document


def _yaml_splits(path: Path) -> tuple[str, ...]:
    document = yolo_data_yaml(path)
    return tuple(key for key in ("train", "val", "test") if document.get(key))


def _nothing_matched(root: Path) -> str:
    accepted = "\n".join(f"  - {name}: {text}" for name, text in LAYOUTS.items())
    return f"no data set layout recognised in {root}.\nAccepted layouts:\n{accepted}\nFound: {_summary(root)}"


def _summary(folder: Path, depth: int = 1) -> str:
    """What a folder holds: file counts by suffix, and the same for each subfolder (one level)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    suffixes = Counter(p.suffix.lower() or "(no suffix)" for p in entries if p.is_file())
    parts = [", ".join(f"{n} {s}" for s, n in sorted(suffixes.items()))] if suffixes else []
    for sub in (p for p in entries if p.is_dir()):
        parts.append(f"{sub.name}/ ({_summary(sub, depth - 1) if depth > 0 else '...'})")
    return "; ".join(parts) or "nothing"


# --- opening -----------------------------------------------------------------------------------------------
def open_dataset(
    layout: Layout,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    on_error: OnError = "raise",
) -> Any:
    """The data set of ``layout`` (index-addressable ``(image, target)`` with ``class_names`` and
    ``annotation(i)``); ``split`` picks one of ``layout.splits`` (a ``data.yaml`` defaults to ``train``)."""
    if split is not None and layout.splits and split not in layout.splits and layout.kind != "coco":
        raise DatasetError(f"split {split!r} not found in {layout.annotations} (available: {list(layout.splits)})")
    if split is not None and not layout.splits:
        raise DatasetError(f"{layout.root} ({layout.kind} layout) has no named splits; {split!r} cannot be chosen")
    if layout.format == "coco":
        return _open_coco(layout, split, class_names, on_error)
    if layout.kind == "yolo":
        return _open_yolo_yaml(layout.annotations, split or "train", class_names, on_error)
    if layout.format == "voc":
        from detect.data.voc import VocDataset

        root = layout.root if layout.kind in ("voc", "flat") else (layout.images, layout.annotations)
        return VocDataset(root, split, class_names, on_error)
    if layout.format == "labelme":
        from detect.data.labelme import LabelmeDataset

        return LabelmeDataset(layout.images, layout.annotations, class_names, on_error)
    from detect.data.yolo import YoloDataset, list_images

    names = tuple(class_names) if class_names is not None else _yolo_names(layout)
    return YoloDataset.from_files(list_images(layout.images), names, layout.annotations, on_error)


def _open_coco(layout: Layout, split: str | None, class_names: Sequence[str] | None, on_error: OnError) -> Any:
    from detect.data.coco import CocoDataset

    json_path, images = layout.annotations, layout.images
    if split is not None:
        matches = [s for s in layout.splits if s == split] or [s for s in layout.splits if split in s]
        if len(matches) != 1:
            raise DatasetError(f"split {split!r} names {len(matches)} of the COCO files {list(layout.splits)}")
        json_path = next(p for p in _coco_files(layout) if p.stem == matches[0])
        images = _coco_images(json_path, layout.root)
    return CocoDataset(json_path, images, class_names, on_error)


def _coco_files(layout: Layout) -> list[Path]:
    root = layout.root
    return [p for p in [*root.glob("*.json"), *root.glob("annotations/*.json")] if p.stem in layout.splits]


def _yolo_names(layout: Layout) -> tuple[str, ...]:
    """YOLO class names for a folder layout: ``classes.txt`` beside the labels, else in the root (or its
    ``data.yaml``)."""
    from detect.data.yolo import read_class_names

    if (layout.annotations / "classes.txt").is_file():
        return read_class_names(layout.annotations)
    try:
        return read_class_names(layout.root)
    except DatasetError:
        raise DatasetError(
            f"{layout.annotations}: YOLO labels number their classes 0..K-1 but no names were found: write one name "
            f"a line into {layout.annotations / 'classes.txt'} (or a data.yaml with 'names'), or set class_names"
        ) from None


def yolo_data_yaml(path: Path) -> dict:
    """An Ultralytics ``data.yaml`` as a dict with ``root`` (its ``path`` resolved against the file's folder) and
    ``names`` as a tuple; :class:`DatasetError` for a file that is not one."""
    try:
        document = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ConfigError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read YAML ({e})", path=str(path)) from e
    if not isinstance(document, dict) or "train" not in document or "names" not in document:
        raise DatasetError(f"{path}: a YOLO data.yaml needs 'train' and 'names'", path=str(path))
    names = document["names"]
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DatasetError(f"{path}: 'names' must be a list of names or a mapping 0..K-1 -> name", path=str(path))
    root = Path(document.get("path") or ".")
    root = root if root.is_absolute() else path.parent / root
    return {**document, "root": root, "names": tuple(names)}


def _open_yolo_yaml(path: Path, split: str, class_names: Sequence[str] | None, on_error: OnError) -> Any:
    from detect.data.yolo import YoloDataset

    document = yolo_data_yaml(path)
    entries = document.get(split)
    if not entries:
        raise DatasetError(f"{path}: no {split!r} entry")
    files: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        files += _yolo_entry(document["root"], str(entry), path)
    if not files:
        raise DatasetError(f"{path}: {split!r} ({entries}) names no image files", path=str(path))
    names = tuple(class_names) if class_names is not None else document["names"]
    return YoloDataset.from_files(sorted(set(files)), names, None, on_error)


def _yolo_entry(root: Path, entry: str, where: Path) -> list[Path]:
    """The image files of one ``data.yaml`` entry: a folder (searched recursively, as Ultralytics does), a ``.txt``
    list (lines relative to the list's folder when they start with ``./``, else to ``root``) or one image."""
    target = Path(entry) if Path(entry).is_absolute() else root / entry
    if target.is_dir():
        return [p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if target.suffix.lower() == ".txt" and target.is_file():
        lines = [line.strip() for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [target.parent / line if line.startswith("./") else root / line for line in lines]
    if target.suffix.lower() in IMAGE_SUFFIXES and target.is_file():
        return [target]
    raise DatasetError(f"{where}: {entry!r} ({target}) is not a folder, an image list (.txt) or an image", path=str(where))


# --- hold-out split ----------------------------------------------------------------------------------------
class Subset:
    """The images ``indices`` of ``dataset``, in that order, with its ``class_names``."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, tuple(int(i) for i in indices)
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, dict]:
        return self.dataset[self.indices[i]]

    def annotation(self, i: int) -> dict:
        return self.dataset.annotation(self.indices[i])


def holdout(dataset: Any, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)``, disjoint, each sorted: images ranked by the SHA-256 of
    ``"<seed>:<image id>"`` and the first ``round(fraction * n)`` (at least 1 when ``n >= 2`` and ``fraction > 0``)
    held out. Image ids come from ``dataset.annotation(i)`` (no decoding)."""
    if not 0 <= fraction < 1:
        raise DatasetError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(dataset)
    count = min(max(round(fraction * n), 1 if fraction > 0 else 0), n - 1) if n >= 2 else 0
    keys = [hashlib.sha256(f"{seed}:{dataset.annotation(i)['image_id']}".encode()).digest() for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (keys[i], i))
    held = set(ranked[:count])
    return [i for i in range(n) if i not in held], sorted(held)
