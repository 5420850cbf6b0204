"""YOLO txt labels: hand-written label files, class lists, both layouts, and every refusal with raise/skip."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.data.yolo import YoloDataset
from detect.errors import DatasetError


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((height, width, 3), dtype=np.uint8))


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """Flat layout: a 200x100 image with two objects, a 50x40 background image without a label file."""
    _image(tmp_path / "a.png", 200, 100)
    _image(tmp_path / "b.jpg", 50, 40)
    (tmp_path / "classes.txt").write_text("cat\ndog\n\n")
    # cat centred at (0.25 W, 0.5 H), 0.1 W x 0.2 H; dog the whole image
    (tmp_path / "a.txt").write_text("0 0.25 0.5 0.1 0.2\n\n1 0.5 0.5 1.0 1.0\n")
    return tmp_path


def test_flat_layout(flat: Path) -> None:
    dataset = YoloDataset(flat)
    assert dataset.class_names == ("cat", "dog") and len(dataset) == 2 and dataset.problems == ()
    image, target = dataset[0]
    assert image.shape == (100, 200, 3)
    # hand-computed: cat x = 50 -+ 10, y = 50 -+ 10
    np.testing.assert_allclose(target["boxes"], [[40, 40, 60, 60], [0, 0, 200, 100]], rtol=0, atol=1e-5)
    assert target["boxes"].dtype == np.float32
    np.testing.assert_array_equal(target["labels"], [1, 2])
    assert target["labels"].dtype == np.int64 and target["image_id"] == "a"
    np.testing.assert_array_equal(target["difficult"], [False, False])
    background = dataset.annotation(1)
    assert background["boxes"].shape == (0, 4) and background["image_id"] == "b"


def test_images_labels_layout_with_split_and_data_yaml(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "train" / "x.png", 64, 32)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "x.txt").write_text("2 0.5 0.5 0.5 0.25\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: a\n  1: b\n  2: c\n")
    dataset = YoloDataset(tmp_path, split="train")
    assert dataset.class_names == ("a", "b", "c")
    target = dataset.annotation(0)
    np.testing.assert_allclose(target["boxes"], [[16, 12, 48, 20]], atol=1e-5)
    np.testing.assert_array_equal(target["labels"], [3])
    (tmp_path / "data.yaml").write_text("names: [p, q, r]\n")
    assert YoloDataset(tmp_path, split="train").class_names == ("p", "q", "r")
    assert YoloDataset(tmp_path, split="train", class_names=["u", "v", "w"]).class_names == ("u", "v", "w")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2 0.5 0.5 0.1 0.1", "class 2 is not one of the 2 classes"),
        ("-1 0.5 0.5 0.1 0.1", "class -1 is not one of"),
        ("0 0.5 0.5 0 0.1", "empty or non-finite box"),
        ("0 0.5 0.5 nan 0.1", "empty or non-finite box"),
        ("0 0.95 0.5 0.2 0.1", "is not inside the 200x100 image"),
        ("0 0.5 0.5 0.1", "expected 5 values"),
        ("0 0.1 0.1 0.2 0.1 0.2 0.2 0.1", "expected 5 values"),
        ("cat 0.5 0.5 0.1 0.1", "class must be an integer"),
    ],
)
def test_bad_line_raises_or_is_skipped(flat: Path, line: str, message: str) -> None:
    (flat / "a.txt").write_text(f"0 0.25 0.5 0.1 0.2\n{line}\n")
    with pytest.raises(DatasetError, match=message) as error:
        YoloDataset(flat)
    assert f"a.txt: line 2 ({line!r})" in error.value.message
    dataset = YoloDataset(flat, on_error="skip")
    np.testing.assert_array_equal(dataset.annotation(0)["labels"], [1])  # the good object stays
    assert len(dataset.problems) == 1 and dataset.problems[0].source == str(flat / "a.txt")


def test_tiny_overshoot_is_clipped(flat: Path) -> None:
    (flat / "a.txt").write_text("0 0.95 0.5 0.10001 0.2\n")
    np.testing.assert_allclose(YoloDataset(flat).annotation(0)["boxes"], [[180, 40, 200, 60]], atol=1e-3)


def test_label_without_image_and_unreadable_image(flat: Path) -> None:
    (flat / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="orphan.txt: no image orphan"):
        YoloDataset(flat)
    (flat / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset = YoloDataset(flat, on_error="skip")
    assert [p.name for p in dataset.files] == ["a.png", "b.jpg"]
    messages = sorted(p.message for p in dataset.problems)
    assert len(messages) == 2 and "broken.png" in messages[0] and "orphan.txt" in messages[1]


def test_setup_errors(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 10, 10)
    with pytest.raises(DatasetError, match="no classes.txt or data.yaml"):
        YoloDataset(tmp_path)
    (tmp_path / "data.yaml").write_text("names: {0: a, 2: b}\n")
    with pytest.raises(DatasetError, match="'names' must be"):
        YoloDataset(tmp_path)
    with pytest.raises(DatasetError, match="unique"):
        YoloDataset(tmp_path, class_names=["a", "a"])
    with pytest.raises(DatasetError, match="needs the images/<split>"):
        YoloDataset(tmp_path, split="train", class_names=["a"])
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images .* in .*images$"):  # images are one level down, in train/
        YoloDataset(tmp_path, class_names=["a"])


def test_exif_rotated_image_uses_the_upright_size(tmp_path: Path) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[274] = 6  # stored 200x100, shown rotated by 90 degrees: 100 wide, 200 high
    Image.new("RGB", (200, 100)).save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "r.txt").write_text("0 0.5 0.25 0.2 0.1\n")
    image, target = YoloDataset(tmp_path, class_names=["a"])[0]
    assert image.shape == (200, 100, 3)
    np.testing.assert_allclose(target["boxes"], [[40, 40, 60, 60]], atol=1e-4)  # 0.5*100 -+ 10, 0.25*200 -+ 10
