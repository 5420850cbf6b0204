"""Batched helpers for training two-stage detectors: ragged boxes padded into one tensor, and balanced sampling.

The RPN draws anchors, the Fast R-CNN head draws RoIs, and R-CNN and SPP-Net draw regions with the same two
steps: pad each image's boxes into a ``(B, N, 4)`` batch so that matching is one call, then draw a mini-batch of
labelled elements per row with at most a given fraction positive.

Decisions:

- :func:`sample_balanced` calls ``torch.randperm`` exactly as torchvision's ``BalancedPositiveNegativeSampler``
  does (per row, positives then negatives, on the labels' device), so the same seed draws the same elements as
  torchvision; only those RNG calls loop over rows, the selection itself is batched. One host sync reads the
  per-row counts.
- :func:`pad_boxes` always returns at least one column (``N >= 1``) so that reductions over the padded axis are
  defined when every image has no box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["pad_boxes", "sample_balanced"]


def pad_boxes(boxes: Sequence[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """Stack ragged ``(G_i, 4)`` boxes into ``(B, G, 4)`` (zeros where missing, ``G >= 1`` even when every image is
    empty) and a validity mask ``(B, G)``. ``like`` gives the dtype and device."""
    sentinel = like.new_zeros((1, 4))  # a last row of one box makes G >= 1; dropped after padding
    padded = pad_sequence([b.to(like.dtype) for b in boxes] + [sentinel], batch_first=True)[:-1]  # (B, G, 4)
    counts = torch.tensor([len(b) for b in boxes], device=like.device)  # (B,)
    valid = torch.arange(padded.shape[1], device=like.device) < counts[:, None]  # (B, G)
    return padded, valid


def _select(mask: Tensor, perms: list[Tensor], quotas: list[int]) -> Tensor:
    """Keep, per row, the elements of ``mask (B, N)`` whose rank among the row's True entries is in
    ``perms[b][:quotas[b]]``. ``perms[b]`` is a permutation of ``range(mask[b].sum())``."""
    counts = torch.tensor([len(p) for p in perms], device=mask.device)  # (B,)
    starts = torch.cumsum(counts, 0) - counts  # (B,)
    flat_perm = torch.cat(perms)  # (P,) ranks within each row
    owner_start = torch.repeat_interleave(starts, counts)  # (P,)
    owner_quota = torch.repeat_interleave(torch.tensor(quotas, device=mask.device), counts)  # (P,)
    taken = torch.arange(flat_perm.numel(), device=mask.device) - owner_start < owner_quota  # (P,)
    chosen = torch.zeros(flat_perm.numel(), dtype=torch.bool, device=mask.device)
    chosen[flat_perm[taken] + owner_start[taken]] = True  # (P,) in row-major order of mask's True entries
    selected = torch.zeros_like(mask)
    selected[mask] = chosen
    return selected


def sample_balanced(labels: Tensor, batch_size_per_row: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Draw at most ``batch_size_per_row`` labelled elements from each row of ``labels (B, N)`` (1 positive,
    0 negative, anything else ignored), at most ``positive_fraction`` of them positive, the rest negative.
    Returns boolean masks ``(B, N)`` of the drawn positives and negatives.

    Draws like torchvision's ``BalancedPositiveNegativeSampler``: per row, ``randperm`` over its positives then
    over its negatives, the first ``quota`` of each permutation kept.
    """
    positive, negative = labels == 1, labels == 0  # (B, N)
    counts = torch.stack((positive.sum(1), negative.sum(1)), dim=1).tolist()  # (B, 2) on the host
    most_positive = int(batch_size_per_row * positive_fraction)
    pos_perms, neg_perms, pos_quota, neg_quota = [], [], [], []
    for num_pos, num_neg in counts:  # the RNG calls, in torchvision's order
        pos_quota.append(min(num_pos, most_positive))
        neg_quota.append(min(num_neg, batch_size_per_row - pos_quota[-1]))
        pos_perms.append(torch.randperm(num_pos, device=labels.device))
        neg_perms.append(torch.randperm(num_neg, device=labels.device))
    return _select(positive, pos_perms, pos_quota), _select(negative, neg_perms, neg_quota)
