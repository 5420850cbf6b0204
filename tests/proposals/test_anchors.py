"""Anchors against torchvision's AnchorGenerator (exact equality) and hand-computed values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from proposals.anchors import AnchorGenerator, cell_anchors


def image_batch(padded: tuple[int, int], sizes: list[tuple[int, int]], device: torch.device) -> ImageList:
    return ImageList(torch.zeros(len(sizes), 3, *padded, device=device), sizes)


def features(grid_sizes: list[tuple[int, int]], device: torch.device, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(2, 1, h, w, device=device, dtype=dtype) for h, w in grid_sizes]


def fpn_grids(height: int, width: int) -> list[tuple[int, int]]:
    """Feature sizes of a ResNet-FPN (strides 4..64, ceil division as stride-2 convs with padding give)."""
    return [(-(-height // s), -(-width // s)) for s in (4, 8, 16, 32, 64)]


@pytest.mark.parametrize("padded", [(224, 320), (200, 304), (96, 160), (800, 1216)])
def test_fpn_default_equals_torchvision(device: torch.device, padded: tuple[int, int]) -> None:
    grids = fpn_grids(*padded)
    images = image_batch(padded, [padded, (padded[0] - 10, padded[1] - 30)], device)
    feats = features(grids, device)
    reference = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)(images, feats)

    ours = AnchorGenerator()(images, feats)

    assert ours.device.type == device.type and ours.dtype == torch.float32
    for per_image in reference:  # torchvision repeats the same grid for every image of the batch
        assert torch.equal(ours, per_image)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtype_follows_features_and_equals_torchvision(device: torch.device, dtype: torch.dtype) -> None:
    padded = (128, 192)
    images = image_batch(padded, [padded], device)
    feats = features(fpn_grids(*padded), device, dtype)
    reference = TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)(images, feats)

    ours = AnchorGenerator()(images, feats)

    assert ours.dtype == dtype
    assert torch.equal(ours, reference[0])


@pytest.mark.parametrize(
    ("padded", "grid"),
    [((224, 320), (14, 20)), ((600, 1000), (37, 62)), ((160, 480), (20, 30))],  # strides 16x16, 16x16, 8x16
)
def test_single_level_equals_torchvision_default(device: torch.device, padded, grid) -> None:
    """torchvision's default generator is the paper's 3 sizes x 3 ratios on one map; its stride is derived."""
    images = image_batch(padded, [padded], device)
    feats = features([grid], device)
    reference = TVAnchorGenerator()(images, feats)[0]

    derived = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))(images, feats)

    assert torch.equal(derived, reference)
    if padded[0] // grid[0] == padded[1] // grid[1] == 16:
        assert torch.equal(AnchorGenerator.single_level()(images, feats), reference)


def test_single_level_fixed_stride_ignores_padded_size(device: torch.device) -> None:
    """A 47-pixel side pooled to 2 cells would derive stride 23; the paper configuration keeps 16."""
    images = image_batch((47, 47), [(47, 47)], device)
    anchors = AnchorGenerator.single_level(sizes=(128,), aspect_ratios=(1.0,))(images, features([(2, 2)], device))
    expected = torch.tensor(
        [[-64, -64, 64, 64], [-48, -64, 80, 64], [-64, -48, 64, 80], [-48, -48, 80, 80]],
        dtype=torch.float32,
        device=device,
    )
    assert torch.equal(anchors, expected)


def test_hand_computed_layout(device: torch.device) -> None:
    """Ratio-major cell anchors, rounded half-sides; cells row by row; anchors of a cell together; levels in order.

    Ratio 0.5 (h/w), size 128: w = 128/sqrt(0.5) = 181.02 -> half 90.51 -> 91; h = 128*sqrt(0.5) = 90.51 -> half
    45.25 -> 45. Size 10: w = 14.14 -> half 7.07 -> 7; h = 7.07 -> half 3.54 -> 4. Ratio 2 swaps w and h.
    Second level: stride 32, size 64, ratio 1 (half 32).
    """
    generator = AnchorGenerator(((128, 10), (64,)), ((0.5, 2.0), (1.0,)), strides=(16, 32))
    images = image_batch((32, 48), [(32, 48)], device)
    anchors = generator(images, features([(1, 2), (1, 1)], device))
    cell = [[-91, -45, 91, 45], [-7, -4, 7, 4], [-45, -91, 45, 91], [-4, -7, 4, 7]]
    first_cell = torch.tensor(cell, dtype=torch.float32)
    second_cell = first_cell + torch.tensor([16.0, 0.0, 16.0, 0.0])
    level2 = torch.tensor([[-32.0, -32.0, 32.0, 32.0]])
    expected = torch.cat([first_cell, second_cell, level2]).to(device)
    assert torch.equal(anchors, expected)
    assert generator.num_anchors_per_location() == [4, 1]


@pytest.mark.exact
@given(
    sizes=st.lists(st.integers(8, 700), min_size=1, max_size=4),
    ratios=st.lists(st.floats(0.125, 8.0, width=32), min_size=1, max_size=4),
)
def test_cell_anchors_bitwise_torchvision(sizes: list[int], ratios: list[float]) -> None:
    reference = TVAnchorGenerator((tuple(sizes),), (tuple(ratios),)).cell_anchors[0]
    assert torch.equal(cell_anchors(sizes, ratios), reference)


def test_cache_reuses_grid_per_key(device: torch.device) -> None:
    generator = AnchorGenerator(cache_size=2)
    feats = features(fpn_grids(64, 64), device)
    small = image_batch((64, 64), [(64, 64)], device)
    first = generator(small, feats)
    assert generator(small, feats) is first
    assert generator(small, [f.double() for f in feats]) is not first  # dtype is part of the key
    generator(image_batch((128, 128), [(128, 128)], device), feats)  # same grid, other strides: evicts the first
    assert generator(small, feats) is not first
    assert len(generator._cache) == 2


def test_no_state_and_validation() -> None:
    assert AnchorGenerator().state_dict() == {}
    with pytest.raises(ValueError):
        AnchorGenerator(((32,), (64,)), ((1.0,),))
    with pytest.raises(ValueError):
        AnchorGenerator()(image_batch((64, 64), [(64, 64)], torch.device("cpu")), features([(16, 16)], "cpu"))
