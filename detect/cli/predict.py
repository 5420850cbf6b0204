"""``detect predict``, ``detect serve`` and ``detect demo``: the commands that run models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from detect import demo
from detect.cli.args import non_negative_int, positive_int
from detect.detectors import families
from detect.engines.local import FORMATS, PredictOptions, default_proposal_workers, prepare_output_dir, run
from detect.errors import ConfigError
from detect.inference import Refinement, check_thresholds, default_weights, load_model, resolve_classes

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``, ``serve`` and ``demo``."""
    p = sub.add_parser("predict", help="detect objects in image files and folders, writing results under --out")
    p.add_argument("sources", nargs="+", metavar="SRC", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or weights file (default: the bundled <model>_shapes)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--workers", type=positive_int, default=2, help="image decoding threads")
    p.add_argument("--proposal-workers", type=non_negative_int, default=default_proposal_workers(),
                   help="selective search processes for rcnn/sppnet (default: 0 on 1-2 CPUs, else min(4, CPUs - 1); "
                        "0: in-process)")
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--max-detections", type=positive_int)
    p.add_argument("--classes", help="comma-separated class names or 1-based ids to keep")
    p.add_argument("--format", action="append", choices=FORMATS, help="output format (repeatable; default jsonl)")
    p.add_argument("--save-images", action="store_true", help="also write annotated copies (<name>.annotated.png)")
    p.add_argument("--resume", action="store_true", help="skip inputs the manifest records as done")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("serve", help="run the REST API (settings from DETECT_* environment variables)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="detect objects in generated sample images with the bundled weights")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or file (default: the bundled <model>_shapes)")
    p.add_argument("--num-images", type=positive_int, default=6, help="sample images to draw (default 6)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_demo)


def _cmd_predict(args: argparse.Namespace) -> int:
    check_thresholds(args.score_threshold, args.iou_threshold, args.max_detections)  # before anything is loaded
    prepare_output_dir(args.out)
    detector = load_model(args.weights or default_weights(args.model), args.device, args.model)
    classes = None if args.classes is None else resolve_classes(args.classes.split(","), detector.class_names)
    options = PredictOptions(
        sources=tuple(args.sources),
        out_dir=Path(args.out),
        recursive=args.recursive,
        batch_size=args.batch_size,
        refinement=Refinement(args.score_threshold, args.iou_threshold, args.max_detections, classes),
        formats=tuple(dict.fromkeys(args.format or ["jsonl"])),
        save_images=args.save_images,
        resume=args.resume,
        workers=args.workers,
        proposal_workers=args.proposal_workers,
    )
    summary = run(options, detector, progress=sys.stderr)
    if summary.images + summary.failed + summary.skipped == 0:
        print("error[no_inputs]: no image found in the given sources", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.service import check_weights
    from api.settings import Settings

    settings = read_settings(Settings)
    check_weights(settings)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def read_settings(settings_class: type) -> object:
    """The service settings from the ``DETECT_*`` variables; an invalid one is a :class:`ConfigError` naming the
    variable, its value and the problem (one line, exit 2), never a pydantic traceback."""
    from pydantic import ValidationError

    try:
        return settings_class()
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first.get("loc") else "?"
        variable = f"DETECT_{field.upper()}"
        value = os.environ.get(variable)
        shown = f"={value[:80]!r}" if value is not None else ""
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {variable}{shown}: {first['msg']}{more}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    report = demo.run_demo(args.out, args.model, args.weights, args.num_images, args.device)
    print(demo.format_report(report))
    return EXIT_PARTIAL if report["failed"] else EXIT_OK
