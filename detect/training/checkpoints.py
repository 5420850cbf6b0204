"""Checkpoints and resume.

- ``checkpoint.pt`` holds the model, optimizer, grad scaler, torch RNG states, the iteration and the time spent so
  far; it is written atomically (temporary file + rename), so a kill never leaves a half-written file, and read
  back with ``torch.load(weights_only=True)``. A file that does not load (truncated, not a checkpoint, a pickle
  that ``weights_only`` refuses) is a :class:`ConfigError` naming the file, never torch's advice to unpickle it.
- Run identity: every checkpoint carries the identity of the run that wrote it (:func:`run_identity`: a digest of
  the recipe's fields that shape the result, a fingerprint of the training data, the seed), and a fresh run
  writes its identity to ``run.json`` before its first step. ``--resume`` compares the checkpoint's identity
  with the run being resumed and refuses a mismatch, naming what differs in both runs: a checkpoint left in
  ``--out`` by an older run is never taken for this one. A fresh run also deletes such a stale checkpoint at its
  start, so killing it before its own first checkpoint leaves nothing to resume from (a clear error, not an old model).
- Fields that do not change the result (where the run writes, loader processes, progress and logging cadence,
  TensorBoard, checkpoint cadence, the device) and the run's length and evaluation cadence are outside the
  identity: a run may be resumed with other ones (and so extended).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from detect.errors import ConfigError
from detect.io import atomic_write

__all__ = ["VOLATILE_FIELDS", "data_fingerprint", "read_checkpoint", "run_identity", "check_identity",
           "write_checkpoint", "write_run_identity", "read_run_identity"]

# TrainConfig fields a resume may change: those that do not change what a run computes, and the length of the run
# and its evaluation cadence (a run may be resumed to go on longer than first planned).
VOLATILE_FIELDS = ("out_dir", "workers", "progress_seconds", "tensorboard", "log_every", "log_format",
                   "checkpoint_every", "device", "proposal_cache", "max_iterations", "eval_every", "time_budget",
                   "epochs")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data_config: Any, dataset: Any) -> str:
    """A digest of the training data: where it is and how it is read (the data config), how many images it has
    and their class list, and the ids of its first and last images (cheap: no image is decoded)."""
    ids: list[Any] = []
    for index in {0, len(dataset) - 1} if len(dataset) else ():
        ids.append(_image_id(dataset, index))
    return _digest({
        "config": dataclasses.asdict(data_config),
        "images": len(dataset),
        "classes": list(getattr(dataset, "class_names", ())),
        "ids": sorted(map(str, ids)),
    })


def _image_id(dataset: Any, index: int) -> Any:
    """The id of image ``index`` without decoding it where the data set can say (``annotation(i)``), else its
    position (the shapes set: its images are a function of its config, which the fingerprint holds)."""
    annotation = getattr(dataset, "annotation", None)
    if annotation is not None:
        try:
            return annotation(index).get("image_id", index)
        except Exception:  # noqa: BLE001 - an unreadable annotation is the loader's to report, not the fingerprint's
            return index
    return index


def _changed(values: Any, defaults: Any) -> Any:
    """The parts of ``values`` that differ from ``defaults`` (nested dicts compared key by key): a field a later
    version adds with its default does not change the digest of an older run's recipe."""
    if isinstance(values, dict) and isinstance(defaults, dict):
        out = {}
        for key, value in values.items():
            if key not in defaults:
                out[key] = value
            elif value != defaults[key]:
                out[key] = _changed(value, defaults[key])
        return out
    return values


def run_identity(config: Any, data_config: Any, dataset: Any) -> dict[str, Any]:
    """What makes a run this run: a digest of its recipe (the fields it sets away from their defaults, without
    :data:`VOLATILE_FIELDS`), of its data, and the seed, plus the detector's name (for the message)."""
    recipe = _changed(dataclasses.asdict(config), dataclasses.asdict(type(config)()))
    recipe = {k: v for k, v in recipe.items() if k not in VOLATILE_FIELDS}
    return {
        "detector": config.detector,
        "recipe": _digest(recipe),
        "data": data_fingerprint(data_config, dataset),
        "seed": config.seed,
    }


def check_identity(path: Path, theirs: Mapping[str, Any] | None, ours: Mapping[str, Any]) -> None:
    """:class:`ConfigError` when the checkpoint at ``path`` was written by another run than ``ours``."""
    if theirs is None:
        raise ConfigError(f"--resume: {path} records no run identity (written by an older version of detect); "
                          "start a fresh run or use another --out")
    differ = [k for k in ("recipe", "data", "seed") if theirs.get(k) != ours.get(k)]
    if differ:
        what = {"recipe": "recipe", "data": "training data", "seed": "seed"}
        names = ", ".join(what[k] for k in differ)
        raise ConfigError(
            f"--resume: {path} belongs to another run ({names} differ): that run {_describe(theirs)}, this run "
            f"{_describe(ours)}. Resume with the same recipe and data, or train into a new --out"
        )


def _describe(identity: Mapping[str, Any]) -> str:
    return (f"[{identity.get('detector')}, recipe {identity.get('recipe')}, data {identity.get('data')}, "
            f"seed {identity.get('seed')}]")


def write_run_identity(out: Path, identity: Mapping[str, Any]) -> None:
    atomic_write(out / "run.json", (json.dumps(dict(identity), indent=2) + "\n").encode())


def read_run_identity(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """``state`` (tensors, numbers, strings, plain containers) into ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write(path, buffer.getvalue())


def read_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The state in ``path``; :class:`ConfigError` when there is none or it does not load safely."""
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError,
            AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in first or "Weights only load failed" in str(err):
            first = "not a safe checkpoint (it holds objects other than tensors and plain data)"
        raise ConfigError(f"--resume: cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise ConfigError(f"--resume: {path} is not a detect train checkpoint")
    return state
