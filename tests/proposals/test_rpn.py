"""The RPN against torchvision's (same weights, same inputs, same seed) and hand-computed matching and sampling."""

from __future__ import annotations

import dataclasses
import inspect
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import box_iou

from proposals.anchors import AnchorGenerator
from proposals.rpn import RegionProposalNetwork, RPNConfig, RPNHead, match_anchors

CHANNELS = 64
FPN = (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
SINGLE = (((128, 256, 512),), ((0.5, 1.0, 2.0),))
PADDED = (224, 320)
IMAGE_SIZES = [(224, 300), (200, 320)]  # two images of different sizes in one padded batch
FPN_GRIDS = [(56, 80), (28, 40), (14, 20), (7, 10), (4, 5)]
SINGLE_GRIDS = [(14, 20)]  # stride 16


def rpn_config(settings: dict) -> RPNConfig:
    """torchvision's RPN arguments as an :class:`RPNConfig` (its top-k dicts split into train and test fields)."""
    pre, post = settings["pre_nms_top_n"], settings["post_nms_top_n"]
    flat = {k: v for k, v in settings.items() if k not in ("pre_nms_top_n", "post_nms_top_n")}
    return RPNConfig(
        pre_nms_top_n_train=pre["training"],
        pre_nms_top_n_test=pre["testing"],
        post_nms_top_n_train=post["training"],
        post_nms_top_n_test=post["testing"],
        **flat,
    )


def paired_rpns(anchor_config, device: torch.device, conv_depth: int = 1, **settings):
    """torchvision's RPN with seeded random weights, and ours loaded from its state dict (strict)."""
    generator = torch.Generator().manual_seed(0)
    num_anchors = TVAnchorGenerator(*anchor_config).num_anchors_per_location()[0]
    head = TVRPNHead(CHANNELS, num_anchors, conv_depth)
    for name, param in head.named_parameters():  # spread the logits so that no two scores tie
        std = 0.02 if name.startswith("bbox_pred") else 0.1
        param.data.normal_(0.0, std, generator=generator)
    config = dict(
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n=dict(training=1200, testing=1000),  # training: below the default 2000 to keep tests fast
        post_nms_top_n=dict(training=800, testing=1000),
        nms_thresh=0.7,
        score_thresh=0.0,
    )
    config.update(settings)
    reference = TVRegionProposalNetwork(TVAnchorGenerator(*anchor_config), head, **config)
    ours = RegionProposalNetwork(
        AnchorGenerator(*anchor_config), RPNHead(CHANNELS, num_anchors, conv_depth), rpn_config(config)
    )
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.to(device), ours.to(device)


def inputs(grids, device: torch.device, sizes=IMAGE_SIZES):
    generator = torch.Generator().manual_seed(1)
    images = ImageList(torch.zeros(len(sizes), 3, *PADDED, device=device), list(sizes))
    features = OrderedDict(
        (str(i), torch.randn(len(sizes), CHANNELS, h, w, generator=generator).to(device))
        for i, (h, w) in enumerate(grids)
    )
    return images, features


def targets_for(device: torch.device, empty_second: bool = False) -> list[dict[str, torch.Tensor]]:
    first = torch.tensor([[10.0, 20.0, 120.0, 150.0], [150.0, 30.0, 290.0, 200.0], [60.0, 60.0, 90.0, 100.0]])
    second = torch.zeros(0, 4) if empty_second else torch.tensor([[0.0, 0.0, 320.0, 200.0], [30.0, 40.0, 50.0, 60.0]])
    return [{"boxes": first.to(device)}, {"boxes": second.to(device)}]


def assert_same_proposals(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every comparison with torchvision on one torch thread: our inference runs the RPN head's 1x1 convolutions
    on one (PyTorch picks their kernel by the thread count, and a last-bit change reorders near-equal objectness in
    the top-k); torchvision's then computes the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("anchor_config", "grids"), [(FPN, FPN_GRIDS), (SINGLE, SINGLE_GRIDS)], ids=["fpn", "single"])
def test_eval_proposals_equal_torchvision(device: torch.device, anchor_config, grids) -> None:
    reference, ours = paired_rpns(anchor_config, device)
    images, features = inputs(grids, device)
    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected, _ = reference(images, features)
        proposals, losses = ours(images, features)
    assert losses == {}
    assert all(len(p) > 100 for p in proposals)
    assert_same_proposals(proposals, expected)
    for boxes, (h, w) in zip(proposals, IMAGE_SIZES):  # clipped to each image's own size, not the padded one
        assert boxes[:, 2].max() <= w and boxes[:, 3].max() <= h


@pytest.mark.parametrize("empty_second", [False, True], ids=["boxes", "one-image-without-boxes"])
@pytest.mark.parametrize(("anchor_config", "grids"), [(FPN, FPN_GRIDS), (SINGLE, SINGLE_GRIDS)], ids=["fpn", "single"])
def test_training_losses_and_gradients_equal_torchvision(
    device: torch.device, anchor_config, grids, empty_second: bool
) -> None:
    reference, ours = paired_rpns(anchor_config, device)
    images, features = inputs(grids, device)
    targets = targets_for(device, empty_second)
    reference.train()
    ours.train()

    torch.manual_seed(7)
    expected_proposals, expected = reference(images, features, targets)
    sum(expected.values()).backward()
    torch.manual_seed(7)
    proposals, losses = ours(images, features, targets)
    sum(losses.values()).backward()

    assert_same_proposals(proposals, expected_proposals)
    assert not any(p.requires_grad for p in proposals)
    assert losses.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=0, atol=1e-5)
    assert expected["loss_rpn_box_reg"] > 0
    reference_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, reference_grads[name].grad, rtol=1e-4, atol=1e-6)


def test_all_images_without_boxes_are_all_negative(device: torch.device) -> None:
    reference, ours = paired_rpns(FPN, device)
    images, features = inputs(FPN_GRIDS, device)
    targets = [{"boxes": torch.zeros(0, 4, device=device)} for _ in IMAGE_SIZES]
    torch.manual_seed(3)
    _, expected = reference.train()(images, features, targets)
    torch.manual_seed(3)
    _, losses = ours.train()(images, features, targets)
    assert losses["loss_rpn_box_reg"] == 0
    torch.testing.assert_close(losses["loss_objectness"], expected["loss_objectness"], rtol=0, atol=1e-5)


def test_losses_in_eval_mode_and_single_tensor_features(device: torch.device) -> None:
    """Targets give losses in evaluation mode too (validation loss); a lone tensor is a one-level feature list."""
    reference, ours = paired_rpns(SINGLE, device)
    images, features = inputs(SINGLE_GRIDS, device)
    targets = targets_for(device)
    torch.manual_seed(11)
    _, expected = reference.train()(images, features, targets)
    ours.eval()
    with torch.no_grad():
        plain, no_losses = ours(images, features["0"])
    torch.manual_seed(11)
    _, losses = ours.train()(images, features["0"], targets)
    assert no_losses == {} and len(plain) == 2
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("score_thresh", [0.4, 1.5], ids=["some-pass", "none-pass"])
def test_small_top_n_and_score_threshold_equal_torchvision(device: torch.device, score_thresh: float) -> None:
    top_n = dict(pre_nms_top_n=dict(training=50, testing=40), post_nms_top_n=dict(training=30, testing=25))
    reference, ours = paired_rpns(FPN, device, score_thresh=score_thresh, nms_thresh=0.5, **top_n)
    images, features = inputs(FPN_GRIDS, device)
    with torch.no_grad():
        expected, _ = reference.eval()(images, features)
        proposals, _ = ours.eval()(images, features)
    assert all(len(p) <= 25 for p in proposals)
    assert all(len(p) == 0 for p in proposals) == (score_thresh > 1)
    assert_same_proposals(proposals, expected)


@pytest.mark.parametrize("conv_depth", [1, 2])
def test_head_names_and_outputs_equal_torchvision(device: torch.device, conv_depth: int) -> None:
    reference = TVRPNHead(CHANNELS, 3, conv_depth)
    ours = RPNHead(CHANNELS, 3, conv_depth)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    features = [torch.randn(2, CHANNELS, 9, 7, device=device), torch.randn(2, CHANNELS, 5, 4, device=device)]
    expected = reference.to(device)(features)
    for mine, theirs in zip(ours.to(device)(features), expected):
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


def test_old_flat_head_keys_are_renamed_on_load() -> None:
    """torchvision's first RPNHead stored its single conv as ``conv.weight``; whole-model dicts carry a prefix."""
    reference = TVRegionProposalNetwork(
        TVAnchorGenerator(*SINGLE), TVRPNHead(CHANNELS, 9), 0.7, 0.3, 256, 0.5, {}, {}, 0.7
    )
    old = {
        f"rpn.{key.replace('conv.0.0.', 'conv.')}": value.clone() + 1 for key, value in reference.state_dict().items()
    }
    assert "rpn.head.conv.weight" in old
    model = torch.nn.Module()
    model.rpn = RegionProposalNetwork(AnchorGenerator.single_level(), RPNHead(CHANNELS, 9))
    model.load_state_dict(old, strict=True)
    assert torch.equal(model.rpn.head.conv[0][0].weight, old["rpn.head.conv.weight"])
    assert torch.equal(model.rpn.head.conv[0][0].bias, old["rpn.head.conv.bias"])


def test_match_anchors_hand_computed(device: torch.device) -> None:
    """IoUs worked by hand. Ground truth g0 = [0,0,10,10], g1 = [100,100,110,110], g2 far from every anchor.

    a0 = g0 (IoU 1) and a1 (80/100 = 0.8) are positive; a2 (0.5) is ignored; a3 (0.2) and a4 (0) are negative.
    g1's best anchors a5 and a6 tie at 0.5: both become positive (low-quality rule, ties included); a7 (50/150)
    is ignored. g2 overlaps nothing: it makes no anchor positive (torchvision would promote a4, at IoU 0).
    """
    anchors = torch.tensor(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 8],
            [0, 0, 10, 5],
            [0, 0, 10, 2],
            [20, 20, 30, 30],
            [100, 100, 110, 105],
            [100, 105, 110, 110],
            [105, 100, 115, 110],
        ],
        dtype=torch.float32,
        device=device,
    )
    gt = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110], [1000, 1000, 1010, 1010]], dtype=torch.float32)
    labels, matched = match_anchors(anchors, [gt.to(device), torch.zeros(0, 4, device=device)], 0.7, 0.3)
    expected = torch.tensor([[1, 1, -1, 0, 0, 1, 1, -1], [0] * 8], dtype=torch.float32, device=device)
    assert torch.equal(labels, expected)
    assert torch.equal(matched[0, [0, 1, 5, 6]].cpu(), gt[[0, 0, 1, 1]])


def test_low_quality_match_takes_the_anchors_best_box(device: torch.device) -> None:
    """a0 is gA's best anchor (IoU 0.4) but overlaps gB more (40/60): it is positive and matched to gB."""
    anchors = torch.tensor([[0, 0, 10, 4], [0, 0, 10, 2], [50, 50, 60, 60]], dtype=torch.float32, device=device)
    gt = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6]], dtype=torch.float32, device=device)
    labels, matched = match_anchors(anchors, [gt], 0.7, 0.3)
    assert labels.tolist() == [[1.0, -1.0, 0.0]]  # a1: IoU 0.2 / 0.333 -> best 0.333, ignored
    assert torch.equal(matched[0, 0], gt[1])


def boxes_strategy(min_size: int, max_size: int):
    corner = st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 30), st.integers(1, 30))
    return st.lists(corner, min_size=min_size, max_size=max_size).map(
        lambda rows: torch.tensor([[x, y, x + w, y + h] for x, y, w, h in rows], dtype=torch.float32).reshape(-1, 4)
    )


@settings(max_examples=30)
@given(anchors=boxes_strategy(1, 40), gt_a=boxes_strategy(1, 5), gt_b=boxes_strategy(0, 5))
def test_match_anchors_equals_torchvision_matcher(anchors, gt_a, gt_b) -> None:
    """torchvision's Matcher (allow_low_quality_matches) and RPN labelling, per image, as the reference."""
    tiles = torch.tensor([[x, y, x + 30, y + 30] for x in range(0, 90, 15) for y in range(0, 90, 15)])
    anchors = torch.cat([anchors, tiles.float()])  # every ground-truth box overlaps some anchor
    gts = [gt_a, gt_b]
    labels, matched = match_anchors(anchors, gts, 0.7, 0.3)
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    for image, gt in enumerate(gts):
        if len(gt) == 0:
            assert (labels[image] == 0).all()
            continue
        matches = matcher(box_iou(gt, anchors))
        expected = torch.where(matches >= 0, 1.0, torch.where(matches == -1, 0.0, -1.0))
        assert torch.equal(labels[image], expected)
        positive = matches >= 0
        assert torch.equal(matched[image][positive], gt[matches[positive]])


def test_config_fields_and_defaults_are_torchvisions() -> None:
    """RPNConfig's fields are torchvision's ``FasterRCNN(rpn_*=...)`` settings (all but the two modules, the
    anchor generator and the head), with their defaults."""
    theirs = {
        name.removeprefix("rpn_"): parameter.default
        for name, parameter in inspect.signature(TVFasterRCNN.__init__).parameters.items()
        if name.startswith("rpn_") and name not in ("rpn_anchor_generator", "rpn_head")
    }
    assert dataclasses.asdict(RPNConfig()) == theirs


def test_background_threshold_above_foreground_is_rejected() -> None:
    with pytest.raises(ValueError, match="bg_iou_thresh 0.5 is above fg_iou_thresh 0.4"):
        RPNConfig(fg_iou_thresh=0.4, bg_iou_thresh=0.5)
