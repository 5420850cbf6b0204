"""``detect train`` and ``detect eval``: training from a recipe, and the VOC mAP of trained weights."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from detect import evaluate, training
from detect.errors import ConfigError, DetectError
from detect.inference import torch_device
from detect.training import auto
from detect.training.budget import parse_duration


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` (each sets ``func``)."""
    p = subparsers.add_parser("train", help="train a detector on your data (recipe derived from it) or from a recipe")
    p.add_argument("--recipe", help="YAML recipe (see recipes/); without it the recipe is derived from --data, "
                   "printed and written to OUT/recipe.yaml")
    p.add_argument("--model", choices=sorted(auto.MODELS), help="the detector family of a derived recipe "
                   "(default faster_rcnn)")
    p.add_argument("--time", help="time budget, e.g. 30m, 90s, 1h30m: the run is fitted to end within it "
                   "(default for a derived recipe: 30m, none on a GPU with --epochs or --iterations)")
    p.add_argument("--iterations", type=int, help="training iterations (recipe: max_iterations; with --time a cap)")
    p.add_argument("--epochs", type=float, help="training length in passes over the training images, instead of "
                   "--iterations (recipe: epochs; with --time a cap)")
    p.add_argument(
        "--data", help="data to train on instead of the recipe's: a folder (VOC devkit, flat, images + annotations "
        "pair), a COCO .json or a YOLO data.yaml"
    )
    p.add_argument("--val-data", help="validation data, as --data (default: the data's own val split, else a "
                   "seeded hold-out of data.val_fraction of it)")
    p.add_argument("--images", help="the image folder of an image + annotation folder pair (with --annotations)")
    p.add_argument("--annotations", help="the annotation folder (VOC .xml, LabelMe .json, YOLO .txt) or COCO .json")
    p.add_argument("--out", help="output folder (default: the recipe's out_dir; derived: runs/<data folder name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init", help="start from this detector (registered name, detect train file or torchvision "
                   ".pth): every tensor that fits, class layers rebuilt for the data's classes (recipe: init)")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ... (recipe: device)")
    p.add_argument("--seed", type=int, help="the training seed (recipe: seed; default 0): initial weights, batch "
                   "order, augmentation. The held-out images stay those of data.split_seed")
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
    started = time.monotonic()  # a time budget counts from here
    overrides: dict[str, Any] = {}
    if args.out:
        overrides["out_dir"] = args.out
    loader_keys = ("init", "device", "seed", "workers") if args.engine == "local" else ("init", "device", "seed")
    overrides |= {key: value for key in loader_keys if (value := getattr(args, key)) is not None}
    if args.iterations is not None:
        if args.iterations < 1:
            print("detect train: --iterations must be positive", file=sys.stderr)
            return 2
        overrides["max_iterations"] = args.iterations
    if args.epochs is not None:
        if args.iterations is not None or not args.epochs > 0:
            print("detect train: --epochs must be positive, and given instead of --iterations, not with it",
                  file=sys.stderr)
            return 2
        overrides["epochs"] = args.epochs
    try:
        if args.time is not None:
            overrides["time_budget"] = parse_duration(args.time)
    except DetectError as err:
        print(f"detect train: {err}", file=sys.stderr)
        return 2
    if args.recipe is None and not (args.data or (args.images and args.annotations)):
        print("detect train: give --data (the recipe is derived from it) or --recipe", file=sys.stderr)
        return 2
    if args.recipe is not None and args.model is not None:
        print("detect train: --model chooses the family of a derived recipe; with --recipe it is the recipe's "
              "detector", file=sys.stderr)
        return 2
    try:
        if args.recipe is None:
            recipe = _derived_recipe(args, overrides)
            config = training.load_recipe(recipe)
        else:
            overrides |= _data_overrides(args)
            config = training.load_recipe(args.recipe, overrides)
        if (code := _distributed(args, config)) is not None:
            return code
        result = training.train(config, resume=args.resume, started=started)
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


def _derived_recipe(args: argparse.Namespace, overrides: dict[str, Any]) -> Path:
    """``OUT/recipe.yaml`` derived from the data (printed as a table), the command line's fields over the derived
    ones; a ``--resume`` reruns the recipe already there."""
    data = _data_overrides(args)
    name = Path(args.data or args.images or "train").resolve().name or "train"
    out = Path(overrides.get("out_dir") or f"runs/{name}")
    path = out / "recipe.yaml"
    if args.resume and path.exists():
        print(f"resuming with {path}", file=sys.stderr)
        return path
    device = torch_device(args.device or "auto").type
    budget = overrides.get("time_budget")
    if budget is None and not (device == "cuda" and (args.iterations or args.epochs)):
        budget = auto.DEFAULT_BUDGET
    derivation = auto.derive_for(data["data"], data.get("val_data"), args.model or "faster_rcnn", budget, device,
                                 str(out))
    recipe = override_plain(derivation.recipe, {**overrides, "out_dir": str(out)})
    print(auto.format_derivation(derivation))
    out.mkdir(parents=True, exist_ok=True)
    auto.write_recipe(path, recipe, "derived by detect train --data; rerun: detect train --recipe " + str(path))
    print(f"wrote {path} (rerun: detect train --recipe {path})")
    return path


def override_plain(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with the command line's ``overrides`` (top-level fields) on top."""
    return {**recipe, **{k: v for k, v in overrides.items() if v is not None}}


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
