"""``detect data shapes``: write the synthetic shapes set to disk in VOC or COCO layout. ``detect data check``:
what a data set on disk holds and every annotation problem in it (:mod:`detect.data.check`); exit 0 clean, 1 with
problems, 2 when the layout is not recognised or the set cannot be read.

Splits are consecutive index ranges in the order given (``--split train=800 --split test=200``: images 0-799, then
800-999), so a split is the same images for the same seed on every machine. VOC gets one
``ImageSets/Main/<name>.txt`` per split over one image folder; COCO gets ``<name>.json`` per split over one
``images/`` folder (``annotations.json`` for all images when no split is given).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from detect.data.shapes import ShapesConfig, ShapesDataset, write_coco, write_voc
from detect.errors import ConfigError, DatasetError

__all__ = ["add_parser", "split_ranges"]

_SPLIT = re.compile(r"^([A-Za-z0-9_\-]+)=(\d+)$")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``detect data shapes`` (the handler returns an exit code, raises :class:`ConfigError`)."""
    data = subparsers.add_parser("data", help="data set tools")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("shapes", help="write the synthetic shapes data set (VOC or COCO layout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=("voc", "coco"), default="voc")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=ShapesConfig.image_size, help="side of the square images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split", action="append", type=_split, metavar="NAME=COUNT",
        help="a split of COUNT consecutive images (repeatable, in order; e.g. --split train=800 --split test=200)",
    )
    p.set_defaults(func=_cmd_shapes)
    p = sub.add_parser("check", help="report a data set's layout, classes, sizes and annotation problems")
    p.add_argument("path", nargs="?", help="a data folder, COCO .json or YOLO data.yaml")
    p.add_argument("--images", help="the image folder (with --annotations, instead of PATH)")
    p.add_argument("--annotations", help="the annotation folder or COCO .json (with --images)")
    p.add_argument("--split", help="a named split (VOC image set, data.yaml key, COCO file)")
    p.add_argument("--classes", help="comma-separated class list: any other label is a problem")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_check)


def _split(text: str) -> tuple[str, int]:
    match = _SPLIT.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT (letters, digits, _ and -), got {text!r}")
    return match.group(1), int(match.group(2))


def split_ranges(splits: list[tuple[str, int]], num_images: int) -> dict[str, list[int]]:
    """Split name -> its consecutive indices; :class:`ConfigError` for repeated names or too many images."""
    names = [name for name, _ in splits]
    if len(set(names)) != len(names):
        raise ConfigError(f"split names must differ, got {names}")
    total = sum(count for _, count in splits)
    if total > num_images:
        raise ConfigError(f"the splits ask for {total} images but --num-images is {num_images}")
    ranges, start = {}, 0
    for name, count in splits:
        ranges[name] = list(range(start, start + count))
        start += count
    return ranges


def _cmd_shapes(args: argparse.Namespace) -> int:
    dataset = ShapesDataset(ShapesConfig(num_images=args.num_images, image_size=args.image_size, seed=args.seed))
    splits = split_ranges(args.split or [], args.num_images)
    indices = sorted({i for members in splits.values() for i in members}) if splits else None
    out, start = Path(args.out), time.perf_counter()
    if args.format == "voc":
        write_voc(dataset, out, indices=indices, splits=splits)
    elif splits:
        for name, members in splits.items():
            write_coco(dataset, out, indices=members, json_name=f"{name}.json")
    else:
        write_coco(dataset, out)
    count = len(dataset) if indices is None else len(indices)
    print(f"wrote {count} images ({args.format}) to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from detect.data.check import check_dataset, format_check

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        report = check_dataset(args.path, args.images, args.annotations, args.split, classes)
    except DatasetError as err:
        print(f"detect data check: {err.message}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_check(report))
    return 1 if report["problems"] else 0
