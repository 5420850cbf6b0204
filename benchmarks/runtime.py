"""Runtime benchmark: PyTorch vs ONNX Runtime (fp32 and int8), the ``.pt2`` program and AOTInductor for Faster
R-CNN, measured in the same run.

    python benchmarks/runtime.py [--repeats 5] [--models r50_fpn,tiny] [--calibration-images 8] [--skip-map]
                                 [--aoti] [--skip-batch8]

Every artefact is the one ``torch.export`` program of the model (:mod:`detect.export`): ONNX for ONNX Runtime,
``.pt2`` run by ``ExportedProgram.module()``, and with ``--aoti`` the AOTInductor package (compiling it takes
minutes on a small machine, hence opt-in). Their ratios against eager PyTorch are printed beside ONNX Runtime's.

Two models: ResNet-50-FPN with seeded random weights (:func:`detect.testing.randomise_frozen_bn`, the classifier
scaled by :data:`detect.testing.CLS_SCALE` so that about 100 detections survive) on 480 x 640 images
(``min_size`` 480, ``max_size`` 640, so nothing is resized), and the bundled ``faster_rcnn_shapes`` (tiny) on
240 x 320 shapes images. Each runs as PyTorch loads it for inference (:func:`detect.inference.load_model`: frozen
BN folded, ``inference_mode``), and as its ONNX export run by ONNX Runtime, fp32 and int8
(:func:`detect.export.quantize`, calibrated on shapes images), through the same detector interface the CLI and the
API call (grouping by padded size, preprocessing included). Times are medians of interleaved runs
(:func:`benchmarks._timing.median_seconds`) with torch's and ONNX Runtime's default thread counts (one per core):
latency at batch 1 and images/s at batch 8. Ratios above 1 mean faster than PyTorch.

Accuracy: the detections of ONNX Runtime fp32 against PyTorch's (largest box and score differences), and, for the
bundled model, VOC mAP@0.5 on the held-out shapes split its manifest states (200 images) for the three runtimes:
the int8 model's mAP change is printed beside its speed-up. Goal (issue 15): ONNX Runtime fp32 >= 1.5x PyTorch at
batch 1 on the CPU, more with int8. The last line sums up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._timing import median_seconds  # noqa: E402
from detect import export  # noqa: E402
from detect.data.shapes import ShapesConfig, ShapesDataset  # noqa: E402
from detect.detectors.faster_rcnn import FasterRCNNConfig, fasterrcnn_resnet50_fpn  # noqa: E402
from detect.inference import load_model  # noqa: E402
from detect.testing import CLS_SCALE, randomise_frozen_bn  # noqa: E402
from detect.transform import TransformConfig  # noqa: E402
from detect.weights import resolve, write_detector  # noqa: E402

RUNTIMES = ("torch", "ort_fp32", "ort_int8")
TORCH_RUNTIMES = ("pt2", "aoti")  # torch.export artefacts run by torch itself


def r50_weights(folder: Path) -> Path:
    """Seeded random R50-FPN weights (480 short side, 640 long) written as a weights file."""
    config = FasterRCNNConfig(transform=TransformConfig((480,), 640))
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(config=config)
    randomise_frozen_bn(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(CLS_SCALE)
    path = folder / "r50_fpn_random.safetensors"
    write_detector(model.eval(), path, config=config)
    return path


def images(height: int, width: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` shapes images of exactly ``height x width`` (cropped from larger renders)."""
    data = ShapesDataset(ShapesConfig(num_images=count, image_size=max(height, width), seed=seed))
    return [np.ascontiguousarray(data[i][0][:height, :width]) for i in range(count)]


def load_runtimes(
    weights: str | Path, folder: Path, calibration: int, aoti: bool = False
) -> tuple[dict[str, object], dict[str, float]]:
    """The model under each runtime, and the export, quantisation (and AOTInductor compile) seconds."""
    stem = Path(str(weights)).stem
    reference = load_model(weights)
    start = time.perf_counter()
    fp32 = export.export(weights, folder / f"{stem}.onnx", model=reference).path
    exported = time.perf_counter() - start
    start = time.perf_counter()
    int8 = export.quantize(fp32, folder / f"{stem}.int8.onnx", calibration_images=calibration)
    quantised = time.perf_counter() - start
    models = {
        "torch": reference,
        "ort_fp32": load_model(fp32, backend="onnxruntime"),
        "ort_int8": load_model(int8, backend="onnxruntime"),
    }
    costs = {"export_s": exported, "quantize_s": quantised}
    for runtime in TORCH_RUNTIMES if aoti else TORCH_RUNTIMES[:1]:
        start = time.perf_counter()
        path = export.export(weights, folder / f"{stem}.{runtime}.pt2", runtime, model=reference).path
        costs[f"{runtime}_s"] = time.perf_counter() - start
        models[runtime] = load_model(path, backend=runtime)
    return models, costs


def differences(models: dict[str, object], batch: list[np.ndarray], runtime: str = "ort_fp32") -> str:
    """How far ``runtime``'s detections are from PyTorch's on ``batch``."""
    with torch.inference_mode():
        expected, _ = models["torch"](batch)
        got, _ = models[runtime](batch)
    counts = [(len(e), len(g)) for e, g in zip(expected, got)]
    same = all(a == b for a, b in counts) and all(bool((e.labels == g.labels).all()) for e, g in zip(expected, got))
    if not same:
        return f"detections differ in count or order: {counts}"
    box = max((float((e.boxes - g.boxes).abs().max()) for e, g in zip(expected, got) if len(e)), default=0.0)
    score = max((float((e.scores - g.scores).abs().max()) for e, g in zip(expected, got) if len(e)), default=0.0)
    return f"{sum(a for a, _ in counts)} detections, same labels, boxes within {box:.1e} px, scores within {score:.1e}"


def time_model(
    models: dict[str, object], batch1: list[np.ndarray], batch8: list[np.ndarray], repeats: int, skip8: bool = False
) -> dict:
    def call(model: object, batch: list[np.ndarray]):
        def run() -> None:
            with torch.inference_mode():
                model(batch)
        return run

    one = median_seconds({name: call(m, batch1) for name, m in models.items()}, repeats)
    if skip8:
        return {name: (one[name], float("nan")) for name in models}
    eight = median_seconds({name: call(m, batch8) for name, m in models.items()}, max(repeats // 2, 2))
    return {name: (one[name], len(batch8) / eight[name]) for name in models}


def held_out_map(models: dict[str, object]) -> dict[str, float]:
    """VOC mAP@0.5 of each runtime on the bundled model's held-out split (from its manifest entry)."""
    from detect.evaluate import evaluate_detector

    held_out = resolve("faster_rcnn_shapes").metrics["eval_data"]["shapes"]
    config = ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in held_out.items()})
    dataset = ShapesDataset(config)
    with torch.inference_mode():
        return {name: evaluate_detector(model, dataset, 8)["mAP"] for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed calls at batch 1 (half at batch 8)")
    parser.add_argument("--models", default="r50_fpn,tiny")
    parser.add_argument("--calibration-images", type=int, default=8, help="shapes images for int8 calibration")
    parser.add_argument("--skip-map", action="store_true", help="skip the held-out mAP of the tiny model")
    parser.add_argument("--aoti", action="store_true", help="also compile and time the AOTInductor package")
    parser.add_argument("--skip-batch8", action="store_true", help="time batch 1 only (a shortened run)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(a shared machine: medians of interleaved runs, compare the ratios)")
    summary = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in args.models.split(","):
            if name == "r50_fpn":
                weights, (height, width) = r50_weights(folder), (480, 640)
            elif name == "tiny":
                weights, (height, width) = "faster_rcnn_shapes", (240, 320)
            else:
                raise SystemExit(f"unknown model {name!r}")
            models, costs = load_runtimes(weights, folder, args.calibration_images, args.aoti)
            batch8 = images(height, width, 8, seed=21)
            compiled = "".join(f", {r} {costs[f'{r}_s']:.1f} s" for r in TORCH_RUNTIMES if f"{r}_s" in costs)
            print(f"\n{name} at {height}x{width}: export {costs['export_s']:.1f} s, int8 quantisation "
                  f"{costs['quantize_s']:.1f} s ({args.calibration_images} calibration images){compiled}")
            for runtime in ("ort_fp32", *[r for r in TORCH_RUNTIMES if r in models]):
                print(f"  {runtime} vs PyTorch: {differences(models, batch8[:2], runtime)}")
            timings = time_model(models, batch8[:1], batch8, args.repeats, args.skip_batch8)
            base_latency, base_rate = timings["torch"]
            print(f"  {'runtime':<10} {'batch 1 ms':>11} {'x torch':>8} {'batch 8 img/s':>14} {'x torch':>8}")
            for runtime, (latency, rate) in timings.items():
                print(f"  {runtime:<10} {latency * 1e3:>11.1f} {base_latency / latency:>8.2f} {rate:>14.2f} "
                      f"{rate / base_rate:>8.2f}")
            ratios = {r: (base_latency / timings[r][0], timings[r][1] / base_rate) for r in RUNTIMES[1:]}
            line = (f"{name} b1 fp32 {ratios['ort_fp32'][0]:.2f}x int8 {ratios['ort_int8'][0]:.2f}x, "
                    f"b8 fp32 {ratios['ort_fp32'][1]:.2f}x int8 {ratios['ort_int8'][1]:.2f}x")
            extra = [f"{r} b1 {base_latency / timings[r][0]:.2f}x" for r in TORCH_RUNTIMES if r in timings]
            if name == "tiny" and not args.skip_map:
                scores = held_out_map({r: models[r] for r in RUNTIMES})
                change = scores["ort_int8"] - scores["torch"]
                print(f"  held-out mAP@0.5 (200 shapes images): torch {scores['torch']:.4f}, ONNX Runtime fp32 "
                      f"{scores['ort_fp32']:.4f}, int8 {scores['ort_int8']:.4f} (change {change:+.4f}, stated bound "
                      f"-{export.INT8_MAX_MAP_DROP}) beside int8's {ratios['ort_int8'][0]:.2f}x at batch 1")
                line += f", int8 mAP {change:+.4f}"
            summary.append(line + "".join(f", {e}" for e in extra))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    goal = all(float(s.split("fp32 ")[1].split("x")[0]) >= 1.5 for s in summary)
    print(f"runtime (ONNX Runtime / PyTorch, medians): {'; '.join(summary)}; "
          f"goal fp32 >= 1.5x at batch 1: {'met' if goal else 'not met'}")


if __name__ == "__main__":
    main()
