"""``detect train --data DIR`` (the recipe derived from the data, within a time budget) against the shapes recipe
applied to the same data (``--recipe recipes/faster_rcnn_shapes.yaml --data DIR``) at the same wall time.

For each data set: VOC mAP@0.5 and mAP@[.5:.95] (COCO AP) of both runs' final models on the same held-out fifth of
the images, the anchors' best-possible recall at IoU 0.5 before and after the fit, and each run's wall time
against the budget. One ``SUMMARY`` line at the end. The data sets are not in the repository (see
``benchmarks/README.md`` for where to get them)::

    python benchmarks/train_auto.py --data raccoon=/work/data/raccoon --data fruits=/work/data/fruits/train_zip/train \
        --test fruits=/work/data/fruits/test_zip/test --time 30m

The issue's targets are for the default 30-minute budget on a 2-core CPU: mAP@0.5 >= 0.80 on a one-class set,
>= 0.60 on a several-class one, and both above the shapes recipe. ``--time`` shortens a measurement (say so when
quoting it); ``--skip-shapes`` leaves the comparison run out. The four runs take two hours: ``--skip-shapes``
now and ``--reuse`` later runs them in two parts (``--reuse`` reads the runs that finished in ``--out``).
``--seed N`` trains both recipes with another training seed (the held-out fifth stays the same): one 30-minute
run per recipe is one draw, and a recipe's evaluations swing by about 0.02 between runs, so a close comparison
takes several seeds (a separate ``--out`` each).

``--test NAME=DIR`` also measures each run's kept model (``model.safetensors``, the best by the held-out fifth)
on a separate test split of that set, through ``detect eval``. The held-out fifth picks the best of a run's
evaluations and is then quoted for it, which flatters a run whose evaluations swing; images no run has seen or
chosen on give the unbiased figure (the fruit set ships 60 test photos).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detect.training import auto  # noqa: E402
from detect.training.budget import format_seconds, parse_duration  # noqa: E402


def _run(command: list[str], log: Path, out: Path, reuse: bool) -> float | None:
    """Run ``command`` (output to ``log``, the run's folder ``out``); returns its wall seconds, or None when the
    run is left out. With ``reuse``, a run that finished earlier (its ``wall.json`` beside its report) is read,
    not run again: the four runs of two sets take two hours, and this lets them be measured in parts. A failure
    ends the benchmark."""
    done = out / "wall.json"
    if reuse and done.is_file() and (out / "report.json").is_file():
        return float(json.loads(done.read_text())["wall_seconds"])
    began = time.perf_counter()
    with log.open("w") as stream:
        code = subprocess.call(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed with exit {code}; see {log}")
    wall = time.perf_counter() - began
    done.write_text(json.dumps({"wall_seconds": wall, "command": command}) + "\n")
    return wall


def _scores(out: Path) -> tuple[float, float]:
    report = json.loads((out / "report.json").read_text())
    voc = report.get("mAP@0.5", report.get("mAP"))
    coco = (report.get("coco") or {}).get("AP")
    return (float("nan") if voc is None else voc), (float("nan") if coco is None else coco)


def _test(run: Path, data: str | None, reuse: bool) -> tuple[str, str]:
    """The kept model of ``run`` measured on the test data ``data`` (``detect eval`` into ``run/test``), as the
    report line's and the SUMMARY part's words; nothing without test data."""
    if data is None:
        return "", ""
    out, report = run / "test", run / "test" / "report.json"
    # reused only when measured on the model there now (a run trained again since has a newer model file)
    if not (reuse and report.is_file() and report.stat().st_mtime >= (run / "model.safetensors").stat().st_mtime):
        command = [sys.executable, "-m", "detect", "eval", "--weights", str(run / "model.safetensors"), "--data",
                   data, "--out", str(out)]
        out.mkdir(parents=True, exist_ok=True)
        with (out / "eval.log").open("w") as stream:
            if subprocess.call(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT) != 0:
                sys.exit(f"{' '.join(command)} failed; see {out / 'eval.log'}")
    voc, coco = _scores(out)
    return f"; on the test split {voc:.3f} / {coco:.3f}", f" test {voc:.3f}/{coco:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=DIR, once per data set")
    parser.add_argument("--time", default="30m", help="the time budget of each run (default 30m)")
    parser.add_argument("--out", default="runs/bench_train_auto")
    parser.add_argument("--skip-shapes", action="store_true", help="leave out the shapes-recipe comparison run")
    parser.add_argument("--seed", type=int, default=0, help="the training seed of both runs (default 0)")
    parser.add_argument("--test", action="append", default=[],
                        help="NAME=DIR: also measure the kept models on this test split of data set NAME")
    parser.add_argument("--reuse", action="store_true",
                        help="read the runs that finished in --out before instead of running them again")
    args = parser.parse_args()
    budget = parse_duration(args.time)
    tests = dict(spec.partition("=")[::2] for spec in args.test)
    if unknown := set(tests) - {spec.partition("=")[0] for spec in args.data}:
        parser.error(f"--test names no --data set: {', '.join(sorted(unknown))}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # the shapes recipe, holding out the same fifth of the images as the derived one (its data section gives way
    # to --data; val_fraction and split_seed stay)
    shapes = yaml.safe_load((ROOT / "recipes" / "faster_rcnn_shapes.yaml").read_text())
    shapes["data"] = {"source": "shapes", "val_fraction": auto.VAL_FRACTION, "on_error": "skip"}
    shapes_recipe = out / "faster_rcnn_shapes_fifth.yaml"
    shapes_recipe.write_text(yaml.safe_dump(shapes, sort_keys=False))
    parts = []
    for spec in args.data:
        name, _, path = spec.partition("=")
        derivation = auto.derive_for({"source": "auto", "path": path}, None, budget_seconds=budget)
        derived_out = out / name / "derived"
        line = f"{name}: anchors BPR@0.5 {derivation.bpr_default:.3f} -> {derivation.bpr_fitted:.3f}"
        part = f"{name} bpr {derivation.bpr_default:.2f}->{derivation.bpr_fitted:.2f}"
        wall = _run([sys.executable, "-m", "detect", "train", "--data", path, "--time", args.time, "--out",
                     str(derived_out), "--seed", str(args.seed)], out / f"{name}_derived.log", derived_out,
                    args.reuse)
        voc, coco = _scores(derived_out)
        line += (f"; derived mAP@0.5 {voc:.3f} mAP@[.5:.95] {coco:.3f} (wall {format_seconds(wall)} of "
                 f"{format_seconds(budget)}, {wall / budget:.2f})")
        part += f" derived {voc:.3f}/{coco:.3f} wall/budget {wall / budget:.2f}"
        words = _test(derived_out, tests.get(name), args.reuse)
        line, part = line + words[0], part + words[1]
        if not args.skip_shapes:
            shapes_out = out / name / "shapes"
            wall_s = _run([sys.executable, "-m", "detect", "train", "--recipe", str(shapes_recipe), "--data", path,
                           "--time", args.time, "--out", str(shapes_out), "--seed", str(args.seed)],
                          out / f"{name}_shapes.log", shapes_out, args.reuse)
            voc_s, coco_s = _scores(shapes_out)
            line += f"; shapes recipe mAP@0.5 {voc_s:.3f} mAP@[.5:.95] {coco_s:.3f} (wall {format_seconds(wall_s)})"
            part += f" shapes {voc_s:.3f}/{coco_s:.3f}"
            words = _test(shapes_out, tests.get(name), args.reuse)
            line, part = line + words[0], part + words[1]
        print(line, flush=True)
        parts.append(part)
    seed = f" seed {args.seed}" if args.seed else ""
    print(f"SUMMARY train_auto budget {format_seconds(budget)}{seed}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
