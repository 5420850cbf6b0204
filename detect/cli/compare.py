"""``detect compare IMAGE...``: R-CNN, SPP-Net and Faster R-CNN on the same images (library: :mod:`detect.compare`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detect.compare import compare, format_detections, format_table, side_by_side
from detect.errors import DetectError
from detect.inference import encode_png
from detect.io import atomic_write, decode_image

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def ranks(text: str) -> tuple[int, int]:
    """``"R6,R7"`` -> ``(R6, R7)``, both positive."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected two positive ranks R6,R7 (e.g. 64,16), got {text!r}")
    return int(parts[0]), int(parts[1])


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``compare``."""
    p = sub.add_parser(
        "compare",
        help="run R-CNN, SPP-Net and Faster R-CNN on the same images: per-stage times, detections, one picture",
        description="Selective search + R-CNN, selective search + SPP-Net and RPN + Faster R-CNN on the same images "
                    "(bundled shapes weights unless given): prints the time per image of each stage (proposals, "
                    "features, pooling, heads, NMS) and each detector's detections, and writes one side-by-side "
                    "annotated picture (a row per image, a column per detector).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", default="compare.png", help="the side-by-side picture, PNG (default: compare.png)")
    p.add_argument("--rcnn-weights", help="registered name or file (default: the bundled rcnn_shapes)")
    p.add_argument("--sppnet-weights", help="registered name or file (default: the bundled sppnet_shapes)")
    p.add_argument("--faster-rcnn-weights", help="registered name or file (default: the bundled faster_rcnn_shapes)")
    p.add_argument("--sppnet-svd", type=ranks, metavar="R6,R7",
                   help="compress SPP-Net's fc6/fc7 by truncated SVD to these ranks first (e.g. 64,16)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detections shown and drawn (default 0.5)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present; the default), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    images, names, failed = [], [], 0
    for path in args.images:
        try:
            images.append(decode_image(Path(path)))
            names.append(path)
        except DetectError as err:  # this image fails, the others go on
            print(f"error[{err.code}]: {path}: {err.message}", file=sys.stderr)
            failed += 1
    if not images:
        return EXIT_PARTIAL
    weights = {"rcnn": args.rcnn_weights, "sppnet": args.sppnet_weights, "faster_rcnn": args.faster_rcnn_weights}
    runs = compare(
        images,
        {family: name for family, name in weights.items() if name},
        device=args.device,
        score_threshold=args.score_threshold,
        sppnet_ranks=args.sppnet_svd,
    )
    print(f"{len(images)} image(s); time per image of one call over all of them, after one warm-up call each")
    print(format_table(runs, len(images)))
    print(f"\ndetections (score >= {args.score_threshold}):")
    print(format_detections(runs, names))
    out = Path(args.out)
    atomic_write(out, encode_png(side_by_side(images, runs)))
    print(f"\nside-by-side picture: {out}")
    return EXIT_PARTIAL if failed else EXIT_OK
