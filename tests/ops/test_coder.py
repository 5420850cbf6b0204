"""BoxCoder against torchvision's (bitwise on CPU float32) and against a float64 Python loop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from detect.ops.coder import BoxCoder
from tests.helpers import assert_close_to_reference, assert_matches_peer, random_boxes

pytestmark = pytest.mark.exact  # bitwise against torchvision / the reference: rerun on other vector paths

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.3, 7.0, 3.3, 1.7)]
CLIP = math.log(1000.0 / 16)


def decode_reference(delta: list[float], box: list[float], weights, clip: float = CLIP) -> list[float]:
    """One box, in Python floats, straight from the R-CNN equations."""
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + w / 2, box[1] + h / 2
    px, py = delta[0] / weights[0] * w + cx, delta[1] / weights[1] * h + cy
    pw, ph = math.exp(min(delta[2] / weights[2], clip)) * w, math.exp(min(delta[3] / weights[3], clip)) * h
    return [px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2]


def encode_reference(gt: list[float], proposal: list[float], weights) -> list[float]:
    pw, ph = proposal[2] - proposal[0], proposal[3] - proposal[1]
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    dx = (gt[0] + gw / 2 - proposal[0] - pw / 2) / pw
    dy = (gt[1] + gh / 2 - proposal[1] - ph / 2) / ph
    return [weights[0] * dx, weights[1] * dy, weights[2] * math.log(gw / pw), weights[3] * math.log(gh / ph)]


def proposals_and_targets(n: int, *lead: int, scale: float = 1000.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals with sides >= 1 and jittered targets near them, ``(*lead, n, 4)`` each."""
    proposals = random_boxes(n, *lead, scale=scale, seed=seed)
    proposals[..., 2:] += 1.0
    g = torch.Generator().manual_seed(seed + 1)
    jitter = torch.randn(proposals.shape, generator=g) * 0.2 * (proposals[..., 2:] - proposals[..., :2]).repeat(
        *[1] * len(lead), 1, 2
    )
    targets = proposals + jitter
    targets[..., 2:] = torch.maximum(targets[..., 2:], targets[..., :2] + 0.5)
    return proposals, targets


# ----------------------------------------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("num_classes", [1, 21])
def test_decode_per_class_equals_torchvision(device: torch.device, weights, num_classes: int) -> None:
    counts = [700, 0, 333, 1]  # odd sizes, and an image without boxes
    boxes = random_boxes(sum(counts), scale=30_000.0, max_size=3000.0).to(device)
    deltas = (torch.randn(sum(counts), num_classes * 4) * 3).to(device)  # some beyond the clamp
    peer = TorchvisionBoxCoder(weights).decode(deltas, list(boxes.split(counts)))  # (sum N, C, 4)

    ours = BoxCoder(weights).decode_per_class(deltas, boxes)

    assert ours.shape == (sum(counts), num_classes, 4)
    assert_matches_peer(ours, peer)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_batched_decode_equals_torchvision(device: torch.device, weights) -> None:
    boxes = random_boxes(250, 3, scale=5000.0, seed=2).to(device)  # (B, N, 4)
    deltas = torch.randn(3, 250, 21 * 4).to(device)  # (B, N, C*4)
    peer = TorchvisionBoxCoder(weights).decode(deltas.flatten(0, 1), list(boxes))  # (B*N, C, 4)
    coder = BoxCoder(weights)

    per_class = coder.decode_per_class(deltas, boxes)
    single = coder.decode(deltas[..., :4], boxes)

    assert per_class.shape == (3, 250, 21, 4)
    assert_matches_peer(per_class.flatten(0, 1), peer)
    assert_matches_peer(single.flatten(0, 1), peer[:, 0])


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_equals_torchvision(device: torch.device, weights) -> None:
    proposals, targets = proposals_and_targets(1500, 2, scale=30_000.0, seed=3)  # (2, 1500, 4) each
    proposals, targets = proposals.to(device), targets.to(device)
    peer = TorchvisionBoxCoder(weights).encode(list(targets), list(proposals))  # 2 x (1500, 4)

    ours = BoxCoder(weights).encode(targets, proposals)

    assert ours.shape == (2, 1500, 4)
    for i in range(2):
        assert_matches_peer(ours[i], peer[i])


# ----------------------------------------------------------------------------------------------- float64 reference

finite = st.floats(-2.0, 2.0, width=32)
coords = st.floats(-100.0, 30_000.0, width=32)
sides = st.floats(1.0, 2_000.0, width=32)
box_and_delta = st.tuples(coords, coords, sides, sides, st.lists(finite, min_size=4, max_size=4))


@given(cases=st.lists(box_and_delta, min_size=0, max_size=20), weights=st.sampled_from(WEIGHTS))
def test_decode_matches_float64_loop(cases, weights) -> None:
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in cases], dtype=torch.float32).reshape(-1, 4)
    deltas = torch.tensor([d for *_, d in cases], dtype=torch.float32).reshape(-1, 4)
    reference = torch.tensor(
        [decode_reference(d, b, weights) for d, b in zip(deltas.double().tolist(), boxes.double().tolist())],
        dtype=torch.float64,
    ).reshape(-1, 4)
    ours = BoxCoder(weights).decode(deltas, boxes)
    assert ours.dtype == torch.float32
    assert_close_to_reference(ours, reference, magnitude=reference.abs().max().item() if len(cases) else 1.0)


@given(cases=st.lists(box_and_delta, min_size=1, max_size=20), weights=st.sampled_from(WEIGHTS))
def test_encode_matches_float64_loop_and_round_trips(cases, weights) -> None:
    proposals = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in cases], dtype=torch.float64)
    coder = BoxCoder(weights)
    targets = coder.decode(torch.tensor([d for *_, d in cases], dtype=torch.float64) / 2, proposals)  # nearby boxes

    deltas = coder.encode(targets, proposals)

    assert deltas.dtype == torch.float64
    reference = [encode_reference(t, p, weights) for t, p in zip(targets.tolist(), proposals.tolist())]
    torch.testing.assert_close(deltas, torch.tensor(reference, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(coder.decode(deltas, proposals), targets, rtol=1e-12, atol=1e-8)


def test_round_trip_float32_tens_of_thousands(device: torch.device) -> None:
    proposals, targets = proposals_and_targets(3000, scale=40_000.0, seed=4)
    proposals, targets = proposals.to(device), targets.to(device)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    back = coder.decode(coder.encode(targets, proposals), proposals)
    assert_close_to_reference(back, targets.double(), magnitude=50_000.0)


# ----------------------------------------------------------------------------------------------- edge cases


def test_scale_clamp_hand_values(device: torch.device) -> None:
    box = torch.tensor([[0.0, 0.0, 16.0, 8.0]], device=device)  # centre (8, 4)
    coder = BoxCoder()
    huge = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 1e6]], device=device), box)  # both clamped: scale 62.5
    torch.testing.assert_close(huge.cpu(), torch.tensor([[8 - 500.0, 4 - 250.0, 8 + 500.0, 4 + 250.0]]), rtol=1e-6, atol=0)
    small = coder.decode(torch.tensor([[0.5, -1.0, -50.0, math.log(2.0)]], device=device), box)  # only max clamped
    torch.testing.assert_close(small.cpu(), torch.tensor([[16.0, -12.0, 16.0, 4.0]]), rtol=1e-6, atol=1e-6)
    weighted = BoxCoder((10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(2.0))
    doubled = weighted.decode(torch.tensor([[0.0, 0.0, 5 * 10.0, 5 * math.log(2.0)]], device=device), box)
    torch.testing.assert_close(doubled.cpu(), torch.tensor([[-8.0, -4.0, 24.0, 12.0]]), rtol=1e-6, atol=1e-6)


def test_empty_inputs(device: torch.device) -> None:
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    empty = torch.zeros(0, 4, device=device)
    assert coder.encode(empty, empty).shape == (0, 4)
    assert coder.decode(empty, empty).shape == (0, 4)
    assert coder.decode_per_class(torch.zeros(0, 84, device=device), empty).shape == (0, 21, 4)
    assert coder.decode_per_class(torch.zeros(2, 0, 84, device=device), torch.zeros(2, 0, 4, device=device)).shape == (
        2,
        0,
        21,
        4,
    )


def test_broadcast_encode_against_shared_anchors(device: torch.device) -> None:
    anchors, _ = proposals_and_targets(100, seed=5)  # (N, 4) shared by the batch
    _, matched = proposals_and_targets(100, 2, seed=6)  # (B, N, 4)
    anchors, matched = anchors.to(device), matched.to(device)
    ours = BoxCoder().encode(matched, anchors)
    assert ours.shape == (2, 100, 4)
    for i in range(2):
        assert_matches_peer(ours[i], TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(matched[i], anchors))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_computes_in_float32(device: torch.device, dtype: torch.dtype) -> None:
    proposals, targets = proposals_and_targets(200, scale=500.0, seed=7)
    proposals, targets = proposals.to(device, dtype), targets.to(device, dtype)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = coder.encode(targets, proposals)
    decoded = coder.decode_per_class(deltas.repeat(1, 3).to(dtype), proposals)
    assert deltas.dtype == torch.float32 and decoded.dtype == torch.float32
    p64, t64 = proposals.double().tolist(), targets.double().tolist()
    reference = torch.tensor([encode_reference(t, p, coder.weights) for t, p in zip(t64, p64)])
    assert_close_to_reference(deltas, reference, magnitude=50.0)
    d64 = deltas.to(dtype).double().tolist()
    decoded_reference = torch.tensor([decode_reference(d, p, coder.weights) for d, p in zip(d64, p64)])
    for k in range(3):
        assert_close_to_reference(decoded[:, k], decoded_reference, magnitude=1000.0)


def test_configuration() -> None:
    coder = BoxCoder([10, 10, 5, 5])  # a list from a YAML recipe
    assert coder.weights == (10.0, 10.0, 5.0, 5.0) and coder.bbox_xform_clip == CLIP
    assert BoxCoder() == BoxCoder((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        coder.weights = (1.0, 1.0, 1.0, 1.0)  # type: ignore[misc]
    with pytest.raises(ValueError, match="4 weights"):
        BoxCoder((1.0, 1.0))
    with pytest.raises(ValueError, match="multiple of 4"):
        coder.decode_per_class(torch.zeros(3, 10), torch.zeros(3, 4))


def test_decode_is_differentiable_like_torchvision(device: torch.device) -> None:
    boxes = random_boxes(50, seed=8).to(device) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
    deltas = torch.randn(50, 3 * 4, device=device)
    ours_deltas, peer_deltas = deltas.clone().requires_grad_(), deltas.clone().requires_grad_()
    weights = (10.0, 10.0, 5.0, 5.0)
    decoded = BoxCoder(weights).decode_per_class(ours_deltas, boxes)
    peer = TorchvisionBoxCoder(weights).decode(peer_deltas, [boxes])
    assert_matches_peer(decoded.detach(), peer.detach())
    weight = torch.randn(peer.shape, device=device)
    (decoded * weight).sum().backward()
    (peer * weight).sum().backward()
    assert_matches_peer(ours_deltas.grad, peer_deltas.grad)
