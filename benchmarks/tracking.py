"""Tracking on generated videos: MOTA and IDF1 of ``--track`` with the bundled shapes model (issue 26).

``--videos`` videos of ``--frames`` frames (320x320, ``--objects`` shapes each, moving on straight paths that
bounce off the border, so they cross and occlude each other; :mod:`detect.data.shapes_video`) are written as MP4
files and run exactly as ``detect predict clip.mp4 --track`` runs them (:func:`detect.engines.video.iter_video_results`,
decoding the MP4 with OpenCV, the bundled ``faster_rcnn_shapes`` model, score threshold ``--score``). The
ground truth is the set's own: an object more than 60 % hidden is not annotated in that frame. ``motmetrics``
(``pip install 'detect[bench]'``) matches hypotheses to ground truth at IoU >= 0.5 and reports MOTA, IDF1, ID
switches, misses and false positives over all videos. The last line is ``SUMMARY``; the goal is MOTA >= 0.9.

    python benchmarks/tracking.py [--videos 4] [--frames 60] [--objects 4] [--score 0.5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--score", type=float, default=0.5, help="score threshold of the reported detections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import motmetrics as mm
    import torch

    from detect.data.shapes_video import MovingShapesConfig, moving_shapes, write_video
    from detect.engines.video import iter_video_results
    from detect.inference import Refinement, load_model

    torch.set_num_threads(args.threads)
    model = load_model("faster_rcnn_shapes")
    config = MovingShapesConfig(frames=args.frames, objects=args.objects, seed=args.seed)
    accumulators, names, frames, seconds = [], [], 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for v in range(args.videos):
            truth = list(moving_shapes(config, v))
            path = write_video(Path(tmp) / f"video{v}.mp4", [image for image, _ in truth], fps=25.0)
            accumulator = mm.MOTAccumulator(auto_id=True)
            start = time.perf_counter()
            results = list(iter_video_results(model, str(path), refinement=Refinement(score_threshold=args.score), track=True))
            seconds += time.perf_counter() - start
            if len(results) != len(truth) or any(r.error is not None for r in results):
                raise SystemExit(f"video {v}: {len(results)} results for {len(truth)} frames")
            for result, (_, target) in zip(results, truth):
                tracked = result.track_ids >= 0
                hyp_boxes = result.detections.boxes.numpy()[tracked]
                hyp_ids = result.track_ids[tracked]
                gt = target["boxes"]
                distances = _distances(gt, hyp_boxes)
                accumulator.update(target["ids"].tolist(), hyp_ids.tolist(), distances)
            accumulators.append(accumulator)
            names.append(f"video{v}")
            frames += len(results)
    host = mm.metrics.create()
    metrics = ["num_frames", "mota", "idf1", "num_switches", "num_misses", "num_false_positives", "num_objects"]
    table = host.compute_many(accumulators, metrics=metrics, names=names, generate_overall=True)
    print(mm.io.render_summary(table, formatters=host.formatters, namemap=mm.io.motchallenge_metric_names))
    overall = table.loc["OVERALL"]
    print(f"SUMMARY MOTA {overall['mota']:.3f} IDF1 {overall['idf1']:.3f} ID switches {int(overall['num_switches'])} "
          f"over {frames} frames, {args.videos} videos of {args.objects} shapes; {frames / seconds:.1f} frames/s "
          f"(decode + detect + track); goal MOTA >= 0.9: {'met' if overall['mota'] >= 0.9 else 'NOT met'}")


def _distances(gt: np.ndarray, hyp: np.ndarray) -> np.ndarray:
    """motmetrics' distance ``1 - IoU``, NaN (no match) below IoU 0.5; torchvision's IoU, as motmetrics 1.4's
    ``iou_matrix`` calls ``np.asfarray``, which NumPy 2 removed."""
    import torch
    from torchvision.ops import box_iou

    iou = box_iou(torch.as_tensor(gt, dtype=torch.float64).reshape(-1, 4), torch.as_tensor(hyp, dtype=torch.float64).reshape(-1, 4))
    distance = 1.0 - iou.numpy()
    distance[iou.numpy() < 0.5] = np.nan
    return distance


if __name__ == "__main__":
    main()
