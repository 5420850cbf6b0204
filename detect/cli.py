"""The ``detect`` command (also ``python -m detect``).

Exit codes, for every subcommand: 0 all done, 1 some inputs failed, 2 usage or set-up error. Errors of ours
(:class:`detect.errors.DetectError`) print one ``error[code]: message`` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import Callable

from detect import __version__
from detect import demo, train, weights
from detect.data import cli as data_cli
from detect.errors import DetectError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _cmd_info(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    print(f"detect {__version__}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"cuda available: {torch.cuda.is_available()}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    script = BENCHMARKS_DIR / f"{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem for p in BENCHMARKS_DIR.glob("[!_]*.py")) if BENCHMARKS_DIR.is_dir() else []
        print(
            f"error[unknown_benchmark]: no benchmark {args.name!r} (benchmarks run from a source checkout; "
            f"available: {', '.join(available) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    sys.argv = [str(script), *args.bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        return int(stop.code or 0)
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from detect.predict import PredictOptions, Refinement, default_weights, load_detector, resolve_classes, run

    detector = load_detector(args.model, args.weights or default_weights(args.model), args.device)
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

    settings = Settings()
    check_weights(settings)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    from detect.predict import FAMILIES, FORMATS

    p = sub.add_parser("predict", help="detect objects in image files and folders, writing results under --out")
    p.add_argument("sources", nargs="+", metavar="SRC", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--model", default="faster_rcnn", choices=sorted(FAMILIES), help="detector family")
    p.add_argument("--weights", help="registered weights name or weights file (default: the bundled <model>_shapes)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--workers", type=_positive_int, default=2, help="image decoding threads")
    p.add_argument("--proposal-workers", type=_non_negative_int, default=default_proposal_workers(),
                   help="selective search processes for rcnn/sppnet (default: 0 on 1-2 CPUs, else min(4, CPUs - 1); "
                        "0: in-process)")
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--max-detections", type=_positive_int)
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


def default_proposal_workers(cpus: int | None = None) -> int:
    """Selective-search processes for ``detect predict``: none on 1-2 CPUs, where the model's forward already
    keeps every core busy (64 images on 2 cores: 22.1 s in-process, 24.7 s with one worker), else one per spare
    core up to 4."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(4, cpus - 1)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect", description="Two-stage object detection toolkit.")
    parser.add_argument("--version", action="version", version=f"detect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions and devices")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (e.g. kernels)")
    p.add_argument("name", help="benchmark name, e.g. kernels or selective_search")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=_cmd_bench)

    _add_predict_parser(sub)
    weights.add_cli(sub)
    data_cli.add_cli(sub)
    train.add_cli(sub)
    demo.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits 2 on usage errors, 0 on --help
        return int(stop.code or 0)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DetectError as err:
        print(f"error[{err.code}]: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `detect ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
