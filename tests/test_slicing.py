"""Sliced inference (detect.slicing): the tile grid, lazy batches, the two merges against independent references,
and the bundled model finding small shapes in a large scene that whole-image inference misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from detect.errors import ConfigError, DetectError, InferenceError
from detect.slicing import SliceOptions, detect_sliced, iter_tiles, merge_greedy, merge_nms, tile_windows
from detect.structures import Detections
from tests.helpers import SquareFinder


@pytest.mark.parametrize(("height", "width", "size", "overlap"), [(4000, 6000, 640, 0.2), (100, 1000, 256, 0.5),
                                                                  (300, 200, 640, 0.2), (700, 641, 640, 0.0)])
def test_tile_grid_covers_the_image_with_full_size_tiles(height, width, size, overlap):
    windows = tile_windows(height, width, size, overlap)
    covered = np.zeros((height, width), dtype=bool)
    stride = int(size * (1 - overlap))
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(size, width) and y1 - y0 == min(size, height)  # never padded, never cut short
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({w[0] for w in windows})
    assert all(b - a <= stride for a, b in zip(xs, xs[1:]))  # neighbours overlap by at least the asked fraction
    assert len(windows) == len(set(windows))


def test_tile_count_of_the_benchmark_scene():
    # stride 512: x starts 0, 512, ..., 5120 and 5360 (12); y starts 0, ..., 3072 and 3360 (8)
    assert len(tile_windows(4000, 6000, 640, 0.2)) == 96


def test_tiles_are_views_cut_a_batch_at_a_time():
    image = np.zeros((1000, 1500, 3), np.uint8)
    windows = tile_windows(1000, 1500, 400, 0.25)
    batches = list(iter_tiles(image, windows, 4))
    assert [len(tiles) for _, tiles in batches] == [4] * (len(windows) // 4) + ([len(windows) % 4] if len(windows) % 4 else [])
    for chunk, tiles in batches:
        for (x0, y0, x1, y1), tile in zip(chunk, tiles):
            assert np.shares_memory(tile, image) and tile.shape == (y1 - y0, x1 - x0, 3)


@pytest.mark.parametrize("bad", [dict(size=16), dict(overlap=1.0), dict(overlap=-0.1), dict(merge="wbf"),
                                 dict(iou_threshold=0.0), dict(overlap=float("nan"))])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        SliceOptions(**bad)


def _random_detections(n: int, seed: int, classes: int = 3) -> Detections:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    scores = torch.rand(n, generator=g)
    labels = torch.randint(1, classes + 1, (n,), generator=g)
    return Detections(torch.cat([xy, xy + wh], 1), scores, labels, (300, 300))


@pytest.mark.parametrize("seed", range(5))
def test_nms_merge_is_torchvisions_class_wise_nms(seed):
    detections = _random_detections(80, seed)
    merged = merge_nms(detections, 0.5)
    keep = torchvision.ops.batched_nms(detections.boxes, detections.scores, detections.labels, 0.5)
    assert torch.equal(merged.boxes, detections.boxes[keep]) and torch.equal(merged.labels, detections.labels[keep])


def _greedy_reference(boxes, scores, labels, cut, threshold):
    """A plain float64 loop over Python numbers: greedy merging by intersection over the smaller box, in rounds
    until a round merges nothing."""
    while True:
        merged = _greedy_round_reference(boxes, scores, labels, cut, threshold)
        if len(merged) == len(boxes):
            return merged
        boxes, scores, labels, cut = (list(column) for column in zip(*merged))


def _greedy_round_reference(boxes, scores, labels, cut, threshold):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    taken, out = set(), []
    for rank, i in enumerate(order):
        if i in taken:
            continue
        box, box_cut = list(boxes[i]), cut[i]
        for j in order[rank + 1:]:
            if j in taken or labels[j] != labels[i]:
                continue
            a, b = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            if smaller > 0 and iw * ih / smaller >= threshold:
                taken.add(j)
                box_cut = box_cut or cut[j]
                if cut[i] or cut[j]:
                    box = [min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3])]
        out.append((box, scores[i], labels[i], box_cut))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_greedy_merge_matches_a_float64_loop(seed):
    detections = _random_detections(60, seed)
    cut = torch.rand(60, generator=torch.Generator().manual_seed(100 + seed)) < 0.4
    merged = merge_greedy(detections, cut, 0.5)
    expected = _greedy_reference(detections.boxes.double().tolist(), detections.scores.tolist(),
                                 detections.labels.tolist(), cut.tolist(), 0.5)
    assert len(merged) == len(expected)
    for k, (box, score, label, _) in enumerate(expected):
        assert merged.scores[k].item() == pytest.approx(score) and merged.labels[k].item() == label
        np.testing.assert_allclose(merged.boxes[k].numpy(), np.float32(box), rtol=0, atol=1e-4)


def _squares(height, width, squares):
    image = np.zeros((height, width, 3), np.uint8)
    for x0, y0, side in squares:
        image[y0 : y0 + side, x0 : x0 + side] = 255
    return image


def test_sliced_boxes_come_back_in_image_coordinates_and_cut_squares_are_merged():
    # 1000x700, tiles of 256 at 0.25 overlap (stride 192: x 0, 192, ..., 744); one square lies wholly inside a
    # tile, one straddles x = 448 (the end of the tile at 192) and is never whole in any tile's inner part
    squares = [(40, 40, 30), (420, 300, 100), (900, 600, 50)]
    image = _squares(700, 1000, squares)
    finder = SquareFinder()
    expected = sorted([x, y, x + s, y + s] for x, y, s in squares)
    greedy = detect_sliced(finder, [image], SliceOptions(256, 0.25, batch_size=5, merge="greedy"))[0]
    assert sorted(greedy.boxes.tolist()) == expected
    assert max(finder.batches) == 5  # lazily, five tiles at a time
    assert greedy.extras["tiles"] == len(tile_windows(700, 1000, 256, 0.25))
    nms = detect_sliced(finder, [image], SliceOptions(256, 0.25, merge="nms"))[0]
    assert len(nms) > len(squares)  # the parts of the cut square survive NMS
    assert all(b in nms.boxes.tolist() for b in expected[:1])


def test_whole_image_pass_is_scaled_back():
    image = _squares(800, 1200, [(100, 100, 600)])  # larger than a tile
    finder = SquareFinder()
    result = detect_sliced(finder, [image], SliceOptions(256, 0.2, full_image=True))[0]
    assert result.extras["tiles"] == len(tile_windows(800, 1200, 256, 0.2)) + 1
    assert len(result) == 1
    np.testing.assert_allclose(result.boxes[0].numpy(), [100, 100, 700, 700], atol=3)


def test_a_failing_tile_fails_its_image_only_and_is_named():
    class Fails(SquareFinder):
        def __call__(self, images, **kwargs):
            if any(image.shape[0] < 100 for image in images):
                raise RuntimeError("boom")
            return super().__call__(images)

    small, large = _squares(90, 90, [(10, 10, 20)]), _squares(300, 300, [(10, 10, 20)])
    results = detect_sliced(Fails(), [large, small], SliceOptions(256, 0.2))
    assert isinstance(results[0], Detections) and len(results[0]) == 1
    assert isinstance(results[1], InferenceError) and isinstance(results[1], DetectError)
    assert "tile (0, 0, 90, 90)" in results[1].message


def test_bundled_model_finds_small_shapes_only_when_sliced():
    from benchmarks.sliced import make_scene, recall_at
    from detect.inference import forward_batch, load_model

    image, target = make_scene(1280, 1280, 400, (140.0, 260.0), seed=1)
    model = load_model("faster_rcnn_shapes")
    whole = forward_batch(model, [image])[0]
    sliced = detect_sliced(model, [image], SliceOptions(640, 0.2))[0]
    as_dict = lambda d: {"boxes": d.boxes.numpy(), "scores": d.scores.numpy(), "labels": d.labels.numpy()}  # noqa: E731
    assert recall_at(as_dict(sliced), target, 0.25) >= 0.75 > recall_at(as_dict(whole), target, 0.25) + 0.3
