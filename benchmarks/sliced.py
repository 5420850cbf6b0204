"""Sliced against whole-image inference on a large generated scene (issue 26).

A ``--width`` x ``--height`` scene (default 6000x4000) of the shapes set's background with many small shapes
(longest side ``--min-size`` to ``--max-size`` pixels, one per cell of a jittered grid) is drawn once with
:mod:`detect.data.shapes` and annotated by the set's own rules. Each configuration then runs in its own spawned
process (so its peak RSS is its own: the model, the decoded scene and whatever inference holds), with the bundled
``faster_rcnn_shapes`` model:

* ``whole``: the scene as one image (the detector shrinks it to its input size);
* ``slice S nms`` / ``slice S greedy`` (+ ``full``): :func:`detect.slicing.detect_sliced` at ``--overlap``, for
  each slice size in ``--slices``.

Printed per configuration: recall at IoU 0.5 (non-difficult objects matched by a detection scoring at least
``--score``), VOC mAP@0.5 (all detections), tiles, tiles/s, seconds, and peak RSS (MiB, the child's ``VmHWM``) next
to its RSS before inference. The last line is ``SUMMARY``.

    python benchmarks/sliced.py [--width 6000 --height 4000] [--slices 640 320] [--overlap 0.2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_scene(width: int, height: int, cell: int, sizes: tuple[float, float], seed: int) -> tuple[np.ndarray, dict]:
    """One shape per ``cell``-pixel grid cell, centred at a random point that keeps it inside its cell."""
    from detect.data.shapes import SHAPES_CLASSES, Scene, background, render_annotated, shape_object

    rng = np.random.default_rng(seed)
    canvas = background(rng, height, width, distractors=int(width * height / 40_000))
    objects = []
    for top in range(0, height - cell + 1, cell):
        for left in range(0, width - cell + 1, cell):
            size = rng.uniform(*sizes)
            margin = size / 2 + 2
            centre = (rng.uniform(left + margin, left + cell - margin), rng.uniform(top + margin, top + cell - margin))
            label = int(rng.integers(len(SHAPES_CLASSES))) + 1
            objects.append(shape_object(rng, label, size, centre, canvas))
    return render_annotated(Scene(canvas, tuple(objects)))


def _memory_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, from ``/proc/self/status``. Not ``ru_maxrss``:
    Linux keeps that across ``execve``, so a spawned child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(config: dict, scene_path: str) -> dict:
    """In a child: load the model and the scene, run one configuration, report detections, time and RSS."""
    import torch

    from detect.inference import forward_batch, load_model
    from detect.slicing import SliceOptions, detect_sliced

    torch.set_num_threads(config["threads"])
    model = load_model("faster_rcnn_shapes")
    image = np.load(scene_path)
    options = None
    if config["slice"] is not None:
        options = SliceOptions(config["slice"], config["overlap"], batch_size=8, full_image=config["full"], merge=config["merge"])
        detect_sliced(model, [image[:800, :800]], options)  # warm-up: kernels compiled or loaded from numba's cache
    forward_batch(model, [image[:320, :320]])
    before = _memory_mib("VmRSS")
    start = time.perf_counter()
    if config["slice"] is None:
        result, tiles = forward_batch(model, [image])[0], 1
    else:
        result = detect_sliced(model, [image], options)[0]
        tiles = result.extras["tiles"]
    seconds = time.perf_counter() - start
    peak = _memory_mib("VmHWM")
    return {
        "boxes": result.boxes.numpy(), "scores": result.scores.numpy(), "labels": result.labels.numpy(),
        "tiles": tiles, "seconds": seconds, "rss_before": before, "rss_peak": peak,
    }


def recall_at(result: dict, target: dict, score: float, iou: float = 0.5) -> float:
    """Fraction of non-difficult objects with a same-class detection (score >= ``score``) at IoU >= ``iou``."""
    import torch

    from detect.ops.boxes import box_iou

    keep = result["scores"] >= score
    gt = ~target["difficult"]
    if not gt.any():
        return float("nan")
    det_boxes, det_labels = torch.from_numpy(result["boxes"][keep]), result["labels"][keep]
    ious = box_iou(torch.from_numpy(target["boxes"][gt]), det_boxes).numpy()  # (G, D)
    same = target["labels"][gt][:, None] == det_labels[None, :]
    return float(((ious >= iou) & same).any(1).mean()) if det_boxes.numel() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--cell", type=int, default=400, help="grid cell per shape (pixels)")
    parser.add_argument("--min-size", type=float, default=140.0)
    parser.add_argument("--max-size", type=float, default=260.0)
    parser.add_argument("--slices", type=int, nargs="+", default=[640, 320])
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--score", type=float, default=0.25, help="score threshold for recall")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from detect.data.shapes import SHAPES_CLASSES
    from detect.evaluate import DetectionEvaluator

    image, target = make_scene(args.width, args.height, args.cell, (args.min_size, args.max_size), args.seed)
    print(f"scene {args.width}x{args.height}: {len(target['boxes'])} objects "
          f"({int((~target['difficult']).sum())} not difficult), {args.min_size:g}-{args.max_size:g} px")
    configs = [("whole", {"slice": None, "merge": None, "full": False})]
    for size in args.slices:
        configs.append((f"slice {size} nms", {"slice": size, "merge": "nms", "full": False}))
        configs.append((f"slice {size} greedy", {"slice": size, "merge": "greedy", "full": False}))
    configs.append((f"slice {args.slices[0]} greedy+full", {"slice": args.slices[0], "merge": "greedy", "full": True}))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        scene_path = str(Path(tmp) / "scene.npy")
        np.save(scene_path, image)
        del image
        context = multiprocessing.get_context("spawn")
        print(f"{'configuration':24} {'recall@.5':>9} {'mAP@.5':>7} {'tiles':>6} {'tiles/s':>8} {'s':>6} "
              f"{'RSS MiB before/peak':>20}")
        for name, config in configs:
            with context.Pool(1) as pool:
                result = pool.apply(_run, ({**config, "overlap": args.overlap, "threads": args.threads}, scene_path))
            evaluator = DetectionEvaluator(SHAPES_CLASSES)
            evaluator.add(0, (result["boxes"], result["scores"], result["labels"]), target)
            rows[name] = (recall_at(result, target, args.score), evaluator.compute()["mAP"], result)
            recall, m_ap, _ = rows[name]
            rate = result["tiles"] / result["seconds"]
            print(f"{name:24} {recall:9.3f} {m_ap:7.3f} {result['tiles']:6d} {rate:8.1f} {result['seconds']:6.1f} "
                  f"{result['rss_before']:9.0f}/{result['rss_peak']:.0f}", flush=True)
    size = args.slices[0]
    whole = rows["whole"][0]
    greedy, nms = rows[f"slice {size} greedy"], rows[f"slice {size} nms"]
    peaks = " ".join(f"{s}:{rows[f'slice {s} greedy'][2]['rss_peak']:.0f}MiB" for s in args.slices)
    print(f"SUMMARY whole recall {whole:.3f} | slice {size} greedy recall {greedy[0]:.3f} mAP {greedy[1]:.3f} | "
          f"nms recall {nms[0]:.3f} mAP {nms[1]:.3f} | peak RSS {peaks} | goal sliced>=0.9 whole<0.3: "
          f"{'met' if greedy[0] >= 0.9 and whole < 0.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
