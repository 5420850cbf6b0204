"""``detect.drawing``: colours per class, labels inside the image, line widths, hidden labels and scores, and the
annotated copy's format. Checked pixel by pixel against hand-placed expectations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from detect.drawing import PALETTE, Style, annotated_suffix, class_colour, draw_detections, encode_like, line_width_for
from detect.structures import Detections

NAMES = ["cat", "dog", "bird"]


def detections(boxes: list[list[float]], labels: list[int], size: tuple[int, int], scores: list[float] | None = None) -> Detections:
    scores = scores or [0.9] * len(boxes)
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(labels), size)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=2)


def test_palette_is_distinct_and_cycles() -> None:
    assert len(set(PALETTE)) == len(PALETTE) == 20
    assert class_colour(1) == PALETTE[0] and class_colour(20) == PALETTE[19] and class_colour(21) == PALETTE[0]


def test_each_class_gets_its_colour_and_the_line_width_is_exact() -> None:
    image = np.zeros((60, 80, 3), np.uint8)
    found = detections([[10, 10, 30, 40], [40, 10, 70, 40]], [1, 2], (60, 80))
    out = np.asarray(draw_detections(image, found, NAMES, Style(line_width=2, hide_labels=True)))
    mask = changed(image, out)
    # hand-drawn expectation: two 2-pixel rectangle outlines, inclusive corners, nothing else
    expected = np.zeros((60, 80), bool)
    for x1, y1, x2, y2 in ((10, 10, 30, 40), (40, 10, 70, 40)):
        expected[y1 : y2 + 1, x1 : x2 + 1] = True
        expected[y1 + 2 : y2 - 1, x1 + 2 : x2 - 1] = False
    assert (mask == expected).all()
    assert tuple(out[25, 10]) == PALETTE[0] and tuple(out[25, 40]) == PALETTE[1]


def test_labels_stay_inside_the_image_on_a_filled_background() -> None:
    image = np.full((50, 120, 3), 255, np.uint8)
    # a box touching the top edge and running off the right edge: the label cannot go above or to the right
    found = detections([[90, 0, 130, 30]], [3], (50, 120), [0.87])
    out = np.asarray(draw_detections(image, found, NAMES, Style(line_width=1)))
    mask = changed(image, out)
    assert mask[0].any() and mask[:, -1].any()  # drawn up to the borders, nothing lost outside
    rows, cols = np.nonzero((out == np.array(PALETTE[2])).all(axis=2))
    # the label's filled background: a solid block of the class colour, left of the right border, from the top row
    assert rows.min() == 0 and cols.max() == 119 and cols.min() < 90  # shifted left to fit
    filled = np.nonzero((out[:, cols.min()] == np.array(PALETTE[2])).all(axis=1))[0]
    assert filled[0] == 0 and len(filled) >= 8 and (np.diff(filled) == 1).all()  # one block, the text tall


def test_hide_scores_makes_a_shorter_label() -> None:
    image = np.full((80, 200, 3), 255, np.uint8)
    found = detections([[20, 40, 120, 70]], [1], (80, 200), [0.5])
    with_score = changed(image, np.asarray(draw_detections(image, found, NAMES, Style(line_width=1))))
    without = changed(image, np.asarray(draw_detections(image, found, NAMES, Style(line_width=1, hide_scores=True))))
    label_rows = slice(0, 39)  # above the box
    assert np.nonzero(without[label_rows].any(axis=0))[0].max() < np.nonzero(with_score[label_rows].any(axis=0))[0].max()


def test_line_width_scales_with_the_image() -> None:
    assert [line_width_for(h, w) for h, w in ((64, 64), (640, 640), (2000, 2000), (4000, 6000))] == [1, 2, 6, 15]
    with pytest.raises(ValueError):
        Style(line_width=0)


def test_annotated_copy_format_follows_the_input() -> None:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert [annotated_suffix(n) for n in ("a.jpg", "b.JPEG", "c.png", "d.webp", "e.bmp", "f.tif", "g")] == [
        ".jpg", ".jpg", ".png", ".webp", ".png", ".png", ".png"]
    as_jpeg = Image.open(io.BytesIO(encode_like(picture, "photo.jpeg")))
    as_png = Image.open(io.BytesIO(encode_like(picture, "scan.bmp")))
    assert as_jpeg.format == "JPEG" and as_png.format == "PNG"
    assert (np.asarray(as_png) == np.asarray(picture)).all()
    # quality 90: what Pillow writes for quality=90, byte for byte
    reference = io.BytesIO()
    picture.save(reference, format="JPEG", quality=90)
    assert encode_like(picture, "photo.jpg") == reference.getvalue()
