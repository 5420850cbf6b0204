"""The ``detect`` command (also ``python -m detect``): all argument parsing and command handlers live in this
package, one module per group of subcommands (:mod:`.predict`: predict, serve, demo; :mod:`.train`: train, eval;
:mod:`.weights`; :mod:`.data`; :mod:`.export`; :mod:`.compare`); the library modules they call take plain
arguments, never argparse.

Start-up is lazy: ``detect --version`` and ``detect --help`` import no command module (so neither torch nor
FastAPI), and ``detect CMD ...`` imports only CMD's module. :data:`COMMANDS` lists every command with its
module and one-line help; the help listing is built from it, and CMD's module builds CMD's own arguments
(tests/test_cli.py checks the two agree and that ``--version`` leaves torch unimported).

Exit codes, for every subcommand: 0 all done, 1 some inputs failed, 2 usage or set-up error. Errors of ours
(:class:`detect.errors.DetectError`) print one ``error[code]: message`` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Callable

from detect import __version__
from detect.cli.args import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from detect.errors import DetectError

__all__ = ["COMMANDS", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "build_parser", "main"]

# command -> (its module under detect.cli, or None for the two built here; its line in `detect --help`)
COMMANDS: dict[str, tuple[str | None, str]] = {
    "predict": ("predict", "detect objects in image files and folders (results under runs/predict, or --out)"),
    "serve": ("predict", "run the REST API and its web page (--weights FILE serves one model; settings: DETECT_*)"),
    "demo": ("predict", "detect objects in generated sample images with the bundled weights"),
    "weights": ("weights", "list, import and download detector weights"),
    "data": ("data", "data set tools"),
    "train": ("train", "train a detector from a recipe file"),
    "eval": ("train", "COCO and VOC metrics, PR curves and a confusion matrix of trained weights"),
    "export": ("export", "export a detector to ONNX or TorchScript (run ONNX with `detect predict --backend onnxruntime`)"),
    "compare": ("compare", "run R-CNN, SPP-Net and Faster R-CNN on the same images: per-stage times, detections, one picture"),
    "info": (None, "versions and devices"),
    "bench": (None, "run a benchmark script from benchmarks/ (e.g. kernels)"),
}

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


class _Only:
    """Stands in for argparse's sub-command action when a command module registers its commands: only the
    ``wanted`` ones are registered (with their :data:`COMMANDS` help line); the others go to a parser nobody reads."""

    def __init__(self, sub: argparse._SubParsersAction, wanted: set[str]) -> None:
        self.sub, self.wanted = sub, wanted

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if name not in self.wanted:
            return argparse.ArgumentParser(add_help=False)
        return self.sub.add_parser(name, **{**kwargs, "help": COMMANDS[name][1]})


def _command_in(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top level has no valued option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``detect`` parser. Given ``argv``, only the command it names is built in full (its module imported);
    the others are listed by name and help line. Without ``argv``, every command is built."""
    parser = argparse.ArgumentParser(prog="detect", description="Two-stage object detection toolkit.")
    parser.add_argument("--version", action="version", version=f"detect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS) if argv is None else {_command_in(argv)}
    built: set[str] = set()
    for name, (module, help_line) in COMMANDS.items():
        if name not in wanted:
            sub.add_parser(name, help=help_line, add_help=False)
        elif module is None:
            _add_builtin(sub, name, help_line)
        elif module not in built:
            built.add(module)
            importlib.import_module(f"detect.cli.{module}").add_parser(_Only(sub, wanted))
    return parser


def _add_builtin(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line)
    if name == "info":
        p.set_defaults(func=_cmd_info)
    else:
        p.add_argument("name", help="benchmark name, e.g. kernels or selective_search")
        p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
        p.set_defaults(func=_cmd_bench)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
