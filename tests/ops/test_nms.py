"""NMS kernels against independent references: a float64 pure-Python greedy NMS and torchvision's ops.

Random cases use half-integer coordinates and dyadic thresholds, so the float32 IoU of the kernels and the float64
IoU of the reference fall on the same side of the threshold (their ratios are far from it unless equal to it).
Every strategy of :func:`grouped_nms` is checked everywhere ("per_group" only exists on the CPU; "fused" is the
numba loop on the CPU and the Triton kernel on CUDA).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detect.ops.nms import NMSResult, batched_nms, grouped_nms, multiclass_nms, nms

FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
DYADIC_THRESHOLDS = [0.0, 0.25, 0.375, 0.5, 0.75]


@pytest.fixture(params=["per_group", "chunked", "fused"])
def strategy(request, device: torch.device) -> str:
    if request.param == "per_group" and device.type != "cpu":
        pytest.skip("per_group runs torchvision's CPU kernel")
    return request.param


# --- references ----------------------------------------------------------------------------------------------


def iou64(a: list[float], b: list[float]) -> float:
    """IoU in float64; 0/0 (two empty boxes) is NaN, which suppresses nothing, as in torchvision."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union != 0 else math.nan


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Greedy NMS: visit by (score descending, index), keep a box unless a kept one has IoU > thr with it."""
    b, s = boxes.double().tolist(), scores.double().tolist()
    kept: list[int] = []
    for i in sorted(range(len(s)), key=lambda i: (-s[i], i)):
        if not any(iou64(b[i], b[j]) > thr for j in kept):
            kept.append(i)
    return kept


def reference_grouped(boxes, scores, groups, images, num_images, thr, cap=None) -> list[list[int]]:
    """NMS per (image, group) with :func:`reference_nms`, merged by (score descending, index), capped."""
    boxes, scores, groups, images = (t.cpu() for t in (boxes, scores, groups, images))
    s = scores.double().tolist()
    out = []
    for image in range(num_images):
        kept = []
        for group in groups[images == image].unique().tolist():
            members = torch.nonzero((images == image) & (groups == group)).squeeze(1)
            kept += members[reference_nms(boxes[members], scores[members], thr)].tolist()
        out.append(sorted(kept, key=lambda i: (-s[i], i))[:cap])
    return out


def reference_multiclass(boxes, scores, thr, score_thr=0.0, topk=None, cap=None) -> list[list[tuple]]:
    """Per image and class: score filter, top-k, ``torchvision.ops.nms``; merged by (score, row, class), capped.

    Returns ``(score, row, class)`` triples (float64 score), one list per image.
    """
    out = []
    for b, s in zip(boxes, scores):
        b, s = b.cpu().float(), s.cpu().float()
        values = s.double().tolist()  # values[row][class]
        dets = []
        for c in range(s.shape[1]):
            rows = [r for r in range(s.shape[0]) if values[r][c] > score_thr]
            rows = torch.tensor(sorted(rows, key=lambda r: (-values[r][c], r))[:topk], dtype=torch.int64)
            class_boxes = b[rows] if b.ndim == 2 else b[rows, c]
            keep = torchvision.ops.nms(class_boxes.reshape(-1, 4), s[rows, c], thr)
            dets += [(values[r][c], r, c) for r in rows[keep].tolist()]
        out.append(sorted(dets, key=lambda d: (-d[0], d[1], d[2]))[:cap])
    return out


def as_triples(result: NMSResult) -> list[tuple]:
    return list(zip(result.scores.double().tolist(), result.indices.tolist(), result.labels.tolist()))


def realistic_head(n_images: int, rows: list[int], classes: int, class_specific: bool, seed: int = 0):
    """Detector-head-like outputs: boxes jittered around a few objects, softmax-like continuous scores."""
    g = torch.Generator().manual_seed(seed)
    boxes, scores = [], []
    for n in rows[:n_images]:
        centres = torch.rand(6, 2, generator=g) * 400
        pick = torch.randint(0, 6, (n,), generator=g)
        size = 40 + 80 * torch.rand(n, 2, generator=g)
        centre = centres[pick] + 10 * torch.randn(n, 2, generator=g)
        base = torch.cat([centre - size / 2, centre + size / 2], 1)  # (n, 4)
        if class_specific:
            base = base[:, None, :] + 4 * torch.randn(n, classes, 4, generator=g)  # (n, C, 4)
        boxes.append(base)
        scores.append(torch.rand(n, classes, generator=g) ** 3)  # mostly small, as after a softmax
    return boxes, scores


# --- random cases against the float64 reference ---------------------------------------------------------------


@st.composite
def candidates(draw, max_boxes: int = 40, max_groups: int = 3, max_images: int = 3):
    """Half-integer boxes (zero-size ones included), signed scores on a coarse grid (many ties), groups, images."""
    n = draw(st.integers(0, max_boxes))
    corner = st.tuples(st.integers(0, 48), st.integers(0, 48), st.integers(0, 24), st.integers(0, 24))
    raw = draw(st.lists(corner, min_size=n, max_size=n))
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw], dtype=torch.float32).reshape(n, 4) / 2
    scores = torch.tensor(draw(st.lists(st.integers(-3, 8), min_size=n, max_size=n)), dtype=torch.float32) / 8
    groups = torch.tensor(draw(st.lists(st.integers(0, max_groups - 1), min_size=n, max_size=n)), dtype=torch.int64)
    num_images = draw(st.integers(1, max_images))
    images = torch.tensor(draw(st.lists(st.integers(0, num_images - 1), min_size=n, max_size=n)), dtype=torch.int64)
    return boxes, scores, groups, images, num_images


@FIXTURE_OK
@given(case=candidates(max_groups=1, max_images=1), thr=st.sampled_from(DYADIC_THRESHOLDS))
def test_nms_random_matches_reference_and_torchvision(device, case, thr) -> None:
    boxes, scores = case[0], case[1]
    expected = reference_nms(boxes, scores, thr)

    ours = nms(boxes.to(device), scores.to(device), thr)

    assert ours.dtype == torch.int64 and ours.device.type == device.type
    assert ours.tolist() == expected == torchvision.ops.nms(boxes, scores, thr).tolist()


@FIXTURE_OK
@given(
    case=candidates(),
    thr=st.sampled_from(DYADIC_THRESHOLDS),
    cap=st.one_of(st.none(), st.integers(0, 12)),
    chunk=st.sampled_from([1, 3, 8, 256]),
)
def test_grouped_random_matches_reference(device, strategy, case, thr, cap, chunk) -> None:
    boxes, scores, groups, images, num_images = case
    expected = reference_grouped(boxes, scores, groups, images, num_images, thr, cap)
    args = [t.to(device) for t in (boxes, scores, groups, images)]

    ours = grouped_nms(*args, num_images, thr, cap, strategy=strategy, chunk_size=chunk)

    assert [k.tolist() for k in ours] == expected
    assert all(k.dtype == torch.int64 and k.device.type == device.type for k in ours)


@FIXTURE_OK
@given(case=candidates(max_images=1), thr=st.sampled_from(DYADIC_THRESHOLDS))
def test_batched_nms_random_matches_reference(device, case, thr) -> None:
    boxes, scores, groups = case[:3]
    expected = reference_grouped(boxes, scores, groups, torch.zeros_like(groups), 1, thr)[0]

    ours = batched_nms(boxes.to(device), scores.to(device), groups.to(device), thr)

    assert ours.tolist() == expected


def test_batched_nms_matches_torchvision_with_distinct_scores(device) -> None:
    """torchvision's final merge sort is not stable, so compare on distinct scores (both of its code paths)."""
    for n in (300, 3000):  # under and over torchvision's 4,000-coordinate switch to its per-class loop
        boxes, scores = realistic_head(1, [n], 1, class_specific=False, seed=n)
        boxes, scores = boxes[0], scores[0][:, 0]
        idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(1))
        expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)

        ours = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)

        assert torch.equal(ours.cpu(), expected)


def test_batched_nms_stays_exact_where_the_offset_trick_rounds(device) -> None:
    """Shifting class 1 by 1001 (torchvision's coordinate trick) rounds these coordinates enough to move the IoU of
    boxes 0 and 1 from just above 0.5 to not above it, so ``torchvision.ops.batched_nms`` keeps box 1 here."""
    x = 1.2741
    boxes = torch.tensor([[x, x, x + 2, x + 1], [x, x, x + 1, x + 1], [1000, 1000, 1001, 1001]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    idxs = torch.tensor([1, 1, 0])
    per_class = torchvision.ops.nms(boxes[:2], scores[:2], 0.5).tolist() + [2]

    ours = batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)

    assert ours.tolist() == per_class == [0, 2]


# --- edge cases ----------------------------------------------------------------------------------------------


def test_empty_inputs(device, strategy) -> None:
    empty_boxes, empty = torch.zeros(0, 4, device=device), torch.zeros(0, device=device)
    none = torch.zeros(0, dtype=torch.int64, device=device)

    assert nms(empty_boxes, empty, 0.5).shape == (0,)
    assert batched_nms(empty_boxes, empty, none, 0.5).dtype == torch.int64
    kept = grouped_nms(empty_boxes, empty, none, none, 3, 0.5, 10, strategy=strategy)
    assert [k.shape for k in kept] == [(0,)] * 3
    assert grouped_nms(empty_boxes, empty, none, none, 0, 0.5, strategy=strategy) == []


def test_single_box_and_identical_boxes(device, strategy) -> None:
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=device)
    zeros = torch.zeros(1, dtype=torch.int64, device=device)
    kept = grouped_nms(one, torch.ones(1, device=device), zeros, zeros, 1, 0.5, strategy=strategy)
    assert kept[0].tolist() == [0]

    same = one.repeat(6, 1)
    zeros = torch.zeros(6, dtype=torch.int64, device=device)
    tied = torch.full((6,), 0.5, device=device)
    kept = grouped_nms(same, tied, zeros, zeros, 1, 0.5, strategy=strategy)
    assert kept[0].tolist() == [0]  # equal scores: the lowest index wins
    rising = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.3, 0.0], device=device)
    assert grouped_nms(same, rising, zeros, zeros, 1, 0.5, strategy=strategy)[0].tolist() == [2]


def test_tied_scores_keep_input_order(device, strategy) -> None:
    boxes = torch.tensor([[0, 0, 1, 1], [5, 5, 6, 6], [0, 0, 1, 1], [9, 9, 10, 10], [5, 5, 6, 6]], device=device)
    scores = torch.tensor([0.5, 0.5, 0.7, 0.5, 0.7], device=device)
    zeros = torch.zeros(5, dtype=torch.int64, device=device)

    kept = grouped_nms(boxes.float(), scores, zeros, zeros, 1, 0.5, strategy=strategy)[0]

    assert kept.tolist() == [2, 4, 3] == torchvision.ops.nms(boxes.float().cpu(), scores.cpu(), 0.5).tolist()


def test_signed_zero_and_negative_scores_order_like_torchvision(device, strategy) -> None:
    boxes = torch.arange(7.0)[:, None] * 10 + torch.tensor([0.0, 0.0, 5.0, 5.0])  # (7, 4) disjoint
    scores = torch.tensor([0.0, -0.0, -1.0, 0.0, -0.0, float("-inf"), -1e-30])
    zeros = torch.zeros(7, dtype=torch.int64, device=device)
    expected = torchvision.ops.nms(boxes, scores, 0.5)

    kept = grouped_nms(boxes.to(device), scores.to(device), zeros, zeros, 1, 0.5, strategy=strategy)[0]

    assert kept.tolist() == expected.tolist() == [0, 1, 3, 4, 6, 2, 5]


def test_degenerate_boxes_follow_torchvision(device, strategy) -> None:
    """Zero-area boxes (IoU 0 or 0/0 = NaN, never above the threshold) and inverted ones, as torchvision does."""
    boxes = torch.tensor(
        [[3, 3, 3, 3], [3, 3, 3, 3], [0, 0, 0, 9], [0, 0, 0, 9], [5, 5, 2, 2], [5, 5, 2, 2], [0, 0, 4, 4]],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    zeros = torch.zeros(7, dtype=torch.int64, device=device)
    for thr in (0.0, 0.5):
        expected = torchvision.ops.nms(boxes, scores, thr)

        kept = grouped_nms(boxes.to(device), scores.to(device), zeros, zeros, 1, thr, strategy=strategy)[0]

        assert torch.equal(kept.cpu(), expected)


def test_iou_equal_to_threshold_is_kept(device, strategy) -> None:
    boxes = torch.tensor([[0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 3, 1]], dtype=torch.float32, device=device)
    scores = torch.tensor([0.9, 0.8, 0.7], device=device)
    zeros = torch.zeros(3, dtype=torch.int64, device=device)

    kept = grouped_nms(boxes, scores, zeros, zeros, 1, 0.5, strategy=strategy)[0]

    assert kept.tolist() == [0, 1]  # IoU(0, 1) = 1/2 exactly: kept; IoU(0, 2) = 2/3: suppressed


@pytest.mark.parametrize(("thr", "height"), [(0.6, 6.0), (0.7, 7.0), (0.1, 1.0), (0.3, 3.0)])
def test_float32_iou_against_float64_threshold(device, strategy, thr, height) -> None:
    """IoU = 3/5 in float32 is 0.6000000238 > 0.6: torchvision (comparing as double) suppresses; 7/10 rounds
    below 0.7 and is kept. A float32 comparison with the threshold rounded to nearest would get 0.6 wrong."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, height]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8])
    zeros = torch.zeros(2, dtype=torch.int64, device=device)
    expected = torchvision.ops.nms(boxes, scores, thr)

    kept = grouped_nms(boxes.to(device), scores.to(device), zeros, zeros, 1, thr, strategy=strategy)[0]

    assert torch.equal(kept.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(device, dtype) -> None:
    boxes, scores = realistic_head(1, [400], 1, class_specific=False, seed=3)
    boxes, scores = boxes[0].to(dtype), scores[0][:, 0].to(dtype)
    expected = torchvision.ops.nms(boxes.float(), scores.float(), 0.5)

    assert torch.equal(nms(boxes.to(device), scores.to(device), 0.5).cpu(), expected)


def test_float64_inputs_are_computed_in_float64(device, strategy) -> None:
    boxes, scores = realistic_head(1, [500], 1, class_specific=False, seed=4)
    boxes, scores = boxes[0].double(), scores[0][:, 0].double()
    zeros = torch.zeros(500, dtype=torch.int64, device=device)
    expected = torchvision.ops.nms(boxes, scores, 0.45)

    kept = grouped_nms(boxes.to(device), scores.to(device), zeros, zeros, 1, 0.45, strategy=strategy)[0]

    assert torch.equal(kept.cpu(), expected)


@pytest.mark.parametrize(("n", "scale", "chunk"), [(400, 40_000.0, 256), (1500, 1000.0, 256), (300, 500.0, 7)])
def test_large_coordinates_many_boxes_and_many_chunks(device, strategy, n, scale, chunk) -> None:
    g = torch.Generator().manual_seed(n)
    corner = torch.rand(n, 2, generator=g) * scale
    boxes = torch.cat([corner, corner + torch.rand(n, 2, generator=g) * scale / 4], 1)  # (n, 4)
    scores = torch.rand(n, generator=g)
    zeros = torch.zeros(n, dtype=torch.int64, device=device)
    for thr in (0.3, 0.7):
        expected = torchvision.ops.nms(boxes, scores, thr)

        kept = grouped_nms(
            boxes.to(device), scores.to(device), zeros, zeros, 1, thr, strategy=strategy, chunk_size=chunk
        )[0]

        assert torch.equal(kept.cpu(), expected)


def test_cap_stops_each_image_at_its_best_boxes(device, strategy) -> None:
    boxes, scores = realistic_head(3, [900, 50, 600], 1, class_specific=False, seed=5)
    groups = [torch.randint(0, 4, (b.shape[0],), generator=torch.Generator().manual_seed(9)) for b in boxes]
    images = torch.cat([torch.full((b.shape[0],), i) for i, b in enumerate(boxes)])
    flat = [torch.cat(boxes), torch.cat(scores)[:, 0], torch.cat(groups), images]
    for cap in (0, 1, 30, 500):
        expected = reference_grouped(*flat, 3, 0.5, cap)

        kept = grouped_nms(*(t.to(device) for t in flat), 3, 0.5, cap, strategy=strategy, chunk_size=64)

        assert [k.tolist() for k in kept] == expected


def test_rejects_bad_arguments(device) -> None:
    boxes, scores = torch.zeros(3, 4, device=device), torch.zeros(3, device=device)
    zeros = torch.zeros(3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="boxes must be"):
        grouped_nms(boxes[:, :3], scores, zeros, zeros, 1, 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        grouped_nms(boxes, scores[:2], zeros, zeros, 1, 0.5)
    with pytest.raises(ValueError, match="strategy"):
        grouped_nms(boxes, scores, zeros, zeros, 1, 0.5, strategy="fast")
    with pytest.raises(ValueError, match="images must lie"):
        grouped_nms(boxes, scores, zeros, zeros + 1, 1, 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        grouped_nms(boxes, scores, zeros, zeros, 1, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="match"):
        multiclass_nms([boxes], [torch.zeros(4, 2, device=device)], iou_threshold=0.5)


# --- multiclass_nms ------------------------------------------------------------------------------------------


def torchvision_loop(boxes, scores, thr, score_thr, cap) -> list[list[tuple]]:
    """The usual per-image post-processing: score filter, ``batched_nms`` over class ids, ``keep[:cap]``."""
    out = []
    for b, s in zip(boxes, scores):
        b, s = b.cpu().float(), s.cpu().float()
        rows, classes = torch.nonzero(s > score_thr, as_tuple=True)
        cand_boxes = b[rows] if b.ndim == 2 else b[rows, classes]
        keep = torchvision.ops.batched_nms(cand_boxes, s[rows, classes], classes, thr)[:cap]
        out.append([(s[r, c].item(), r, c) for r, c in zip(rows[keep].tolist(), classes[keep].tolist())])
    return out


@pytest.mark.parametrize("class_specific", [True, False])
@pytest.mark.parametrize("cap", [None, 40])
def test_multiclass_matches_torchvision_loop(device, strategy, class_specific, cap) -> None:
    rows = [700, 0, 250, 1]  # different sizes, an empty image, a single row
    boxes, scores = realistic_head(4, rows, 5, class_specific, seed=11)
    expected = torchvision_loop(boxes, scores, 0.5, 0.05, cap)

    ours = multiclass_nms(
        [b.to(device) for b in boxes],
        [s.to(device) for s in scores],
        iou_threshold=0.5,
        score_threshold=0.05,
        max_per_image=cap,
        strategy=strategy,
        chunk_size=128,
    )

    assert [as_triples(r) for r in ours] == expected
    for result, b, s in zip(ours, boxes, scores):
        assert isinstance(result, NMSResult)
        assert result.boxes.dtype == torch.float32 and result.scores.dtype == torch.float32
        assert result.labels.dtype == torch.int64 and result.indices.dtype == torch.int64
        assert result.boxes.device.type == device.type
        source = b[result.indices.cpu()] if b.ndim == 2 else b[result.indices.cpu(), result.labels.cpu()]
        assert torch.equal(result.boxes.cpu(), source)
        assert torch.equal(result.scores.cpu(), s[result.indices.cpu(), result.labels.cpu()])


def test_multiclass_stacked_equals_list_and_reference(device, strategy) -> None:
    boxes, scores = realistic_head(3, [200] * 3, 4, class_specific=True, seed=12)
    expected = reference_multiclass(boxes, scores, 0.4, 0.1, topk=None, cap=25)

    stacked = multiclass_nms(
        torch.stack(boxes).to(device),
        torch.stack(scores).to(device),
        iou_threshold=0.4,
        score_threshold=0.1,
        max_per_image=25,
        strategy=strategy,
    )

    assert [as_triples(r) for r in stacked] == expected


@FIXTURE_OK
@given(
    case=candidates(max_boxes=30, max_groups=1, max_images=1),
    classes=st.integers(1, 3),
    class_specific=st.booleans(),
    topk=st.one_of(st.none(), st.integers(1, 4)),
    cap=st.one_of(st.none(), st.integers(1, 10)),
    score_thr=st.sampled_from([0.0, 0.25, 0.5]),
)
def test_multiclass_random_ties_topk_and_threshold(device, case, classes, class_specific, topk, cap, score_thr):
    """Coarse scores give ties everywhere: order is (score descending, row, class) at every step."""
    boxes, scores = case[0], case[1]
    n = boxes.shape[0]
    scores = torch.stack([scores.roll(c) for c in range(classes)], 1)  # (n, C)
    if class_specific:
        boxes = torch.stack([boxes.roll(c, 0) for c in range(classes)], 1)  # (n, C, 4)
    images = [(boxes, scores), (boxes[: n // 2], scores[: n // 2])]
    expected = reference_multiclass(*zip(*images), 0.5, score_thr, topk, cap)

    ours = multiclass_nms(
        [b.to(device) for b, _ in images],
        [s.to(device) for _, s in images],
        iou_threshold=0.5,
        score_threshold=score_thr,
        topk_per_class=topk,
        max_per_image=cap,
    )

    assert [as_triples(r) for r in ours] == expected


def test_multiclass_score_threshold_is_strict_and_single_class(device) -> None:
    boxes = torch.tensor([[[0, 0, 4, 4]], [[10, 10, 14, 14]], [[20, 20, 24, 24]]], dtype=torch.float32)  # (3, 1, 4)
    scores = torch.tensor([[0.5], [0.25], [0.2500001]])

    (result,) = multiclass_nms([boxes.to(device)], [scores.to(device)], iou_threshold=0.5, score_threshold=0.25)

    assert result.indices.tolist() == [0, 2] and result.labels.tolist() == [0, 0]


def test_multiclass_empty_batches(device) -> None:
    assert multiclass_nms([], [], iou_threshold=0.5) == []
    (result,) = multiclass_nms(
        torch.zeros(1, 0, 3, 4, device=device), torch.zeros(1, 0, 3, device=device), iou_threshold=0.5
    )
    assert result.boxes.shape == (0, 4) and result.labels.shape == (0,)
