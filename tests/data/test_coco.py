"""COCO JSON reading: a hand-written file, every refusal with raise/skip, and the round trip with write_coco."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.data.coco import CocoDataset
from detect.data.shapes import ShapesConfig, ShapesDataset, write_coco
from detect.errors import DatasetError


def _write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 127, dtype=np.uint8))


# Category ids with a gap (as COCO's own), listed out of order; image 7 has no annotations; one crowd box.
DOCUMENT = {
    "images": [
        {"id": 3, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 7, "file_name": "sub/b.png", "width": 20, "height": 10},
    ],
    "annotations": [
        {"id": 1, "image_id": 3, "category_id": 5, "bbox": [1, 2, 10, 20], "area": 150, "iscrowd": 0},
        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [0.5, 0, 39.5, 30], "iscrowd": 1},
    ],
    "categories": [{"id": 5, "name": "dog"}, {"id": 1, "name": "cat"}],
}


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    _write_image(tmp_path / "images" / "a.png", 40, 30)
    _write_image(tmp_path / "images" / "sub" / "b.png", 20, 10)
    return tmp_path


def _write(folder: Path, document: dict) -> Path:
    path = folder / "instances.json"
    path.write_text(json.dumps(document))
    return path


def test_hand_written_file(coco_dir: Path) -> None:
    dataset = CocoDataset(_write(coco_dir, DOCUMENT))
    assert dataset.class_names == ("cat", "dog")  # sorted by category id: 1 -> label 1, 5 -> label 2
    assert dataset.category_ids == (1, 5)
    assert len(dataset) == 2 and dataset.problems == ()
    image, target = dataset[0]
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(target["boxes"], np.array([[1, 2, 11, 22], [0.5, 0, 40, 30]], dtype=np.float32))
    np.testing.assert_array_equal(target["labels"], [2, 1])
    np.testing.assert_array_equal(target["iscrowd"], [False, True])
    np.testing.assert_array_equal(target["difficult"], [False, False])
    np.testing.assert_array_equal(target["area"], [150, 39.5 * 30])  # given, else w * h
    assert target["image_id"] == 3
    empty = dataset.annotation(1)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == np.int64 and empty["image_id"] == 7
    assert dataset[1][0].shape == (10, 20, 3)


def test_class_names_given_reorder_and_refuse_others(coco_dir: Path) -> None:
    dataset = CocoDataset(_write(coco_dir, DOCUMENT), class_names=["dog", "cat", "bird"])
    np.testing.assert_array_equal(dataset.annotation(0)["labels"], [1, 2])
    assert dataset.category_ids == (5, 1, None)
    with pytest.raises(DatasetError, match=r"instances\.json: annotation 1 \(id 2, image 3 'a.png'\).*category_id 1"):
        CocoDataset(_write(coco_dir, DOCUMENT), class_names=["dog"])
    skipped = CocoDataset(_write(coco_dir, DOCUMENT), class_names=["dog"], on_error="skip")
    np.testing.assert_array_equal(skipped.annotation(0)["labels"], [1])
    assert len(skipped.problems) == 1 and "category_id 1 (cat)" in skipped.problems[0].message


def _with_annotation(**changes: object) -> dict:
    document = json.loads(json.dumps(DOCUMENT))
    document["annotations"][0].update(changes)
    return document


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bbox": [30, 2, 11, 20]}, r"bbox \[x=30, y=2, w=11, h=20\] is not inside the 40x30 image"),
        ({"bbox": [-1, 2, 10, 20]}, "is not inside the 40x30 image"),
        ({"bbox": [1, 2, 0, 20]}, "empty bbox"),
        ({"bbox": [1, 2, 10]}, "is not \\[x, y, w, h\\]"),
        ({"bbox": [1, 2, "10", 20]}, "is not \\[x, y, w, h\\]"),
        ({"category_id": 9}, "category_id 9 is not one of the classes"),
        ({"image_id": 99}, "image_id 99 is no image"),
        ({"iscrowd": 2}, "iscrowd and difficult must be 0 or 1"),
    ],
)
def test_bad_annotation_raises_or_is_skipped(coco_dir: Path, changes: dict, message: str) -> None:
    path = _write(coco_dir, _with_annotation(**changes))
    with pytest.raises(DatasetError, match=message) as error:
        CocoDataset(path)
    assert "instances.json: annotation 0 (id 1" in error.value.message
    dataset = CocoDataset(path, on_error="skip")
    assert len(dataset) == 2  # the image stays; only the object goes
    np.testing.assert_array_equal(dataset.annotation(0)["labels"], [1])
    assert len(dataset.problems) == 1 and dataset.problems[0].source == str(path)


def test_tiny_overshoot_is_clipped(coco_dir: Path) -> None:
    dataset = CocoDataset(_write(coco_dir, _with_annotation(bbox=[30, 20, 10.005, 10.005])))
    np.testing.assert_array_equal(dataset.annotation(0)["boxes"][0], [30, 20, 40, 30])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"file_name": "missing.png"}, "missing.png not found"),
        ({"width": 0}, "width and height must be positive integers"),
        ({"file_name": "../a.png"}, "must be a relative path"),
        ({"file_name": "/etc/passwd"}, "must be a relative path"),
    ],
)
def test_bad_image_entry_drops_the_image(coco_dir: Path, image: dict, message: str) -> None:
    document = json.loads(json.dumps(DOCUMENT))
    document["images"][0].update(image)
    path = _write(coco_dir, document)
    with pytest.raises(DatasetError, match=message):
        CocoDataset(path)
    dataset = CocoDataset(path, on_error="skip")
    assert len(dataset.problems) == 1 and "image 0 (id 3" in dataset.problems[0].message  # once, not per object
    assert dataset.image_ids == (7,)


def test_repeated_image_id_keeps_the_first(coco_dir: Path) -> None:
    document = json.loads(json.dumps(DOCUMENT))
    document["images"][1]["id"] = 3
    with pytest.raises(DatasetError, match=r"image 1 \(id 3, 'sub/b.png'\): repeats image id 3"):
        CocoDataset(_write(coco_dir, document))
    dataset = CocoDataset(_write(coco_dir, document), on_error="skip")
    assert dataset.image_ids == (3,) and len(dataset.annotation(0)["boxes"]) == 2


def test_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDataset(path)
    path.write_text("[]")
    with pytest.raises(DatasetError, match="'images' list"):
        CocoDataset(path)
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}))
    with pytest.raises(DatasetError, match="repeats an id or a name"):
        CocoDataset(path, on_error="skip")  # the label space itself is broken: never skipped
    with pytest.raises(DatasetError, match="cannot read"):
        CocoDataset(tmp_path / "absent.json")
    with pytest.raises(DatasetError, match="on_error"):
        CocoDataset(path, on_error="ignore")  # type: ignore[arg-type]


def test_image_size_must_match_the_json(coco_dir: Path) -> None:
    document = json.loads(json.dumps(DOCUMENT))
    document["images"][0]["width"] = 41
    document["annotations"] = []
    dataset = CocoDataset(_write(coco_dir, document))
    with pytest.raises(DatasetError, match="is 40x30 .* but the annotation says 41x30"):
        dataset[0]


def test_round_trip_with_write_coco(tmp_path: Path) -> None:
    shapes = ShapesDataset(ShapesConfig(num_images=3, image_size=64, seed=4))
    path = write_coco(shapes, tmp_path)
    dataset = CocoDataset(path)
    assert dataset.class_names == shapes.class_names and len(dataset) == 3
    for i in range(3):
        image, target = dataset[i]
        original_image, original = shapes[i]
        assert image.shape == original_image.shape and target["image_id"] == i
        for key in ("boxes", "labels", "difficult", "area"):
            np.testing.assert_array_equal(target[key], original[key])
        assert not target["iscrowd"].any()


def test_data_shapes_command_writes_loadable_splits(tmp_path: Path) -> None:
    import argparse

    from detect.cli.data import add_parser
    from detect.data.voc import VocDataset
    from detect.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    common = ["--num-images", "5", "--image-size", "48", "--seed", "2", "--split", "train=3", "--split", "test=2"]
    for fmt in ("coco", "voc"):
        args = parser.parse_args(["data", "shapes", "--out", str(tmp_path / fmt), "--format", fmt, *common])
        assert args.func(args) == 0
    train, test = CocoDataset(tmp_path / "coco" / "train.json"), CocoDataset(tmp_path / "coco" / "test.json")
    assert train.image_ids == (0, 1, 2) and test.image_ids == (3, 4)
    shapes = ShapesDataset(ShapesConfig(num_images=5, image_size=48, seed=2))
    np.testing.assert_array_equal(test.annotation(1)["boxes"], shapes.annotation(4)["boxes"])
    voc = VocDataset(tmp_path / "voc", split="test", class_names=shapes.class_names)
    assert voc.image_ids == ("000003", "000004")
    np.testing.assert_array_equal(voc.annotation(1)["labels"], shapes.annotation(4)["labels"])
    args = parser.parse_args(["data", "shapes", "--out", str(tmp_path / "x"), "--num-images", "2", "--split", "a=3"])
    with pytest.raises(ConfigError, match="ask for 3 images"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "shapes", "--out", "x", "--split", "a:3"])
