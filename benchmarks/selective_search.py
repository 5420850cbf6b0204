"""Selective search benchmark: ours against OpenCV-contrib's ``ximgproc`` selective search, same images, same run.

    python benchmarks/selective_search.py [--images DIR --annotations DIR] [--num-images 20] [--modes fast,quality]

Needs ``opencv-contrib-python-headless`` (the ``bench`` extra) for the peer. Without ``--images`` the images are the
built-in synthetic shapes set at PASCAL-like sizes (300-500 pixels a side); with it, VOC XML files in
``--annotations`` name the images (``<filename>``). Every annotated object counts, ``difficult`` ones included.

Rows: OpenCV's fast mode (``switchToSelectiveSearchFast``, all its boxes), ours in each requested mode (at most
``max_boxes`` = 2,000), and ours truncated per image to OpenCV's box count. Columns: mean boxes per image, recall at
IoU 0.5, MABO (mean over ground-truth boxes of the best IoU with any proposal) and the median seconds per image,
everything single-threaded (``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``, numba kernels are serial, no
worker processes). The numba JIT/cache load is paid once on a small image before timing and reported apart.
The last line sums up the ratios (recall and MABO: ours - OpenCV; speed: OpenCV seconds / ours).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detect.evaluate import proposal_recall  # noqa: E402
from proposals.selective_search import SelectiveSearchConfig, selective_search  # noqa: E402

Sample = tuple[np.ndarray, np.ndarray]  # RGB uint8 (H, W, 3), float32 (N, 4) xyxy ground truth


def load_voc(images: Path, annotations: Path, limit: int) -> list[Sample]:
    from detect.data.voc import parse_voc_xml

    samples = []
    for xml in sorted(annotations.glob("*.xml"))[:limit]:
        record = parse_voc_xml(xml)
        bgr = cv2.imread(str(images / record.filename), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"cannot read image {images / record.filename}")
        gt = np.array([obj.box for obj in record.objects], dtype=np.float32).reshape(-1, 4)
        samples.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), gt))
    return samples


def load_shapes(limit: int) -> list[Sample]:
    from detect.data.shapes import ShapesConfig, ShapesDataset

    data = ShapesDataset(ShapesConfig(num_images=limit, image_size=300, image_size_max=500, seed=0))
    return [(image, target["boxes"]) for image, target in (data[i] for i in range(len(data)))]


def opencv_fast(image: np.ndarray) -> np.ndarray:
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    search.switchToSelectiveSearchFast()
    rects = search.process().astype(np.float32).reshape(-1, 4)  # (R, 4) xywh
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def run_methods(methods: dict, samples: list[Sample]) -> dict[str, dict]:
    """Every method on every image, interleaved per image so that load drift hits all methods alike."""
    seconds = {name: [] for name in methods}
    boxes = {name: [] for name in methods}
    for image, _ in samples:
        for name, method in methods.items():
            start = time.perf_counter()
            proposals = method(image)
            seconds[name].append(time.perf_counter() - start)
            boxes[name].append(np.asarray(proposals, dtype=np.float32))
    return {name: {"boxes": boxes[name], "seconds": statistics.median(seconds[name])} for name in methods}


def scores(proposals: list[np.ndarray], samples: list[Sample]) -> dict:
    """Mean boxes per image, recall at IoU 0.5 and MABO, with the project's evaluation code."""
    result = proposal_recall(
        [torch.from_numpy(p).reshape(-1, 4) for p in proposals],
        [torch.from_numpy(gt) for _, gt in samples],
        iou_thresholds=(0.5,),
    )
    return {"boxes": result["mean_boxes"], "recall": result["recall@0.5"], "mabo": result["mabo"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of images (VOC JPEGImages)")
    parser.add_argument("--annotations", type=Path, help="folder of VOC XML annotations")
    parser.add_argument("--num-images", type=int, default=20)
    parser.add_argument("--modes", default="fast,quality", help="our modes to run (single, fast, quality)")
    args = parser.parse_args(argv)
    if (args.images is None) != (args.annotations is None):
        parser.error("--images and --annotations go together")
    if not hasattr(cv2, "ximgproc"):
        raise SystemExit("the OpenCV peer needs opencv-contrib-python-headless (pip install the 'bench' extra)")

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    samples = load_voc(args.images, args.annotations, args.num_images) if args.images else load_shapes(args.num_images)
    source = f"VOC {args.images}" if args.images else "synthetic shapes"
    print(f"{len(samples)} images ({source}), {sum(len(gt) for _, gt in samples)} objects; opencv {cv2.__version__}")

    start = time.perf_counter()
    selective_search(samples[0][0][:64, :64], SelectiveSearchConfig(mode="quality"))
    print(f"numba JIT / cache load, once: {time.perf_counter() - start:.2f} s (excluded from timings)")

    methods = {"opencv fast": opencv_fast}
    for mode in args.modes.split(","):
        config = SelectiveSearchConfig(mode=mode)
        methods[f"ours {mode}"] = lambda image, config=config: selective_search(image, config).numpy()
    results = run_methods(methods, samples)
    peer = results.pop("opencv fast")
    rows = [{"name": "opencv fast", "seconds": peer["seconds"]} | scores(peer["boxes"], samples)]
    for name, result in results.items():
        rows.append({"name": name, "seconds": result["seconds"]} | scores(result["boxes"], samples))
        truncated = [b[: len(p)] for b, p in zip(result["boxes"], peer["boxes"])]
        rows.append({"name": f"{name} @ opencv count", "seconds": None} | scores(truncated, samples))

    print(f"{'method':<28}{'boxes/img':>10}{'recall@0.5':>12}{'MABO':>8}{'s/img':>9}{'speed':>8}")
    for row in rows:
        timing = f"{row['seconds']:9.3f}{peer['seconds'] / row['seconds']:7.2f}x" if row["seconds"] else ""
        print(f"{row['name']:<28}{row['boxes']:10.0f}{row['recall']:12.3f}{row['mabo']:8.3f}{timing}")

    reference = rows[0]
    summary = []
    for row in rows[1:]:
        parts = [f"recall {row['recall'] - reference['recall']:+.3f}", f"MABO {row['mabo'] - reference['mabo']:+.3f}"]
        if row["seconds"]:
            parts.append(f"speed {peer['seconds'] / row['seconds']:.2f}x")
        parts.append(f"at {row['boxes']:.0f} vs {reference['boxes']:.0f} boxes")
        summary.append(f"{row['name']}: " + " ".join(parts))
    print("SUMMARY vs opencv fast: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
