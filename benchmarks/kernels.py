"""Shared-kernel benchmark: our kernels against torchvision, measured in the same run.

    python benchmarks/kernels.py [--repeats 5] [--threads N]

Each row prints the median time of our kernels as the library runs them (``ours``: the fused numba loops on the
CPU), of our torch-op reference path (``ref``: what ran before the fused kernels, still the fallback), of the
peer, and of the memory floor (``floor``: allocating the output and writing it once; for NMS, whose output is a
few hundred boxes, one pass over the input scores). ``ratio`` is peer / ours (above 1 means we are faster) and
``x floor`` is ours / floor (1 would be the hardware limit). The fused kernels' load/compile time
(``detect.ops.warmup()``) is printed first and excluded from every timing. The last line sums up all ratios.

Cases and targets (issues 2 and 16):

- multi-image multi-class NMS (8 images x 1,000 boxes x 20 classes, score > 0.05, IoU 0.5, top 100 per image) vs a
  per-image loop of ``torchvision.ops.batched_nms``: at least 10x faster on CPU, identical kept detections;
- IoU 4,000 x 4,000 vs ``torchvision.ops.box_iou``: within 3x of the floor and at least 10x faster; peak memory
  for 20,000 x 20,000 at most half;
- box-coder decode (8 x 2,000 boxes x 21 classes; RPN 2 x 4,000; tiny detector 1 x 300 x 4) vs torchvision's
  ``BoxCoder``: at least 3x faster on every case, bitwise equal (issue 24);
- RoI Align's gradient (the tiny Faster R-CNN's training step: 8 x 128 RoIs, 128 channels) vs torchvision's
  ``_roi_align_backward``: bitwise equal (no target; it was 30 % of a training step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import detect.ops  # noqa: E402
from benchmarks import _case_iou_coder, _case_nms, _case_pooling  # noqa: E402


def _fmt(row: dict) -> str:
    shown = {"case", "ours_s", "peer_s", "ratio", "note", "reference_s", "floor_s"}
    extra = {k: v for k, v in row.items() if k not in shown}
    parts = [f"{row['case']:<52}"]
    if row.get("ours_s") is not None:
        parts.append(f"ours {row['ours_s'] * 1e3:8.2f} ms")
        if row.get("reference_s") is not None:
            parts.append(f"ref {row['reference_s'] * 1e3:8.2f} ms")
        parts.append(f"peer {row['peer_s'] * 1e3:8.2f} ms")
        if row.get("floor_s") is not None:
            parts.append(f"floor {row['floor_s'] * 1e3:7.2f} ms")
    parts.append(f"ratio {row['ratio']:6.2f}x")
    if row.get("floor_s"):
        parts.append(f"x floor {row['ours_s'] / row['floor_s']:6.2f}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    if row.get("note"):
        parts.append(f"({row['note']})")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
    parser.add_argument("--threads", type=int, help="torch threads for ours and the peer (default: torch's)")
    args = parser.parse_args(argv)
    # set the count even when it is torch's default: a process that ran a detector has called set_num_threads
    # (detect.ops.threads.one_thread restores the count after each resize), which also sets MKL's, and the decode
    # must be timed in that state (it once made the decode 3 to 100 times slower)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    spent = detect.ops.warmup(("cpu",))
    print(f"fused kernels load/compile (detect.ops.warmup), once: {spent['cpu']:.2f} s (excluded from timings)")
    rows = _case_nms.run(args.repeats) + _case_iou_coder.run(args.repeats) + _case_pooling.run(args.repeats)
    for row in rows:
        print(_fmt(row))
    summary = "; ".join(f"{r['case'].split(':')[0]} {r['ratio']:.2f}x" for r in rows)
    print(f"SUMMARY {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
