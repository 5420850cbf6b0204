"""``detect data check``: statistics against hand-computed values, every problem listed, exit codes 0/1/2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.cli import data as data_cli
from detect.data.check import check_dataset
from detect.data.shapes import ShapesConfig, ShapesDataset, write_voc


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((height, width, 3), dtype=np.uint8))


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    import argparse

    parser = argparse.ArgumentParser()
    data_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    """A 200x100 image with a 20x20 (small), a 100x50 (medium) and a 200x100 (large) box; a 50x40 background."""
    _image(tmp_path / "images" / "a.png", 200, 100)
    _image(tmp_path / "images" / "b.png", 50, 40)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.2\n1 0.5 0.5 0.5 0.5\n1 0.5 0.5 1 1\n")
    return tmp_path


def test_statistics_by_hand(yolo: Path, capsys: pytest.CaptureFixture) -> None:
    report = check_dataset(yolo)
    assert (report["layout"], report["format"], report["images"], report["images_without_objects"]) == (
        "pair", "yolo", 2, 1
    )
    assert report["objects_per_class"] == {"cat": 1, "dog": 2} and report["problems"] == []
    boxes = report["box_sizes"]
    assert (boxes["small"], boxes["medium"], boxes["large"]) == (1, 1, 1)
    assert boxes["width"] == pytest.approx({"min": 20, "median": 100, "max": 200})
    assert boxes["height"] == pytest.approx({"min": 20, "median": 50, "max": 100})
    sizes = report["image_sizes"]
    assert sizes["width"] == {"min": 50, "median": 125, "max": 200} and sizes["distinct"] == 2
    code, out, _ = _run([str(yolo)], capsys)
    assert code == 0
    assert "images: 2 (1 without objects)" in out and "small 1, medium 1, large 1" in out and "(clean)" in out
    code, out, _ = _run([str(yolo), "--json"], capsys)
    assert code == 0 and json.loads(out)["objects"] == 3


def test_every_problem_is_listed_and_exit_1(yolo: Path, capsys: pytest.CaptureFixture) -> None:
    (yolo / "labels" / "a.txt").write_text("0 0.95 0.5 0.2 0.2\n5 0.5 0.5 0.1 0.1\n1 0.5 0.5 0.5 0.5\n")
    (yolo / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    report = check_dataset(yolo)
    messages = [p["message"] for p in report["problems"]]
    assert len(messages) == 3
    assert any("a.txt: line 1" in m and "not inside the 200x100 image" in m for m in messages)
    assert any("a.txt: line 2" in m and "class 5 is not one of the 2 classes" in m for m in messages)
    assert any("ghost.txt: no image ghost.*" in m for m in messages)
    assert report["objects_per_class"] == {"cat": 0, "dog": 1}  # what a run with on_error: skip would use
    code, out, _ = _run([str(yolo)], capsys)
    assert code == 1 and "problems: 3" in out and "class 5 is not one of the 2 classes" in out


def test_voc_counts_missing_image_empty_xml_and_size_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shapes = ShapesDataset(ShapesConfig(num_images=4, image_size=48, max_objects=2, seed=1))
    write_voc(shapes, tmp_path / "voc")
    report = check_dataset(tmp_path / "voc")
    expected = np.bincount(np.concatenate([shapes[i][1]["labels"] for i in range(4)]) - 1, minlength=7)
    present = {name: n for name, n in zip(shapes.class_names, expected.tolist()) if n}  # VOC: the classes found
    assert report["objects_per_class"] == present
    assert report["layout"] == "voc" and report["images"] == 4 and report["problems"] == []
    (tmp_path / "voc" / "JPEGImages" / "000001.jpg").unlink()
    (tmp_path / "voc" / "Annotations" / "000002.xml").write_text("")
    _image(tmp_path / "voc" / "JPEGImages" / "000003.jpg", 40, 48)
    code, out, _ = _run([str(tmp_path / "voc")], capsys)
    assert code == 1
    assert "000002.xml: malformed XML: the file is empty" in out
    assert "000001.xml: image '000001.jpg' not found" in out
    assert "000003.jpg: image is 40x48 but its annotation says 48x48" in out
    assert "images: 2" in out


def test_unknown_layout_and_unreadable_set_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = _run([str(tmp_path / "empty")], capsys)
    assert code == 2 and "no data set layout recognised" in err and "Accepted layouts" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = _run([str(tmp_path / "bad.json")], capsys)
    assert code == 2 and "not valid JSON" in err


def test_explicit_pair_and_class_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shapes = ShapesDataset(ShapesConfig(num_images=2, image_size=48, max_objects=2, seed=2))
    write_voc(shapes, tmp_path / "v")
    shutil.move(tmp_path / "v" / "JPEGImages", tmp_path / "pics")
    shutil.move(tmp_path / "v" / "Annotations", tmp_path / "xml")
    code, out, _ = _run(["--images", str(tmp_path / "pics"), "--annotations", str(tmp_path / "xml")], capsys)
    assert code == 0 and "layout: pair (voc)" in out
    code, out, _ = _run(["--images", str(tmp_path / "pics"), "--annotations", str(tmp_path / "xml"),
                         "--classes", "nothing"], capsys)
    assert code == 1 and "not one of ['nothing']" in out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is whole: only decoding the pixels fails


def test_a_truncated_jpeg_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Headers only called it clean; training then stopped at it (issue 21, item 5)."""
    shapes = ShapesDataset(ShapesConfig(num_images=3, image_size=64, max_objects=2, seed=1))
    write_voc(shapes, tmp_path / "voc")
    _truncate(tmp_path / "voc" / "JPEGImages" / "000001.jpg")
    code, out, _ = _run([str(tmp_path / "voc")], capsys)
    assert code == 1
    assert "000001.jpg" in out and "truncated" in out


@pytest.mark.parametrize(
    ("names", "flagged"),
    [
        (["raccoon", "racoon"], [["raccoon", "racoon"]]),
        (["Dog", "dog"], [["Dog", "dog"]]),
        (["traffic light", "traffic_light"], [["traffic light", "traffic_light"]]),
        (["cat", "car", "bus"], []),  # short real names one letter apart are not typos
        (["motorbike", "motorbikes", "person"], [["motorbike", "motorbikes"]]),
    ],
)
def test_likely_typos_in_class_names(names: list[str], flagged: list[list[str]]) -> None:
    from detect.data.check import likely_typos

    assert [t["classes"] for t in likely_typos(names)] == flagged


def test_data_check_reports_a_class_typo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "images" / "a.png", 64, 64)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "classes.txt").write_text("raccoon\nracoon\n")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.2 0.2\n")
    code, out, _ = _run([str(tmp_path)], capsys)
    assert code == 0  # a warning: the data is readable as it is
    assert "classes 'raccoon' and 'racoon' are 1 letter(s) apart (1 and 1 objects): one class spelt twice?" in out
