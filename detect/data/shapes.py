"""The built-in synthetic detection set: coloured geometric shapes on textured, cluttered backgrounds.

Seven classes (``SHAPES_CLASSES``, label ``k`` is ``SHAPES_CLASSES[k-1]``). Each image holds ``min_objects`` to
``max_objects`` shapes whose longest side is 20-45 % of the shorter image side, in random colours, drawn with
OpenCV (anti-aliased by supersampling) and stacked in random order so that they occlude one another.

Decisions:
- **Determinism.** Sample ``i`` of seed ``s`` comes from its own generator ``default_rng([s, i])``: it is the same
  whatever else was drawn before, in any order, in any process, so the set needs no storage and shards freely.
- **Geometry.** Every shape is a float polygon in continuous pixel coordinates (pixel ``j`` spans ``[j, j+1)``);
  circles and ellipses are 96-gons (under 0.05 px from the true curve at these sizes). Coverage is the fraction
  of each pixel inside the polygon, from a 4x4-supersampled fill (see :func:`_rasterise`). A square stays square, a
  circle round, a hexagon and a star regular; ellipses (axis ratio 0.4-0.7), triangles and crosses vary their
  aspect. Every class but the circle is rotated by a uniform angle. Objects lie wholly inside the image, so no
  object is truncated.
- **Ground truth by construction.** Each object's coverage ``alpha`` (0..1) is composited front to back: its
  visible weight is ``alpha`` times the transmission of everything in front of it. A pixel belongs to an object
  when that visible weight is at least 0.5, i.e. the object contributes at least half of the pixel's colour. The
  box is the tight box of those pixels (``x2`` = last column + 1), so boxes match the drawn pixels exactly, and
  ``area`` is their count.
- **Occlusion.** ``hidden = 1 - visible pixels / pixels of the whole shape``. An object more than ``max_hidden``
  (60 %) hidden is drawn but not annotated; one more than ``difficult_hidden`` (30 %) hidden, or whose visible box
  has a side under ``difficult_min_side`` pixels, is marked ``difficult`` (VOC evaluation ignores those). The
  front object is never hidden, so every image has at least one annotation.
- **Background.** A gradient, stripes or smooth noise between two random colours, plus smooth colour noise, fine
  grain and small distractor blobs and strokes (no annotated class) drawn into the background, so that neither a
  flat-colour threshold nor edge density alone finds the objects. Object colours are redrawn (up to 8 times) until
  they differ from the mean background under the object by at least 100 (sum over RGB).
- **Export.** :func:`write_voc` and :func:`write_coco` write JPEG (quality 95, like VOC: decoded pixels differ from
  the rendered ones by a few levels; boxes are unaffected) and annotations; every file is written to a temporary
  name and moved into place with ``os.replace``, so a reader never sees half a file. Both take any data set with
  ``__len__``, ``__getitem__ -> (image, target)`` and ``class_names``.
"""

from __future__ import annotations

import colorsys
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import cv2
import numpy as np

from detect.data.voc import VocAnnotation, VocObject, voc_xml
from detect.errors import ConfigError
from detect.io import atomic_write

__all__ = [
    "SHAPES_CLASSES",
    "ShapesConfig",
    "ShapeObject",
    "Scene",
    "ShapesDataset",
    "DetectionDataset",
    "render",
    "render_annotated",
    "background",
    "shape_object",
    "write_voc",
    "write_coco",
]

SHAPES_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse", "hexagon", "cross")

_SUBPIXEL_BITS = 4  # cv2 polygon vertices in 1/16 pixel
_SUPERSAMPLE = 4  # objects are rasterised at 4x and averaged (anti-aliasing with exact area coverage)
_MIN_CONTRAST = 100.0  # sum over RGB of |object colour - mean background under it|
_COLOUR_TRIES = 8


@dataclass(frozen=True)
class ShapesConfig:
    """The synthetic set's parameters. ``image_size_max`` set: each image's height and width are drawn
    independently from ``[image_size, image_size_max]``; otherwise every image is ``image_size`` square."""

    num_images: int = 1000
    image_size: int = 320
    image_size_max: int | None = None
    min_objects: int = 1
    max_objects: int = 6
    object_size: tuple[float, float] = (0.20, 0.45)  # longest side, as a fraction of the shorter image side
    max_hidden: float = 0.6
    difficult_hidden: float = 0.3
    difficult_min_side: int = 12
    distractors: tuple[int, int] = (4, 16)  # inclusive range of distractor blobs per image
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "num_images >= 0": self.num_images >= 0,
            "image_size >= 32": self.image_size >= 32,
            "image_size_max >= image_size": self.image_size_max is None or self.image_size_max >= self.image_size,
            "1 <= min_objects <= max_objects": 1 <= self.min_objects <= self.max_objects,
            "0 < object_size[0] <= object_size[1] <= 0.9": 0 < self.object_size[0] <= self.object_size[1] <= 0.9,
            "0 <= difficult_hidden <= max_hidden < 1": 0 <= self.difficult_hidden <= self.max_hidden < 1,
            "0 <= distractors[0] <= distractors[1]": 0 <= self.distractors[0] <= self.distractors[1],
            "seed >= 0": self.seed >= 0,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ConfigError(f"invalid ShapesConfig ({self}): need {', '.join(failed)}")


@dataclass(frozen=True, eq=False)
class ShapeObject:
    """One drawn shape: 1-based ``label``, ``polygon`` ``(K, 2)`` float64 ``(x, y)`` vertices in continuous pixel
    coordinates, RGB ``color``."""

    label: int
    polygon: np.ndarray
    color: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Scene:
    """What one sample draws: ``background`` (``HxWx3`` uint8, distractors included) and ``objects`` back to front."""

    background: np.ndarray
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)


@dataclass(frozen=True, eq=False)
class _Layer:
    """One object's rasterisation in a window at ``(y0, x0)``: coverage and visible weight, both 0..1."""

    alpha: np.ndarray
    visible: np.ndarray
    y0: int
    x0: int


class ShapesDataset:
    """Index-addressable synthetic set. ``dataset[i]`` is ``(image, target)``: ``image`` RGB ``uint8`` ``HxWx3``;
    ``target`` a dict with ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)`` (1-based into
    ``SHAPES_CLASSES``), ``difficult`` bool ``(N,)``, ``area`` float32 ``(N,)`` (visible pixels) and ``image_id``
    (the index ``i``). Annotations are ordered back to front."""

    class_names = SHAPES_CLASSES

    def __init__(self, config: ShapesConfig | None = None) -> None:
        self.config = config or ShapesConfig()

    def __len__(self) -> int:
        return self.config.num_images

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        index = self._index(i)
        scene = self.scene(index)
        image, layers = _composite(scene)
        return image, _annotate(layers, [obj.label for obj in scene.objects], index, self.config)

    def annotation(self, i: int) -> dict:
        """The target of sample ``i`` (rendering is needed to know occlusion, so this costs a full sample)."""
        return self[i][1]

    def scene(self, i: int) -> Scene:
        """The drawing instructions of sample ``i``; ``render(dataset.scene(i))`` is ``dataset[i][0]``."""
        rng = np.random.default_rng([self.config.seed, self._index(i)])
        return _sample_scene(rng, self.config)

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} images")
        return i % len(self)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: RGB ``uint8`` ``HxWx3``."""
    return _composite(scene)[0]


def render_annotated(scene: Scene, config: ShapesConfig | None = None) -> tuple[np.ndarray, dict]:
    """Draw a scene built by hand (large scenes, video frames) and annotate it by the set's rules: ``(image,
    target)`` as ``dataset[i]`` gives them, ``image_id`` 0, plus ``object_index`` ``(N,)``: the position in
    ``scene.objects`` of each annotated object (too hidden ones are left out)."""
    image, layers = _composite(scene)
    return image, _annotate(layers, [obj.label for obj in scene.objects], 0, config or ShapesConfig(), with_index=True)


def background(rng: np.random.Generator, height: int, width: int, distractors: int = 0) -> np.ndarray:
    """A textured background of the set (``HxWx3`` uint8) with ``distractors`` blobs and strokes drawn into it."""
    image = _background(rng, height, width)
    _draw_distractors(rng, image, distractors)
    return image


def shape_object(
    rng: np.random.Generator,
    label: int,
    size: float,
    centre: tuple[float, float],
    background: np.ndarray | None = None,
    angle: float | None = None,
) -> ShapeObject:
    """One shape of class ``label`` (1-based) whose longest side spans ``size`` pixels, centred on ``(x, y)``;
    random outline, angle (unless given) and colour (contrasting with ``background`` under it when given)."""
    name = SHAPES_CLASSES[label - 1]
    outline = _OUTLINES[name](rng)  # (K, 2) within [-1, 1]
    if angle is None:
        angle = 0.0 if name == "circle" else rng.uniform(0, 2 * np.pi)
    polygon = outline @ _rotation(angle) * (size / 2) + np.asarray(centre, dtype=np.float64)
    if background is None:
        rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0))
        colour = tuple(int(round(255 * c)) for c in rgb)
    else:
        colour = _contrasting_colour(rng, background, np.clip(polygon, 0, np.array(background.shape[1::-1]) - 1))
    return ShapeObject(label, polygon, colour)


# --- sampling ----------------------------------------------------------------------------------------------
def _sample_scene(rng: np.random.Generator, config: ShapesConfig) -> Scene:
    high = config.image_size_max or config.image_size
    height, width = (int(v) for v in rng.integers(config.image_size, high + 1, size=2))
    background = _background(rng, height, width)
    _draw_distractors(rng, background, int(rng.integers(config.distractors[0], config.distractors[1] + 1)))
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects = tuple(_sample_object(rng, background, config.object_size) for _ in range(count))
    return Scene(background, objects)


def _sample_object(rng: np.random.Generator, background: np.ndarray, size_range: tuple[float, float]) -> ShapeObject:
    height, width = background.shape[:2]
    label = int(rng.integers(len(SHAPES_CLASSES))) + 1
    outline = _OUTLINES[SHAPES_CLASSES[label - 1]](rng)  # (K, 2) within [-1, 1]
    angle = 0.0 if SHAPES_CLASSES[label - 1] == "circle" else rng.uniform(0, 2 * np.pi)
    polygon = outline @ _rotation(angle) * (rng.uniform(*size_range) * min(height, width) / 2)
    low, high = polygon.min(0), polygon.max(0)
    centre = rng.uniform(-low, np.array([width, height]) - high)
    polygon = polygon + centre
    return ShapeObject(label, polygon, _contrasting_colour(rng, background, polygon))


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray, polygon: np.ndarray) -> tuple[int, int, int]:
    (x0, y0), (x1, y1) = np.floor(polygon.min(0)).astype(int), np.ceil(polygon.max(0)).astype(int)
    under = background[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    best, best_contrast = (0, 0, 0), -1.0
    for _ in range(_COLOUR_TRIES):
        rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0))
        colour = tuple(int(round(255 * c)) for c in rgb)
        contrast = float(np.abs(np.array(colour) - under).sum())
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
        if contrast >= _MIN_CONTRAST:
            break
    return best


def _rotation(angle: float) -> np.ndarray:
    """The matrix that turns row vectors ``(x, y)`` by ``angle`` (clockwise on screen, y pointing down)."""
    return np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    """A regular n-gon (or n-pointed star with inner radius ``inner``) of circumradius 1, a vertex pointing up."""
    k = np.arange(2 * n if inner else n)
    angles = -np.pi / 2 + np.pi * k / n * (1 if inner else 2)
    radius = np.where(k % 2 == 1, inner, 1.0) if inner else np.ones_like(angles)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _cross(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0.25, 0.4)  # half the arm thickness
    quarter = np.array([[-t, -1.0], [t, -1.0], [t, -t]])
    turns = [quarter @ _rotation(a) for a in np.arange(4) * np.pi / 2]
    return np.concatenate(turns) * np.array([1.0, rng.uniform(0.7, 1.0)])


def _triangle(rng: np.random.Generator) -> np.ndarray:
    apex = rng.uniform(-0.35, 0.35)
    return np.array([[apex, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * np.array([rng.uniform(0.6, 1.0), 1.0])


_OUTLINES = {
    "circle": lambda rng: _regular(96),
    "square": lambda rng: np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]),
    "triangle": _triangle,
    "star": lambda rng: _regular(5, inner=rng.uniform(0.4, 0.5)),
    "ellipse": lambda rng: _regular(96) * np.array([1.0, rng.uniform(0.4, 0.7)]),
    "hexagon": lambda rng: _regular(6),
    "cross": _cross,
}


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient, stripes or smooth noise between two colours, plus smooth colour noise and grain: ``HxWx3`` uint8.

    Built per colour plane: NumPy broadcasting of ``(H, W, 1)`` against ``(3,)`` is several times slower."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    kind = rng.integers(3)
    if kind == 2:
        t = _smooth_noise(rng, height, width, int(rng.integers(3, 10)), 1)[..., 0]
    else:
        angle = rng.uniform(0, np.pi)
        xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
        projection = xs[None] * np.float32(np.cos(angle)) + ys[:, None] * np.float32(np.sin(angle))  # (H, W)
        if kind == 0:
            t = (projection - projection.min()) / max(float(np.ptp(projection)), 1.0)
        else:
            t = 0.5 + 0.5 * np.sin(projection * np.float32(2 * np.pi / rng.uniform(8, 40)))
    grain = rng.random((height, width), dtype=np.float32) * np.float32(rng.uniform(0, 12))  # (H, W), luminance
    image = cv2.merge([np.float32(a) + np.float32(b - a) * t + grain for a, b in zip(c0, c1)])  # (H, W, 3)
    image += 25 * (_smooth_noise(rng, height, width, int(rng.integers(4, 16)), 3) - 0.5)
    return _to_uint8(image)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Uniform noise on a coarse ``cells``-wide grid, upsampled: ``(H, W, channels)`` float32. Bicubic to 1/8 of the
    size then bilinear: as smooth to the eye as bicubic all the way, at a third of the cost."""
    grid = rng.random((cells, cells, channels), dtype=np.float32)
    middle = cv2.resize(grid, (max(width // 8, cells), max(height // 8, cells)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(middle, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, channels)


def _draw_distractors(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Small irregular blobs and short strokes, drawn anti-aliased into ``image`` in place."""
    height, width = image.shape[:2]
    side = min(height, width)
    for _ in range(count):
        colour = tuple(float(c) for c in rng.integers(0, 256, size=3))
        centre = rng.uniform((0, 0), (width, height))
        if rng.random() < 0.6:
            n = int(rng.integers(5, 10))
            radius = side * rng.uniform(0.01, 0.04) * rng.uniform(0.5, 1.0, size=(n, 1))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
            points = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
            cv2.fillPoly(image, [_fixed_point(points)], colour, cv2.LINE_AA, _SUBPIXEL_BITS)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            end = centre + side * rng.uniform(0.05, 0.12) * np.array([np.cos(angle), np.sin(angle)])
            ends = _fixed_point(np.stack([centre, end]))
            thickness = int(rng.integers(1, 4))
            cv2.line(image, tuple(ends[0]), tuple(ends[1]), colour, thickness, cv2.LINE_AA, _SUBPIXEL_BITS)


def _fixed_point(points: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Continuous ``(x, y)`` -> OpenCV fixed-point vertices. OpenCV puts integer coordinates at pixel centres, our
    continuous coordinates at pixel corners, hence the half-pixel shift."""
    return np.rint((points - np.asarray(origin) - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)


# --- rendering and annotation ------------------------------------------------------------------------------
def _rasterise(polygon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Coverage (float32, multiples of 1/16) of a polygon in its bounding window, and the window's ``(y0, x0)``.

    Anti-aliased by 4x4 supersampling: OpenCV's own ``LINE_AA`` fill draws a soft line over each edge, which makes
    shapes about 0.7 px fatter per side than their polygon, so its coverage is not an area. A plain fill at four
    times the resolution averaged over 4x4 blocks is (OpenCV fills boundary pixels, so shapes come out about 1/8 px
    fatter per side)."""
    x0, y0 = np.maximum(np.floor(polygon.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(polygon.max(0)).astype(int) + 1, (width, height))
    fine = np.zeros(((y1 - y0) * _SUPERSAMPLE, (x1 - x0) * _SUPERSAMPLE), dtype=np.uint8)
    vertices = _fixed_point(polygon * _SUPERSAMPLE, (x0 * _SUPERSAMPLE, y0 * _SUPERSAMPLE))
    cv2.fillPoly(fine, [vertices], _SUPERSAMPLE**2, cv2.LINE_8, _SUBPIXEL_BITS)
    counts = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)  # block means: exact counts 0..16
    return counts.astype(np.float32) / np.float32(_SUPERSAMPLE**2), int(y0), int(x0)


def _composite(scene: Scene) -> tuple[np.ndarray, list[_Layer]]:
    """Front-to-back compositing: each object's visible weight is its coverage times the transmission of the
    objects in front of it; the image is the sum of weighted colours plus the background times what is left.
    Works on colour planes ``(3, H, W)`` (see :func:`_background` for why)."""
    height, width = scene.background.shape[:2]
    transmission = np.ones((height, width), dtype=np.float32)
    colour_sum = np.zeros((3, height, width), dtype=np.float32)
    layers = []
    for obj in reversed(scene.objects):
        alpha, y0, x0 = _rasterise(obj.polygon, height, width)
        window = (slice(y0, y0 + alpha.shape[0]), slice(x0, x0 + alpha.shape[1]))
        visible = alpha * transmission[window]
        colour_sum[(slice(None), *window)] += np.asarray(obj.color, dtype=np.float32)[:, None, None] * visible
        transmission[window] *= 1 - alpha
        layers.append(_Layer(alpha, visible, y0, x0))
    planes = [total + plane * transmission for total, plane in zip(colour_sum, cv2.split(scene.background))]
    return _to_uint8(cv2.merge(planes)), layers[::-1]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Round to nearest and saturate a float image."""
    return np.rint(np.clip(image, 0, 255, out=image)).astype(np.uint8)


def _annotate(layers: list[_Layer], labels: list[int], image_id: int, config: ShapesConfig, with_index: bool = False) -> dict:
    boxes, kept_labels, difficult, areas, index = [], [], [], [], []
    for i, (layer, label) in enumerate(zip(layers, labels)):
        inside = layer.visible >= 0.5
        visible_pixels = int(inside.sum())
        if visible_pixels == 0:
            continue
        hidden = 1.0 - visible_pixels / int((layer.alpha >= 0.5).sum())
        if hidden > config.max_hidden:
            continue
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        box = (layer.x0 + cols[0], layer.y0 + rows[0], layer.x0 + cols[-1] + 1, layer.y0 + rows[-1] + 1)
        small = min(box[2] - box[0], box[3] - box[1]) < config.difficult_min_side
        boxes.append(box)
        kept_labels.append(label)
        difficult.append(hidden > config.difficult_hidden or small)
        areas.append(visible_pixels)
        index.append(i)
    extra = {"object_index": np.array(index, dtype=np.int64)} if with_index else {}
    return {
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.array(kept_labels, dtype=np.int64),
        "difficult": np.array(difficult, dtype=bool),
        "area": np.array(areas, dtype=np.float32),
        "image_id": image_id,
        **extra,
    }


# --- export ------------------------------------------------------------------------------------------------
class DetectionDataset(Protocol):
    """What the writers need: ``len``, ``dataset[i] -> (RGB uint8 image, target dict)`` and 1-based class names."""

    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]: ...


_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def write_voc(
    dataset: DetectionDataset,
    out_dir: str | os.PathLike,
    indices: Iterable[int] | None = None,
    splits: Mapping[str, Sequence[int]] | None = None,
) -> list[str]:
    """Write samples as a VOC folder: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and, for each entry of
    ``splits`` (name -> dataset indices, each among ``indices``), ``ImageSets/Main/<name>.txt``.

    Boxes are converted to VOC's 1-based inclusive convention (``xmin = x1 + 1``, ``xmax = x2``, see
    :mod:`detect.data.voc`). An integer ``image_id`` becomes a zero-padded six-digit id. Returns the ids written.
    """
    out = Path(out_dir)
    indices = list(range(len(dataset)) if indices is None else indices)
    for name, members in (splits or {}).items():
        if not _SPLIT_NAME.match(name) or not set(members) <= set(indices):
            raise ConfigError(f"split {name!r} must be a plain name listing only written indices {indices}")
    ids = {}
    for i in indices:
        image, target = dataset[i]
        image_id = _file_stem(target["image_id"])
        objects = tuple(
            VocObject(dataset.class_names[label - 1], box, bool(hard))
            for box, label, hard in zip(target["boxes"], target["labels"].tolist(), target["difficult"])
        )
        annotation = VocAnnotation(f"{image_id}.jpg", image.shape[1], image.shape[0], objects)
        atomic_write(out / "JPEGImages" / f"{image_id}.jpg", _jpeg(image))
        atomic_write(out / "Annotations" / f"{image_id}.xml", voc_xml(annotation, folder=out.name))
        ids[i] = image_id
    for name, members in (splits or {}).items():
        atomic_write(out / "ImageSets" / "Main" / f"{name}.txt", "".join(f"{ids[i]}\n" for i in members).encode())
    return list(ids.values())


def write_coco(
    dataset: DetectionDataset,
    out_dir: str | os.PathLike,
    indices: Iterable[int] | None = None,
    json_name: str = "annotations.json",
) -> Path:
    """Write samples as ``images/<id>.jpg`` plus one COCO detection JSON; returns the JSON's path.

    Image ids are the dataset indices; annotation ids count from 1 (COCO tools treat 0 as "unmatched"); category
    ids are the 1-based labels; ``bbox`` is ``[x, y, w, h]``; ``area`` is the visible pixel count where the target
    has one (the shapes set does), else the box area; ``iscrowd`` is 0. Each annotation also carries ``difficult``
    (0/1), which COCO tools ignore.
    """
    out = Path(out_dir)
    images, annotations = [], []
    for i in range(len(dataset)) if indices is None else indices:
        image, target = dataset[i]
        file_name = f"{_file_stem(target['image_id'])}.jpg"
        atomic_write(out / "images" / file_name, _jpeg(image))
        images.append({"id": int(i), "file_name": file_name, "width": image.shape[1], "height": image.shape[0]})
        widths = target["boxes"][:, 2:] - target["boxes"][:, :2]  # (N, 2)
        areas = target["area"] if "area" in target else widths.prod(1)
        for box, size, label, area, hard in zip(target["boxes"], widths, target["labels"], areas, target["difficult"]):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": int(i),
                "category_id": int(label),
                "bbox": [float(box[0]), float(box[1]), float(size[0]), float(size[1])],
                "area": float(area),
                "iscrowd": 0,
                "difficult": int(hard),
            })
    categories = [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(dataset.class_names)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    path = out / json_name
    atomic_write(path, json.dumps(document).encode())
    return path


def _file_stem(image_id: int | str) -> str:
    stem = f"{image_id:06d}" if isinstance(image_id, (int, np.integer)) else str(image_id)
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise ConfigError(f"image id {image_id!r} is not usable as a file name")
    return stem


def _jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ConfigError(f"cannot encode a {image.shape} image as JPEG")
    return data.tobytes()
