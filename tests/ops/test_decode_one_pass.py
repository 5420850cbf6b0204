"""The one-pass float32 box decode (detect.ops._cpu.decode) against torchvision's BoxCoder, bit for bit.

The one-pass loop computes its exponentials with the function torch's CPU exp runs (MKL's vmsExp, called on small
blocks). These tests check that assumption directly (a sample of every float32 bit pattern, blocks of random
lengths), then the decode against torchvision on random and edge inputs, with the clip fused in, across block
boundaries, thread splits, CPU capabilities and the two-pass fallback used where torch has no MKL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import clip_boxes_to_image

from detect.ops import _cpu, dispatch
from detect.ops.boxes import clip_boxes
from detect.ops.coder import BoxCoder
from tests.ops.fused_cases import degenerate_boxes, huge_boxes, random_boxes, same_with_nan

ROOT = Path(__file__).resolve().parents[2]
one_pass = pytest.mark.skipif(_cpu.TORCH_EXP is None, reason="torch without MKL: the two-pass decode runs")
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.3, 7.0, 3.3, 1.7)]


@numba.njit(nogil=True)
def _exp_in_blocks(values, out, lengths):
    """exp of ``values`` through the one-pass loop's call, block by block with the given lengths."""
    start = 0
    for n in lengths:
        stop = min(start + n, values.shape[0])
        _cpu._torch_exp(stop - start, values[start:stop], out[start:stop])
        start = stop


@one_pass
def test_torch_exp_is_the_function_torch_runs_on_every_sampled_float() -> None:
    """Every 1021st float32 bit pattern (4.2 M values: normals, subnormals, infinities, NaNs, both signs), in
    blocks of random lengths at random offsets, against torch.exp on one contiguous tensor."""
    bits = np.arange(0, 1 << 32, 1021, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    ours = np.empty_like(values)
    lengths = np.random.default_rng(0).integers(1, 2 * _cpu.DECODE_BLOCK + 1, size=len(values)).astype(np.int64)
    _exp_in_blocks(values, ours, lengths)
    assert same_with_nan(torch.from_numpy(ours), torch.exp(torch.from_numpy(values)))


def _edge_deltas(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Random deltas, some past the clamp, with NaN, +-inf, the clamp value itself and huge values mixed in."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(rows, columns, generator=g) * 4
    clip = float(np.float32(BoxCoder().bbox_xform_clip))
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), clip, -clip, 1e30, -1e30, 0.0, -0.0, 88.0])
    picks = torch.randint(0, len(specials), (rows, columns), generator=g)
    where = torch.rand(rows, columns, generator=g) < 0.05
    return torch.where(where, specials[picks], deltas)


@one_pass
@pytest.mark.parametrize("weights", WEIGHTS)
def test_one_pass_decode_equals_torchvision_across_blocks(split, weights) -> None:
    rows = 2 * _cpu.DECODE_BLOCK + 37  # three blocks, the last one short
    boxes = torch.cat((random_boxes(rows - 18, seed=3, scale=30_000.0, max_size=3_000.0), degenerate_boxes(),
                       huge_boxes()))
    for classes in (1, 3, 7):  # 3 and 7 do not divide the block: a box's classes straddle two blocks
        deltas = _edge_deltas(rows, 4 * classes, seed=classes)
        ours = BoxCoder(weights).decode_per_class(deltas, boxes)
        assert same_with_nan(ours, TorchvisionBoxCoder(weights).decode(deltas, [boxes]))
    anchors = boxes[:300]  # RPN form: one set of anchors for a batch of deltas (B, A, 4)
    batch = _edge_deltas(600, 4, seed=9).view(2, 300, 4)
    peer = TorchvisionBoxCoder(weights).decode(batch.flatten(0, 1), [anchors, anchors]).view(2, 300, 4)
    assert same_with_nan(BoxCoder(weights).decode(batch, anchors), peer)


@one_pass
@pytest.mark.parametrize("outer_stride, inner_stride", [(0, 2), (3, 0), (1, 0), (7, 3)])
def test_the_loop_indexes_any_box_layout(outer_stride: int, inner_stride: int) -> None:
    """The loop itself, for box layouts the coder's collapse does not produce today (inner stride above 1, outer
    strides other than 0 and 1): row ``o * inner + i`` decodes against box ``o * outer_stride + i * inner_stride``,
    over block boundaries and from a start that is not 0."""
    outer, inner = 41, 29  # 1,189 rows: three blocks, runs of rows cut by the blocks
    boxes = random_boxes(outer * outer_stride + inner * inner_stride + 1, seed=13)
    deltas = _edge_deltas(outer * inner, 4, seed=14)
    index = (torch.arange(outer)[:, None] * outer_stride + torch.arange(inner)[None] * inner_stride).reshape(-1)
    weights = (10.0, 10.0, 5.0, 5.0)
    expected = TorchvisionBoxCoder(weights).decode(deltas, [boxes[index]])[:, 0]
    out = torch.full((outer * inner, 4), 7.0)
    constants = [np.float32(v) for v in (*weights, BoxCoder(weights).bbox_xform_clip, 0.5)]
    _cpu.decode(2, outer, out.view(-1).numpy(), deltas.view(-1).numpy(), boxes.view(-1).numpy(), outer_stride, inner,
                inner_stride, *constants, np.empty((0, 2), np.float32), 1, np.float32(0.0))
    assert same_with_nan(out[2 * inner:], expected[2 * inner:])
    assert bool((out[: 2 * inner] == 7.0).all())  # rows before start untouched


@one_pass
def test_one_pass_decode_ignores_thread_counts() -> None:
    boxes = random_boxes(40_000, seed=5)
    deltas = _edge_deltas(40_000, 4, seed=6)
    coder, peer = BoxCoder((10.0, 10.0, 5.0, 5.0)), TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0))
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, 2, threads}):
            torch.set_num_threads(count)
            assert same_with_nan(coder.decode(deltas, boxes), peer.decode(deltas, [boxes])[:, 0])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mkl", [True, False], ids=["one-pass", "two-pass"])
def test_clip_in_the_same_pass_equals_decode_then_clip(split, monkeypatch, mkl: bool) -> None:
    if not mkl:
        monkeypatch.setattr(_cpu, "TORCH_EXP", None)  # what runs where torch has no MKL
    elif _cpu.TORCH_EXP is None:
        pytest.skip("torch without MKL")
    coder, peer = BoxCoder((10.0, 10.0, 5.0, 5.0)), TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = random_boxes(700, seed=7, scale=900.0, max_size=400.0) - 100.0
    deltas = _edge_deltas(700, 12, seed=8)
    decoded = peer.decode(deltas, [boxes])  # (700, 3, 4)
    expected = clip_boxes_to_image(decoded, (480, 640))
    assert same_with_nan(coder.decode_per_class(deltas, boxes, clip_to=(480, 640)), expected)
    per_row = torch.tensor([[480, 640], [300, 200]]).repeat_interleave(350, dim=0)  # (K, 2): two images
    ours = coder.decode_per_class(deltas, boxes, clip_to=per_row)
    assert same_with_nan(ours, clip_boxes(decoded, per_row))
    assert same_with_nan(ours[350:], clip_boxes_to_image(decoded[350:], (300, 200)))
    batch, anchors = deltas[:, :4].reshape(2, 350, 4), boxes[:350]
    sizes = torch.tensor([[480, 640], [300, 200]])
    with dispatch.use_backend("torch"):
        reference = coder.decode(batch, anchors, clip_to=sizes)
    assert same_with_nan(coder.decode(batch, anchors, clip_to=sizes), reference)
    assert same_with_nan(coder.decode(batch, anchors, clip_to=sizes[:1]), clip_boxes(coder.decode(batch, anchors),
                                                                                     sizes[:1]))


CAPABILITY_SCRIPT = """
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from detect.ops.coder import BoxCoder
from tests.ops.test_decode_one_pass import _edge_deltas
from tests.ops.fused_cases import random_boxes, same_with_nan
boxes = random_boxes(5000, seed=11, scale=30_000.0)
deltas = _edge_deltas(5000, 8, seed=12)
ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_per_class(deltas, boxes)
print(torch.backends.cpu.get_cpu_capability(), same_with_nan(ours, TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas, [boxes])))
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_decode_equals_torchvision_under_each_cpu_capability(capability: str) -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "True", done.stdout


@numba.njit(nogil=True)
def _set_mkl_local(count):
    return _cpu._mkl_local_threads(count)


@one_pass
def test_the_decode_keeps_mkl_on_one_thread_and_restores_the_callers_count() -> None:
    """MKL threads vmsExp itself once torch.set_num_threads has been called (one_thread does, after every resize),
    so the loop sets MKL's count for its thread to one while it runs and gives back what the caller had: checked
    through MKL's own getter (mkl_get_max_threads sees the thread's local count), not through a timing."""
    import ctypes

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    lib.mkl_get_max_threads.restype = ctypes.c_int
    torch.set_num_threads(torch.get_num_threads())  # the state a detector call leaves behind
    previous = _set_mkl_local(1)
    try:
        assert lib.mkl_get_max_threads() == 1  # the intrinsic reaches MKL with the C calling convention
        _set_mkl_local(3)
        boxes = random_boxes(2000, 0).view(20, 100, 4)
        deltas = torch.randn(20, 100, 84, generator=torch.Generator().manual_seed(1))
        ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_per_class(deltas, boxes)
        assert _set_mkl_local(0) == 3 and lib.mkl_get_max_threads() >= 1  # the caller's count came back
        peer = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas.flatten(0, 1), list(boxes))
        assert torch.equal(ours.flatten(0, 1), peer)
    finally:
        _set_mkl_local(previous)
