"""Tests for detect.ops.pooling against independent references.

- RoI wrappers: torchvision.ops called directly with hand-built (K, 5) RoIs.
- SPP: a float64 Python loop taking each bin's max over its explicit cell range (the documented floor/ceil
  partition), and ``adaptive_max_pool2d`` of each clipped window (PyTorch's own, integer, partition).
- Region warping: a float64 Python loop sampling each output pixel centre bilinearly with explicit fill, and
  ``cv2.resize(INTER_LINEAR)`` of a crop inside the image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detect.ops import dispatch
from detect.ops.pooling import boxes_to_rois, roi_align, roi_pool, spatial_pyramid_pool, warp_regions

# The device fixture keeps one value for all examples of a hypothesis test.
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- boxes_to_rois ---------------------------------------------------------------------------------------------


def test_boxes_to_rois_mixed_and_empty_images(device):
    boxes = [torch.rand(2, 4, device=device), torch.zeros(0, 4, device=device), torch.rand(3, 4, device=device)]
    rois = boxes_to_rois(boxes)
    expected = [[float(i)] + row for i, b in enumerate(boxes) for row in b.tolist()]
    assert rois.device.type == device.type and rois.dtype == torch.float32
    assert rois.tolist() == expected


def test_boxes_to_rois_empty_inputs(device):
    assert boxes_to_rois([]).shape == (0, 5)
    assert boxes_to_rois([]).dtype == torch.float32
    none = boxes_to_rois([torch.zeros(0, 4, dtype=torch.float64, device=device)] * 3)
    assert none.shape == (0, 5) and none.dtype == torch.float64 and none.device.type == device.type
    given_kind = boxes_to_rois([], dtype=torch.float16, device=device)
    assert given_kind.dtype == torch.float16 and given_kind.device.type == device.type


def test_boxes_to_rois_casts_to_requested_dtype(device):
    rois = boxes_to_rois([torch.tensor([[1.5, 2.0, 3.0, 4.0]], device=device)], dtype=torch.float64)
    assert rois.dtype == torch.float64 and rois.tolist() == [[0.0, 1.5, 2.0, 3.0, 4.0]]


# --- roi_align / roi_pool wrappers -----------------------------------------------------------------------------


def _two_image_case(device, dtype=torch.float32):
    features = torch.randn(2, 3, 12, 15, device=device, dtype=dtype)
    boxes = [
        torch.tensor([[0.0, 0.0, 20.0, 16.0], [4.5, 3.2, 30.0, 22.7]], device=device),
        torch.tensor([[8.0, 1.0, 9.0, 40.0]], device=device),
    ]
    hand = torch.tensor(
        [[0, 0.0, 0.0, 20.0, 16.0], [0, 4.5, 3.2, 30.0, 22.7], [1, 8.0, 1.0, 9.0, 40.0]], device=device
    )
    return features, boxes, hand


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_matches_torchvision(device, aligned, sampling_ratio):
    features, boxes, hand = _two_image_case(device)
    expected = torchvision.ops.roi_align(features, hand, (4, 5), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(roi_align(features, boxes, (4, 5), 0.5, sampling_ratio, aligned), expected)
    torch.testing.assert_close(roi_align(features, hand, (4, 5), 0.5, sampling_ratio, aligned), expected)


def test_roi_pool_matches_torchvision(device):
    features, boxes, hand = _two_image_case(device)
    expected = torchvision.ops.roi_pool(features, hand, 3, 0.5)
    torch.testing.assert_close(roi_pool(features, boxes, 3, 0.5), expected)
    torch.testing.assert_close(roi_pool(features, hand.double(), 3, 0.5), expected)


def test_roi_wrappers_half_features(device):
    features, boxes, hand = _two_image_case(device, torch.float16)
    pooled = roi_align(features, boxes, 4, 0.5, 2)
    maxed = roi_pool(features, boxes, 4, 0.5)
    assert pooled.dtype == maxed.dtype == torch.float16
    expected = torchvision.ops.roi_align(features.float(), hand, 4, 0.5, 2)
    torch.testing.assert_close(pooled.float(), expected, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(maxed.float(), torchvision.ops.roi_pool(features.float(), hand, 4, 0.5))


def test_roi_wrappers_no_boxes(device):
    features = torch.randn(2, 3, 8, 8, device=device)
    empty = [torch.zeros(0, 4, device=device)] * 2
    assert roi_align(features, empty, 2, 1.0).shape == (0, 3, 2, 2)
    assert roi_pool(features, empty, 2, 1.0).shape == (0, 3, 2, 2)


def test_roi_wrappers_reject_bad_boxes(device):
    features = torch.randn(2, 3, 8, 8, device=device)
    with pytest.raises(ValueError):
        roi_align(features, [torch.zeros(1, 4, device=device)], 2, 1.0)
    with pytest.raises(ValueError):
        roi_pool(features, torch.zeros(3, 4, device=device), 2, 1.0)


def _gradients(features, rois, grad, size, scale, sampling, aligned, pool=roi_align):
    leaf = features.clone().requires_grad_(True)
    pooled = pool(leaf, rois, size, scale, sampling, aligned)
    if pool is roi_align and features.dtype == torch.float32:  # our gradient ran, not torchvision's
        assert "RoIAlignGrad" in pooled.grad_fn.name()
    (out,) = torch.autograd.grad(pooled, leaf, grad)
    return out


def _random_rois(generator, images, rois, height, width, scale):
    """RoIs of random images (some images get none), some reaching past the map, some reversed (x2 < x1)."""
    index = torch.randint(0, images, (rois, 1), generator=generator).float()
    index[index == images - 1] = 0  # the last image has no RoI
    corner = torch.rand(rois, 2, generator=generator) * torch.tensor([width, height]) / scale * 1.2 - 3 / scale
    side = (torch.rand(rois, 2, generator=generator) - 0.1) * torch.tensor([width, height]) / scale * 0.8
    return torch.cat([index, corner, corner + side], 1)


@pytest.mark.exact
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2, 3])
@pytest.mark.parametrize("shape,rois,scale", [((3, 5, 13, 17), 40, 0.5), ((2, 64, 24, 40), 300, 0.125)])
def test_roi_align_gradient_is_torchvisions_bit_for_bit(aligned, sampling_ratio, shape, rois, scale):
    """The float32 CPU gradient (detect.ops._cpu.roi_align_backward) against torchvision's own backward, exactly:
    the same terms in the same order for each element. The larger case splits the images over threads."""
    g = torch.Generator().manual_seed(sampling_ratio + 10 * aligned + shape[1])
    features = torch.randn(*shape, generator=g)
    boxes = _random_rois(g, shape[0], rois, shape[2], shape[3], scale)
    grad = torch.randn(rois, shape[1], 7, 6, generator=g)
    expected = _gradients(features, boxes, grad, (7, 6), scale, sampling_ratio, aligned, torchvision.ops.roi_align)
    got = _gradients(features, boxes, grad, (7, 6), scale, sampling_ratio, aligned)
    assert torch.equal(got, expected)
    assert got.abs().sum() > 0  # the RoIs did reach the maps


@pytest.mark.exact
def test_roi_align_gradient_of_a_strided_grad_and_any_thread_count():
    """A non-contiguous incoming gradient, per-image box lists, and one or two threads: torchvision's result."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(4, 32, 20, 30, generator=g)
    boxes = _random_rois(g, 4, 200, 20, 30, 0.25)
    grad = torch.randn(200, 7, 7, 32, generator=g).permute(0, 3, 1, 2)  # (K, C, 7, 7) channels-last strides
    expected = _gradients(features, boxes, grad, 7, 0.25, 2, False, torchvision.ops.roi_align)
    lists = [boxes[boxes[:, 0] == i, 1:] for i in range(4)]
    order = torch.argsort(boxes[:, 0], stable=True)  # the lists' image-major order
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaf = features.clone().requires_grad_(True)
            pooled = roi_align(leaf, lists, 7, 0.25, 2)
            assert "RoIAlignGrad" in pooled.grad_fn.name()
            (got,) = torch.autograd.grad(pooled, leaf, grad[order])
            assert torch.equal(got, expected), count
    finally:
        torch.set_num_threads(threads)


def test_roi_align_gradient_leaves_other_paths_to_torchvision():
    """float64 features, features without gradient and the forward under no_grad take torchvision's path."""
    g = torch.Generator().manual_seed(6)
    features = torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64)
    boxes = _random_rois(g, 2, 20, 10, 10, 1.0).double()
    grad = torch.randn(20, 3, 2, 2, generator=g, dtype=torch.float64)
    expected = _gradients(features, boxes, grad, 2, 1.0, 2, False, torchvision.ops.roi_align)
    assert torch.equal(_gradients(features, boxes, grad, 2, 1.0, 2, False), expected)
    with torch.no_grad():
        assert roi_align(features.float(), boxes.float(), 2, 1.0, 2).grad_fn is None


# --- spatial_pyramid_pool --------------------------------------------------------------------------------------


def _spp_reference(features: torch.Tensor, rois: torch.Tensor, levels=(1, 2, 3, 6)) -> np.ndarray:
    """float64 loop: round and clip corners, split n cells into bins [lo + floor(i n / l), lo + ceil((i+1) n / l))
    and take each bin's max over its explicit cells, laid out level by level as (C, l, l)."""
    maps = features.detach().double().cpu().numpy()
    _, channels, height, width = maps.shape
    rows = []
    for b, x1, y1, x2, y2 in rois.double().cpu().tolist():
        xa, xb = (min(max(round(v), 0), width - 1) for v in (x1, x2))
        ya, yb = (min(max(round(v), 0), height - 1) for v in (y1, y2))
        xb, yb = max(xb, xa), max(yb, ya)
        nx, ny = xb - xa + 1, yb - ya + 1
        row = []
        for level in levels:
            block = np.empty((channels, level, level))
            for i in range(level):
                y0, y1_ = ya + (i * ny) // level, ya + math.ceil((i + 1) * ny / level)
                for j in range(level):
                    x0, x1_ = xa + (j * nx) // level, xa + math.ceil((j + 1) * nx / level)
                    assert y1_ > y0 and x1_ > x0
                    block[:, i, j] = maps[int(b), :, y0:y1_, x0:x1_].max(axis=(1, 2))
            row.append(block.reshape(-1))
        rows.append(np.concatenate(row))
    return np.array(rows).reshape(len(rois), channels * sum(l * l for l in levels))


def _rois(rows, device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(-1, 5)


EDGE_ROIS = [
    [0, 3, 4, 3, 4],  # 1x1 window
    [0, 0, 0, 10, 8],  # the whole map
    [1, -5, -7, 30, 25],  # bigger than the map on every side
    [1, 2, 0, 2, 8],  # one column
    [0, 0, 5, 10, 5],  # one row
    [0, 6, 1, 8, 2],  # 3x2, smaller than the finest level
    [1, 9, 6, 14, 11],  # partly outside (bottom right)
    [0, 20, 20, 25, 30],  # entirely outside: the corner cell
    [1, 5, 5, 3, 3],  # x2 < x1: one cell
]


def test_spp_edge_windows_match_reference(device):
    features = torch.randn(2, 3, 9, 11, device=device)
    rois = _rois(EDGE_ROIS, device)
    pooled = spatial_pyramid_pool(features, rois)
    assert pooled.shape == (len(EDGE_ROIS), 50 * 3)
    np.testing.assert_array_equal(pooled.double().cpu().numpy(), _spp_reference(features, rois))


def test_spp_single_cell_window_repeats_its_value(device):
    features = torch.randn(1, 2, 5, 5, device=device)
    pooled = spatial_pyramid_pool(features, _rois([0, 1, 2, 1, 2], device))[0].cpu()
    cell = features[0, :, 2, 1].cpu()  # (C,)
    assert torch.equal(pooled, torch.stack([cell[_channel_of(i, 2)] for i in range(100)]))


@pytest.mark.parametrize("levels", [(1,), (4, 2), (1, 2, 3, 4, 5, 7)])
def test_spp_custom_levels(device, levels):
    features = torch.randn(2, 4, 13, 8, device=device)
    rois = _rois(EDGE_ROIS, device)
    pooled = spatial_pyramid_pool(features, rois, levels)
    assert pooled.shape == (len(EDGE_ROIS), 4 * sum(l * l for l in levels))
    np.testing.assert_array_equal(pooled.double().cpu().numpy(), _spp_reference(features, rois, levels))


@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    corners=st.lists(st.tuples(st.integers(0, 2), *[st.integers(-4, 16)] * 4), min_size=0, max_size=6),
)
@FIXTURE_OK
def test_spp_random_windows_match_both_references(device, height, width, corners):
    features = torch.randn(3, 2, height, width, device=device)
    rois = _rois([list(c) for c in corners], device)
    pooled = spatial_pyramid_pool(features, rois)
    assert pooled.shape == (len(corners), 100)
    np.testing.assert_array_equal(pooled.double().cpu().numpy(), _spp_reference(features, rois))
    for k, (b, x1, y1, x2, y2) in enumerate(rois.long().tolist()):
        x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        x2, y2 = max(min(x2, width - 1), x1), max(min(y2, height - 1), y1)
        window = features[b, :, y1 : y2 + 1, x1 : x2 + 1]
        adaptive = torch.cat([F.adaptive_max_pool2d(window, l).reshape(-1) for l in (1, 2, 3, 6)])
        assert torch.equal(pooled[k], adaptive)


def test_spp_half_features(device):
    features = torch.randn(2, 3, 9, 11, device=device).half()
    rois = _rois(EDGE_ROIS, device)
    pooled = spatial_pyramid_pool(features, rois)
    assert pooled.dtype == torch.float16
    np.testing.assert_array_equal(pooled.double().cpu().numpy(), _spp_reference(features, rois))


def test_spp_no_rois_and_bad_input(device):
    features = torch.randn(2, 3, 4, 4, device=device)
    assert spatial_pyramid_pool(features, torch.zeros(0, 5, device=device)).shape == (0, 150)
    with pytest.raises(ValueError):
        spatial_pyramid_pool(features, torch.zeros(2, 4, device=device))
    with pytest.raises(ValueError):
        spatial_pyramid_pool(features, torch.zeros(2, 5, device=device), levels=(0, 2))


def test_spp_gradient_goes_to_each_bins_argmax(device):
    features = torch.randn(2, 2, 7, 9, device=device, dtype=torch.float64, requires_grad=True)
    rois = _rois(EDGE_ROIS, device)
    pooled = spatial_pyramid_pool(features, rois)
    pooled.sum().backward()
    # Reference: every bin adds 1 to the (unique, random data) cell holding its max.
    expected = torch.zeros_like(features).cpu()
    maps = features.detach().cpu()
    reference = torch.from_numpy(_spp_reference(maps, rois))
    for k, b in enumerate(rois[:, 0].long().tolist()):
        values = reference[k].view(-1)
        for value_index, value in enumerate(values.tolist()):
            channel = _channel_of(value_index, 2)
            hits = (maps[b, channel] == value).nonzero()
            assert len(hits) == 1
            expected[b, channel, hits[0, 0], hits[0, 1]] += 1
    torch.testing.assert_close(features.grad.cpu(), expected)
    with torch.no_grad():
        torch.testing.assert_close(spatial_pyramid_pool(features, rois), pooled.detach())


def _channel_of(index: int, channels: int, levels=(1, 2, 3, 6)) -> int:
    """Channel of entry ``index`` of one SPP output row with the (C, l, l)-per-level layout."""
    for level in levels:
        size = channels * level * level
        if index < size:
            return index // (level * level)
        index -= size
    raise IndexError(index)


# --- the SPP backends: the fused CPU loop and the torch reference, each against the float64 loop -------------


SPP_BACKENDS = ("torch", "numba")


@pytest.mark.parametrize("backend", SPP_BACKENDS)
@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (6, 3, 2, 1), (4, 2, 3, 5, 1), (2, 2), (7,), (1, 4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spp_backends_match_loop_reference(backend, levels, dtype):
    features = torch.randn(2, 5, 13, 17, dtype=dtype)
    rois = _rois(EDGE_ROIS, "cpu")
    with dispatch.use_backend(backend):
        pooled = spatial_pyramid_pool(features, rois, levels)
    assert pooled.dtype == dtype and pooled.shape == (len(EDGE_ROIS), 5 * sum(l * l for l in levels))
    np.testing.assert_array_equal(pooled.double().numpy(), _spp_reference(features, rois, levels))


@pytest.mark.parametrize("backend", SPP_BACKENDS)
def test_spp_backends_many_windows_split_over_threads(backend):
    # 300 windows x 64 channels x 50 bins is far above dispatch.PARALLEL_WORK: the loop runs on several threads.
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3, 64, 21, 26, generator=generator)
    corners = torch.rand(300, 4, generator=generator) * torch.tensor([30.0, 25.0, 30.0, 25.0]) - 2
    image = torch.randint(0, 3, (300, 1), generator=generator).float()
    first, last = torch.minimum(corners[:, :2], corners[:, 2:]), torch.maximum(corners[:, :2], corners[:, 2:])
    rois = torch.cat([image, first, last], 1)
    assert 300 * 64 * 50 > dispatch.PARALLEL_WORK
    with dispatch.use_backend(backend), torch.inference_mode():
        pooled = spatial_pyramid_pool(features, rois)
    np.testing.assert_array_equal(pooled.double().numpy(), _spp_reference(features, rois))


@pytest.mark.parametrize("backend", SPP_BACKENDS)
def test_spp_writes_into_a_given_buffer(backend):
    features = torch.randn(2, 3, 9, 11)
    rois = _rois(EDGE_ROIS, "cpu")
    expected = _spp_reference(features, rois)
    with dispatch.use_backend(backend):
        buffer = torch.full((len(EDGE_ROIS), 150), 7.0)
        assert spatial_pyramid_pool(features, rois, out=buffer) is buffer
        np.testing.assert_array_equal(buffer.double().numpy(), expected)
        strided = torch.full((150, len(EDGE_ROIS)), 7.0).T  # not contiguous
        spatial_pyramid_pool(features, rois, out=strided)
        np.testing.assert_array_equal(strided.double().numpy(), expected)
        with pytest.raises(ValueError):
            spatial_pyramid_pool(features, rois, out=torch.empty(len(EDGE_ROIS), 149))


def test_spp_fused_loop_propagates_nan_like_the_reference():
    features = torch.randn(1, 3, 8, 8)
    features[0, 1, 2, 5] = float("nan")
    rois = _rois([[0, 0, 0, 7, 7], [0, 4, 1, 6, 3], [0, 0, 4, 3, 7]], "cpu")
    with dispatch.use_backend("numba"):
        fused = spatial_pyramid_pool(features, rois)
    with dispatch.use_backend("torch"):
        reference = spatial_pyramid_pool(features, rois)
    assert torch.equal(fused.isnan(), reference.isnan()) and bool(fused.isnan().any())
    assert torch.equal(fused.nan_to_num(0.0), reference.nan_to_num(0.0))


def test_spp_fused_loop_rejects_rois_of_missing_images():
    with dispatch.use_backend("numba"), pytest.raises(IndexError):
        spatial_pyramid_pool(torch.randn(2, 3, 8, 8), _rois([[2, 0, 0, 3, 3]], "cpu"))


def test_spp_level_plan_merges_from_the_smallest_multiple():
    from detect.ops.spp import level_plan

    levels, offsets, sources = level_plan((1, 2, 3, 6))
    assert levels.tolist() == [6, 3, 2, 1]
    assert offsets.tolist() == [14, 5, 1, 0]  # first bin of each level in output order 1, 2, 3, 6
    assert sources.tolist() == [-1, 0, 0, 2]  # 3 and 2 from 6, 1 from 2
    assert level_plan((5, 4, 2))[2].tolist() == [-1, -1, 1]  # 5 and 4 read the map, 2 merges from 4


# --- warp_regions ----------------------------------------------------------------------------------------------


def _warp_reference(image, box, size, padding, mode, fill):
    """float64 loop: dilate the box by S / (S - 2p) about its centre, pick the sampled window (the dilated box,
    or the square on its longer side), and for each output pixel centre either fill (outside the image or the
    dilated box) or sample bilinearly between pixel centres with edge clamping. Also returns which pixels sit
    within 1e-4 px of a fill boundary (either answer is right there)."""
    img = image.detach().double().cpu().numpy()
    channels, height, width = img.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
    cx, cy = x1 + w / 2, y1 + h / 2
    scale = size / (size - 2 * padding)
    dw, dh = w * scale, h * scale
    ww, wh = (dw, dh) if mode == "anisotropic" else (max(dw, dh),) * 2
    fills = np.broadcast_to(np.asarray(fill, dtype=np.float64), (channels,))
    out = np.empty((channels, size, size))
    unsure = np.zeros((size, size), dtype=bool)
    for i in range(size):
        v = cy - wh / 2 + (i + 0.5) * wh / size
        for j in range(size):
            u = cx - ww / 2 + (j + 0.5) * ww / size
            limits = [(u, 0.0, width), (v, 0.0, height), (u, cx - dw / 2, cx + dw / 2), (v, cy - dh / 2, cy + dh / 2)]
            shown = all(lo <= t <= hi for t, lo, hi in limits)
            unsure[i, j] = any(min(abs(t - lo), abs(t - hi)) < 1e-4 for t, lo, hi in limits)
            out[:, i, j] = _bilinear(img, u - 0.5, v - 0.5) if shown else fills
    return out, unsure


def _bilinear(img, x, y):
    _, height, width = img.shape
    x, y = min(max(x, 0.0), width - 1), min(max(y, 0.0), height - 1)
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    ax, ay = x - x0, y - y0
    top = (1 - ax) * img[:, y0, x0] + ax * img[:, y0, x1]
    bottom = (1 - ax) * img[:, y1, x0] + ax * img[:, y1, x1]
    return (1 - ay) * top + ay * bottom


def _check_warp(crops, images, boxes, size, padding, mode, fill, atol):
    k = 0
    for image, image_boxes in zip(images, boxes):
        for box in image_boxes.tolist():
            expected, unsure = _warp_reference(image, box, size, padding, mode, fill)
            got = crops[k].double().cpu().numpy()
            np.testing.assert_allclose(got[:, ~unsure], expected[:, ~unsure], atol=atol, rtol=0, err_msg=str(box))
            k += 1
    assert k == len(crops)


WARP_BOXES_A = [  # on a 20 (H) x 30 (W) image
    [5.0, 4.0, 17.0, 15.0],  # inside, dilated box inside too
    [0.0, 0.0, 30.0, 20.0],  # the whole image: the context is all fill
    [-6.0, 12.5, 9.3, 27.0],  # outside on the left and the bottom
    [22.2, -3.0, 41.0, 6.1],  # outside on the right and the top
    [10.0, 5.0, 10.0, 14.0],  # zero width
    [3.0, 7.0, 3.0, 7.0],  # a point
    [12.0, 9.0, 8.0, 6.0],  # x2 < x1, y2 < y1: a point at (12, 9)
    [40.0, 30.0, 50.0, 45.0],  # entirely outside: all fill
]
WARP_BOXES_B = [  # on a 25 (H) x 18 (W) image
    [1.5, 2.0, 16.0, 6.0],  # wide
    [7.0, 0.0, 9.5, 25.0],  # tall, touching top and bottom
]


@pytest.mark.parametrize("mode", ["anisotropic", "isotropic"])
def test_warp_regions_matches_reference(device, mode):
    images = [torch.rand(3, 20, 30, device=device), torch.rand(3, 25, 18, device=device)]
    boxes = [torch.tensor(WARP_BOXES_A, device=device), torch.tensor(WARP_BOXES_B, device=device)]
    crops = warp_regions(images, boxes, output_size=16, context_padding=2, mode=mode, fill=(0.25, -1.0, 2.0))
    assert crops.shape == (10, 3, 16, 16) and crops.dtype == torch.float32
    assert not crops.isnan().any()
    _check_warp(crops, images, boxes, 16, 2, mode, (0.25, -1.0, 2.0), atol=1e-5)


@given(
    data=st.lists(
        st.tuples(*[st.floats(-12.0, 40.0, allow_nan=False)] * 4), min_size=0, max_size=4
    ),
    size=st.integers(3, 12),
    padding_fraction=st.floats(0.0, 0.49),
    mode=st.sampled_from(["anisotropic", "isotropic"]),
    fill=st.floats(-2.0, 2.0),
)
@FIXTURE_OK
def test_warp_regions_random_boxes(device, data, size, padding_fraction, mode, fill):
    padding = int(padding_fraction * size)
    images = [torch.rand(2, h, w, dtype=torch.float64, device=device) for h, w in ((20, 30), (11, 7))]
    boxes = [torch.tensor(d, device=device).reshape(-1, 4) for d in (data, data[:2])]
    crops = warp_regions(images, boxes, size, padding, mode, fill)
    assert crops.dtype == torch.float64
    _check_warp(crops, images, boxes, size, padding, mode, fill, atol=1e-9)


def test_warp_regions_batch_tensor_equals_list(device):
    images = torch.rand(2, 3, 20, 30, device=device)
    boxes = [torch.tensor(WARP_BOXES_A[:4], device=device), torch.tensor(WARP_BOXES_A[3:], device=device)]
    crops = warp_regions(images, boxes, 16, 2, fill=0.5)
    assert crops.shape == (9, 3, 16, 16)
    _check_warp(crops, list(images), boxes, 16, 2, "anisotropic", 0.5, atol=1e-5)


def test_warp_regions_half_images(device):
    images = [torch.rand(3, 20, 30, device=device).half()]
    boxes = [torch.tensor(WARP_BOXES_A, device=device)]
    crops = warp_regions(images, boxes, 16, 2, mode="isotropic")
    assert crops.dtype == torch.float16
    _check_warp(crops, images, boxes, 16, 2, "isotropic", 0.0, atol=1e-3)


def test_warp_regions_matches_cv2_resize_of_inner_crop(device):
    """The dilated box [10, 3, 50, 55] has integral corners and lies inside the image: the crop must equal
    cv2.resize of image[3:55, 10:50] with INTER_LINEAR. The crop is larger than S in both directions, so cv2's
    clamping at the crop's own edges never comes into play. Tolerance 1e-6: float32 arithmetic on both sides
    (measured difference 1.2e-7; a half-pixel shift of the box gives 0.45)."""
    image = np.random.default_rng(0).random((64, 72, 3), dtype=np.float32)  # HWC for cv2
    scale = 16 / (16 - 2 * 2)
    box = [30 - 20 / scale, 29 - 26 / scale, 30 + 20 / scale, 29 + 26 / scale]  # dilates to [10, 3, 50, 55]
    tensor = torch.from_numpy(image).permute(2, 0, 1).to(device)
    crops = warp_regions([tensor], [torch.tensor([box], device=device)], 16, 2)
    expected = cv2.resize(image[3:55, 10:50], (16, 16), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(crops[0].permute(1, 2, 0).cpu().numpy(), expected, atol=1e-6, rtol=0)


def test_warp_regions_without_boxes(device):
    images = [torch.rand(3, 20, 30, device=device), torch.rand(3, 8, 9, device=device)]
    assert warp_regions(images, [torch.zeros(0, 4, device=device)] * 2, 16, 2).shape == (0, 3, 16, 16)
    assert warp_regions([], [], 16, 2).shape == (0, 3, 16, 16)
    boxes = [torch.zeros(0, 4, device=device), torch.tensor([[1.0, 1, 5, 5]], device=device)]
    one = warp_regions(images, boxes, 8, 1)
    assert one.shape == (1, 3, 8, 8)
    _check_warp(one, images, boxes, 8, 1, "anisotropic", 0.0, 1e-5)


def test_warp_regions_rejects_bad_arguments(device):
    images = [torch.rand(3, 8, 8, device=device)]
    boxes = [torch.zeros(1, 4, device=device)]
    for kwargs in ({"mode": "squash"}, {"output_size": 8, "context_padding": 4}, {"fill": (1.0, 2.0)}):
        with pytest.raises(ValueError):
            warp_regions(images, boxes, **kwargs)
    with pytest.raises(ValueError):
        warp_regions(images, boxes * 2)
    with pytest.raises(ValueError):
        warp_regions([torch.zeros(3, 8, 8, dtype=torch.uint8, device=device)], boxes)
