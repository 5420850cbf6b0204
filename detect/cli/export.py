"""``detect export``: write a detector as ONNX (optionally int8), a ``.pt2`` program or an AOTInductor package
(see :mod:`detect.export`)."""

from __future__ import annotations

import argparse

from detect.cli.args import positive_int
from detect.detectors import families

EXIT_OK = 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    p = sub.add_parser(
        "export",
        help="export a detector with torch.export to ONNX, .pt2 or AOTInductor "
             "(run it with `detect predict --backend onnxruntime|pt2|aoti`)",
    )
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or weights file (default: the bundled <model>_shapes)")
    p.add_argument("--format", default="onnx", choices=("onnx", "pt2", "aoti"),
                   help="onnx (ONNX Runtime), pt2 (torch.export.save) or aoti (AOTInductor, needs a C++ compiler); "
                        "pt2 and aoti are Faster R-CNN only")
    p.add_argument("--out", required=True, help="output file (.onnx, or .pt2 for pt2 and aoti)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--int8", action="store_true",
                   help="quantise to int8 after export (ONNX, Faster R-CNN; calibrated on shapes images)")
    p.add_argument("--calibration-images", type=positive_int, default=16, help="images for int8 calibration")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from detect import export
    from detect.inference import default_weights, load_model

    if args.int8 and args.format != "onnx":  # before the model loads
        raise export.ConfigError("--int8 applies to ONNX exports only")
    if args.opset is not None:
        export.check_opset(args.opset)
    weights = args.weights or default_weights(args.model)
    model = load_model(weights, "cpu", args.model)
    info = export.export(
        weights, args.out, args.format, model=model, int8=args.int8, calibration_images=args.calibration_images,
        opset=args.opset or export.OPSET,
    )
    size = info.path.stat().st_size / 1e6
    kind = f"{info.format}{' int8' if args.int8 else ''}"
    print(f"{info.path}: {kind}, {info.detector}, {size:.1f} MB, from weights sha256 {info.source_sha256[:12]} "
          f"in {info.seconds:.1f} s")
    return EXIT_OK
