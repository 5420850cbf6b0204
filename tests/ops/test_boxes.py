"""Box kernels against torchvision (bitwise on CPU) and against slow float64 Python loops."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st

from detect.ops.boxes import (
    BOX_FORMATS,
    IOU_BLOCK,
    _block_shape,
    batched_box_iou,
    box_area,
    box_convert,
    box_iou,
    clip_boxes,
    clip_boxes_list,
    pairwise_box_iou,
    remove_small_boxes,
    min_size_mask,
)
from tests.helpers import assert_close_to_reference, assert_matches_peer, random_boxes

pytestmark = pytest.mark.exact  # bitwise against torchvision / the reference: rerun on other vector paths

# ----------------------------------------------------------------------------------------------- helpers


def iou_reference(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes in Python floats; 0 when the union is 0 (the documented decision)."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def iou_matrix_reference(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    rows, cols = boxes1.double().tolist(), boxes2.double().tolist()
    return torch.tensor([[iou_reference(a, b) for b in cols] for a in rows], dtype=torch.float64).reshape(
        len(rows), len(cols)
    )


coordinate = st.floats(-50.0, 30_000.0, allow_nan=False, width=32)
side = st.one_of(st.just(0.0), st.floats(0.0, 600.0, width=32))
box = st.tuples(coordinate, coordinate, side, side).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
box_lists = st.lists(box, min_size=0, max_size=25)


def as_tensor(boxes: list[list[float]], device: torch.device) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------- box_convert


@pytest.mark.parametrize("in_fmt", BOX_FORMATS)
@pytest.mark.parametrize("out_fmt", BOX_FORMATS)
def test_box_convert_equals_torchvision(device: torch.device, in_fmt: str, out_fmt: str) -> None:
    boxes = random_boxes(50, 2, 3, scale=30_000.0).to(device)  # (2, 3, 50, 4), leading dims
    ours = box_convert(boxes, in_fmt, out_fmt)
    assert_matches_peer(ours, torchvision.ops.box_convert(boxes, in_fmt, out_fmt))
    assert ours.data_ptr() != boxes.data_ptr()  # always a new tensor


def convert_reference(b: list[float], in_fmt: str, out_fmt: str) -> list[float]:
    if in_fmt == "xywh":
        b = [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    elif in_fmt == "cxcywh":
        b = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]
    x1, y1, x2, y2 = b
    return {
        "xyxy": [x1, y1, x2, y2],
        "xywh": [x1, y1, x2 - x1, y2 - y1],
        "cxcywh": [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1],
    }[out_fmt]


@given(boxes=box_lists, in_fmt=st.sampled_from(BOX_FORMATS), out_fmt=st.sampled_from(BOX_FORMATS))
def test_box_convert_matches_float64_loop_and_round_trips(boxes, in_fmt: str, out_fmt: str) -> None:
    tensor = as_tensor(boxes, torch.device("cpu"))
    ours = box_convert(tensor, in_fmt, out_fmt)
    reference = torch.tensor([convert_reference(b, in_fmt, out_fmt) for b in tensor.double().tolist()]).reshape(-1, 4)
    assert_close_to_reference(ours, reference, magnitude=60_000.0)
    back = box_convert(ours, out_fmt, in_fmt)
    assert_close_to_reference(back, tensor.double(), magnitude=60_000.0)


def test_box_convert_hand_values_empty_and_bad_format(device: torch.device) -> None:
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]], device=device)
    assert box_convert(xyxy, "xyxy", "xywh").tolist() == [[10.0, 20.0, 20.0, 40.0]]
    assert box_convert(xyxy, "xyxy", "cxcywh").tolist() == [[20.0, 40.0, 20.0, 40.0]]
    assert box_convert(torch.tensor([[20.0, 40.0, 20.0, 40.0]], device=device), "cxcywh", "xywh").tolist() == [
        [10.0, 20.0, 20.0, 40.0]
    ]
    assert box_convert(torch.zeros(2, 0, 4, device=device), "xywh", "cxcywh").shape == (2, 0, 4)
    with pytest.raises(ValueError, match="box formats"):
        box_convert(xyxy, "xyxy", "xywhr")


# ----------------------------------------------------------------------------------------------- box_area


def test_box_area_equals_torchvision_and_loop(device: torch.device) -> None:
    boxes = random_boxes(300, 2, scale=30_000.0).to(device)  # (2, 300, 4)
    ours = box_area(boxes)
    assert ours.shape == (2, 300)
    assert_matches_peer(ours, torchvision.ops.box_area(boxes))
    reference = torch.tensor([[(b[2] - b[0]) * (b[3] - b[1]) for b in image] for image in boxes.double().tolist()])
    assert_close_to_reference(ours, reference, magnitude=300.0**2)


def test_box_area_upcasts_half_and_keeps_inverted_negative(device: torch.device) -> None:
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0], [5.0, 5.0, 4.0, 7.0]], device=device)
    area = box_area(boxes.half())
    assert area.dtype == torch.float32  # 90,000 overflows float16's 65,504
    assert area.tolist() == [90_000.0, -2.0]
    assert box_area(torch.zeros(0, 4, device=device)).shape == (0,)


# ----------------------------------------------------------------------------------------------- clipping


def wild_boxes(n: int, *lead: int, seed: int = 0) -> torch.Tensor:
    """Boxes sticking out of a 480 x 640 image on every side."""
    return random_boxes(n, *lead, scale=900.0, max_size=400.0, seed=seed) - 150.0


def test_clip_boxes_pair_equals_torchvision(device: torch.device) -> None:
    boxes = wild_boxes(500, 3).to(device)  # (3, 500, 4)
    assert_matches_peer(clip_boxes(boxes, (480, 640)), torchvision.ops.clip_boxes_to_image(boxes, (480, 640)))
    single = torch.tensor([480, 640], device=device)
    assert_matches_peer(clip_boxes(boxes, single), torchvision.ops.clip_boxes_to_image(boxes, (480, 640)))


def test_clip_boxes_per_image_sizes_equal_torchvision(device: torch.device) -> None:
    sizes = [(480, 640), (300, 200), (33, 1000)]
    boxes = wild_boxes(200, 3).to(device)  # (3, 200, 4)
    per_class = wild_boxes(200 * 5, 3, seed=1).to(device).view(3, 200, 5, 4)  # (B, N, K, 4)
    size_tensor = torch.tensor(sizes, device=device)  # (B, 2) int64
    clipped, clipped_per_class = clip_boxes(boxes, size_tensor), clip_boxes(per_class, size_tensor)
    for i, size in enumerate(sizes):
        assert_matches_peer(clipped[i], torchvision.ops.clip_boxes_to_image(boxes[i], size))
        assert_matches_peer(clipped_per_class[i], torchvision.ops.clip_boxes_to_image(per_class[i], size))


def test_clip_boxes_against_loop_with_nan_and_half(device: torch.device) -> None:
    boxes = torch.tensor([[-5.0, -1.0, 700.0, 500.0], [10.5, 20.5, 30.5, 40.5], [float("nan"), 1.0, 2.0, 3.0]])
    clipped = clip_boxes(boxes.to(device), (480, 640)).cpu()
    assert clipped[:2].tolist() == [[0.0, 0.0, 640.0, 480.0], [10.5, 20.5, 30.5, 40.5]]
    assert clipped[2, 0].isnan() and clipped[2, 1:].tolist() == [1.0, 2.0, 3.0]
    half = clip_boxes(boxes[:2].half().to(device), torch.tensor([[480, 640], [10, 10]], device=device))
    assert half.dtype == torch.float16
    assert half.tolist() == [[0.0, 0.0, 640.0, 480.0], [10.0, 10.0, 10.0, 10.0]]


def test_clip_boxes_list_equals_per_image_torchvision(device: torch.device) -> None:
    sizes = [(480, 640), (100, 50), (600, 300)]
    boxes = [wild_boxes(n, seed=n).to(device) for n in (40, 0, 17)]  # an image without boxes in the middle
    for given_sizes in (sizes, torch.tensor(sizes, device=device)):
        clipped = clip_boxes_list(boxes, given_sizes)
        assert [len(c) for c in clipped] == [40, 0, 17]
        for ours, b, size in zip(clipped, boxes, sizes):
            assert_matches_peer(ours, torchvision.ops.clip_boxes_to_image(b, size))
    assert clip_boxes_list([], []) == []


# ----------------------------------------------------------------------------------------------- small boxes


def test_remove_small_boxes_equals_torchvision(device: torch.device) -> None:
    boxes = random_boxes(2000, max_size=20.0).to(device)
    boxes[::7, 2] = boxes[::7, 0] + 5.0  # exactly min_size wide: kept
    for min_size in (0.0, 1e-3, 5.0, 12.5):
        ours = remove_small_boxes(boxes, min_size)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, torchvision.ops.remove_small_boxes(boxes, min_size))


@given(boxes=box_lists, min_size=st.sampled_from([0.0, 1.0, 16.0, 250.5]))
def test_min_size_mask_matches_loop(boxes, min_size: float) -> None:
    tensor = as_tensor(boxes, torch.device("cpu"))
    expected = [b[2] - b[0] >= min_size and b[3] - b[1] >= min_size for b in tensor.tolist()]
    assert min_size_mask(tensor, min_size).tolist() == expected
    assert remove_small_boxes(tensor, min_size).tolist() == [i for i, keep in enumerate(expected) if keep]


def test_min_size_mask_batched_shapes(device: torch.device) -> None:
    boxes = random_boxes(30, 2, 3, max_size=10.0).to(device)  # (2, 3, 30, 4)
    mask = min_size_mask(boxes, 4.0)
    assert mask.shape == (2, 3, 30) and mask.dtype == torch.bool
    for index in [(0, 0), (1, 2)]:
        assert torch.equal(mask[index].nonzero().squeeze(1), torchvision.ops.remove_small_boxes(boxes[index], 4.0))
    nan_box = torch.tensor([[0.0, 0.0, float("nan"), 10.0]], device=device)
    assert min_size_mask(nan_box, 1.0).tolist() == [False]
    assert remove_small_boxes(torch.zeros(0, 4, device=device), 1.0).shape == (0,)


# ----------------------------------------------------------------------------------------------- IoU


@given(boxes1=box_lists, boxes2=box_lists, block=st.sampled_from([1, 5, 64, IOU_BLOCK]))
def test_box_iou_matches_float64_loop(boxes1, boxes2, block) -> None:
    a, b = as_tensor(boxes1, torch.device("cpu")), as_tensor(boxes2, torch.device("cpu"))
    ours = box_iou(a, b, block=block)
    assert ours.shape == (len(boxes1), len(boxes2)) and ours.dtype == torch.float32
    assert not ours.isnan().any()
    assert_close_to_reference(ours, iou_matrix_reference(a, b))


@given(boxes1=box_lists, boxes2=box_lists)
def test_box_iou_equals_torchvision_where_defined(boxes1, boxes2) -> None:
    a, b = as_tensor(boxes1, torch.device("cpu")), as_tensor(boxes2, torch.device("cpu"))
    ours, peer = box_iou(a, b, block=7), torchvision.ops.box_iou(a, b)
    empty_pair = peer.isnan()  # torchvision's 0 / 0
    assert torch.equal(ours[~empty_pair], peer[~empty_pair])
    assert (ours[empty_pair] == 0).all()


@pytest.mark.parametrize(
    ("n", "m", "block"),
    [(37, 23, 1), (90, 71, 7), (1500, 1100, 1099), (1500, 1100, 1100), (1500, 1100, 1101), (1500, 1100, IOU_BLOCK)],
)
def test_box_iou_block_boundaries_equal_torchvision(device: torch.device, n: int, m: int, block) -> None:
    a = random_boxes(n, scale=3000.0, seed=1).to(device)
    b = random_boxes(m, scale=3000.0, seed=2).to(device)
    assert_matches_peer(box_iou(a, b, block=block), torchvision.ops.box_iou(a, b))


def test_box_iou_large_set_against_loop_on_sampled_pairs(device: torch.device) -> None:
    a = random_boxes(1200, scale=40_000.0, max_size=2_000.0, seed=3).to(device)
    b = random_boxes(1300, scale=40_000.0, max_size=2_000.0, seed=4).to(device)
    ours = box_iou(a, b).cpu()
    overlapping = torchvision.ops.box_iou(a, b).cpu().nonzero()  # (K, 2): sample overlaps and non-overlaps alike
    picked = overlapping[torch.randperm(len(overlapping))[:200]]  # (200, 2)
    rows = torch.cat((picked[:, 0], torch.randint(0, 1200, (200,))))
    cols = torch.cat((picked[:, 1], torch.randint(0, 1300, (200,))))
    reference = torch.tensor([iou_reference(a[i].double().tolist(), b[j].double().tolist()) for i, j in zip(rows, cols)])
    assert len(picked) == 200
    assert_close_to_reference(ours[rows, cols], reference)


def test_box_iou_hand_values_and_zero_area(device: torch.device) -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 9.0]], device=device)
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]], device=device)
    expected = [
        [50 / 150, 1.0, 0.0],
        [0.0, 0.0, 0.0],  # a point inside a box, and a point on itself (0 / 0 -> 0, not NaN)
        [0.0, 0.0, 0.0],  # a line
    ]
    assert_close_to_reference(box_iou(a, b), torch.tensor(expected))
    inverted = torch.tensor([[10.0, 10.0, 0.0, 0.0]], device=device)
    assert box_iou(inverted, a).tolist() == [[0.0, 0.0, 0.0]]
    nan = torch.tensor([[float("nan"), 0.0, 1.0, 1.0]], device=device)
    assert box_iou(nan, a).isnan().all()


@pytest.mark.parametrize(("shape1", "shape2"), [((0, 4), (5, 4)), ((5, 4), (0, 4)), ((0, 4), (0, 4))])
def test_box_iou_empty(device: torch.device, shape1, shape2) -> None:
    ours = box_iou(torch.zeros(shape1, device=device), torch.zeros(shape2, device=device))
    assert ours.shape == (shape1[0], shape2[0]) and ours.device.type == device.type


def test_box_iou_dtypes(device: torch.device) -> None:
    a, b = random_boxes(60, seed=5).to(device), random_boxes(70, seed=6).to(device)
    reference = iou_matrix_reference(a.half(), b.half())  # the float16 inputs, exactly
    for dtype in (torch.float16, torch.bfloat16):
        ours = box_iou(a.to(dtype), b.to(dtype), block=100)
        assert ours.dtype == torch.float32
        assert_close_to_reference(ours, iou_matrix_reference(a.to(dtype), b.to(dtype)))
    assert_close_to_reference(box_iou(a.half(), b.half()), reference)
    ours64 = box_iou(a.double(), b.double(), block=100)
    assert ours64.dtype == torch.float64
    assert_matches_peer(ours64, torchvision.ops.box_iou(a.double(), b.double()))
    assert box_iou(a, b.double()).dtype == torch.float64
    integer = box_iou(a.round().int(), b.round().int())
    assert integer.dtype == torch.float32
    assert_close_to_reference(integer, iou_matrix_reference(a.round(), b.round()))


def test_batched_box_iou_equals_torchvision_per_image(device: torch.device) -> None:
    a = random_boxes(45, 3, scale=500.0, seed=7).to(device)  # (3, 45, 4)
    b = random_boxes(130, 3, scale=500.0, seed=8).to(device)  # (3, 130, 4)
    for block in (1000, 45 * 130 - 1, 45 * 130 * 2 + 1, 50, IOU_BLOCK):
        ours = batched_box_iou(a, b, block=block)
        assert ours.shape == (3, 45, 130)
        for i in range(3):
            assert_matches_peer(ours[i], torchvision.ops.box_iou(a[i], b[i]))


def test_batched_box_iou_broadcast_anchors_and_empty(device: torch.device) -> None:
    gt = random_boxes(4, 2, seed=9).to(device)  # (2, 4, 4)
    anchors = random_boxes(300, seed=10).to(device)  # (300, 4) shared by both images
    ours = batched_box_iou(gt, anchors.expand(2, 300, 4), block=257)
    for i in range(2):
        assert_close_to_reference(ours[i], iou_matrix_reference(gt[i], anchors))
    assert batched_box_iou(gt[:, :0], anchors.expand(2, 300, 4)).shape == (2, 0, 300)
    assert batched_box_iou(gt[:0], anchors[None, :0].expand(0, 0, 4)).shape == (0, 4, 0)
    with pytest.raises(ValueError, match="expected"):
        batched_box_iou(gt, anchors)
    with pytest.raises(ValueError, match="block"):
        batched_box_iou(gt, gt, block=0)


@given(
    batch=st.integers(1, 5), rows=st.integers(1, 40), cols=st.integers(1, 40), block=st.integers(1, 5000)
)
def test_block_shape_is_bounded_and_covers(batch: int, rows: int, cols: int, block: int) -> None:
    images, rows_per, cols_per = _block_shape(batch, rows, cols, block)
    assert images * rows_per * cols_per <= block  # the scratch bound the docstring states
    assert 1 <= images <= batch and 1 <= rows_per <= rows and 1 <= cols_per <= cols
    if block >= batch * rows * cols:  # everything fits: one block
        assert (images, rows_per, cols_per) == (batch, rows, cols)
    if images > 1:  # images are grouped only when whole images fit
        assert (rows_per, cols_per) == (rows, cols)
    if rows_per > 1:
        assert cols_per == cols


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory statistics need CUDA")
def test_box_iou_working_memory_bound_on_cuda() -> None:
    a = random_boxes(3000, seed=11).cuda()
    b = random_boxes(2500, seed=12).cuda()
    block = 2**16
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = box_iou(a, b, block=block)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * 4
    assert extra <= 8 * block + 64 * (3000 + 2500) + 2**20  # scratch + per-box vectors + allocator rounding


def test_pairwise_box_iou_matches_loop_and_torchvision_diagonal(device: torch.device) -> None:
    a = random_boxes(400, scale=300.0, seed=13).to(device)
    b = random_boxes(400, scale=300.0, seed=14).to(device)
    b[1::9, 2:] = b[1::9, :2]  # some empty boxes
    a[1::10, 2:] = a[1::10, :2]  # and some empty pairs (1, 91, ...)
    b[::5] = a[::5]  # some identical pairs (none of them empty)
    ours = pairwise_box_iou(a, b)
    reference = torch.tensor([iou_reference(x, y) for x, y in zip(a.double().tolist(), b.double().tolist())])
    assert_close_to_reference(ours, reference)
    peer = torchvision.ops.box_iou(a, b).diagonal()
    defined = ~peer.isnan()
    assert_matches_peer(ours[defined], peer[defined])
    assert (ours[~defined] == 0).all() and (~defined).any()
    assert (ours[::5] == 1).all()


def test_pairwise_box_iou_broadcasts_and_upcasts(device: torch.device) -> None:
    a = random_boxes(20, 3, seed=15).to(device)  # (3, 20, 4)
    b = random_boxes(20, seed=16).to(device)  # (20, 4)
    ours = pairwise_box_iou(a.half(), b.half())
    assert ours.shape == (3, 20) and ours.dtype == torch.float32
    for i in range(3):
        reference = [iou_reference(x, y) for x, y in zip(a[i].half().double().tolist(), b.half().double().tolist())]
        assert_close_to_reference(ours[i], torch.tensor(reference))
    assert pairwise_box_iou(a[:, :0], b[:0]).shape == (3, 0)
    assert math.isclose(pairwise_box_iou(a[0, :1], a[0, :1]).item(), 1.0)


def test_iou_autograd(device: torch.device) -> None:
    """The blocked matrix is for matching (no gradient, no error on inputs that need one); pairwise is differentiable."""
    a = random_boxes(5, seed=17).to(device).requires_grad_()
    b = random_boxes(6, seed=18).to(device)
    assert not box_iou(a, b).requires_grad
    pairwise_box_iou(a, b[:5]).sum().backward()
    assert a.grad is not None and a.grad.isfinite().all()
