"""Benchmark cases: blocked IoU and the box coder against torchvision, measured in the same run.

    python benchmarks/_case_iou_coder.py [--repeats 5]

1. ``box_iou`` on 4,000 x 4,000 boxes vs ``torchvision.ops.box_iou``: median time of ``repeats`` calls each,
   ours and the peer's interleaved so that load from other processes hits both alike.
2. Peak memory of ``box_iou`` on 20,000 x 20,000 boxes: each implementation runs once in a fresh Python process,
   which reports the growth of its peak resident set (the high-water mark, reset just before the call through
   ``/proc/self/clear_refs``, after the call minus the resident set before it; ``ru_maxrss`` elsewhere) and, on CUDA,
   ``torch.cuda.max_memory_allocated`` growth. Both include the 1.6 GB float32 output itself. torchvision's peak
   is about nine times that, so when the machine has too little free memory the case shrinks the box count (and
   says so in its note) rather than get killed.
3. Box-coder decode vs torchvision's ``BoxCoder.decode`` (which takes per-image box lists and concatenated
   deltas), three sizes (:data:`DECODE_CASES`): class-specific deltas for 8 images x 2,000 boxes x 21 classes
   (weights 10, 10, 5, 5; a Fast R-CNN head), class-agnostic RPN deltas for 2 x 4,000 anchors, and the bundled
   tiny detector's head on one image (300 x 4), where fixed per-call costs dominate.

Each timed sample of cases 1 and 3 is the mean of back-to-back calls filling at least :data:`MIN_SAMPLE` seconds
(:func:`benchmarks._timing.median_seconds`): a decode takes about a millisecond, and one call timed alone measured
the shared machine's scheduler as much as the loop (the large decode's ratio moved between 2.0x and 4.3x from one
run to the next that way).

``ratio`` is peer / ours: above 1 means we are faster (or, for memory, smaller). ``ours`` is what the public
kernels run (the fused numba loops on the CPU); ``reference_s`` times our torch-op reference path (what ran before
the fused kernels) and ``floor_s`` the memory floor: allocating the output and writing it once
(``torch.empty(...).fill_(0)``), which every implementation has to pay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._timing import median_seconds  # noqa: E402
from detect.ops import dispatch  # noqa: E402
from detect.ops.boxes import box_iou  # noqa: E402
from detect.ops.coder import BoxCoder  # noqa: E402

IOU_BOXES = 4_000
MEMORY_BOXES = 20_000
PEER_PEAK_ARRAYS = 10  # torchvision's peak in (N, M) float32 arrays, with a margin (measured: 13.7 GB at 20,000)
IMAGES, BOXES_PER_IMAGE, CLASSES = 8, 2_000, 21
MIN_SAMPLE = 0.02  # seconds of back-to-back calls in one timed sample

MEMORY_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
import torch, torchvision
from detect.ops.boxes import box_iou

def peak_kib():  # the resident-set high-water mark, in KiB
    status = Path("/proc/self/status")
    if status.exists():
        return int(next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:")).split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS

impl, n, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fn = box_iou if impl == "ours" else torchvision.ops.box_iou
g = torch.Generator().manual_seed(0)
xy = torch.rand(n, 2, generator=g) * 1000
boxes = torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 100), 1).to(device)
fn(boxes[:16], boxes[:16])  # lazy initialisation belongs to the baseline
cuda = device == "cuda"
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
cuda_before = torch.cuda.memory_allocated() if cuda else 0
try:  # reset the high-water mark to the current RSS, so that import-time peaks do not hide the call's
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before = peak_kib()
start = time.perf_counter()
out = fn(boxes, boxes)
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
cuda_mb = (torch.cuda.max_memory_allocated() - cuda_before) / 2**20 if cuda else None
print(json.dumps({"rss_mb": (peak_kib() - before) / 1024, "cuda_mb": cuda_mb, "seconds": seconds}))
"""


def random_boxes(n: int, generator: torch.Generator, scale: float = 1000.0, max_size: float = 200.0) -> torch.Tensor:
    """``(n, 4)`` float32 xyxy boxes with corners in ``[0, scale]`` and sides in ``[0, max_size]``."""
    xy = torch.rand(n, 2, generator=generator) * scale
    return torch.cat((xy, xy + torch.rand(n, 2, generator=generator) * max_size), dim=1)


def reference(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` on the torch-op reference path of our kernels (what ran before the fused kernels)."""

    def run() -> object:
        with dispatch.use_backend("torch"):
            return fn()

    return run


def time_row(
    case: str,
    ours: Callable[[], object],
    peer: Callable[[], object],
    repeats: int,
    note: str,
    floor: Callable[[], object] | None = None,
) -> dict:
    """Medians of the fused kernel (``ours``), our torch-op reference, the peer and the memory floor, interleaved."""
    fns = {"ours": ours, "reference": reference(ours), "peer": peer}
    if floor is not None:
        fns["floor"] = floor
    t = median_seconds(fns, repeats, MIN_SAMPLE)
    row = {"case": case, "ours_s": t["ours"], "peer_s": t["peer"], "ratio": t["peer"] / t["ours"]}
    row["reference_s"] = t["reference"]
    if floor is not None:
        row["floor_s"] = t["floor"]
    row["note"] = note
    return row


def iou_time_case(repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(IOU_BOXES, g), random_boxes(IOU_BOXES, g)
    same = torch.equal(box_iou(a, b), torchvision.ops.box_iou(a, b))
    note = f"outputs {'bitwise equal' if same else 'DIFFER'}"
    return time_row(
        f"iou: {IOU_BOXES} x {IOU_BOXES} vs box_iou",
        lambda: box_iou(a, b),
        lambda: torchvision.ops.box_iou(a, b),
        repeats,
        note,
        floor=lambda: torch.empty(IOU_BOXES, IOU_BOXES).fill_(0.0),
    )


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); unlimited elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def peak_memory(impl: str, n: int, device: str) -> dict:
    """Run one IoU call in a fresh process; its peak-memory growth in MB."""
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, impl, str(n), device],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def iou_memory_case() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = MEMORY_BOXES
    while n > 1_000 and PEER_PEAK_ARRAYS * 4 * n * n > 0.8 * available_bytes():
        n //= 2
    ours, peer = peak_memory("ours", n, device), peak_memory("peer", n, device)
    note = f"peak RSS growth incl. the {4 * n * n / 2**20:.0f} MB output, one fresh process each"
    if n != MEMORY_BOXES:
        note += f"; shrunk from {MEMORY_BOXES} boxes for lack of free memory"
    row = {
        "case": f"iou memory: {n} x {n} vs box_iou",
        "ours_s": None,
        "peer_s": None,
        "ratio": peer["rss_mb"] / ours["rss_mb"],
        "ours_mb": round(ours["rss_mb"]),
        "peer_mb": round(peer["rss_mb"]),
        "ours_call_s": round(ours["seconds"], 2),
        "peer_call_s": round(peer["seconds"], 2),
        "note": note,
    }
    if device == "cuda":
        row["ours_cuda_mb"], row["peer_cuda_mb"] = round(ours["cuda_mb"]), round(peer["cuda_mb"])
        row["cuda_ratio"] = round(peer["cuda_mb"] / ours["cuda_mb"], 2)
    return row


DECODE_CASES = (  # (label, images, boxes per image, classes, weights)
    ("decode", IMAGES, BOXES_PER_IMAGE, CLASSES, (10.0, 10.0, 5.0, 5.0)),  # Fast R-CNN head, class-specific
    ("decode rpn", 2, 4_000, 1, (1.0, 1.0, 1.0, 1.0)),  # RPN proposals of a batch of 2
    ("decode small", 1, 300, 4, (10.0, 10.0, 5.0, 5.0)),  # the bundled tiny detector, one image
)


def decode_case(repeats: int, label: str, images: int, per_image: int, classes: int, weights) -> dict:
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(images * per_image, g).view(images, per_image, 4)  # (B, N, 4)
    deltas = torch.randn(images, per_image, classes * 4, generator=g) * 2  # (B, N, C*4), some past the clamp
    ours, peer = BoxCoder(weights), TorchvisionBoxCoder(weights)
    per_image_boxes, flat_deltas = list(boxes), deltas.flatten(0, 1)  # the peer's input form, built outside the timing
    same = torch.equal(ours.decode_per_class(deltas, boxes).flatten(0, 1), peer.decode(flat_deltas, per_image_boxes))
    return time_row(
        f"{label}: {images} x {per_image} boxes x {classes} classes vs BoxCoder",
        lambda: ours.decode_per_class(deltas, boxes),
        lambda: peer.decode(flat_deltas, per_image_boxes),
        repeats,
        f"outputs {'bitwise equal' if same else 'DIFFER'}",
        floor=lambda: torch.empty(images, per_image, classes, 4).fill_(0.0),
    )


def run(repeats: int = 5) -> list[dict]:
    """The rows described in the module docstring."""
    return [iou_time_case(repeats), iou_memory_case()] + [decode_case(repeats, *case) for case in DECODE_CASES]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median reported)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for row in run(args.repeats):
        print(row)
