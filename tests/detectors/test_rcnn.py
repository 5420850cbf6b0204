"""Tests for detect.detectors.rcnn against independent references.

- Warped crops: a float64 Python loop that dilates each box, samples every output pixel centre bilinearly from the
  normalised image (edge pixels within half a pixel of the border, 0 outside) and compares with the detector's crops.
- Decoding: boxes and scores worked out by hand from the paper's parametrisation for fixed head weights.
- Matching and sampling: torchvision's ``box_iou`` per image in a Python loop.
- SVMs: an independent solver (projected gradient on the dual, in numpy) certified by its duality gap; ours must
  reach the same objective and the same weights within the bound strong convexity gives, and no small step may
  lower the primal hinge objective at our solution.
- Ridge regression: ``numpy.linalg.solve`` of the augmented normal equations in float64.
- Overfitting: a tiny conv net trained on four synthetic shapes images reaches VOC AP@0.5 >= 0.9 by a small AP
  written here (all-point interpolation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from detect.data.shapes import SHAPES_CLASSES
from detect.detectors.rcnn import RCNN, RCNNConfig, rcnn_alexnet
from detect.detectors.region import (
    RegionPostprocessConfig,
    SamplingConfig,
    SVMConfig,
    match_regions,
    sample_regions,
)
from detect.detectors.solvers import fit_ridge, train_linear_svms
from detect.errors import WeightsError
from detect.transform import IMAGENET_MEAN, IMAGENET_STD
from detect.weights import load_detector, write_detector
from tests.helpers import overfit_and_refine, shapes_problem, voc_map

pytestmark = pytest.mark.usefixtures("one_thread")

# --- a tiny R-CNN ------------------------------------------------------------------------------------------------


def tiny_rcnn(**overrides) -> RCNN:
    """32-pixel crops -> three 3x3 convs -> pool5 (32 x 4 x 4) -> fc6/fc7 of 128: trains in seconds on a CPU."""
    features = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
    )
    settings = dict(backbone="tiny", input_size=32, context_padding=4, representation_size=128, dropout=0.0)
    config = RCNNConfig(**{**settings, **overrides})
    return RCNN(features, nn.MaxPool2d(2), 32 * 4 * 4, SHAPES_CLASSES, config)


# --- warped crops ------------------------------------------------------------------------------------------------


def _reference_crop(image: np.ndarray, box, size: int, padding: int) -> np.ndarray:
    """The crop R-CNN feeds its CNN, by a float64 loop: dilate the box about its centre by size / (size - 2p),
    sample each output pixel centre bilinearly between pixel centres (edge pixel within half a pixel of the
    border), 0 outside the image."""
    channels, height, width = image.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = size / (size - 2 * padding)
    cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    left, top = cx - half_w, cy - half_h
    out = np.zeros((channels, size, size))
    for row in range(size):
        v = top + (row + 0.5) * 2 * half_h / size
        for col in range(size):
            u = left + (col + 0.5) * 2 * half_w / size
            if not (0 <= u <= width and 0 <= v <= height):
                continue
            px, py = min(max(u - 0.5, 0.0), width - 1), min(max(v - 0.5, 0.0), height - 1)
            c0, r0 = int(math.floor(px)), int(math.floor(py))
            c1, r1 = min(c0 + 1, width - 1), min(r0 + 1, height - 1)
            fx, fy = px - c0, py - r0
            out[:, row, col] = (
                image[:, r0, c0] * (1 - fx) * (1 - fy) + image[:, r0, c1] * fx * (1 - fy)
                + image[:, r1, c0] * (1 - fx) * fy + image[:, r1, c1] * fx * fy
            )
    return out


def test_warped_crops_match_slow_reference(device):
    model = tiny_rcnn(input_size=20, context_padding=3, chunk_size=2).to(device)
    rng = np.random.default_rng(1)
    first = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)  # a uint8 HxWx3 array
    second = torch.rand(3, 25, 19)  # a float (3, H, W) tensor
    boxes = [
        torch.tensor([[3.0, 4.0, 20.0, 28.0], [-6.0, 10.0, 15.5, 12.0], [30.0, 1.0, 41.0, 30.0]]),
        torch.tensor([[0.0, 0.0, 19.0, 25.0], [7.3, 8.1, 9.9, 20.4]]),
    ]
    tensors = [torch.from_numpy(first).permute(2, 0, 1).double() / 255, second.double()]
    prepared = model.prepare([tensors[0].float().to(device), second.to(device)], with_grad=False)
    crops = torch.cat(list(model.warped_chunks(prepared, [b.to(device) for b in boxes]))).cpu()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    expected = [
        _reference_crop(((image - mean) / std).numpy(), box, 20, 3) for image, b in zip(tensors, boxes) for box in b
    ]
    assert crops.shape == (5, 3, 20, 20)
    np.testing.assert_allclose(crops.double().numpy(), np.stack(expected), atol=2e-5)


# --- decoding and scoring ------------------------------------------------------------------------------------------


def _fixed_heads(model: RCNN, favourite: int, deltas: tuple[float, float, float, float]) -> None:
    """Make every region score class ``favourite`` (1-based) with logit 10 and regress it by ``deltas``."""
    heads = model.heads
    with torch.no_grad():
        heads.cls_score.weight.zero_()
        heads.cls_score.bias.zero_()
        heads.cls_score.bias[favourite] = 10.0
        heads.bbox_pred.weight.zero_()
        heads.bbox_pred.bias.copy_(torch.randn(heads.bbox_pred.bias.shape))
        heads.bbox_pred.bias[4 * (favourite - 1) : 4 * favourite] = torch.tensor(deltas)
        heads.svm.weight.zero_()
        heads.svm.bias.copy_(torch.linspace(-2.0, 1.5, heads.num_classes))


def test_class_specific_decoding(device):
    model = tiny_rcnn().to(device).eval()
    _fixed_heads(model, favourite=3, deltas=(0.1, -0.2, math.log(2.0), math.log(0.5)))
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    proposals = [torch.tensor([[10.0, 20.0, 50.0, 40.0], [60.0, 70.0, 100.0, 90.0]])]
    detections, losses = model([image], proposals=proposals)
    # Box 1: centre (30, 30), size 40 x 20 -> centre (30 + 4, 30 - 4), size 80 x 10 -> [-6, 21, 74, 31], clipped at 0.
    # Box 2: centre (80, 80) -> (84, 76), size 80 x 10 -> [44, 71, 124, 81], clipped at the width 120.
    expected_boxes = torch.tensor([[0.0, 21.0, 74.0, 31.0], [44.0, 71.0, 120.0, 81.0]])
    probability = math.exp(10.0) / (math.exp(10.0) + len(SHAPES_CLASSES))
    (result,) = detections
    assert losses == {} and result.image_size == (100, 120)
    order = result.boxes[:, 0].argsort()
    torch.testing.assert_close(result.boxes[order].cpu(), expected_boxes, atol=1e-4, rtol=0)
    assert result.labels.tolist() == [3, 3]
    torch.testing.assert_close(result.scores.cpu(), torch.full((2,), probability), atol=1e-6, rtol=0)


def test_svm_scoring_uses_margins_and_their_threshold(device):
    model = tiny_rcnn(postprocess=RegionPostprocessConfig(svm_score_thresh=0.0, nms_thresh=0.3), scoring="svm")
    model = model.to(device).eval()
    _fixed_heads(model, favourite=3, deltas=(0.0, 0.0, 0.0, 0.0))
    with torch.no_grad():
        model.heads.bbox_pred.bias.zero_()  # every class keeps the proposal
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    (result,), _ = model([image], proposals=[torch.tensor([[10.0, 10.0, 40.0, 30.0]])])
    margins = torch.linspace(-2.0, 1.5, len(SHAPES_CLASSES))  # SVM biases; fc7 features meet zero weights
    positive = torch.nonzero(margins > 0).squeeze(1)
    assert sorted(result.labels.tolist()) == (positive + 1).tolist()
    torch.testing.assert_close(result.scores.sort().values.cpu(), margins[positive].sort().values)


def test_regions_without_proposals_give_empty_detections(device):
    model = tiny_rcnn().to(device).eval()
    images = [np.zeros((40, 50, 3), dtype=np.uint8), np.zeros((30, 30, 3), dtype=np.uint8)]
    detections, _ = model(images, proposals=[torch.zeros(0, 4), torch.tensor([[1.0, 2.0, 20.0, 25.0]])])
    assert len(detections[0]) == 0 and detections[0].image_size == (40, 50)
    assert detections[1].image_size == (30, 30)


def test_proposer_is_used_when_no_proposals_are_given():
    model = tiny_rcnn().eval()
    calls = []

    def proposer(images):
        calls.append(len(images))
        return [torch.tensor([[0.0, 0.0, 10.0, 10.0]]) for _ in images]

    model.proposer = proposer
    detections, _ = model([np.zeros((20, 20, 3), dtype=np.uint8)] * 2)
    assert calls == [2] and len(detections) == 2


# --- matching and sampling -----------------------------------------------------------------------------------------


def _random_boxes(n: int, size: float, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator) * size
    return torch.cat([corner, corner + 2 + torch.rand(n, 2, generator=generator) * size / 2], 1)


def test_match_regions_against_per_image_loop(generator):
    boxes = [_random_boxes(30, 50, generator), _random_boxes(0, 50, generator), _random_boxes(12, 50, generator)]
    targets = [
        {"boxes": _random_boxes(4, 50, generator), "labels": torch.tensor([1, 3, 3, 2])},
        {"boxes": _random_boxes(2, 50, generator), "labels": torch.tensor([1, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    match = match_regions(boxes, targets, num_classes=3)
    rows = 0
    for region, target in zip(boxes, targets):
        for box in region:
            iou = torchvision.ops.box_iou(box[None], target["boxes"])[0] if len(target["boxes"]) else torch.zeros(0)
            for c in range(3):
                of_class = iou[target["labels"] == c + 1]
                assert float(match.overlaps[rows, c]) == pytest.approx(float(of_class.max()) if len(of_class) else 0.0)
            best = float(iou.max()) if len(iou) else 0.0
            assert float(match.iou[rows]) == pytest.approx(best)
            if best > 0:
                k = int(iou.argmax())
                assert int(match.gt_labels[rows]) == int(target["labels"][k])
                assert torch.equal(match.gt_boxes[rows], target["boxes"][k])
            else:
                assert int(match.gt_labels[rows]) == 0
            rows += 1
    assert rows == len(match.iou)


def _quotas(positives: int, negatives: int, config: SamplingConfig) -> tuple[int, int]:
    most_positive = int(config.batch_size * config.positive_fraction)
    taken = min(positives, most_positive)
    return taken, min(negatives, config.batch_size - taken)


@pytest.mark.parametrize("per_image", [False, True])
def test_sample_regions_respects_quotas_and_labels(generator, per_image):
    config = SamplingConfig(batch_size=16, positive_fraction=0.25, bg_iou_low=0.1, per_image=per_image)
    boxes = [_random_boxes(60, 40, generator), _random_boxes(50, 40, generator)]
    targets = [
        {"boxes": _random_boxes(3, 40, generator), "labels": torch.tensor([2, 1, 2])},
        {"boxes": _random_boxes(2, 40, generator), "labels": torch.tensor([3, 1])},
    ]
    sample = sample_regions(boxes, targets, config, num_classes=3)
    labels = sample.labels.split([len(b) for b in sample.boxes])
    eligible = []  # (foreground, background) candidates per image, ground truth included
    for region, label, proposals, target in zip(sample.boxes, labels, boxes, targets):
        best, index = torchvision.ops.box_iou(region, target["boxes"]).max(1)  # over (S_i, G)
        assert torch.equal(label, torch.where(best >= 0.5, target["labels"][index], 0))
        assert bool((best >= 0.1).all())  # nothing below the background floor
        everything = torchvision.ops.box_iou(torch.cat([proposals, target["boxes"]]), target["boxes"]).max(1).values
        eligible.append((int((everything >= 0.5).sum()), int(((everything >= 0.1) & (everything < 0.5)).sum())))
        if per_image:
            assert _quotas(*eligible[-1], config) == (int((label > 0).sum()), int((label == 0).sum()))
    if not per_image:
        total = _quotas(sum(e[0] for e in eligible), sum(e[1] for e in eligible), config)
        assert total == (int((sample.labels > 0).sum()), int((sample.labels == 0).sum()))


# --- SVMs ------------------------------------------------------------------------------------------------------------


def _primal(w: np.ndarray, x: np.ndarray, y: np.ndarray, cost: np.ndarray) -> float:
    """1/2 |w|^2 + sum cost * hinge, with x already augmented by the bias feature."""
    return 0.5 * float(w @ w) + float(np.sum(cost * np.maximum(0.0, 1.0 - y * (x @ w))))


def _reference_svm(x: np.ndarray, y: np.ndarray, cost: np.ndarray, iterations: int = 40_000):
    """Projected gradient ascent on the dual in float64 (a different algorithm from ours): returns w and the
    duality gap that certifies it."""
    z = x * y[:, None]  # (N, D)
    q = z @ z.T
    step = 1.0 / np.linalg.eigvalsh(q).max()
    alpha = np.zeros(len(y))
    for _ in range(iterations):
        alpha = np.clip(alpha + step * (1.0 - q @ alpha), 0.0, cost)
    w = z.T @ alpha
    dual = float(alpha.sum() - 0.5 * alpha @ q @ alpha)
    return w, dual


def test_linear_svms_reach_the_hinge_optimum():
    rng = np.random.default_rng(0)
    n, d, bias = 40, 3, 2.0
    features = rng.normal(size=(n, d)) + np.array([1.0, 0.0, 0.5])
    signs = np.stack([np.sign(features[:, 0] + 0.4 * rng.normal(size=n)), np.where(rng.random(n) < 0.3, 1.0, -1.0)], 1)
    costs = np.stack([np.full(n, 0.5), np.where(rng.random(n) < 0.8, 2.0, 0.0)], 1)  # class 2 leaves some out
    solution = train_linear_svms(
        torch.tensor(features), torch.tensor(signs), torch.tensor(costs), bias_multiplier=bias, tol=1e-9,
        max_epochs=20_000, generator=torch.Generator().manual_seed(0),
    )
    augmented = np.concatenate([features, np.full((n, 1), bias)], 1)
    for k in range(2):
        ours = np.concatenate([solution.weight[k].numpy(), [solution.bias[k].item() / bias]])
        ref, dual = _reference_svm(augmented, signs[:, k], costs[:, k])
        p_ours = _primal(ours, augmented, signs[:, k], costs[:, k])
        p_ref = _primal(ref, augmented, signs[:, k], costs[:, k])
        assert p_ref - dual < 1e-6  # the reference is certified optimal
        assert p_ours - dual < 1e-6
        # 1-strong convexity: |w - w*|^2 / 2 <= P(w) - P* <= P(w) - dual.
        bound = math.sqrt(2 * max(p_ours - dual, 0.0)) + math.sqrt(2 * max(p_ref - dual, 0.0))
        assert np.linalg.norm(ours - ref) <= bound + 1e-9
        for direction in rng.normal(size=(50, d + 1)):  # convex: no small step may go downhill
            assert _primal(ours + 1e-4 * direction, augmented, signs[:, k], costs[:, k]) >= p_ours - 1e-10


def test_fit_svms_mines_hard_negatives():
    model = tiny_rcnn(svm=SVMConfig(initial_negatives=3, C=1.0, tol=1e-3))
    rng = np.random.default_rng(1)
    k = len(SHAPES_CLASSES)
    centres = rng.normal(size=(k, 128)) * 3
    labels = torch.tensor(np.repeat(np.arange(1, k + 1), 30))  # 30 regions per class
    features = torch.tensor(centres[labels.numpy() - 1] + rng.normal(size=(len(labels), 128)), dtype=torch.float32)
    is_gt = torch.tensor(np.tile(np.arange(30) < 5, k))  # the first 5 of each class are ground truth
    overlaps = torch.where(torch.nn.functional.one_hot(labels, k + 1)[:, 1:].bool(), 0.7, 0.0)
    overlaps[is_gt] = torch.nn.functional.one_hot(labels[is_gt], k + 1)[:, 1:].float()
    generator = torch.Generator().manual_seed(0)
    report = model.fit_svms(features, torch.where(is_gt, labels, 0), overlaps, generator=generator)
    assert report.rounds >= 2 and report.hard_negatives[0] > 0 and report.hard_negatives[-1] == 0
    assert model.config.scoring == "svm"
    fc7_scaled = features * model.heads.svm_scale
    scores = model.heads.svm(fc7_scaled)  # (N, K)
    assert bool((scores.argmax(1) + 1 == labels).all())
    negative = ~torch.nn.functional.one_hot(labels, k + 1)[:, 1:].bool()
    assert bool((scores[negative] < 0).all())


# --- ridge regression --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [50, 6])  # primal (N >= D) and dual (N < D) solves
def test_fit_ridge_matches_numpy_solve(n):
    rng = np.random.default_rng(n)
    d, lam = 10, 3.0
    x, y = rng.normal(size=(n, d)) * 4 + 1, rng.normal(size=(n, 4))
    weight, bias = fit_ridge(torch.tensor(x, dtype=torch.float32), torch.tensor(y), lam)
    # min |X w + b - y|^2 + lam |w|^2: normal equations of [X 1] with no penalty on b.
    a = np.concatenate([x.astype(np.float32).astype(np.float64), np.ones((n, 1))], 1)
    penalty = lam * np.diag(np.r_[np.ones(d), 0.0])
    expected = np.linalg.solve(a.T @ a + penalty, a.T @ y)  # (D+1, 4)
    assert weight.dtype == torch.float64
    np.testing.assert_allclose(weight.numpy(), expected[:d].T, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), expected[d], rtol=1e-9, atol=1e-10)


def test_fit_box_regressor_uses_the_papers_targets_and_selection(generator):
    model = tiny_rcnn()
    n, dim = 80, model.heads.in_features
    features = torch.rand(n, dim, generator=generator)
    gt = _random_boxes(n, 60, generator)
    wh = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
    boxes = gt + wh * (torch.rand(n, 4, generator=generator) - 0.5) * 0.4
    labels = torch.tensor([1, 2] * (n // 2))
    labels[:5] = 0  # no ground truth
    counts = model.fit_box_regressor(features, boxes, gt, labels)
    iou = torchvision.ops.box_iou(boxes, gt).diagonal()
    use = (iou > 0.6) & (labels > 0)
    x = features[use].double()
    x = x * 20.0 / x.norm(dim=1).mean()
    p, g = boxes[use].double(), gt[use].double()
    pw, ph, gw, gh = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    targets = torch.stack([
        ((g[:, 0] + g[:, 2]) - (p[:, 0] + p[:, 2])) / 2 / pw, ((g[:, 1] + g[:, 3]) - (p[:, 1] + p[:, 3])) / 2 / ph,
        torch.log(gw / pw), torch.log(gh / ph),
    ], 1)
    assert counts.tolist() == [int((labels[use] == c).sum()) for c in range(1, len(SHAPES_CLASSES) + 1)]
    deltas = model.heads.bbox_pred(features[use] * model.heads.bbox_scale).double().view(-1, len(SHAPES_CLASSES), 4)
    for c in (1, 2):
        rows = labels[use] == c
        a = np.concatenate([x[rows].numpy(), np.ones((int(rows.sum()), 1))], 1)
        solution = np.linalg.solve(a.T @ a + 1000.0 * np.diag(np.r_[np.ones(dim), 0.0]), a.T @ targets[rows].numpy())
        np.testing.assert_allclose(deltas[rows, c - 1].numpy(), a @ solution, atol=1e-4)
    assert float(model.heads.bbox_pred.weight[8:].abs().sum()) == 0.0  # classes 3.. saw no region: zero deltas


# --- weights files -----------------------------------------------------------------------------------------------


def test_save_and_from_weights_round_trip(tmp_path):
    config = RCNNConfig(representation_size=16, scoring="svm", chunk_size=2)
    model = rcnn_alexnet(("cat", "dog"), config=config).eval()
    with torch.no_grad():
        model.heads.svm.bias.copy_(torch.tensor([0.5, -0.25]))
    path = tmp_path / "rcnn.safetensors"
    write_detector(model, path)
    loaded = load_detector(path)
    assert loaded.class_names == ("cat", "dog") and loaded.config == config and loaded.name == "rcnn_alexnet"
    assert not loaded.training
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    proposals = [torch.tensor([[0.0, 0.0, 30.0, 40.0], [10.0, 5.0, 70.0, 60.0], [20.0, 20.0, 40.0, 30.0]])]
    (expected,), _ = model([image], proposals=proposals)
    (actual,), _ = loaded([image], proposals=proposals)
    assert torch.equal(expected.boxes, actual.boxes) and torch.equal(expected.scores, actual.scores)


def test_from_weights_rejects_a_file_without_config(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsError):
        load_detector(path)


# --- overfitting -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_rcnn_overfits_four_shapes_images():
    images, targets, proposals = shapes_problem()
    model = tiny_rcnn(chunk_size=64)
    regions = overfit_and_refine(model, images, targets, proposals)
    model.fit_svms(regions.fc7, regions.labels, regions.overlaps)
    by_svm, _ = model(images, proposals=proposals)
    assert model.config.scoring == "svm" and voc_map(by_svm, targets) >= 0.9
