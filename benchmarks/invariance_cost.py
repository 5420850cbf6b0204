"""What batch- and thread-invariant CPU inference costs (issue 21): this checkout against an earlier one.

    python benchmarks/invariance_cost.py --before DIR [--repeats 5] [--threads 2] [--batch 8]

``DIR`` is a checkout of the commit before the change (``git worktree add /tmp/before 9f04a02``). Each model
(the bundled ``*_shapes`` weights, loaded as every engine loads them) runs a batch of ``--batch`` shapes images of
mixed sizes (the region detectors with their selective-search proposals given, so only the model is timed) in a
child process per checkout, the children alternating ``--repeats`` times; each child reports the median of 3
calls. Printed: images/s before and after and their ratio per model (medians over the repeats), then one
``SUMMARY`` line. Run it on an idle machine: on a shared one the ratios carry the neighbours' noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = ("rcnn_shapes", "sppnet_shapes", "faster_rcnn_shapes")
SIZES = ((96, 96), (100, 150), (120, 90), (64, 128), (40, 120), (72, 100), (160, 200), (200, 160))

CHILD = r"""
import json, statistics, sys, time
import numpy as np, torch
from PIL import Image
from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.inference import load_model
from proposals.selective_search import selective_search
threads, batch, sizes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(threads)
images = []
for index in range(batch):
    height, width = sizes[index % len(sizes)]
    scene = ShapesDataset(ShapesConfig(num_images=1, image_size=height, image_size_max=None, seed=500 + index))[0][0]
    images.append(np.ascontiguousarray(np.asarray(Image.fromarray(scene).resize((width, height)))))
out = {}
for name in sys.argv[4:]:
    model = load_model(name)
    extra = {}
    if hasattr(model, "proposer"):
        extra = {"proposals": [selective_search(image, model.proposer.config) for image in images]}
    with torch.inference_mode():
        model(images, **extra)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model(images, **extra)
            times.append(time.perf_counter() - start)
    out[name] = len(images) / statistics.median(times)
print(json.dumps(out))
"""


def child(root: Path, threads: int, batch: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-c", CHILD, str(threads), str(batch), json.dumps(SIZES), *MODELS]
    result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the commit before the change")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    after_root = Path(__file__).resolve().parents[1]
    rates: dict[str, dict[str, list[float]]] = {"before": {m: [] for m in MODELS}, "after": {m: [] for m in MODELS}}
    for _ in range(args.repeats):
        for label, root in (("before", args.before.resolve()), ("after", after_root)):
            for name, rate in child(root, args.threads, args.batch).items():
                rates[label][name].append(rate)
    ratios = []
    for name in MODELS:
        before, after = statistics.median(rates["before"][name]), statistics.median(rates["after"][name])
        ratios.append(after / before)
        print(f"{name:20s} before {before:7.2f} img/s  after {after:7.2f} img/s  after/before {after / before:.3f}")
    summary = " ".join(f"{name}={ratio:.3f}" for name, ratio in zip(MODELS, ratios))
    print(f"SUMMARY invariance cost (after/before images/s, {args.threads} threads, batch {args.batch}): {summary}")


if __name__ == "__main__":
    main()
