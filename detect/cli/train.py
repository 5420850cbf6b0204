"""``detect train`` and ``detect eval``: training from a recipe, and the VOC mAP of trained weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detect import evaluate, training
from detect.errors import ConfigError, DetectError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` (each sets ``func``)."""
    p = subparsers.add_parser("train", help="train a detector from a recipe file")
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument(
        "--data", help="data to train on instead of the recipe's: a folder (VOC devkit, flat, images + annotations "
        "pair), a COCO .json or a YOLO data.yaml"
    )
    p.add_argument("--val-data", help="validation data, as --data (default: the data's own val split, else a "
                   "seeded hold-out of data.val_fraction of it)")
    p.add_argument("--images", help="the image folder of an image + annotation folder pair (with --annotations)")
    p.add_argument("--annotations", help="the annotation folder (VOC .xml, LabelMe .json, YOLO .txt) or COCO .json")
    p.add_argument("--out", help="output folder (default: the recipe's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init", help="start from this detector (registered name, detect train file or torchvision "
                   ".pth): every tensor that fits, class layers rebuilt for the data's classes (recipe: init)")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ... (recipe: device)")
    p.add_argument("--workers", type=int, help="data loader processes, 0 = in the training process (recipe: "
                   "workers); with --engine ray: the number of Ray Train workers (loader processes then as the recipe)")
    p.add_argument("--nproc", type=int, help="data-parallel training in N processes on this machine (one per GPU; "
                   "gloo on CPU): global batch = recipe batch_size x N. Under torchrun, leave it out")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="ray: data-parallel training under Ray Train on the cluster RAY_ADDRESS names (--workers N)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker (default 0: CPU)")
    p.set_defaults(func=_cmd_train)
    p = subparsers.add_parser("eval", help="COCO and VOC metrics, PR curves and a confusion matrix of trained weights")
    p.add_argument("--weights", required=True, help="model.safetensors written by detect train, or a registered name")
    p.add_argument(
        "--data", help="a training recipe (the validation data its run used), or data as for train --data"
    )
    p.add_argument("--images", help="the image folder of an image + annotation folder pair (with --annotations)")
    p.add_argument("--annotations", help="the annotation folder or COCO .json (with --images)")
    p.add_argument("--out", default="runs/eval", help="folder for report.json, pr_curves/ and confusion_matrix.png")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="detections scoring at least this count in the confusion matrix (default 0.5)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    """0 when training (and evaluation) finished, 1 when training diverged, 2 on a bad set-up."""
    overrides: dict[str, Any] = {}
    if args.out:
        overrides["out_dir"] = args.out
    loader_keys = ("init", "device", "workers") if args.engine == "local" else ("init", "device")
    overrides |= {key: value for key in loader_keys if (value := getattr(args, key)) is not None}
    try:
        overrides |= _data_overrides(args)
        config = training.load_recipe(args.recipe, overrides)
        if (code := _distributed(args, config)) is not None:
            return code
        result = training.train(config, resume=args.resume)
    except DetectError as err:
        print(f"detect train: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"detect train: {err}", file=sys.stderr)
        return 1
    if result:
        print(evaluate.format_table(result))
    print(f"wrote {Path(config.out_dir) / 'model.safetensors'}")
    return 0


def _distributed(args: argparse.Namespace, config: training.TrainConfig) -> int | None:
    """The exit code of a data-parallel run (``--nproc``, ``torchrun``'s environment, ``--engine ray``), or
    ``None`` for a one-process run."""
    from detect.training import launch as distributed

    env = distributed.torchrun_env()
    if args.engine == "ray":
        if args.nproc is not None or env is not None:
            raise ConfigError("--engine ray starts its own workers: give --workers N, not --nproc or torchrun")
        return distributed.run_ray(config, args.workers or 1, args.gpus_per_worker, args.resume)
    if env is not None:
        if args.nproc is not None and args.nproc != env["world_size"]:
            raise ConfigError(f"--nproc {args.nproc} under a launcher of WORLD_SIZE {env['world_size']}: leave it out")
        return distributed.run_rank(config, env, args.resume)
    if args.nproc is not None and args.nproc != 1:
        return distributed.launch(config, args.nproc, args.resume)
    return None


def _data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe overrides for ``--data``/``--images``/``--annotations``/``--val-data`` (each checked for a layout
    now): new data replaces every location field of the recipe's, and without ``--val-data`` the recipe's
    validation data (other classes, most likely) gives way to the data's own split."""
    def location(path: str | None, images: str | None = None, annotations: str | None = None) -> dict[str, Any]:
        training.data_config(path, images, annotations)
        return {"source": "auto", "path": path, "split": None, "images_dir": images, "annotations_dir": annotations,
                "part": "all"}

    overrides: dict[str, Any] = {}
    if args.data or args.images or args.annotations:
        overrides["data"] = location(args.data, args.images, args.annotations)
        overrides["val_data"] = None
    if args.val_data:
        overrides["val_data"] = location(args.val_data)
    return overrides


def _cmd_eval(args: argparse.Namespace) -> int:
    """Prints the COCO and VOC numbers and the per-class table; writes ``report.json``, ``pr_curves/`` and
    ``confusion_matrix.png`` into ``--out``; 0 done, 2 bad set-up."""
    if not (args.data or (args.images and args.annotations)):
        print("detect eval: give --data, or --images and --annotations", file=sys.stderr)
        return 2
    try:
        data = training.evaluation_data(args.data, args.images, args.annotations)
        result = evaluate.evaluate_weights(
            args.weights, data, args.out, args.batch_size, score_threshold=args.score_threshold, device=args.device
        )
    except DetectError as err:
        print(f"detect eval: {err}", file=sys.stderr)
        return 2
    print(evaluate.format_table(result))
    print(evaluate.format_summary(result))
    print(f"wrote {Path(args.out) / 'report.json'}, {Path(args.out) / 'pr_curves'}/, "
          f"{Path(args.out) / 'confusion_matrix.png'}")
    return 0
