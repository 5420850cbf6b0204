"""Padding and balanced sampling against hand-worked values and torchvision's ``BalancedPositiveNegativeSampler``."""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from detect.ops.sampling import pad_boxes, sample_balanced


def test_pad_boxes_hand_worked(device: torch.device) -> None:
    """Two boxes, none and one box: a (3, 2, 4) batch of float64 (``like``'s dtype), zeros where missing."""
    first = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]], device=device)
    third = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=device)
    like = torch.zeros(1, dtype=torch.float64, device=device)

    padded, valid = pad_boxes([first, torch.zeros(0, 4, device=device), third], like)

    expected = torch.tensor(
        [
            [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]],
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
            [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    assert padded.dtype == torch.float64 and padded.device.type == device.type
    assert torch.equal(padded.cpu(), expected)
    assert valid.cpu().tolist() == [[True, True], [False, False], [True, False]]


def test_pad_boxes_of_empty_images_keeps_one_column(device: torch.device) -> None:
    padded, valid = pad_boxes([torch.zeros(0, 4, device=device)] * 2, torch.zeros(1, device=device))
    assert padded.shape == (2, 1, 4) and not bool(valid.any())


def test_sampling_counts_and_torchvision_draws(device: torch.device) -> None:
    """Per image: 300 positives -> 128 + 128; 10 positives -> 10 + 246; no negatives -> positives only; and the
    same seed draws exactly torchvision's anchors."""
    labels = torch.full((4, 1500), -1.0, device=device)
    labels[0, :300], labels[0, 300:1300] = 1, 0
    labels[1, 100:110], labels[1, 200:1400] = 1, 0
    labels[2, :40] = 1
    labels[3, 500:700] = 0
    labels = labels[:, torch.randperm(1500, device=device)]

    torch.manual_seed(5)
    positive, negative = sample_balanced(labels, 256, 0.5)
    torch.manual_seed(5)
    expected_pos, expected_neg = BalancedPositiveNegativeSampler(256, 0.5)(list(labels))

    assert positive.sum(1).tolist() == [128, 10, 40, 0]
    assert negative.sum(1).tolist() == [128, 246, 0, 200]
    assert (labels[positive] == 1).all() and (labels[negative] == 0).all()
    assert torch.equal(positive, torch.stack(expected_pos).bool())
    assert torch.equal(negative, torch.stack(expected_neg).bool())


def test_integer_labels_and_a_fractional_quota(device: torch.device) -> None:
    """int64 labels with ignored (-1) entries; a batch of 10 at 25 % allows int(2.5) = 2 positives, then up to 8
    negatives: 2 + 8 of the first row's 3 + 9, 1 + 7 of the second's 1 + 7. Same draws as torchvision's sampler
    for the same seed."""
    labels = torch.tensor(
        [[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, -1], [0, 0, 0, -1, -1, 1, 0, 0, 0, 0, -1, -1, -1, -1]], device=device
    )

    torch.manual_seed(11)
    positive, negative = sample_balanced(labels, 10, 0.25)
    torch.manual_seed(11)
    expected_pos, expected_neg = BalancedPositiveNegativeSampler(10, 0.25)(list(labels))

    assert positive.sum(1).tolist() == [2, 1] and negative.sum(1).tolist() == [8, 7]
    assert torch.equal(positive, torch.stack(expected_pos).bool())
    assert torch.equal(negative, torch.stack(expected_neg).bool())
