"""The synthetic shapes set: determinism, geometry, ground truth measured from the rendered pixels, VOC/COCO export."""

from __future__ import annotations

import dataclasses
import json
import math
import stat
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from detect.data.shapes import SHAPES_CLASSES, Scene, ShapesConfig, ShapesDataset, render, write_coco, write_voc
from detect.data.voc import VocDataset
from detect.errors import ConfigError

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@pytest.fixture(scope="module")
def dataset() -> ShapesDataset:
    return ShapesDataset(ShapesConfig(num_images=64, seed=7))


@pytest.fixture(scope="module")
def samples(dataset) -> list[tuple[np.ndarray, dict]]:
    return [dataset[i] for i in range(len(dataset))]


def _same(a: tuple[np.ndarray, dict], b: tuple[np.ndarray, dict]) -> bool:
    keys = ("boxes", "labels", "difficult", "area")
    return np.array_equal(a[0], b[0]) and all(np.array_equal(a[1][k], b[1][k]) for k in keys)


# --- determinism -------------------------------------------------------------------------------------------
def test_sample_depends_only_on_seed_and_index(dataset):
    first = dataset[5]
    fresh = ShapesDataset(ShapesConfig(num_images=64, seed=7))
    for i in (40, 3, 63):  # other samples drawn first, in another order
        fresh[i]
    assert _same(first, fresh[5])
    assert _same(first, dataset[5])
    assert _same(first, dataset[5 - 64])  # negative indices address the same sample


def test_seeds_and_indices_differ(dataset):
    other_seed = ShapesDataset(ShapesConfig(num_images=64, seed=8))
    assert not np.array_equal(dataset[0][0], other_seed[0][0])
    assert not np.array_equal(dataset[0][0], dataset[1][0])


def test_index_out_of_range(dataset):
    with pytest.raises(IndexError):
        dataset[64]
    assert sum(1 for _ in ShapesDataset(ShapesConfig(num_images=3))) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_objects": 4, "max_objects": 2},
        {"min_objects": 0},
        {"object_size": (0.5, 0.3)},
        {"object_size": (0.0, 0.3)},
        {"image_size": 400, "image_size_max": 300},
        {"difficult_hidden": 0.7, "max_hidden": 0.6},
        {"seed": -1},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        ShapesConfig(**kwargs)


# --- targets -----------------------------------------------------------------------------------------------
def test_target_types_and_ranges(samples):
    for i, (image, target) in enumerate(samples):
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape == (320, 320, 3)
        n = len(target["labels"])
        assert n >= 1 and target["image_id"] == i
        assert target["boxes"].dtype == np.float32 and target["boxes"].shape == (n, 4)
        assert target["labels"].dtype == np.int64 and target["difficult"].dtype == bool
        assert ((target["labels"] >= 1) & (target["labels"] <= len(SHAPES_CLASSES))).all()
        x1, y1, x2, y2 = target["boxes"].T
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
        assert (x2 > x1).all() and (y2 > y1).all()
        assert (target["area"] <= (x2 - x1) * (y2 - y1)).all()


def test_varied_image_sizes():
    ds = ShapesDataset(ShapesConfig(num_images=12, image_size=160, image_size_max=400, seed=3))
    shapes = {ds[i][0].shape for i in range(len(ds))}
    assert len(shapes) > 6
    for i in range(len(ds)):
        image, target = ds[i]
        h, w = image.shape[:2]
        assert 160 <= h <= 400 and 160 <= w <= 400
        assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()


def test_all_classes_and_occlusion_appear(dataset, samples):
    labels = np.concatenate([target["labels"] for _, target in samples])
    assert set(labels.tolist()) == set(range(1, len(SHAPES_CLASSES) + 1))
    drawn = sum(len(dataset.scene(i).objects) for i in range(len(dataset)))
    difficult = np.concatenate([target["difficult"] for _, target in samples])
    assert len(labels) < drawn  # some objects are hidden enough to be dropped
    assert 0 < difficult.sum() < len(difficult)


# --- geometry of the scene description ---------------------------------------------------------------------
def _sides(polygon: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.roll(polygon, -1, axis=0) - polygon, axis=1)


def _radii(polygon: np.ndarray) -> np.ndarray:
    return np.linalg.norm(polygon - polygon.mean(0), axis=1)


def test_shape_geometry(dataset):
    seen = set()
    for i in range(len(dataset)):
        scene = dataset.scene(i)
        side = min(scene.background.shape[:2])
        for obj in scene.objects:
            name, p = SHAPES_CLASSES[obj.label - 1], obj.polygon
            seen.add(name)
            assert (p >= 0).all() and (p[:, 0] <= scene.background.shape[1]).all()
            assert (p[:, 1] <= scene.background.shape[0]).all()
            if name == "square":  # stays square: equal sides, equal diagonals
                np.testing.assert_allclose(_sides(p), _sides(p)[0], rtol=1e-9)
                np.testing.assert_allclose(np.linalg.norm(p[0] - p[2]), np.linalg.norm(p[1] - p[3]), rtol=1e-9)
                assert 0.2 - 1e-9 <= _sides(p)[0] / side <= 0.45 + 1e-9
            elif name in ("circle", "hexagon"):  # regular: all vertices on one circle, equal sides
                np.testing.assert_allclose(_radii(p), _radii(p)[0], rtol=1e-9)
                np.testing.assert_allclose(_sides(p), _sides(p)[0], rtol=1e-9)
                assert 0.2 - 1e-9 <= 2 * _radii(p)[0] / side <= 0.45 + 1e-9
            elif name == "star":  # ten vertices on two circles, inner/outer 0.4..0.5
                outer, inner = _radii(p)[0::2], _radii(p)[1::2]
                np.testing.assert_allclose(outer, outer[0], rtol=1e-9)
                assert 0.4 - 1e-9 <= inner.max() / outer[0] <= 0.5 + 1e-9
            elif name == "ellipse":  # axis ratio 0.4..0.7: never a circle
                assert 0.4 - 1e-6 <= _radii(p).min() / _radii(p).max() <= 0.7 + 1e-6
    assert seen == set(SHAPES_CLASSES)


def _shoelace(polygon: np.ndarray) -> float:
    x, y = polygon.T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_rasterised_shape_matches_its_polygon(dataset):
    """Each shape drawn alone (white on black): its total coverage is the polygon's area (shoelace formula) to within
    a quarter pixel along the outline (OpenCV's LINE_AA fill, 0.7 px fat per side, would fail), and the pixels at
    least half covered lie within the polygon's bounds."""
    for i in range(8):
        scene = dataset.scene(i)
        for obj in scene.objects:
            alone = _alone(scene, obj)  # (H, W) uint8 coverage
            area = _shoelace(obj.polygon)
            assert abs(alone.sum(dtype=np.float64) / 255 - area) <= 0.25 * _sides(obj.polygon).sum()
            ys, xs = np.nonzero(alone >= 128)
            low, high = obj.polygon.min(0), obj.polygon.max(0)
            assert xs.min() >= math.floor(low[0]) and xs.max() + 1 <= math.ceil(high[0])
            assert ys.min() >= math.floor(low[1]) and ys.max() + 1 <= math.ceil(high[1])


# --- ground truth measured from rendered pixels ------------------------------------------------------------
def _alone(scene: Scene, obj) -> np.ndarray:
    """The object alone, white on black: its coverage in 8 bits."""
    black = np.zeros_like(scene.background)
    return render(Scene(black, (dataclasses.replace(obj, color=WHITE),)))[..., 0]


def _contribution(scene: Scene, k: int) -> np.ndarray:
    """How much of each pixel's colour object ``k`` provides, in 8 bits: the scene rendered with object ``k`` white
    minus the scene rendered with it black (everything else equal)."""
    def with_colour(colour):
        objects = list(scene.objects)
        objects[k] = dataclasses.replace(objects[k], color=colour)
        return render(dataclasses.replace(scene, objects=tuple(objects))).astype(np.int32)

    return (with_colour(WHITE) - with_colour(BLACK))[..., 0]


def _bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


@dataclasses.dataclass
class _Measured:
    """Bounds on one object's annotation from 8-bit pixels. A pixel whose true share is exactly at the 0.5 threshold
    can round either way, so 8-bit values of 127 and 128 are undecided: ``lo`` counts only pixels >= 129, ``hi``
    those >= 127."""

    label: int
    box_lo: np.ndarray | None
    box_hi: np.ndarray | None
    area: tuple[int, int]
    hidden: tuple[float, float]
    min_side: tuple[int, int]


def _measure(scene: Scene, k: int) -> _Measured:
    share, coverage = _contribution(scene, k), _alone(scene, scene.objects[k])
    vis_lo, vis_hi = share >= 129, share >= 127
    full_lo, full_hi = int((coverage >= 129).sum()), int((coverage >= 127).sum())
    hidden = (1 - vis_hi.sum() / full_lo, 1 - vis_lo.sum() / full_hi)
    box_lo = _bbox(vis_lo) if vis_lo.any() else None
    box_hi = _bbox(vis_hi) if vis_hi.any() else None
    sides = [int(min(b[2] - b[0], b[3] - b[1])) if b is not None else 0 for b in (box_lo, box_hi)]
    return _Measured(scene.objects[k].label, box_lo, box_hi, (int(vis_lo.sum()), int(vis_hi.sum())), hidden,
                     (sides[0], sides[1]))


def _fits(m: _Measured, box: np.ndarray, label: int, area: float) -> bool:
    """The annotation lies between the sure and the possible pixels of the measured object."""
    if m.box_hi is None or label != m.label or not m.area[0] <= area <= m.area[1]:
        return False
    outer_ok = box[0] >= m.box_hi[0] and box[1] >= m.box_hi[1] and box[2] <= m.box_hi[2] and box[3] <= m.box_hi[3]
    if m.box_lo is None:
        return outer_ok
    inner_ok = box[0] <= m.box_lo[0] and box[1] <= m.box_lo[1] and box[2] >= m.box_lo[2] and box[3] >= m.box_lo[3]
    return outer_ok and inner_ok


@pytest.mark.parametrize("index", range(0, 64, 4))
def test_boxes_match_rendered_pixels(dataset, samples, index):
    """Independent check of occlusion, boxes, dropping and difficulty: every annotation is re-derived from the pixels
    each object contributes to the final image, measured by re-rendering it white and black."""
    config = dataset.config
    image, target = samples[index]
    scene = dataset.scene(index)
    assert np.array_equal(render(scene), image)
    annotations = list(zip(target["boxes"], target["labels"].tolist(), target["area"], target["difficult"]))
    for k in range(len(scene.objects)):
        m = _measure(scene, k)
        must_keep = m.box_lo is not None and m.hidden[1] <= config.max_hidden
        must_drop = m.box_hi is None or m.hidden[0] > config.max_hidden
        matches = bool(annotations) and _fits(m, annotations[0][0], annotations[0][1], annotations[0][2])
        assert not (must_keep and not matches), f"object {k} missing or wrong: {m} vs {annotations[:1]}"
        if matches and not must_drop:
            difficult = annotations.pop(0)[3]
            if m.hidden[0] > config.difficult_hidden or m.min_side[1] < config.difficult_min_side:
                assert difficult
            if m.hidden[1] <= config.difficult_hidden and m.min_side[0] >= config.difficult_min_side:
                assert not difficult
    assert not annotations, f"annotations matching no drawn object: {annotations}"


# --- export ------------------------------------------------------------------------------------------------
def _assert_files_complete(root) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert all(p.stat().st_mode & stat.S_IROTH for p in files)


def test_write_voc_round_trip(dataset, tmp_path):
    ids = write_voc(dataset, tmp_path, indices=range(6), splits={"train": [0, 1, 2, 3], "val": [4, 5]})
    assert ids == [f"{i:06d}" for i in range(6)]
    _assert_files_complete(tmp_path)
    train = VocDataset(tmp_path, split="train", class_names=SHAPES_CLASSES)
    assert train.image_ids == ("000000", "000001", "000002", "000003")
    assert VocDataset(tmp_path, split="val", class_names=SHAPES_CLASSES).image_ids == ("000004", "000005")
    for i in range(4):
        image, target = dataset[i]
        read_image, read_target = train[i]
        np.testing.assert_array_equal(read_target["boxes"], target["boxes"])
        np.testing.assert_array_equal(read_target["labels"], target["labels"])
        np.testing.assert_array_equal(read_target["difficult"], target["difficult"])
        assert read_image.shape == image.shape
        assert np.abs(read_image.astype(int) - image).mean() < 3  # JPEG quality 95

    # VOC's own convention in the file: 1-based inclusive corners.
    root = ET.parse(tmp_path / "Annotations" / "000002.xml").getroot()
    _, target = dataset[2]
    assert root.findtext("filename") == "000002.jpg"
    assert (root.findtext("size/width"), root.findtext("size/height")) == ("320", "320")
    for node, box, label, hard in zip(root.iter("object"), target["boxes"], target["labels"], target["difficult"]):
        assert node.findtext("name") == SHAPES_CLASSES[label - 1]
        assert node.findtext("difficult") == str(int(hard))
        corners = [int(node.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        assert corners == [int(box[0]) + 1, int(box[1]) + 1, int(box[2]), int(box[3])]


def test_write_voc_rejects_split_outside_indices(dataset, tmp_path):
    with pytest.raises(ConfigError):
        write_voc(dataset, tmp_path, indices=[0, 1], splits={"train": [0, 5]})
    with pytest.raises(ConfigError):
        write_voc(dataset, tmp_path, indices=[0], splits={"../evil": [0]})
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_write_coco(dataset, tmp_path):
    path = write_coco(dataset, tmp_path, indices=[3, 1, 8])
    _assert_files_complete(tmp_path)
    document = json.loads(path.read_text())
    assert document["categories"] == [
        {"id": k, "name": name, "supercategory": "object"} for k, name in enumerate(SHAPES_CLASSES, start=1)
    ]
    assert [image["id"] for image in document["images"]] == [3, 1, 8]
    ids = [a["id"] for a in document["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    for entry in document["images"]:
        decoded = cv2.imread(str(tmp_path / "images" / entry["file_name"]))
        assert decoded.shape[:2] == (entry["height"], entry["width"]) == (320, 320)
        _, target = dataset[entry["id"]]
        mine = [a for a in document["annotations"] if a["image_id"] == entry["id"]]
        assert len(mine) == len(target["labels"])
        for a, box, label, area, hard in zip(
            mine, target["boxes"].tolist(), target["labels"], target["area"], target["difficult"]
        ):
            assert a["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            assert a["category_id"] == label and a["iscrowd"] == 0
            assert a["area"] == area and a["difficult"] == int(hard)


def test_writers_take_any_dataset(dataset, tmp_path):
    """A VOC folder read back exports to COCO too: string ids name the files, the box area stands in for ``area``."""
    write_voc(dataset, tmp_path / "voc", indices=[2])
    voc = VocDataset(tmp_path / "voc", class_names=SHAPES_CLASSES)
    document = json.loads(write_coco(voc, tmp_path / "coco").read_text())
    assert document["images"][0]["file_name"] == "000002.jpg"
    x1, y1, x2, y2 = dataset[2][1]["boxes"].T
    assert [a["area"] for a in document["annotations"]] == ((x2 - x1) * (y2 - y1)).tolist()
