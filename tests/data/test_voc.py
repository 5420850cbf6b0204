"""Pascal VOC reading: hand-written annotation files, every refusal, and the three folder layouts."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detect.data.voc import VocAnnotation, VocDataset, VocObject, parse_voc_xml, voc_xml
from detect.errors import DatasetError, DetectError

# A real-looking VOC 2007 file (whitespace, pose, extra fields), values chosen by hand.
VOC_XML = b"""<annotation>
\t<folder>VOC2007</folder>
\t<filename>000005.jpg</filename>
\t<source><database>The VOC2007 Database</database></source>
\t<size><width>500</width><height>375</height><depth>3</depth></size>
\t<segmented>0</segmented>
\t<object>
\t\t<name>chair</name><pose>Rear</pose><truncated>0</truncated><difficult>0</difficult>
\t\t<bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>
\t\t\tdog
\t\t</name><truncated>1</truncated><difficult>1</difficult>
\t\t<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>500</xmax><ymax>375</ymax></bndbox>
\t</object>
\t<object>
\t\t<name>chair</name>
\t\t<bndbox><xmin>5.0</xmin><ymin>244.5</ymin><xmax>67</xmax><ymax>374</ymax></bndbox>
\t</object>
</annotation>
"""


def test_parse_hand_written_file():
    ann = parse_voc_xml(VOC_XML)
    assert (ann.filename, ann.width, ann.height) == ("000005.jpg", 500, 375)
    assert [o.name for o in ann.objects] == ["chair", "dog", "chair"]
    # 1-based inclusive -> 0-based, exclusive right edge: x1 = xmin - 1, x2 = xmax.
    np.testing.assert_array_equal(ann.objects[0].box, np.array([262, 210, 324, 339], np.float32))
    np.testing.assert_array_equal(ann.objects[1].box, np.array([0, 0, 500, 375], np.float32))  # the whole image
    np.testing.assert_array_equal(ann.objects[2].box, np.array([4, 243.5, 67, 374], np.float32))
    assert all(o.box.dtype == np.float32 for o in ann.objects)
    assert [(o.difficult, o.truncated) for o in ann.objects] == [(False, False), (True, True), (False, False)]


def test_parse_from_path(tmp_path):
    path = tmp_path / "a.xml"
    path.write_bytes(VOC_XML)
    ann = parse_voc_xml(path)
    assert ann.source == str(path) and len(ann.objects) == 3


def _xml(objects: str = "", size: str = "<size><width>100</width><height>50</height></size>") -> bytes:
    return f"<annotation><filename>x.jpg</filename>{size}{objects}</annotation>".encode()


def _obj(name="cat", box=(1, 1, 10, 10), extra="") -> str:
    coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name>{extra}<bndbox>{coords}</bndbox></object>"


def test_image_without_objects():
    ann = parse_voc_xml(_xml())
    assert ann.objects == ()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"<annotation><filename>x.jpg</filename><size><width>100</wid", "malformed XML"),
        (b"", "malformed XML"),
        (b"<root/>", "expected <annotation>"),
        (_xml(size=""), "missing <size>"),
        (_xml(size="<size><width>100</width></size>"), "missing <height>"),
        (_xml(size="<size><width>100</width><height>0</height></size>"), "not positive"),
        (_xml(size="<size><width>10.5</width><height>5</height></size>"), "not a whole number"),
        (b"<annotation><size><width>9</width><height>9</height></size></annotation>", "missing <filename>"),
        (_xml("<object><bndbox><xmin>1</xmin></bndbox></object>"), "object 0: missing <name>"),
        (_xml(_obj() + "<object><name>dog</name></object>"), "object 1 ('dog'): missing <bndbox>"),
        (_xml(_obj(box=(1, 1, 10, ""))), "empty <ymax>"),
        (_xml(_obj(box=(1, 1, "ten", 10))), "bndbox/xmax is 'ten', not a number"),
        (_xml(_obj(box=(1, 1, "nan", 10))), "not a number"),
        (_xml(_obj(box=(5, 1, 3, 10))), "empty box"),
        (_xml(_obj(box=(5, 1, 4, 10))), "empty box"),  # xmax = xmin - 1: zero width
        (_xml(_obj(box=(0, 1, 10, 10))), "not inside the 100x50 image"),  # xmin 0 is x1 = -1
        (_xml(_obj(box=(1, 1, 101, 10))), "not inside"),
        (_xml(_obj(box=(1, 1, 10, 51))), "not inside"),
        (_xml(_obj(extra="<difficult>yes</difficult>")), "<difficult> is 'yes'"),
    ],
)
def test_refusals_name_file_and_object(tmp_path, data, needle):
    path = tmp_path / "bad.xml"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as info:
        parse_voc_xml(path)
    assert needle in info.value.message and str(path) in info.value.message
    assert info.value.code == "bad_annotation" and isinstance(info.value, DetectError)


def test_one_pixel_box_is_valid():
    (obj,) = parse_voc_xml(_xml(_obj(box=(7, 3, 7, 3)))).objects  # VOC: xmin == xmax is one column wide
    np.testing.assert_array_equal(obj.box, [6, 2, 7, 3])


def test_entity_bomb_refused_fast():
    levels = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    bomb = f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY l0 "ha">{levels}]><annotation>&l9;</annotation>'
    start = time.perf_counter()
    with pytest.raises(DatasetError, match="DOCTYPE/ENTITY"):
        parse_voc_xml(bomb.encode())
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "data",
    [
        b'<!doctype annotation SYSTEM "file:///etc/passwd"><annotation/>',
        b'<annotation><!ENTITY x "y"></annotation>',
        b"<annotation><!--x--><!  DOCTYPE a></annotation>",
    ],
)
def test_declarations_refused(data):
    with pytest.raises(DatasetError, match="DOCTYPE/ENTITY"):
        parse_voc_xml(data)


def test_unreadable_and_oversized(tmp_path):
    with pytest.raises(DatasetError, match="cannot read annotation"):
        parse_voc_xml(tmp_path / "missing.xml")
    with pytest.raises(DatasetError, match="larger than"):
        parse_voc_xml(b"<annotation>" + b" " * (8 << 20) + b"</annotation>")


@given(
    st.lists(
        st.tuples(
            st.integers(0, 98), st.integers(0, 48), st.integers(1, 100), st.integers(1, 50), st.booleans(),
            st.sampled_from(["cat", "dog", "pottedplant", "tv monitor", "<&>"]),
        ),
        max_size=5,
    )
)
def test_write_then_parse_is_identity(rows):
    objects = tuple(
        VocObject(name, np.array([x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)], np.float32), hard)
        for x1, y1, x2, y2, hard, name in rows
    )
    ann = parse_voc_xml(voc_xml(VocAnnotation("img.jpg", 100, 50, objects)))
    assert (ann.filename, ann.width, ann.height) == ("img.jpg", 100, 50)
    assert [(o.name, o.difficult, o.box.tolist()) for o in ann.objects] == [
        (o.name, o.difficult, o.box.tolist()) for o in objects
    ]


# --- data sets ---------------------------------------------------------------------------------------------
def _write_sample(images: Path, annotations: Path, stem: str, objects: str, size=(40, 30), suffix=".jpg") -> None:
    """An image of ``size`` (w, h) whose pixel values encode the stem, and its annotation."""
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    image = np.full((size[1], size[0], 3), (10 * int(stem), 20, 200), np.uint8)  # RGB
    cv2.imwrite(str(images / f"{stem}{suffix}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>"
    xml = f"<annotation><filename>{stem}{suffix}</filename>{size_xml}{objects}</annotation>"
    (annotations / f"{stem}.xml").write_text(xml)


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOC"
    images, annotations = root / "JPEGImages", root / "Annotations"
    two = _obj("dog", (1, 2, 20, 30)) + _obj("cat", (3, 4, 5, 6), "<difficult>1</difficult>")
    _write_sample(images, annotations, "1", two)
    _write_sample(images, annotations, "2", _obj("bird", (10, 10, 40, 11)), suffix=".png")
    _write_sample(images, annotations, "3", "")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("1\n3\n\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("2 1\n")  # class-list style: id then a flag
    return root


def test_voc_layout_all_annotations(voc_root):
    ds = VocDataset(voc_root)
    assert ds.image_ids == ("1", "2", "3") and len(ds) == 3
    assert ds.class_names == ("bird", "cat", "dog")  # sorted unique names from the data
    image, target = ds[0]
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    assert abs(int(image[5, 5, 0]) - 10) <= 2 and abs(int(image[5, 5, 2]) - 200) <= 2  # RGB, not BGR
    np.testing.assert_array_equal(target["boxes"], np.array([[0, 1, 20, 30], [2, 3, 5, 6]], np.float32))
    np.testing.assert_array_equal(target["labels"], np.array([3, 2], np.int64))
    np.testing.assert_array_equal(target["difficult"], [False, True])
    assert target["image_id"] == "1"
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == np.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == np.int64
    assert ds[1][0][0, 0, 0] == 20  # the PNG: lossless


def test_voc_layout_splits(voc_root):
    assert VocDataset(voc_root, split="train").image_ids == ("1", "3")
    assert VocDataset(voc_root, split="val").image_ids == ("2",)
    with pytest.raises(DatasetError, match=r"split 'test' not found.*\['train', 'val'\]"):
        VocDataset(voc_root, split="test")
    with pytest.raises(DatasetError, match="not found"):
        VocDataset(voc_root, split="../train")


def test_annotation_without_images(voc_root):
    ds = VocDataset(voc_root, class_names=["dog", "cat", "bird", "person"])
    for path in (voc_root / "JPEGImages").iterdir():
        path.unlink()
    target = ds.annotation(0)
    np.testing.assert_array_equal(target["labels"], [1, 2])
    target["boxes"][:] = -1  # the caller's copy
    assert ds.annotation(0)["boxes"][0, 0] == 0
    with pytest.raises(DatasetError, match=r"image '1.jpg' not found") as info:
        ds[0]
    assert "1.xml" in info.value.message


def test_unknown_class_with_given_list(voc_root):
    with pytest.raises(DatasetError, match=r"1\.xml: object 1 has class 'cat', not one of \['dog', 'bird'\]"):
        VocDataset(voc_root, class_names=["dog", "bird"])
    with pytest.raises(DatasetError, match="unique"):
        VocDataset(voc_root, class_names=["dog", "dog"])


def test_flat_and_pair_layouts(tmp_path):
    flat = tmp_path / "flat"
    _write_sample(flat, flat, "4", _obj("cat", (1, 1, 40, 30)))
    _write_sample(flat, flat, "5", _obj("cat", (2, 2, 3, 3)))
    ds = VocDataset(flat)
    assert ds.image_ids == ("4", "5") and ds.class_names == ("cat",)
    np.testing.assert_array_equal(ds[0][1]["boxes"], [[0, 0, 40, 30]])
    with pytest.raises(DatasetError, match="needs the VOC layout"):
        VocDataset(flat, split="train")

    images, annotations = tmp_path / "img", tmp_path / "ann"
    _write_sample(images, annotations, "6", _obj("cat", (1, 1, 2, 2)))
    pair = VocDataset((images, annotations))
    assert pair.image_ids == ("6",) and pair[0][0].shape == (30, 40, 3)


def test_image_found_by_id_when_filename_differs(tmp_path):
    _write_sample(tmp_path, tmp_path, "7", "")
    xml = (tmp_path / "7.xml").read_text().replace("7.jpg", "renamed.jpg")
    (tmp_path / "7.xml").write_text(xml)
    assert VocDataset(tmp_path)[0][0].shape == (30, 40, 3)


def test_filename_with_path_is_not_followed(tmp_path):
    data = tmp_path / "data"
    _write_sample(data, data, "8", "")
    _write_sample(tmp_path, tmp_path / "elsewhere", "9", "")
    (data / "8.jpg").unlink()
    (data / "8.xml").write_text((data / "8.xml").read_text().replace("8.jpg", "../9.jpg"))
    with pytest.raises(DatasetError, match="not found"):
        VocDataset(data)[0]


def test_bad_images_and_folders(tmp_path):
    _write_sample(tmp_path, tmp_path, "1", "", size=(40, 30))
    (tmp_path / "1.xml").write_text((tmp_path / "1.xml").read_text().replace("<width>40", "<width>41"))
    with pytest.raises(DatasetError, match=r"is 40x30 \(EXIF-upright\) but the annotation says 41x30"):
        VocDataset(tmp_path)[0]
    (tmp_path / "1.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"1\.xml: image .*1\.jpg: "):
        VocDataset(tmp_path)[0]
    with pytest.raises(DatasetError, match="does not exist"):
        VocDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no annotations found"):
        VocDataset(tmp_path / "empty")


def test_missing_annotation_for_split_id(voc_root):
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text("1\n99\n")
    with pytest.raises(DatasetError, match=r"99\.xml: cannot read annotation"):
        VocDataset(voc_root, split="train")


def test_a_file_stating_no_size_takes_the_image_header(tmp_path):
    """Labelling tools write ``0 x 0`` (or no ``<size>``) when they never opened the image: the data set reads the
    size from the image's header, EXIF-upright (a phone photo stored 40 x 30 with orientation 6 is 30 x 40)."""
    from PIL import Image

    _write_sample(tmp_path, tmp_path, "1", _obj("cat", (1, 1, 35, 25)))
    xml = (tmp_path / "1.xml").read_text()
    (tmp_path / "1.xml").write_text(xml.replace("<width>40</width><height>30</height>",
                                                "<width>0</width><height>0</height>"))
    _write_sample(tmp_path, tmp_path, "2", _obj("cat", (1, 1, 25, 35)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "2.jpg", exif=exif)
    xml = (tmp_path / "2.xml").read_text()
    (tmp_path / "2.xml").write_text(xml.replace("<size><width>40</width><height>30</height></size>", ""))
    data = VocDataset(tmp_path)
    assert [(r.width, r.height) for r in data.records] == [(40, 30), (30, 40)]
    assert data[0][0].shape == (30, 40, 3) and data[1][0].shape == (40, 30, 3)
    assert data.annotation(1)["boxes"].tolist() == [[0.0, 0.0, 25.0, 35.0]]
    # without its image the size cannot be known: the file is a problem, as any unreadable annotation
    (tmp_path / "1.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1\.xml: image '1\.jpg' not found"):
        VocDataset(tmp_path)
    assert VocDataset(tmp_path, on_error="skip").image_ids == ("2",)
    # a negative size is the file's error, never looked up
    (tmp_path / "1.xml").unlink()
    xml = (tmp_path / "2.xml").read_text()
    (tmp_path / "2.xml").write_text(xml.replace("<filename>", "<size><width>-1</width><height>5</height></size>"
                                                "<filename>"))
    with pytest.raises(DatasetError, match="-1x5 is not positive"):
        VocDataset(tmp_path)
