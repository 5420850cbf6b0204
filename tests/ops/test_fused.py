"""The fused kernels (numba on the CPU, Triton on CUDA) against the torch-op reference, torchvision and slow
float64 loops, plus their dispatch, thread splitting, cache fallback and warm-up.

On the CPU every comparison with the reference is bitwise (NaN in the same places). On CUDA, where the fused
kernels are Triton's and could not be checked on a GPU when written, values may differ by float32 ulps; NMS
decisions must still be identical. The Triton kernels themselves are checked bitwise on the CPU under
``TRITON_INTERPRET=1`` by ``test_triton_interpret.py``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

import detect.ops
from detect.ops import _cpu, dispatch
from detect.ops.boxes import batched_box_iou, box_iou, clip_boxes
from detect.ops.coder import BoxCoder
from detect.ops.nms import batched_nms, grouped_nms, multiclass_nms, nms
from tests.ops.fused_cases import (
    degenerate_boxes,
    huge_boxes,
    iou64_matrix,
    nms64,
    random_boxes,
    same_with_nan,
    threshold_equal_boxes,
    tied_scores,
)

pytestmark = pytest.mark.exact  # bitwise against torchvision / the reference: rerun on other vector paths

ROOT = Path(__file__).resolve().parents[2]


def reference(fn, *args, **kwargs):
    """``fn`` on the torch-op path."""
    with dispatch.use_backend("torch"):
        return fn(*args, **kwargs)


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bitwise on the CPU; float32 ulps on CUDA (Triton)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.device == ref.device
    if ours.device.type == "cpu":
        assert same_with_nan(ours, ref)
    else:
        torch.testing.assert_close(ours, ref, rtol=4e-7, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------- dispatch


def test_choose_picks_one_implementation_per_device_and_dtype() -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert dispatch.choose("box_iou", cpu, torch.float32) == "numba"
    assert dispatch.choose("box_iou", cpu, torch.float64) == "numba"
    assert dispatch.choose("box_iou", cpu, torch.float16) == "torch"  # callers upcast first
    assert dispatch.choose("box_iou", cpu, torch.float32, needs_grad=True) == "torch"
    assert dispatch.choose("box_iou", meta, torch.float32) == "torch"
    with dispatch.use_backend("torch"):
        assert dispatch.choose("box_iou", cpu, torch.float32) == "torch"
    with dispatch.use_backend("triton"):  # not interpreted here: no Triton on CPU tensors
        if os.environ.get("TRITON_INTERPRET", "0") == "0":
            assert dispatch.choose("box_iou", cpu, torch.float32) == "numba"
    if torch.cuda.is_available() and dispatch.gpu() is not None:
        assert dispatch.choose("box_iou", torch.device("cuda"), torch.float32) == "triton"
        assert dispatch.choose("box_iou", torch.device("cuda"), torch.float64) == "torch"
    with pytest.raises(ValueError, match="backend"):
        with dispatch.use_backend("cuda"):
            pass


def test_warmup_reports_seconds_per_device() -> None:
    spent = detect.ops.warmup(("cpu",))
    assert set(spent) == {"cpu"} and spent["cpu"] >= 0
    assert detect.ops.warmup(("cpu",))["cpu"] < 5.0  # warm: no compilation


def test_uncachable_loops_compile_without_cache(monkeypatch) -> None:
    """Where numba finds no writable cache location it raises at decoration; the loop then compiles uncached."""
    real = _cpu.numba.njit
    calls = []

    def njit(**options):
        calls.append(options["cache"])
        if options["cache"]:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real(**options)

    monkeypatch.setattr(_cpu.numba, "njit", njit)

    def add(start, stop, out):
        for k in range(start, stop):
            out[k] += 1.0

    loop = _cpu._jit(add)
    out = torch.zeros(3).numpy()
    loop(0, 3, out)
    assert calls == [True, False] and out.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_fresh_cache_directory_in_a_new_process(tmp_path) -> None:
    """A cold ``NUMBA_CACHE_DIR`` compiles and fills it; the kernels give the reference's results."""
    code = (
        "import torch, torchvision; from detect.ops.boxes import box_iou; "
        "a = torch.rand(50, 2) * 100; b = torch.cat((a, a + 20), 1); "
        "assert torch.equal(box_iou(b, b), torchvision.ops.box_iou(b, b)); print('ok')"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert any(tmp_path.rglob("*.nbi"))


def _iou_in_child(queue) -> None:
    """In the child only small torch ops run (torch's own GNU OpenMP pool is not fork-safe either)."""
    import numpy as np

    torch.get_num_threads = lambda: 2  # what dispatch reads: split even if torch's pool says otherwise
    a, b = random_boxes(300, seed=1), random_boxes(400, seed=2)
    split = box_iou(a, b).numpy().copy()
    dispatch.PARALLEL_WORK = 1 << 60
    whole = box_iou(a, b).numpy()
    queue.put(bool(np.array_equal(split, whole)))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_gets_its_own_worker_threads(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "PARALLEL_WORK", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    box_iou(random_boxes(40, seed=0), random_boxes(40, seed=1))  # start the parent's workers
    assert dispatch._pool["pid"] == os.getpid()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_iou_in_child, args=(queue,))
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5)


# ----------------------------------------------------------------------------------------------- IoU


def iou_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    deg = degenerate_boxes()
    return [
        ("random", random_boxes(70, seed=1), random_boxes(130, seed=2)),
        ("degenerate", deg, deg),
        ("huge", huge_boxes(), torch.cat((huge_boxes(), deg))),
        ("far apart", random_boxes(20, seed=3, scale=30_000.0), random_boxes(30, seed=4, scale=30_000.0)),
    ]


@pytest.mark.parametrize("case", iou_cases(), ids=lambda c: c[0])
def test_iou_equals_reference_torchvision_and_float64(device, split, case) -> None:
    _, a, b = case
    a, b = a.to(device), b.to(device)
    ours = box_iou(a, b)
    assert_same(ours, reference(box_iou, a, b))
    peer = torchvision.ops.box_iou(a, b)
    defined = ~peer.isnan()
    if device.type == "cpu":
        assert torch.equal(ours[defined], peer[defined])  # torchvision's formula, bit for bit
    finite = (a.abs() < 1e15).all(1)[:, None] & (b.abs() < 1e15).all(1)[None, :]
    expected = iou64_matrix(a.cpu(), b.cpu())
    torch.testing.assert_close(ours.cpu()[finite].double(), expected[finite], rtol=1e-6, atol=1e-6)


def test_iou_float64_batched_broadcast_and_half(device, split) -> None:
    a, b = random_boxes(60, seed=5).to(device), random_boxes(90, seed=6).to(device)
    assert_same(box_iou(a.double(), b.double()), reference(box_iou, a.double(), b.double()))
    anchors = b.expand(3, 90, 4)  # zero-stride batch
    gt = torch.stack((a, a.flip(0), a + 5))  # (3, 60, 4)
    assert_same(batched_box_iou(gt, anchors), reference(batched_box_iou, gt, anchors))
    assert_same(box_iou(a.half(), b.bfloat16()), reference(box_iou, a.half(), b.bfloat16()))
    assert_same(box_iou(a[:, [2, 3, 0, 1]].t().contiguous().t()[:, [2, 3, 0, 1]], b), box_iou(a, b))  # strided


def test_iou_large_split_equals_one_range() -> None:
    a, b = random_boxes(700, seed=7), random_boxes(900, seed=8)
    whole = box_iou(a, b)
    assert torch.equal(whole, torchvision.ops.box_iou(a, b))
    old = dispatch.PARALLEL_WORK
    try:
        dispatch.PARALLEL_WORK = 1 << 60
        assert torch.equal(box_iou(a, b), whole)
    finally:
        dispatch.PARALLEL_WORK = old


# ----------------------------------------------------------------------------------------------- NMS


def nms_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Named cases; in the last one the float32 IoU (3/5 rounded up) exceeds 0.6 while the float64 one equals
    it, so torchvision (and we) suppress where the float64 loop keeps: it is compared with torchvision only."""
    deg = degenerate_boxes()
    boxes, scores, thr = threshold_equal_boxes()
    tied_b, tied_s = tied_scores(60, seed=3)
    g = torch.Generator().manual_seed(4)
    return [
        ("random", random_boxes(200, seed=9, max_size=400.0), torch.rand(200, generator=g), 0.5),
        ("degenerate", deg, torch.linspace(1, 0, len(deg)), 0.0),
        ("degenerate tied", deg, torch.full((len(deg),), 0.5), 0.3),
        ("threshold equal", boxes, scores, thr),
        ("tied", tied_b, tied_s, 0.375),
        ("huge", huge_boxes(), torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), 0.1),
        ("float32 vs float64 threshold", torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6.0]]), torch.tensor([0.9, 0.8]), 0.6),
    ]


@pytest.mark.parametrize("case", nms_cases(), ids=lambda c: c[0])
def test_nms_equals_torchvision_and_float64(device, split, case) -> None:
    name, boxes, scores, thr = case
    expected = torchvision.ops.nms(boxes, scores, thr)
    ours = nms(boxes.to(device), scores.to(device), thr)
    assert ours.tolist() == expected.tolist()
    if (boxes.abs() < 1e15).all() and name != "float32 vs float64 threshold":
        assert ours.tolist() == nms64(boxes, scores, thr)
    kept = grouped_nms(boxes.to(device), scores.to(device), *(torch.zeros(len(boxes), dtype=torch.int64, device=device),) * 2,
                       1, thr, strategy="fused")
    assert kept[0].tolist() == expected.tolist()


def test_nms_nan_coordinates_follow_torchvision(split) -> None:
    """torchvision's ``std::max``/``std::min`` argument order decides what a NaN coordinate does."""
    boxes = torch.tensor([[0, 0, 10, 10], [float("nan"), 0, 10, 10], [0, 0, 9, 10], [0, float("nan"), 5, 5],
                          [1, 1, 10, 10]])
    for order in (torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([0.5, 0.9, 0.8, 0.7, 0.95])):
        for thr in (0.0, 0.5):
            assert nms(boxes, order, thr).tolist() == torchvision.ops.nms(boxes, order, thr).tolist()


def test_grouped_fused_many_images_groups_and_caps(device, split) -> None:
    g = torch.Generator().manual_seed(10)
    n = 400
    boxes, scores = tied_scores(n, seed=11)
    boxes = boxes * 4
    groups = torch.randint(0, 5, (n,), generator=g) * 2**33  # wide group ids: the ranked segment path
    images = torch.randint(0, 4, (n,), generator=g)
    for cap in (None, 0, 1, 7):
        ref = reference(grouped_nms, boxes, scores, groups, images, 4, 0.5, cap)
        ours = grouped_nms(boxes.to(device), scores.to(device), groups.to(device), images.to(device), 4, 0.5, cap)
        assert [k.tolist() for k in ours] == [k.tolist() for k in ref]
    idxs = groups // 2**33
    assert batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.25).tolist() == reference(
        batched_nms, boxes, scores, idxs, 0.25
    ).tolist()


def test_grouped_fused_float64_and_half(device, split) -> None:
    boxes, scores = random_boxes(150, seed=12, max_size=500.0), torch.rand(150, generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros(150, dtype=torch.int64)
    for b, s in ((boxes.double(), scores.double()), (boxes.half(), scores.half()), (boxes.bfloat16(), scores)):
        expected = torchvision.ops.nms(b.float() if b.dtype != torch.float64 else b, s.float() if s.dtype != torch.float64 else s, 0.45)
        ours = grouped_nms(b.to(device), s.to(device), zeros.to(device), zeros.to(device), 1, 0.45, strategy="fused")[0]
        assert ours.tolist() == expected.tolist()


def head(n_images: int, rows: list[int], classes: int, class_specific: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    boxes, scores = [], []
    for n in rows[:n_images]:
        centre = torch.rand(5, 2, generator=g)[torch.randint(0, 5, (n,), generator=g)] * 300
        size = 30 + 60 * torch.rand(n, 2, generator=g)
        base = torch.cat((centre - size / 2, centre + size / 2), 1)
        if class_specific:
            base = base[:, None] + 3 * torch.randn(n, classes, 4, generator=g)
        boxes.append(base)
        scores.append((torch.randint(0, 9, (n, classes), generator=g) / 8.0) ** 2)  # coarse: ties everywhere
    return boxes, scores


@pytest.mark.parametrize("class_specific", [True, False])
@pytest.mark.parametrize(("topk", "cap", "score_thr"), [(None, None, 0.05), (3, 10, 0.0), (None, 25, 0.25), (1, None, 0.5)])
def test_multiclass_fused_equals_reference(device, split, class_specific, topk, cap, score_thr) -> None:
    boxes, scores = head(3, [150, 0, 90], 4, class_specific, seed=13)
    kwargs = dict(iou_threshold=0.5, score_threshold=score_thr, topk_per_class=topk, max_per_image=cap)
    ref = reference(multiclass_nms, boxes, scores, **kwargs)
    ours = multiclass_nms([b.to(device) for b in boxes], [s.to(device) for s in scores], **kwargs)
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        for field_ours, field_ref in zip(o, r):
            assert field_ours.dtype == field_ref.dtype and torch.equal(field_ours.cpu(), field_ref)


def test_multiclass_fused_matches_torchvision_loop_and_stacked_input(split) -> None:
    boxes, scores = head(2, [300, 300], 6, True, seed=14)
    scores = [s + torch.rand(s.shape, generator=torch.Generator().manual_seed(2)) * 1e-3 for s in scores]  # distinct
    ours = multiclass_nms(torch.stack(boxes), torch.stack(scores), iou_threshold=0.5, score_threshold=0.05,
                          max_per_image=40)
    for result, b, s in zip(ours, boxes, scores):
        rows, classes = torch.nonzero(s > 0.05, as_tuple=True)
        keep = torchvision.ops.batched_nms(b[rows, classes], s[rows, classes], classes, 0.5)[:40]
        assert result.indices.tolist() == rows[keep].tolist() and result.labels.tolist() == classes[keep].tolist()
        assert torch.equal(result.boxes, b[rows[keep], classes[keep]])


def test_multiclass_score_threshold_compares_in_the_scores_dtype(split) -> None:
    """``scores > 0.05`` on a float32 tensor compares with float32(0.05), which is above 0.05."""
    boxes = torch.tensor([[0, 0, 4, 4], [10, 10, 14, 14], [20, 20, 24, 24]], dtype=torch.float32)
    exact = torch.tensor(0.05, dtype=torch.float32)
    scores = torch.stack([exact, torch.nextafter(exact, torch.tensor(1.0)), torch.tensor(0.9)])[:, None]
    ours = multiclass_nms([boxes], [scores], iou_threshold=0.5, score_threshold=0.05)[0]
    ref = reference(multiclass_nms, [boxes], [scores], iou_threshold=0.5, score_threshold=0.05)[0]
    assert ours.indices.tolist() == ref.indices.tolist() == [2, 1]
    as64 = multiclass_nms([boxes.double()], [scores.double()], iou_threshold=0.5, score_threshold=0.05)[0]
    assert as64.indices.tolist() == [2, 1, 0]  # float64 scores compare with 0.05 itself


# ----------------------------------------------------------------------------------------------- box coder


WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.3, 7.0, 3.3, 1.7)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_equals_reference_and_torchvision(device, split, weights) -> None:
    g = torch.Generator().manual_seed(15)
    boxes = random_boxes(120, seed=16, scale=20_000.0, max_size=2_000.0).to(device)
    deltas = (torch.randn(120, 5 * 4, generator=g) * 4).to(device)  # some past the clamp
    deltas[::17] = float("nan")
    coder = BoxCoder(weights)
    ours = coder.decode_per_class(deltas, boxes)
    assert_same(ours, reference(coder.decode_per_class, deltas, boxes))
    peer = TorchvisionBoxCoder(weights).decode(deltas, [boxes])
    if device.type == "cpu":
        assert same_with_nan(ours, peer)
    single = coder.decode(deltas[:, :4], boxes)
    assert_same(single, reference(coder.decode, deltas[:, :4], boxes))
    anchors = boxes[:40]  # (A, 4) shared by a batch of deltas (2, A, 4)
    batch = deltas[:80, :4].view(2, 40, 4)
    assert_same(coder.decode(batch, anchors), reference(coder.decode, batch, anchors))
    assert_same(coder.decode(deltas[:1, :4], boxes), reference(coder.decode, deltas[:1, :4], boxes))  # deltas broadcast


def test_decode_huge_degenerate_float64_and_half(device, split) -> None:
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = torch.cat((degenerate_boxes(), huge_boxes())).to(device)
    deltas = torch.randn(len(boxes), 8, generator=torch.Generator().manual_seed(17)).to(device) * 30
    for b, d in ((boxes, deltas), (boxes.double(), deltas.double()), (boxes.half().float(), deltas.half())):
        assert_same(coder.decode_per_class(d, b), reference(coder.decode_per_class, d, b))


def test_decode_matches_float64_loop(split) -> None:
    boxes = random_boxes(200, seed=18) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    deltas = torch.randn(200, 4, generator=torch.Generator().manual_seed(19))
    ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, boxes).double()
    b, d = boxes.double(), deltas.double()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = b[:, 0] + w / 2, b[:, 1] + h / 2
    clip = math.log(1000.0 / 16)
    px, py = d[:, 0] / 10 * w + cx, d[:, 1] / 10 * h + cy
    pw, ph = torch.exp((d[:, 2] / 5).clamp(max=clip)) * w, torch.exp((d[:, 3] / 5).clamp(max=clip)) * h
    expected = torch.stack((px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2), 1)
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=1e-3)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_equals_reference_and_torchvision(device, split, weights) -> None:
    proposals = random_boxes(150, seed=20, scale=20_000.0) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    targets = proposals + torch.randn(150, 4, generator=torch.Generator().manual_seed(21)) * 5
    targets[:, 2:] = torch.maximum(targets[:, 2:], targets[:, :2] + 0.5)
    proposals, targets = proposals.to(device), targets.to(device)
    coder = BoxCoder(weights)
    ours = coder.encode(targets, proposals)
    assert_same(ours, reference(coder.encode, targets, proposals))
    if device.type == "cpu":
        assert same_with_nan(ours, TorchvisionBoxCoder(weights).encode_single(targets, proposals))
    matched = targets[:100].view(2, 50, 4)
    assert_same(coder.encode(matched, proposals[:50]), reference(coder.encode, matched, proposals[:50]))
    assert_same(coder.encode(targets.double(), proposals), reference(coder.encode, targets.double(), proposals))


def test_coder_keeps_autograd_on_the_reference() -> None:
    boxes = random_boxes(10, seed=22) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    deltas = torch.randn(10, 4, requires_grad=True)
    out = BoxCoder().decode(deltas, boxes)
    assert out.requires_grad
    out.sum().backward()
    assert deltas.grad is not None


def test_coder_thread_count_changes_both_paths_alike() -> None:
    """torch's exp splits its work by thread count; the fused path uses torch's exp on the same arrays."""
    g = torch.Generator().manual_seed(23)
    boxes = random_boxes(40_000, seed=24)
    deltas = torch.randn(40_000, 4, generator=g) * 3
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    threads = torch.get_num_threads()
    try:
        for count in {1, threads}:
            torch.set_num_threads(count)
            assert torch.equal(coder.decode(deltas, boxes), reference(coder.decode, deltas, boxes))
    finally:
        torch.set_num_threads(threads)


def _decode_case(images: int, rows: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-specific deltas ``(images, rows, classes * 4)`` (some NaN, some past the clamp) on their boxes."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(images * rows, seed=seed + 1, scale=2_000.0).view(images, rows, 4)
    deltas = torch.randn(images, rows, classes * 4, generator=g) * 4
    deltas[:, ::97] = float("nan")
    return deltas, boxes


@pytest.mark.skipif(_cpu.GOMP_PARALLEL is None or _cpu.TORCH_EXP is None, reason="torch runs on libgomp with MKL")
def test_decode_on_torchs_openmp_team_equals_reference(monkeypatch) -> None:
    """Large decodes run on torch's OpenMP team (one ``GOMP_parallel`` per call), each thread its share of the
    images' rows, and give the torch reference's bits: odd task counts, clipped or not, 2 and 3 threads."""
    calls = []
    parallel = _cpu.GOMP_PARALLEL
    monkeypatch.setattr(_cpu, "GOMP_PARALLEL", lambda *args: (calls.append(args[2]), parallel(*args)))
    monkeypatch.setattr(dispatch, "PARALLEL_WORK", 0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    threads = torch.get_num_threads()
    try:
        for count, (images, rows, classes) in ((2, (3, 701, 5)), (3, (5, 333, 21)), (2, (1, 2_001, 1))):
            torch.set_num_threads(count)
            deltas, boxes = _decode_case(images, rows, classes, seed=30 + count)
            sizes = torch.tensor([[600, 800], [0, 0], [1_000, 500], [5, 5], [2_000, 2_000]])[:images]
            for clip_to in (None, sizes):
                ours = coder.decode_per_class(deltas, boxes, clip_to)
                assert calls and calls[-1] == count
                assert_same(ours, reference(coder.decode_per_class, deltas, boxes, clip_to))
            flat = deltas.view(-1, 4)[: rows * images]  # one box a row (the RPN's layout): rows are the tasks
            assert_same(coder.decode(flat, boxes.view(-1, 4)), reference(coder.decode, flat, boxes.view(-1, 4)))
            assert calls[-1] == count
    finally:
        torch.set_num_threads(threads)


def _decode_in_child(queue, deltas, boxes, expected) -> None:
    """No torch op that would enter torch's OpenMP pool runs here: it hangs in a forked child."""
    import numpy as np

    torch.get_num_threads = lambda: 2
    ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_per_class(deltas, boxes)
    queue.put(bool(np.array_equal(ours.numpy().view(np.int32), expected.numpy().view(np.int32))))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_decodes_without_the_openmp_team(monkeypatch) -> None:
    """libgomp's team does not survive fork: a forked child's large decode runs on its own Python threads (on the
    parent's team it would hang) and gives the same bits."""
    monkeypatch.setattr(dispatch, "PARALLEL_WORK", 0)
    deltas, boxes = _decode_case(2, 400, 3, seed=40)
    expected = reference(BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_per_class, deltas, boxes)
    BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_per_class(deltas, boxes)  # the parent's team runs first
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_decode_in_child, args=(queue, deltas, boxes, expected))
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5)


# ----------------------------------------------------------------------------------------------- clipping


def test_clip_equals_reference_and_torchvision(device, split) -> None:
    boxes = (random_boxes(300, seed=25, scale=900.0, max_size=400.0) - 150.0).to(device)
    boxes[::13, 1] = float("nan")
    peer = torchvision.ops.clip_boxes_to_image(boxes, (480, 640))
    for size in ((480, 640), torch.tensor([480, 640], device=device)):
        ours = clip_boxes(boxes, size)
        assert_same(ours, reference(clip_boxes, boxes, size))
        assert_same(ours, peer)
    per_image = boxes.view(3, 100, 4)
    sizes = torch.tensor([[480, 640], [30, 20], [1000, 5]], device=device)
    assert_same(clip_boxes(per_image, sizes), reference(clip_boxes, per_image, sizes))
    per_class = boxes.view(3, 25, 4, 4)  # (B, N, C, 4) with per-image sizes
    assert_same(clip_boxes(per_class, sizes), reference(clip_boxes, per_class, sizes))
    assert_same(clip_boxes(boxes.double(), (480.5, 640)), reference(clip_boxes, boxes.double(), (480.5, 640)))
    assert_same(clip_boxes(huge_boxes().to(device), (480, 640)), reference(clip_boxes, huge_boxes().to(device), (480, 640)))
