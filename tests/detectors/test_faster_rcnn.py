"""Faster R-CNN against torchvision's ``fasterrcnn_resnet50_fpn`` with the same seeded random weights, plus the
RoI head's pieces against torchvision's and hand-computed values, and checkpoint loading."""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TVPredictor
from torchvision.models.detection.faster_rcnn import TwoMLPHead as TVTwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from detect.detectors import DETECTORS
from detect.detectors.faster_rcnn import (
    COCO_CLASS_NAMES,
    FasterRCNN,
    FasterRCNNConfig,
    RPNConfig,
    check_targets,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_vgg16,
)
from detect.errors import ConfigError, WeightsError
from detect.roi_heads import (
    FastRCNNPredictor,
    RoIHeads,
    RoIHeadsConfig,
    ThreadedRoIPool,
    TwoMLPHead,
    _contiguous_chunks,
    load_fc67,
)
from detect.testing import CLS_SCALE, randomise_frozen_bn
from detect.weights import load_detector
from detect.transform import RCNNTransform, TransformConfig

# Fewer proposals and sampled RoIs than the defaults keep the box head's CPU time down; same in both models.
PROPOSALS = dict(pre_nms_top_n_train=1000, pre_nms_top_n_test=600, post_nms_top_n_train=600, post_nms_top_n_test=300)
SMALL = FasterRCNNConfig(
    transform=TransformConfig(min_size=(480,), max_size=640),
    rpn=RPNConfig(**PROPOSALS),
    roi_heads=RoIHeadsConfig(batch_size_per_image=256),
)
@pytest.fixture(scope="module")
def models() -> tuple[TVFasterRCNN, FasterRCNN]:
    """torchvision's Faster R-CNN R50-FPN built from its public pieces with seeded random weights, and ours
    loaded from its state dict with strict=True."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    reference = TVFasterRCNN(
        _resnet_fpn_extractor(resnet, 3),
        num_classes=91,
        min_size=480,
        max_size=640,
        box_batch_size_per_image=256,
        **{f"rpn_{key}": value for key, value in PROPOSALS.items()},
    )
    randomise_frozen_bn(reference, generator)
    with torch.no_grad():
        reference.roi_heads.box_predictor.cls_score.weight.mul_(CLS_SCALE)
    ours = fasterrcnn_resnet50_fpn(config=SMALL)
    ours.load_state_dict(reference.state_dict(), strict=True)
    for module in ours.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = 0.0
    return reference, ours


def images(scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    sizes = [(int(480 * scale), int(640 * scale)), (int(300 * scale), int(400 * scale))]
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


@contextmanager
def input_size(models: tuple[TVFasterRCNN, FasterRCNN], min_size: int, max_size: int) -> Iterator[None]:
    """Both models resize to ``min_size``/``max_size`` inside the block (to keep CPU time down)."""
    reference, ours = models
    saved = reference.transform.min_size, reference.transform.max_size, ours.transform
    reference.transform.min_size, reference.transform.max_size = (min_size,), max_size
    ours.transform = RCNNTransform(TransformConfig(min_size=(min_size,), max_size=max_size))
    try:
        yield
    finally:
        reference.transform.min_size, reference.transform.max_size, ours.transform = saved


TARGETS = [
    {"boxes": torch.tensor([[10.0, 20.0, 200.0, 300.0], [300.0, 100.0, 600.0, 400.0]]), "labels": torch.tensor([1, 5])},
    {"boxes": torch.tensor([[50.0, 50.0, 150.0, 250.0]]), "labels": torch.tensor([3])},
]


def capture_rpn(model: nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return model.rpn.register_forward_hook(lambda module, args, output: store.append(output[0]))


@pytest.mark.slow
def test_detections_and_proposals_match_torchvision(models: tuple[TVFasterRCNN, FasterRCNN]) -> None:
    reference, ours = models
    reference.eval(), ours.eval()
    their_proposals, our_proposals = [], []
    hooks = [capture_rpn(reference, their_proposals), capture_rpn(ours, our_proposals)]
    with torch.no_grad():
        theirs = reference(images())
        detections, losses = ours(images())
    for hook in hooks:
        hook.remove()
    assert losses == {}
    for a, b in zip(their_proposals[0], our_proposals[0]):
        # Equal objectness scores (common with a random RPN head) may come in either order: torchvision's sort is
        # not stable, ours puts the lower anchor index first. Same boxes, and the same order apart from such ties.
        assert a.shape == b.shape and len(a) == 300
        assert torch.equal(torch.unique(a, dim=0), torch.unique(b, dim=0))
        assert float((a == b).all(dim=1).float().mean()) > 0.95
    assert sum(len(d) for d in detections) >= 40
    assert len(torch.unique(torch.cat([d.labels for d in detections]))) >= 2
    for expected, actual, size in zip(theirs, detections, [(480, 640), (300, 400)]):
        assert actual.image_size == size
        assert torch.equal(actual.labels, expected["labels"])
        torch.testing.assert_close(actual.scores, expected["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(actual.boxes, expected["boxes"], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_training_losses_match_torchvision(models: tuple[TVFasterRCNN, FasterRCNN]) -> None:
    reference, ours = models
    reference.train(), ours.train()
    targets = [{"boxes": t["boxes"] / 2, "labels": t["labels"]} for t in TARGETS]
    with input_size(models, 240, 320), torch.no_grad():
        torch.manual_seed(5)
        expected = reference(images(0.5), targets)
        torch.manual_seed(5)
        detections, losses = ours(images(0.5), targets)
    assert set(losses) == set(expected)
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-4, atol=1e-5)
    assert sum(len(d) for d in detections) > 0  # from the sampled RoIs, in original pixels
    for d, (h, w) in zip(detections, [(240, 320), (150, 200)]):
        assert d.image_size == (h, w)
        assert float(d.boxes[:, 2].max()) <= w and float(d.boxes[:, 3].max()) <= h


@pytest.mark.slow
def test_evaluation_with_targets_adds_validation_losses(models: tuple[TVFasterRCNN, FasterRCNN]) -> None:
    _, ours = models
    generator = torch.Generator().manual_seed(3)
    small = [torch.rand(3, 96, 128, generator=generator), torch.rand(3, 80, 80, generator=generator)]
    targets = [{"boxes": t["boxes"] / 5, "labels": t["labels"]} for t in TARGETS]
    with input_size(models, 96, 128):
        ours.eval()
        with torch.no_grad():
            plain, no_losses = ours(small)
            detections, losses = ours(small, targets)
        ours.train()
        numpy_targets = [{"boxes": t["boxes"].numpy(), "labels": t["labels"].numpy(), "image_id": "a"} for t in targets]
        _, train_losses = ours(small, numpy_targets)
    assert no_losses == {}
    names = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert set(losses) == set(train_losses) == names
    assert all(math.isfinite(float(v)) for v in losses.values())
    for a, b in zip(plain, detections):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    # Gradients reach the head, the RPN and the trainable backbone stages (cheap paths only: no fc6 backward).
    head = ours.roi_heads.box_predictor.cls_score.weight
    assert torch.autograd.grad(train_losses["loss_classifier"], head)[0].abs().sum() > 0
    rpn_and_backbone = [ours.rpn.head.cls_logits.weight, ours.backbone.body.layer4[0].conv1.weight]
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(train_losses["loss_objectness"], rpn_and_backbone))
    assert not ours.backbone.body.conv1.weight.requires_grad  # frozen (trainable_layers=3)


def paired_heads(generator: torch.Generator, **settings) -> tuple[TVRoIHeads, RoIHeads]:
    """torchvision's RoIHeads and ours, same random weights (small: 8 channels, 6 classes)."""
    config = RoIHeadsConfig(**settings)
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    reference = TVRoIHeads(
        pool, TVTwoMLPHead(8 * 49, 32), TVPredictor(32, 6), config.fg_iou_thresh, config.bg_iou_thresh,
        config.batch_size_per_image, config.positive_fraction, config.bbox_reg_weights, config.score_thresh,
        config.nms_thresh, config.detections_per_img,
    )
    for param in reference.parameters():
        param.data.normal_(0.0, 0.5, generator=generator)
    ours = RoIHeads(MultiScaleRoIAlign(["0"], 7, 2), TwoMLPHead(8 * 49, 32), FastRCNNPredictor(32, 6), config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def random_proposals(generator: torch.Generator, counts: list[int], size: float) -> list[torch.Tensor]:
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=generator) * size * 0.7
        out.append(torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * size * 0.3 + 1], 1))
    return out


@pytest.mark.exact
def test_sampling_matches_torchvision(generator: torch.Generator) -> None:
    reference, ours = paired_heads(generator, batch_size_per_image=64)
    proposals = random_proposals(generator, [300, 200, 50], 100.0)
    targets = [
        {"boxes": proposals[0][:3] + 1.0, "labels": torch.tensor([2, 4, 5])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # background-only image
        {"boxes": proposals[2][:1], "labels": torch.tensor([1])},
    ]
    torch.manual_seed(7)
    their_rois, _, their_labels, their_targets = reference.select_training_samples(list(proposals), targets)
    torch.manual_seed(7)
    sample = ours.sample_proposals(proposals, targets)
    assert [len(p) for p in sample.proposals] == [len(p) for p in their_rois]
    for a, b in zip(sample.proposals, their_rois):
        assert torch.equal(a, b)
    assert torch.equal(sample.labels, torch.cat(their_labels))
    assert int((sample.labels > 0).sum()) > 3
    positive = sample.labels > 0
    torch.testing.assert_close(sample.regression_targets[positive], torch.cat(their_targets)[positive])


@pytest.mark.exact
def test_postprocessing_matches_torchvision(generator: torch.Generator) -> None:
    reference, ours = paired_heads(generator, score_thresh=0.1, detections_per_img=30)
    proposals = random_proposals(generator, [120, 80], 60.0)
    logits = torch.randn(200, 6, generator=generator) * 2
    deltas = torch.randn(200, 24, generator=generator)
    sizes = [(60, 50), (45, 60)]
    boxes, scores, labels = reference.postprocess_detections(logits, deltas, proposals, sizes)
    detections = ours.postprocess(logits, deltas, proposals, sizes)
    assert sum(len(d) for d in detections) > 20
    assert len(torch.unique(torch.cat([d.labels for d in detections]))) == 5  # every foreground class
    for d, b, s, lab, size in zip(detections, boxes, scores, labels, sizes):
        assert d.image_size == size
        assert torch.equal(d.labels, lab)
        torch.testing.assert_close(d.scores, s, rtol=0, atol=1e-6)
        torch.testing.assert_close(d.boxes, b, rtol=0, atol=1e-5)


def test_class_specific_decode_by_hand() -> None:
    """One proposal, two confident classes with different deltas: each detection gets its own class's box."""
    head = RoIHeads(nn.Identity(), nn.Identity(), nn.Identity(), RoIHeadsConfig(score_thresh=0.05))
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 30.0]])]  # w 40, h 20, centre (30, 20)
    logits = torch.log(torch.tensor([[0.1, 0.02, 0.5, 0.38]]))  # background, class 1 (below 0.05), 2, 3
    deltas = torch.zeros(1, 16)
    deltas[0, 8:12] = torch.tensor([10 * 0.1, 10 * 0.2, 5 * math.log(2.0), 5 * math.log(0.5)])  # class 2
    deltas[0, 12:16] = torch.tensor([10 * -0.25, 0.0, 0.0, 0.0])  # class 3: shift left by 10 px
    (detections,) = head.postprocess(logits, deltas, proposals, [(100, 60)])
    assert detections.labels.tolist() == [2, 3]  # 1-based, by score
    torch.testing.assert_close(detections.scores, torch.tensor([0.5, 0.38]))
    # class 2: centre (30 + 4, 20 + 4), size (80, 10) -> [-6, 19, 74, 29], clipped to width 60
    torch.testing.assert_close(detections.boxes, torch.tensor([[0.0, 19.0, 60.0, 29.0], [0.0, 10.0, 40.0, 30.0]]))


def test_too_small_boxes_are_dropped() -> None:
    head = RoIHeads(nn.Identity(), nn.Identity(), nn.Identity(), RoIHeadsConfig(score_thresh=0.05))
    proposals = [torch.tensor([[10.0, 10.0, 10.005, 30.0], [0.0, 0.0, 20.0, 20.0]])]
    logits = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    (detections,) = head.postprocess(logits, torch.zeros(2, 8), proposals, [(50, 50)])
    torch.testing.assert_close(detections.boxes, proposals[0][1:])


def test_coco_class_names_are_torchvisions() -> None:
    assert COCO_CLASS_NAMES == tuple(_COCO_CATEGORIES[1:])
    assert fasterrcnn_resnet50_fpn.__name__ in DETECTORS and fasterrcnn_vgg16.__name__ in DETECTORS
    model = DETECTORS["fasterrcnn_resnet50_fpn"](num_classes=3, class_names=["cat", "dog"])
    assert model.name == "fasterrcnn_resnet50_fpn" and model.class_names == ("cat", "dog")
    assert list(model.transform.state_dict()) == []
    with pytest.raises(ConfigError, match="does not match"):
        fasterrcnn_resnet50_fpn(num_classes=3, class_names=["cat"])


def test_vgg16_paper_configuration() -> None:
    model = fasterrcnn_vgg16(
        num_classes=4, config=FasterRCNNConfig(transform=TransformConfig(min_size=(160,), max_size=256))
    ).eval()
    assert model.rpn.anchor_generator.num_anchors_per_location() == [9]
    assert model.backbone.stride == 16 and model.roi_heads.box_roi_pool.output_size == (7, 7)
    assert model.roi_heads.box_head.fc6.in_features == 512 * 7 * 7
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(100.0)
        (detections,), _ = model(np.zeros((120, 200, 3), dtype=np.uint8))
    assert detections.image_size == (120, 200)
    assert detections.boxes.dtype == torch.float32 and detections.labels.dtype == torch.int64
    if len(detections):
        assert int(detections.labels.min()) >= 1 and int(detections.labels.max()) <= 3


def old_style(state: dict[str, torch.Tensor]) -> OrderedDict:
    """Rename to the flat keys of torchvision checkpoints saved before its RPN head and FPN blocks were nested."""
    renamed = OrderedDict()
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        renamed[key] = value
    return renamed


@pytest.mark.slow
def test_checkpoints_load_or_fail_clearly(models: tuple[TVFasterRCNN, FasterRCNN], tmp_path: Path) -> None:
    reference, _ = models
    state = reference.state_dict()
    legacy = old_style(state)
    assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.0.weight" in legacy
    torch.save({"model": legacy}, tmp_path / "old.pth")
    loaded = load_detector(tmp_path / "old.pth")
    assert not loaded.training and loaded.class_names == COCO_CLASS_NAMES
    ours = loaded.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items())
    assert all(m.eps == 0.0 for m in loaded.modules() if isinstance(m, FrozenBatchNorm2d))

    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "ours.safetensors"), metadata={"frozen_bn_eps": "1e-05"})
    loaded = load_detector(tmp_path / "ours.safetensors", class_names=[f"c{i}" for i in range(90)])
    assert loaded.class_names[0] == "c0"
    assert all(m.eps == 1e-5 for m in loaded.modules() if isinstance(m, FrozenBatchNorm2d))
    state["roi_heads.box_head.fc7.weight"] = torch.zeros(1024, 1000)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsError, match=r"wrong shapes.*fc7\.weight: \(1024, 1000\)"):
        load_detector(tmp_path / "wrong.safetensors")
    del state["roi_heads.box_head.fc7.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys \(1\): roi_heads.box_head.fc7.weight"):
        load_detector(tmp_path / "missing.safetensors")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(WeightsError, match="architecture"):
        load_detector(tmp_path / "alien.safetensors")


def test_fc67_come_from_an_imagenet_classifier() -> None:
    head = TwoMLPHead(8, 6)
    imagenet = {
        "classifier.0.weight": torch.randn(6, 8), "classifier.0.bias": torch.randn(6),
        "classifier.3.weight": torch.randn(6, 6), "classifier.3.bias": torch.randn(6),
    }
    load_fc67(head, imagenet, (0, 3), "vgg.pth")
    assert torch.equal(head.fc6.weight, imagenet["classifier.0.weight"])
    assert torch.equal(head.fc7.bias, imagenet["classifier.3.bias"])
    with pytest.raises(WeightsError, match="alexnet.pth lacks fc6/fc7"):
        load_fc67(head, imagenet, (1, 4), "alexnet.pth")


def test_degenerate_targets_are_rejected() -> None:
    good = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1])}
    check_targets([good])
    with pytest.raises(ValueError, match="positive width and height"):
        check_targets([good, {"boxes": torch.tensor([[3.0, 0.0, 3.0, 5.0]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="int64"):
        check_targets([{"boxes": good["boxes"], "labels": torch.tensor([1.0])}])


@pytest.fixture
def three_threads() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(saved)


@pytest.mark.exact
def test_threaded_pooling_equals_one_call(three_threads: None, generator: torch.Generator) -> None:
    features = OrderedDict(
        (str(i), torch.randn(3, 8, 64 // 2**i, 48 // 2**i, generator=generator, requires_grad=True)) for i in range(4)
    )
    proposals = random_proposals(generator, [250, 0, 170], 180.0)
    sizes = [(256, 192)] * 3
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    threaded = ThreadedRoIPool(MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), min_rois_per_thread=100)
    expected = plain(features, proposals, sizes)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(threaded(features, proposals, sizes), expected)
    actual = threaded(features, proposals, sizes)
    assert torch.equal(actual, expected)
    weights = torch.randn(expected.shape, generator=generator)
    grads = torch.autograd.grad((expected * weights).sum(), list(features.values()))
    threaded_grads = torch.autograd.grad((actual * weights).sum(), list(features.values()))
    for a, b in zip(grads, threaded_grads):
        torch.testing.assert_close(b, a)
    assert list(threaded.state_dict()) == [] and threaded.output_size == (7, 7)


def test_contiguous_chunks_cover_the_rois_in_order() -> None:
    proposals = [torch.arange(n * 4.0).reshape(n, 4) + 1000 * i for i, n in enumerate([5, 0, 3, 7])]
    chunks = _contiguous_chunks(proposals, 4)
    assert all(len(chunk) == 4 for chunk in chunks)
    sizes = [sum(len(p) for p in chunk) for chunk in chunks]
    assert sum(sizes) == 15 and max(sizes) - min(sizes) <= 1  # nearly equal
    assert torch.equal(torch.cat([torch.cat(chunk) for chunk in chunks]), torch.cat(proposals))


@pytest.mark.exact
def test_cpu_inference_runs_each_image_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU inference passes hold one image each (issue 21: a group's kernels follow its batch size), and each
    image's detections are bitwise those it gets alone."""
    torch.manual_seed(0)
    model = DETECTORS["fasterrcnn_tiny"](class_names=("a", "b")).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (160, 192, 3), dtype=np.uint8) for _ in range(3)]  # padded 160 x 192 each
    alone = [model([image])[0][0] for image in images]  # the reference: each image on its own
    passes: list[int] = []
    original = model.forward_batch
    monkeypatch.setattr(model, "forward_batch", lambda batch, targets: passes.append(len(batch.image_sizes))
                        or original(batch, targets))
    detections, _ = model(images)
    assert passes == [1, 1, 1]
    for expected, actual in zip(alone, detections):
        assert torch.equal(expected.labels, actual.labels)
        assert torch.equal(actual.boxes, expected.boxes) and torch.equal(actual.scores, expected.scores)
    passes.clear()
    model(images, targets=[{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}] * 3)
    assert passes == [3]  # with targets (losses) the group stays one batch


def test_pool_rois_matches_torchvisions_multiscale_roi_align(generator: torch.Generator) -> None:
    """The exportable path's pooling of ``(K, 5)`` RoIs (levels concatenated, then gathered back into RoI order)
    gives torchvision's ``MultiScaleRoIAlign`` on per-image box lists bit for bit: RoIs of every level, two images,
    the rows in image-major RoI order."""
    from detect.roi_heads import pool_rois

    sizes = [(512, 640), (480, 600)]  # maps at strides 4, 8, 16, 32 of the padded 512 x 640
    features = OrderedDict(
        (str(i), torch.randn(2, 8, 128 // 2**i, 160 // 2**i, generator=generator)) for i in range(4))
    boxes = []
    for h, w in sizes:  # sides from 16 to 600 px: torchvision's levels 2 to 5 (224 px is level 4), all four maps
        xy = torch.rand(60, 2, generator=generator) * torch.tensor([w * 0.3, h * 0.3])
        side = 16 * (600 / 16) ** torch.rand(60, 1, generator=generator)
        boxes.append(torch.cat([xy, torch.minimum(xy + side, torch.tensor([w, h]).float())], 1))
    theirs = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = theirs(features, boxes, sizes)
    ours = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    got = pool_rois(ThreadedRoIPool(ours), features, rois, torch.tensor(sizes))
    levels = theirs.map_levels(boxes)
    assert len(set(levels.tolist())) == 4  # every level is exercised
    assert torch.equal(got, expected)
