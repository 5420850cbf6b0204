"""``detect weights list|import|add|pull``: the weights on the search path, and registering new ones."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from detect import training, weights


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``detect weights list|import|pull`` (handlers return exit codes, raise :class:`WeightsError`)."""
    parser = subparsers.add_parser("weights", help="list, import and download detector weights")
    sub = parser.add_subparsers(dest="weights_command", required=True)
    p = sub.add_parser("list", help="weights on the search path (DETECT_WEIGHTS_DIR, user folder, bundled)")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("import", help="register a torchvision Faster R-CNN ResNet-50-FPN checkpoint (.pth)")
    p.add_argument("path", help="checkpoint file")
    p.add_argument("--name", help="name to register (default: the file name without its hash suffix)")
    p.add_argument("--dir", help="weights folder to write (default: first DETECT_WEIGHTS_DIR, else user folder)")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser("add", help="register a finished `detect train` run (e.g. into the bundled weights/ folder)")
    p.add_argument("run", help="the run's folder (or its model.safetensors)")
    p.add_argument("--name", required=True, help="name to register")
    p.add_argument("--dir", help="weights folder to write (default: first DETECT_WEIGHTS_DIR, else user folder)")
    p.add_argument("--recipe", help="the recipe the run was trained with, stored in the manifest entry")
    p.set_defaults(func=_cmd_add)
    p = sub.add_parser("pull", help="download an official checkpoint (needs internet) and register it")
    p.add_argument("name", help=f"one of: {', '.join(sorted(weights.OFFICIAL_CHECKPOINTS))}")
    p.add_argument("--dir", help="weights folder to write (default: first DETECT_WEIGHTS_DIR, else user folder)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the network")
    p.set_defaults(func=_cmd_pull)


def _cmd_list(args: argparse.Namespace) -> int:
    entries = weights.list_weights()
    if args.json:
        print(json.dumps([{**e.to_json(), "path": str(e.path)} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no weights found in {', '.join(str(d) for d in weights.weights_dirs())}")
    for entry in entries:
        metrics = ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in entry.metrics.items()
            if isinstance(v, (int, float, str))  # the rest (e.g. the evaluation data) is in --json
        )
        print(f"{entry.name}\t{entry.architecture['builder']}\t{len(entry.class_names)} classes\t"
              f"{entry.size_bytes / 1e6:.1f} MB\t{metrics or '-'}\t{entry.path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    name = args.name or re.sub(r"-[0-9a-f]{8,64}$", "", Path(args.path).stem)
    entry = weights.import_torchvision_checkpoint(args.path, name, directory=args.dir)
    print(f"registered {entry.name} -> {entry.path}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    entry = training.bundle_run(args.run, args.name, args.dir, args.recipe)
    print(f"registered {entry.name} -> {entry.path} (mAP {entry.metrics.get('voc_map50')})")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    entry = weights.pull(args.name, directory=args.dir, timeout=args.timeout)
    print(f"registered {entry.name} -> {entry.path}")
    return 0
