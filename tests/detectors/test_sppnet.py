"""Tests for detect.detectors.sppnet against independent references.

- Window projection: hand-computed cells for stride 16 (the paper's formula), and a brute-force enumeration of the
  cells whose centres lie strictly inside each window.
- Pooled features: for boxes of any size and aspect, ``(K, C * 50)`` features equal to a float64 reference that
  enumerates the window's cells, crops the feature map and pools each level with ``adaptive_max_pool2d``; with
  several scales, each box is pooled at the scale whose scaled area is closest to 224 x 224 (chosen by a loop).
- Overfitting: a tiny conv net trained on four synthetic shapes images reaches VOC AP@0.5 >= 0.9 (the data, AP
  reference and checks come from test_rcnn).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from detect.backbones import receptive_field
from detect.data.shapes import SHAPES_CLASSES
from detect.detectors.region import SamplingConfig, chunk_boxes
from detect.errors import ConfigError
from detect.detectors.sppnet import TINY_CONFIG, SPPNet, SPPNetConfig, project_boxes, sppnet_alexnet, sppnet_tiny
from detect.weights import load_detector, write_detector
from tests.helpers import overfit_and_refine, shapes_problem

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDE = 8


def tiny_sppnet(**overrides) -> SPPNet:
    """Three stride-2 3x3 convs (stride 8, 32 channels, cell i centred at 8 i + 0.5) -> SPP -> fc6/fc7 of 128."""
    backbone = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
    )
    field = receptive_field(backbone)
    settings_ = dict(backbone="tiny", scales=(96,), representation_size=128, dropout=0.0)
    config = SPPNetConfig(**{**settings_, **overrides})
    return SPPNet(backbone, 32, field.stride, field.offset, SHAPES_CLASSES, config)


# --- projection --------------------------------------------------------------------------------------------------


def test_project_boxes_hand_computed_stride_16():
    boxes = torch.tensor([
        [0.0, 0.0, 100.0, 50.0],  # x: floor(0)+1 = 1 .. ceil(6.25)-1 = 6; y: 1 .. ceil(3.125)-1 = 3
        [32.0, 48.0, 160.0, 64.0],  # x: 3 .. 9; y: 4 > 3, no centre strictly inside: centre 3.5 -> 3 .. 4
        [20.0, 20.0, 28.0, 28.0],  # both axes: 2 > 1, centre 1.5 -> 1 .. 2
        [33.0, 5.0, 47.5, 200.0],  # x: 3 > 2, centre 2.52 -> 2 .. 3; y: 1 .. 12, clamped to 8
    ])
    expected = torch.tensor([[1.0, 1.0, 6.0, 3.0], [3.0, 3.0, 9.0, 4.0], [1.0, 1.0, 2.0, 2.0], [2.0, 1.0, 3.0, 8.0]])
    assert torch.equal(project_boxes(boxes, 16, 0.0, torch.tensor([10.0, 8.0])), expected)


def test_project_boxes_with_a_cell_offset():
    # Cells centred at 16 i + 8 (VGG16): the window [8, 40] has centres 8 and 40 on its edges, 24 inside.
    boxes = torch.tensor([[8.0, 8.0, 40.0, 41.0], [0.0, 0.0, 7.0, 7.0]])
    # Box 2: x1' = floor(-0.5) + 1 = 0, x2' = ceil(-0.0625) - 1 = -1: centre (3.5 - 8) / 16 -> -1 .. 0, clamped to 0.
    expected = torch.tensor([[1.0, 1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(project_boxes(boxes, 16, 8.0), expected)


def _reference_cells(x1: float, x2: float, stride: int, offset: float, last: int) -> tuple[int, int]:
    """Cells whose centres lie strictly inside (x1, x2), by enumeration; else the cells around the centre."""
    inside = [i for i in range(-50, 200) if x1 < stride * i + offset < x2]
    if inside:
        lo, hi = inside[0], inside[-1]
    else:
        centre = ((x1 + x2) / 2 - offset) / stride
        lo, hi = math.floor(centre), math.ceil(centre)
    return min(max(lo, 0), last), min(max(hi, 0), last)


coordinate = st.integers(-40, 600).map(lambda v: v / 4)


corner_lists = st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), min_size=1, max_size=8)


@given(corner_lists, st.sampled_from([0.0, 8.0, 15.5]))
def test_project_boxes_matches_enumeration(corners, offset):
    boxes = torch.tensor([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in corners])
    cells = project_boxes(boxes, 16, offset, torch.tensor([20.0, 30.0])).tolist()
    for box, got in zip(boxes.tolist(), cells):
        x = _reference_cells(box[0], box[2], 16, offset, 20)
        y = _reference_cells(box[1], box[3], 16, offset, 30)
        assert got == [x[0], y[0], x[1], y[1]]


# --- pooled features ---------------------------------------------------------------------------------------------


def _reference_pool(features: torch.Tensor, box, scale: tuple[float, float], levels, size: tuple[int, int]):
    """SPP of one box on one image's ``(C, H, W)`` map by enumeration (float64)."""
    height, width = size
    last_x = max([i for i in range(features.shape[2]) if STRIDE * i + 0.5 < width] + [0])
    last_y = max([i for i in range(features.shape[1]) if STRIDE * i + 0.5 < height] + [0])
    x1, y1, x2, y2 = (float(v) * s for v, s in zip(box, (scale[1], scale[0]) * 2))
    xs = _reference_cells(x1, x2, STRIDE, 0.5, last_x)
    ys = _reference_cells(y1, y2, STRIDE, 0.5, last_y)
    window = features[:, ys[0] : ys[1] + 1, xs[0] : xs[1] + 1].double()
    return torch.cat([F.adaptive_max_pool2d(window, level).flatten() for level in levels])


@settings(max_examples=25)
@given(corner_lists)
def test_pooled_features_have_50_bins_for_any_box(corners):
    model = tiny_sppnet(scales=(40,)).eval()
    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in corners]).clamp(0, 40)
    prepared = model.prepare([image], with_grad=False)
    pooled = model.pool(prepared, [boxes])
    features = prepared.scales[0].features[0]  # (C, H, W)
    assert pooled.shape == (len(boxes), 32 * 50) and bool(torch.isfinite(pooled).all())
    for box, row in zip(boxes, pooled):
        expected = _reference_pool(features, box, (1.0, 1.0), (1, 2, 3, 6), (40, 56))
        torch.testing.assert_close(row.double(), expected)


def test_multiscale_pooling_picks_the_scale_closest_to_224_squared(device):
    model = tiny_sppnet(scales=(64, 128, 256), target_box_side=64).to(device).eval()
    images = [torch.rand(3, 64, 80, device=device), torch.rand(3, 72, 64, device=device)]
    boxes = [
        torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 10.0, 26.0, 26.0], [5.0, 5.0, 45.0, 25.0]], device=device),
        torch.tensor([[0.0, 0.0, 8.0, 8.0], [3.0, 4.0, 60.0, 70.0]], device=device),
    ]
    prepared = model.prepare(images, with_grad=False)
    pooled = model.pool(prepared, boxes).cpu()
    rows = 0
    for i, (image, image_boxes) in enumerate(zip(images, boxes)):
        height, width = image.shape[1:]
        for box in image_boxes.tolist():
            areas = []
            for side in (64, 128, 256):
                factor = side / min(height, width)  # exact here: every resized side is an integer
                areas.append(abs((box[2] - box[0]) * (box[3] - box[1]) * factor * factor - 64 * 64))
            chosen = int(np.argmin(areas))
            factor = (64, 128, 256)[chosen] / min(height, width)
            level = prepared.scales[chosen]
            size = level.sizes[i]
            assert size == (int(height * factor), int(width * factor))
            expected = _reference_pool(level.features[i].cpu(), box, (factor, factor), (1, 2, 3, 6), size)
            torch.testing.assert_close(pooled[rows].double(), expected)
            rows += 1


def test_paper_defaults():
    config = SPPNetConfig()
    assert config.pyramid_levels == (1, 2, 3, 6) and config.bins == 50 and config.scales == (688,)
    sampling = config.sampling
    assert (sampling.positive_fraction, sampling.fg_iou_thresh, sampling.bg_iou_low) == (0.25, 0.5, 0.1)
    assert config.sampling.per_image and config.trainable_layers == 0


# --- weights files -----------------------------------------------------------------------------------------------


def test_save_and_from_weights_round_trip(tmp_path):
    config = SPPNetConfig(representation_size=16, scales=(64, 96))
    model = sppnet_alexnet(("cat", "dog", "bird"), config=config).eval()
    path = tmp_path / "spp.safetensors"
    write_detector(model, path)
    loaded = load_detector(path)
    assert loaded.class_names == ("cat", "dog", "bird") and loaded.config == config and loaded.offset == 15.5
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    proposals = [torch.tensor([[0.0, 0.0, 30.0, 40.0], [10.0, 5.0, 90.0, 60.0]])]
    (expected,), _ = model([image], proposals=proposals)
    (actual,), _ = loaded([image], proposals=proposals)
    assert torch.equal(expected.boxes, actual.boxes) and torch.equal(expected.scores, actual.scores)


# --- inference in chunks -----------------------------------------------------------------------------------------


def test_chunk_boxes_hand_computed():
    boxes = [torch.zeros(2, 4), torch.zeros(0, 4), torch.arange(20.0).view(5, 4)]
    chunks = [[len(b) for b in chunk] for chunk in chunk_boxes(boxes, 3)]
    assert chunks == [[2, 0, 0], [0, 0, 3], [0, 0, 2]]  # a chunk never mixes images (issue 21)
    last = list(chunk_boxes(boxes, 3))[-1][2]
    assert torch.equal(last, torch.arange(12.0, 20.0).view(2, 4))
    assert list(chunk_boxes([torch.zeros(0, 4)], 4)) == []


@pytest.mark.parametrize("scales", [(96,), (64, 96)])
def test_chunked_inference_equals_one_pass(scales):
    # Two images of different sizes (two groups) and, with two scales, boxes split between the scales.
    model = tiny_sppnet(scales=scales, chunk_size=4).eval()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)]
    proposals = [torch.tensor(rng.uniform(0, 60, (n, 2))).float() for n in (7, 6)]
    proposals = [torch.cat([p, p + torch.tensor(rng.uniform(4, 40, (len(p), 2))).float()], 1) for p in proposals]
    tensors = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    with torch.no_grad():
        prepared = model.prepare(tensors, with_grad=False)
        whole = model.heads(model.pool(prepared, proposals))  # one pass, a fresh output tensor
        chunked = model.classify(prepared, proposals)  # chunks of 4 regions through one reused buffer
    for expected, actual in zip(whole, chunked):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# --- truncated-SVD heads -----------------------------------------------------------------------------------------


def _numpy_rank(weight: torch.Tensor, rank: int) -> tuple[np.ndarray, float, float]:
    """float64 numpy: the rank-``rank`` truncation of ``weight``, its largest discarded and its largest singular
    value."""
    u, s, vt = np.linalg.svd(weight.detach().double().numpy(), full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return truncated, float(s[rank]) if rank < len(s) else 0.0, float(s[0])


def _trained_looking_heads(model: SPPNet, generator: torch.Generator) -> SPPNet:
    """``model`` with fc6/fc7 of decaying spectra (as trained layers have; random ones have flat spectra)."""
    for layer in (model.heads.box_head.fc6, model.heads.box_head.fc7):
        out_f, in_f = layer.weight.shape
        left = torch.linalg.qr(torch.randn(out_f, out_f, generator=generator))[0]
        right = torch.linalg.qr(torch.randn(in_f, out_f, generator=generator))[0]
        spectrum = 0.8 ** torch.arange(out_f, dtype=torch.float32)  # (out,)
        with torch.no_grad():
            layer.weight.copy_(left @ torch.diag(spectrum) @ right.T)
            layer.bias.normal_(0.0, 0.1, generator=generator)
    return model.eval()


@pytest.mark.parametrize("ranks", [(8, 4), (20, None), (None, 3), (32, 32)])
def test_svd_heads_error_within_the_discarded_singular_values(ranks):
    generator = torch.Generator().manual_seed(5)
    model = _trained_looking_heads(tiny_sppnet(representation_size=32), generator)
    fc6, fc7 = model.heads.box_head.fc6, model.heads.box_head.fc7
    w6, b6, w7, b7 = (t.detach().double().numpy() for t in (fc6.weight, fc6.bias, fc7.weight, fc7.bias))
    x = torch.randn(64, 32 * 50, generator=generator)  # (K, D) random pooled features
    with torch.no_grad():
        dense = model.heads.box_head(x).double().numpy()
    rank6, rank7 = (r if r is not None else 32 for r in ranks)
    t6, s6, _ = _numpy_rank(fc6.weight, rank6)
    t7, s7, top7 = _numpy_rank(fc7.weight, rank7)
    model.compress(*ranks)
    assert (model.config.fc6_rank, model.config.fc7_rank) == ranks
    with torch.no_grad():
        compressed = model.heads.box_head(x).double().numpy()
        hidden = model.heads.box_head.fc6(x).double().numpy()
    xd = x.double().numpy()
    # Each factorised layer is the numpy rank-t truncation of the dense one (float32 factors: ~1e-5 relative).
    np.testing.assert_allclose(hidden, xd @ t6.T + b6, rtol=1e-4, atol=1e-4)
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    np.testing.assert_allclose(compressed, relu(relu(xd @ t6.T + b6) @ t7.T + b7), rtol=1e-4, atol=1e-4)
    # Bound: |fc7'(fc6'(x)) - fc7(fc6(x))| <= s7 |relu(fc6(x))| + top7 * s6 |x| (ReLU is 1-Lipschitz).
    a6 = relu(xd @ w6.T + b6)
    bound = s7 * np.linalg.norm(a6, axis=1) + top7 * s6 * np.linalg.norm(xd, axis=1)  # (K,)
    error = np.linalg.norm(compressed - dense, axis=1)
    assert np.all(error <= bound * (1 + 1e-4) + 1e-4)
    if ranks == (32, 32):  # full rank: nothing discarded, the same function
        assert s6 == 0.0 and s7 == 0.0 and error.max() < 1e-4
    else:
        assert error.max() > 0


def test_svd_heads_round_trip_through_a_weights_file(tmp_path):
    config = dataclasses.replace(TINY_CONFIG, representation_size=32)
    model = _trained_looking_heads(sppnet_tiny(SHAPES_CLASSES, config=config), torch.Generator().manual_seed(6))
    model.compress(12, 6)
    path = tmp_path / "compressed.safetensors"
    write_detector(model, path)
    loaded = load_detector(path)
    assert (loaded.config.fc6_rank, loaded.config.fc7_rank) == (12, 6)
    assert loaded.heads.box_head.fc6.down.weight.shape == (12, 128 * config.bins)
    assert loaded.heads.box_head.fc7.up.weight.shape == (32, 6)
    state, expected = loaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    image = np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    proposals = [torch.tensor([[0.0, 0.0, 40.0, 50.0], [20.0, 10.0, 90.0, 70.0], [5.0, 5.0, 95.0, 75.0]])]
    (want,), _ = model([image], proposals=proposals)
    (got,), _ = loaded([image], proposals=proposals)
    assert torch.equal(want.boxes, got.boxes) and torch.equal(want.scores, got.scores)
    dense = sppnet_tiny(SHAPES_CLASSES, config=config)  # no ranks in its config: dense layers, the old keys
    assert "heads.box_head.fc6.weight" in dense.state_dict()


def test_svd_ranks_are_checked():
    with pytest.raises(ConfigError):
        SPPNetConfig(representation_size=16, fc6_rank=17)
    with pytest.raises(ConfigError):
        SPPNetConfig(fc7_rank=0)


# --- overfitting -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_sppnet_overfits_four_shapes_images():
    images, targets, proposals = shapes_problem()
    # The random background boxes mostly miss the objects (IoU < 0.1), which the paper's sampling ignores; on
    # four images they are the only background, so train on them.
    model = tiny_sppnet(sampling=SamplingConfig(bg_iou_low=0.0, per_image=True))
    conv = model.backbone[0].weight.detach().clone()
    overfit_and_refine(model, images, targets, proposals)
    assert not torch.equal(conv, model.backbone[0].weight)  # gradients reach the conv layers through SPP
