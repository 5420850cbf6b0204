"""``detect demo``: detection out of the box, on sample images the project draws itself.

The README's main job. It writes ``--num-images`` scenes of the synthetic shapes set (a seed no training or
validation split uses) as a VOC folder under ``OUT/samples``, runs ``detect predict`` on them with bundled weights
(``faster_rcnn_shapes`` unless ``--weights`` names others) into ``OUT/detections`` (JSON lines, COCO results and
annotated JPEG copies, as the samples are JPEGs), then scores the written detections against the drawn objects and prints a VOC mAP@0.5
line. Nothing is downloaded.

Decisions: the samples are drawn at 320 pixels (twice the training size: the detectors resize inside, and bigger
annotated images are easier to look at), and the score threshold for the written outputs is 0.5 so the pictures
show confident detections. The mAP line scores those written detections (read back from ``predictions.jsonl``, so
the model runs once): with the low-scoring ones cut it can only be at most the full VOC figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from detect.data.shapes import ShapesConfig, ShapesDataset, write_voc
from detect.evaluate import DetectionEvaluator
from detect.engines.local import PredictOptions, run
from detect.inference import Refinement, default_weights, load_model

DEMO_SEED = 424242  # training uses seed 0, validation 1000
DEMO_SIZE = 320
SHOW_SCORE = 0.5


def run_demo(
    out: str | Path,
    family: str = "faster_rcnn",
    weights: str | None = None,
    num_images: int = 6,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Draw the samples, detect, write the outputs and return ``{"mAP", "images", "detections", "out"}``."""
    out = Path(out)
    detector = load_model(weights or default_weights(family), device, family)
    dataset = ShapesDataset(ShapesConfig(num_images=num_images, image_size=DEMO_SIZE, seed=DEMO_SEED))
    samples = out / "samples"
    ids = write_voc(dataset, samples)
    options = PredictOptions(
        sources=(str(samples / "JPEGImages"),),
        out_dir=out / "detections",
        refinement=Refinement(score_threshold=SHOW_SCORE),
        formats=("jsonl", "coco"),
        save_images=True,
    )
    summary = run(options, detector, progress=sys.stderr if progress else None)
    written = {}  # file name -> its JSON record, read back from what detect predict wrote
    for line in (options.out_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        written[record["file"]] = record["detections"]
    targets = [dataset[index][1] for index in range(len(dataset))]
    evaluator = DetectionEvaluator(dataset.class_names)
    for image_id, target in zip(ids, targets):
        found = written.get(f"{image_id}.jpg", [])
        boxes = np.array([d["box"] for d in found], np.float32).reshape(-1, 4)
        scores = np.array([d["score"] for d in found], np.float32)
        labels = np.array([d["class_id"] for d in found], np.int64)
        evaluator.add(image_id, (boxes, scores, labels), target)
    result = evaluator.compute()
    return {
        "mAP": float(result["mAP"]),
        "images": summary.images,
        "failed": summary.failed,
        "detections": summary.detections,
        "objects": int(sum(int((~np.asarray(t["difficult"])).sum()) for t in targets)),
        "out": str(out),
    }


def format_report(report: dict) -> str:
    """The lines ``detect demo`` prints: the report as JSON, then a sentence with the mAP and where things are."""
    out = Path(report["out"])
    return (
        f"{json.dumps(report)}\n"
        f"detect demo: {report['images']} sample images, {report['detections']} detections with score >= "
        f"{SHOW_SCORE} ({report['objects']} objects drawn); VOC mAP@0.5 of those detections {report['mAP']:.3f}\n"
        f"  annotated images and predictions.jsonl under {out / 'detections'}, the samples (VOC) under "
        f"{out / 'samples'}"
    )
