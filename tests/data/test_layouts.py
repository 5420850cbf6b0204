"""Every accepted layout recognised and opened on small generated sets (VOC devkit, flat, pair, COCO, YOLO data.yaml,
LabelMe), the broken ones with the message a user needs, and the seeded hold-out split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.data.layouts import LAYOUTS, Subset, detect_layout, holdout, open_dataset
from detect.data.shapes import ShapesConfig, ShapesDataset, write_coco, write_voc
from detect.errors import DatasetError

SHAPES = ShapesConfig(num_images=4, image_size=48, max_objects=2, object_size=(0.3, 0.5), seed=3)


@pytest.fixture(scope="module")
def shapes() -> ShapesDataset:
    return ShapesDataset(SHAPES)


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory, shapes: ShapesDataset) -> Path:
    root = tmp_path_factory.mktemp("voc")
    write_voc(shapes, root, splits={"train": [0, 1, 2], "val": [3]})
    return root


def _expected(shapes: ShapesDataset) -> list[tuple[str, list[str]]]:
    """(image stem, sorted class names) per image, from the generator itself."""
    return [
        (f"{i:06d}", sorted(shapes.class_names[k - 1] for k in shapes[i][1]["labels"])) for i in range(len(shapes))
    ]


def _seen(dataset) -> list[tuple[str, list[str]]]:
    out = []
    for i in range(len(dataset)):
        target = dataset.annotation(i)
        out.append((str(target["image_id"]).split("/")[-1], sorted(dataset.class_names[k - 1] for k in target["labels"])))
    return sorted(out)


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 128, dtype=np.uint8))


def test_voc_devkit_with_splits_and_nested_vocdevkit(voc: Path, shapes, tmp_path: Path) -> None:
    layout = detect_layout(voc)
    assert (layout.kind, layout.format, layout.splits) == ("voc", "voc", ("train", "val"))
    assert _seen(open_dataset(layout)) == _expected(shapes)
    assert len(open_dataset(layout, "val")) == 1
    with pytest.raises(DatasetError, match=r"split 'test' not found .*\['train', 'val'\]"):
        open_dataset(layout, "test")
    shutil.copytree(voc, tmp_path / "VOCdevkit" / "VOC2007")  # as the archive unpacks
    assert detect_layout(tmp_path).root == tmp_path / "VOCdevkit" / "VOC2007"


def test_flat_and_pair_under_any_names(voc: Path, shapes, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(voc / "JPEGImages", flat)
    for xml in (voc / "Annotations").iterdir():
        shutil.copy(xml, flat)
    layout = detect_layout(flat)
    assert (layout.kind, layout.format) == ("flat", "voc")
    assert _seen(open_dataset(layout)) == _expected(shapes)

    pair = tmp_path / "pair"
    shutil.copytree(voc / "JPEGImages", pair / "photos")
    shutil.copytree(voc / "Annotations", pair / "boxes")
    (pair / "notes").mkdir()
    (pair / "notes" / "readme.md").write_text("not data")
    layout = detect_layout(pair)
    assert (layout.kind, layout.format, layout.images.name, layout.annotations.name) == ("pair", "voc", "photos", "boxes")
    assert _seen(open_dataset(layout)) == _expected(shapes)
    explicit = detect_layout(None, pair / "photos", pair / "boxes")
    assert (explicit.kind, explicit.images) == ("pair", pair / "photos")


def test_coco_beside_images_and_in_annotations_folder(shapes, tmp_path: Path) -> None:
    path = write_coco(shapes, tmp_path / "a")
    layout = detect_layout(tmp_path / "a")
    assert (layout.kind, layout.annotations, layout.images) == ("coco", path, tmp_path / "a" / "images")
    assert detect_layout(path).annotations == path
    dataset = open_dataset(layout)
    assert [sorted(dataset.class_names[k - 1] for k in dataset.annotation(i)["labels"]) for i in range(4)] == [
        names for _, names in _expected(shapes)
    ]
    # The COCO download's shape: annotations/instances_<split>.json and a <split>/ image folder.
    root = tmp_path / "b"
    write_coco(shapes, root / "tmp", indices=[0, 1, 2], json_name="instances_train2017.json")
    write_coco(shapes, root / "tmp", indices=[3], json_name="instances_val2017.json")
    (root / "annotations").mkdir()
    for name in ("instances_train2017.json", "instances_val2017.json"):
        (root / "tmp" / name).rename(root / "annotations" / name)
    (root / "tmp" / "images").rename(root / "train2017")
    shutil.rmtree(root / "tmp")
    layout = detect_layout(root)
    assert layout.kind == "coco" and layout.images == root / "train2017"
    assert set(layout.splits) == {"instances_train2017", "instances_val2017"}
    assert len(open_dataset(layout)) == 3


def _yolo_set(root: Path) -> None:
    """Ultralytics' layout by hand: images/{train,val}, labels/{train,val}, data.yaml with a names mapping."""
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for stem in stems:
            _image(root / "images" / split / f"{stem}.jpg", 40, 20)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.2\n")
    (root / "labels" / "val" / "c.txt").write_text("1 0.5 0.5 1 1\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")


def test_yolo_data_yaml_train_and_val(tmp_path: Path) -> None:
    _yolo_set(tmp_path)
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.splits) == ("yolo", ("train", "val"))
    assert detect_layout(tmp_path / "data.yaml") == layout
    train = open_dataset(layout)
    assert train.class_names == ("cat", "dog") and len(train) == 2
    a = train.annotation(0)  # 40x20: cat centre (20, 10) 20x10 -> [10, 5, 30, 15]; dog centre (10, 5) 4x4
    np.testing.assert_allclose(a["boxes"], [[10, 5, 30, 15], [8, 3, 12, 7]], atol=1e-5)
    assert a["labels"].tolist() == [1, 2] and len(train.annotation(1)["labels"]) == 0  # b: background image
    val = open_dataset(layout, "val")
    np.testing.assert_allclose(val.annotation(0)["boxes"], [[0, 0, 40, 20]])
    # A .txt list of images (lines relative to the root) works as the entry too.
    (tmp_path / "train.txt").write_text("images/train/a.jpg\n./images/val/c.jpg\n")
    (tmp_path / "data.yaml").write_text("train: train.txt\nnames: [cat, dog]\n")
    assert len(open_dataset(detect_layout(tmp_path))) == 2


def test_yolo_pair_needs_names_and_finds_classes_txt(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "a.png", 40, 20)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.format) == ("pair", "yolo")
    with pytest.raises(DatasetError, match=r"no names were found: write one name a line into .*classes\.txt"):
        open_dataset(layout)
    (tmp_path / "txt" / "classes.txt").write_text("cat\n")
    assert open_dataset(layout).class_names == ("cat",)


def test_labelme_pair(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.jpg", 40, 30)
    shapes = [
        {"label": "cat", "points": [[30, 20], [10, 5]], "shape_type": "rectangle"},
        {"label": "dog", "points": [[1, 1], [5, 2], [3, 9]], "shape_type": "polygon"},
    ]
    document = {"shapes": shapes, "imagePath": "C:/x/a.jpg", "imageWidth": 40, "imageHeight": 30}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "a.json").write_text(json.dumps(document))
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.format) == ("pair", "labelme")
    dataset = open_dataset(layout)
    assert dataset.class_names == ("cat", "dog")
    np.testing.assert_array_equal(dataset.annotation(0)["boxes"], [[10, 5, 30, 20], [1, 1, 5, 9]])
    image, target = dataset[0]
    assert image.shape == (30, 40, 3) and target["image_id"] == "a"


def test_nothing_recognised_lists_the_layouts_and_what_was_found(tmp_path: Path) -> None:
    _image(tmp_path / "pics" / "a.jpg", 8, 8)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DatasetError) as info:
        detect_layout(tmp_path)
    message = info.value.message
    assert "no data set layout recognised" in message
    assert all(f"- {name}:" in message for name in LAYOUTS)
    assert "1 .md" in message and "pics/ (1 .jpg)" in message
    with pytest.raises(DatasetError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="go together"):
        detect_layout(None, tmp_path / "pics", None)


# --- broken sets: the message a user needs ------------------------------------------------------------------
def test_broken_voc_missing_image_empty_xml_unknown_class(voc: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(voc, root)
    (root / "JPEGImages" / "000001.jpg").unlink()
    (root / "Annotations" / "000002.xml").write_bytes(b"")
    layout = detect_layout(root)
    with pytest.raises(DatasetError, match=r"000002\.xml: malformed XML: the file is empty"):
        open_dataset(layout)
    skipped = open_dataset(layout, on_error="skip")
    assert [t for t in skipped.image_ids] == ["000000", "000003"]
    messages = [p.message for p in skipped.problems]
    assert any("000002.xml: malformed XML: the file is empty" in m for m in messages)
    assert any("000001.xml: image '000001.jpg' not found in" in m for m in messages)
    first = {skipped.class_names[k - 1] for k in skipped.annotation(0)["labels"]}
    only = sorted(first)[:1]
    narrow = open_dataset(layout, class_names=only, on_error="skip")
    assert any(f"has class" in p.message and f"not one of {only}" in p.message for p in narrow.problems)
    with pytest.raises(DatasetError, match=r"\d{6}\.xml: object \d+ has class '\w+', not one of"):
        open_dataset(detect_layout(voc), class_names=only)


def test_broken_yolo_box_outside_and_class_outside_the_list(tmp_path: Path) -> None:
    _yolo_set(tmp_path)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.9 0.5 0.4 0.2\n7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"a\.txt: line 1 .* is not inside the 40x20 image"):
        open_dataset(detect_layout(tmp_path))
    skipped = open_dataset(detect_layout(tmp_path), on_error="skip")
    messages = sorted(p.message for p in skipped.problems)
    assert "line 1" in messages[0] and "not inside the 40x20 image" in messages[0]
    assert "line 2" in messages[1] and "class 7 is not one of the 2 classes (0..1)" in messages[1]


# --- hold-out split ------------------------------------------------------------------------------------------
class _Ids:
    class_names = ("a",)

    def __init__(self, ids):
        self.ids = list(ids)

    def __len__(self):
        return len(self.ids)

    def annotation(self, i):
        return {"image_id": self.ids[i]}


def test_holdout_is_reproducible_disjoint_and_order_free() -> None:
    ids = [f"img{i:03d}" for i in range(50)]
    train, val = holdout(_Ids(ids), 0.1, seed=0)
    assert len(val) == 5 and sorted(train + val) == list(range(50)) and not set(train) & set(val)
    assert holdout(_Ids(ids), 0.1, seed=0) == (train, val)
    assert holdout(_Ids(ids), 0.1, seed=1)[1] != val
    shuffled = ids[::-1]
    _, val_shuffled = holdout(_Ids(shuffled), 0.1, seed=0)
    assert sorted(shuffled[i] for i in val_shuffled) == sorted(ids[i] for i in val)  # same images, any file order
    # The held-out images are the ones with the smallest hashes: an independent recomputation.
    import hashlib

    expected = sorted(ids, key=lambda s: hashlib.sha256(f"0:{s}".encode()).digest())[:5]
    assert sorted(ids[i] for i in val) == sorted(expected)
    assert holdout(_Ids(["x", "y"]), 0.1, 0)[1] != [] and holdout(_Ids(["x"]), 0.5, 0) == ([0], [])
    assert holdout(_Ids(ids), 0.0, 0) == (list(range(50)), [])
    with pytest.raises(DatasetError, match="val_fraction"):
        holdout(_Ids(ids), 1.0, 0)


def test_subset_reads_through(voc: Path) -> None:
    dataset = open_dataset(detect_layout(voc))
    part = Subset(dataset, [3, 1])
    assert len(part) == 2 and part.class_names == dataset.class_names
    assert part.annotation(0)["image_id"] == "000003" and part[1][1]["image_id"] == "000001"


# --- from a recipe and the command line ------------------------------------------------------------------------
def _train_cli(argv: list[str]) -> int:
    import argparse

    from detect.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_holds_out_a_seeded_split_and_eval_reports_it(voc: Path, tmp_path: Path, capsys) -> None:
    """``--data`` without validation data: 1 of the 4 images held out (stated on stderr and in summary.json, the
    same image as :func:`holdout` picks); ``detect eval --data RECIPE`` then evaluates that image and writes the COCO
    numbers, the confusion matrix and its PNG."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"detector": "fasterrcnn_tiny", "max_iterations": 1, "batch_size": 1,
                                      "out_dir": str(tmp_path / "run")}))
    assert _train_cli(["train", "--recipe", str(recipe), "--data", str(voc / "JPEGImages"),
                       "--annotations", str(voc / "Annotations"), "--images", str(voc / "JPEGImages")]) == 0
    assert "holding out 1 of 4 images" in capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_images"] == 1 and summary["val_data"]["part"] == "val"
    assert (summary["val_data"]["val_fraction"], summary["val_data"]["split_seed"]) == (0.1, 0)
    _, held = holdout(open_dataset(detect_layout(voc)), 0.1, 0)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["num_images"] == 1 == len(held)

    recipe.write_text(yaml.safe_dump({"detector": "fasterrcnn_tiny", "data": {
        "source": "voc", "images_dir": str(voc / "JPEGImages"), "annotations_dir": str(voc / "Annotations")}}))
    out = tmp_path / "eval"
    assert _train_cli(["eval", "--weights", str(tmp_path / "run" / "model.safetensors"), "--data", str(recipe),
                       "--out", str(out), "--score-threshold", "0.0"]) == 0
    printed = capsys.readouterr().out
    assert "COCO  AP" in printed and "VOC   mAP@0.5" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 1 and set(report["coco"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    matrix = np.array(report["confusion_matrix"]["matrix"])
    gt_objects = len(open_dataset(detect_layout(voc)).annotation(held[0])["labels"])
    assert matrix[:-1].sum() == gt_objects  # every gt is matched or missed exactly once
    assert (out / "confusion_matrix.png").stat().st_size > 0


def test_yolo_yaml_trains_on_train_and_validates_on_val(tmp_path: Path) -> None:
    """A data.yaml with train and val: the run uses them as shipped (no hold-out)."""
    from detect.config import override
    from detect.training import TrainConfig, data_splits

    _yolo_set(tmp_path)
    config = override(TrainConfig(), {"data": {"source": "auto", "path": str(tmp_path / "data.yaml")}})
    train_data, val_data = data_splits(config)
    assert (train_data.split, train_data.part, val_data.split, val_data.part) == ("train", "all", "val", "all")
    config = override(TrainConfig(), {"data": {"source": "coco", "path": str(tmp_path / "data.yaml")}})
    from detect.errors import ConfigError

    with pytest.raises(ConfigError, match="data source is 'coco' but .* holds yolo"):
        data_splits(config)
