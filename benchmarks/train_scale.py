"""Data-parallel training throughput: images per second of ``detect train --nproc N`` at 1 and at N ranks, and the
scaling efficiency (N-rank throughput / (N x 1-rank throughput)).

Each rank count trains the same recipe (fasterrcnn_tiny on synthetic shapes, no validation) at the same
per-process batch, so N ranks process N times the images per iteration. Throughput is images / the run's
optimisation seconds (``summary.json``'s ``train_seconds``: the steps and the wait for their batches, not process
start-up or the final save). ``--repeats`` runs each count several times and takes the median.

    python benchmarks/train_scale.py                                  # CPU: 1 and 2 ranks (gloo)
    python benchmarks/train_scale.py --device cuda --ranks 1,all      # 1 GPU against every visible GPU (NCCL)

On a machine with fewer cores than ranks, or cores shared with other work, expect no gain: the figure is printed
as measured. Ends with one ``SUMMARY`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def recipe(args: argparse.Namespace) -> dict:
    return {
        "detector": "fasterrcnn_tiny",
        "data": {"shapes": {"num_images": args.images, "image_size": args.image_size, "seed": 0}},
        "augment": {"flip_prob": 0.5},
        "optimizer": {"lr": 0.01},
        "max_iterations": args.iterations,
        "batch_size": args.batch_size,
        "checkpoint_every": args.iterations,
        "device": args.device,
        "workers": args.loader_workers,
        "mixed_precision": args.device.startswith("cuda"),
    }


def run(args: argparse.Namespace, ranks: int, folder: Path) -> float:
    """Images per second of one ``detect train --nproc ranks`` run."""
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(args)))
    out = folder / f"run-{ranks}"
    command = [sys.executable, "-m", "detect", "train", "--recipe", str(path), "--out", str(out), "--nproc", str(ranks)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        sys.exit(f"train_scale: {ranks} rank(s) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return args.iterations * args.batch_size * ranks / summary["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated; 'all' = every visible GPU")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2, help="per-process batch")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    counts = [gpus if c == "all" else int(c) for c in args.ranks.split(",")]
    if args.device.startswith("cuda") and (not gpus or max(counts) > gpus):
        sys.exit(f"train_scale: {max(counts)} rank(s) on cuda, {gpus} GPU(s) visible")
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in dict.fromkeys(counts):
            rates[ranks] = statistics.median(run(args, ranks, Path(tmp)) for _ in range(args.repeats))
            print(f"{ranks} rank(s): {rates[ranks]:.2f} images/s", flush=True)
    base = rates[counts[0]]
    parts = [f"{r} rank(s) {v:.2f} img/s" for r, v in rates.items()]
    efficiency = [f"{r} ranks {v / (base * r / counts[0]):.2f}" for r, v in rates.items() if r != counts[0]]
    print(f"SUMMARY train_scale device={args.device} cores={os.cpu_count()} per-process batch {args.batch_size}, "
          f"{args.iterations} iterations: {', '.join(parts)}; scaling efficiency (vs {counts[0]} rank(s)): "
          f"{', '.join(efficiency) or '-'}")


if __name__ == "__main__":
    main()
