"""The ``detect`` command (also ``python -m detect``): all argument parsing and command handlers live in this
package, one module per group of subcommands (:mod:`.predict`: predict, serve, demo; :mod:`.train`: train, eval;
:mod:`.weights`; :mod:`.data`; :mod:`.export`; :mod:`.compare`); the library modules they call take plain
arguments, never argparse.

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
from detect.cli import compare, data, export, predict, train, weights
from detect.cli.predict import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from detect.errors import DetectError

__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "build_parser", "main"]

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


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

    for group in (predict, weights, data, train, export, compare):
        group.add_parser(sub)
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
