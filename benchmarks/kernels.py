"""Shared-kernel benchmark: our batched kernels against torchvision, measured in the same run.

    python benchmarks/kernels.py [--repeats 5]

Each row prints our median time, the peer's median time and the ratio peer/ours (above 1 means we are faster).
The last line is a one-line summary of all ratios. Cases and targets (issue 2):

- multi-image multi-class NMS (8 images x 1,000 boxes x 20 classes, score > 0.05, IoU 0.5, top 100 per image) vs a
  per-image loop of ``torchvision.ops.batched_nms``: at least 2x faster on CPU, identical kept detections;
- IoU 4,000 x 4,000 vs ``torchvision.ops.box_iou``: no slower; peak memory for 20,000 x 20,000 at most half;
- box-coder decode, 8 x 2,000 boxes x 21 classes, vs torchvision's ``BoxCoder``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _case_iou_coder, _case_nms  # noqa: E402


def _fmt(row: dict) -> str:
    extra = {k: v for k, v in row.items() if k not in {"case", "ours_s", "peer_s", "ratio", "note"}}
    parts = [f"{row['case']:<52}"]
    if row.get("ours_s") is not None:
        parts.append(f"ours {row['ours_s'] * 1e3:9.2f} ms  peer {row['peer_s'] * 1e3:9.2f} ms")
    parts.append(f"ratio {row['ratio']:6.2f}x")
    parts += [f"{k}={v}" for k, v in extra.items()]
    if row.get("note"):
        parts.append(f"({row['note']})")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    rows = _case_nms.run(args.repeats) + _case_iou_coder.run(args.repeats)
    for row in rows:
        print(_fmt(row))
    summary = "; ".join(f"{r['case'].split(':')[0]} {r['ratio']:.2f}x" for r in rows)
    print(f"SUMMARY {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
