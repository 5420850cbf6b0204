"""``detect train`` and ``detect eval``: training from a recipe, and the VOC mAP of trained weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detect import train
from detect.errors import DetectError
from detect.evaluate import format_table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` (each sets ``func``)."""
    p = subparsers.add_parser("train", help="train a detector from a recipe file")
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("--data", help="a VOC folder or COCO JSON to train on instead of the recipe's data")
    p.add_argument("--out", help="output folder (default: the recipe's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_cmd_train)
    p = subparsers.add_parser("eval", help="VOC mAP of trained weights on a data set")
    p.add_argument("--weights", required=True, help="model.safetensors written by detect train, or a registered name")
    p.add_argument("--data", required=True, help="a recipe (its val_data), a VOC folder or a COCO JSON")
    p.add_argument("--out", default="runs/eval", help="folder for report.json and PR plots")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    """0 when training (and evaluation) finished, 1 when training diverged, 2 on a bad set-up."""
    overrides: dict[str, Any] = {}
    if args.data:
        overrides["data"] = {"source": train.data_config(args.data).source, "path": args.data}
    if args.out:
        overrides["out_dir"] = args.out
    try:
        config = train.load_recipe(args.recipe, overrides)
        result = train.train(config, resume=args.resume)
    except DetectError as err:
        print(f"detect train: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"detect train: {err}", file=sys.stderr)
        return 1
    if result:
        print(format_table(result))
    print(f"wrote {Path(config.out_dir) / 'model.safetensors'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Writes ``report.json`` and PR plots into ``--out``; 0 done, 2 bad set-up."""
    try:
        result = train.evaluate_weights(args.weights, train.evaluation_data(args.data), args.out, args.batch_size)
    except DetectError as err:
        print(f"detect eval: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0
