"""A run's data: its training and validation splits (:func:`data_splits`), the batch of each iteration
(:class:`TrainBatches`, a pure function of the seed and the iteration) and the loader that builds batches ahead of
the step (:func:`batch_loader`)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from detect.config import load_yaml
from detect.data.augment import BOX_KEYS, Augment
from detect.data.config import DataConfig, data_config, data_layout, make_dataset
from detect.errors import ConfigError
from detect.evaluate import ProposalCache, cache_keys
from detect.training.config import TrainConfig, load_recipe
from detect.transform import shrink_to_input

__all__ = ["SHORT_SIDE_SLOT", "TrainBatches", "batch_loader", "data_splits", "describe_validation",
           "evaluation_data", "model_inputs"]


def data_splits(config: TrainConfig) -> tuple[DataConfig, DataConfig | None]:
    """The training and validation data of a run. ``val_data`` when the recipe names it; else a split the data
    ships (``train`` and ``val``: a ``data.yaml``, VOC image sets, COCO files), training on ``train`` by default;
    else, for data on disk, the seeded hold-out split of ``data`` (none with ``val_fraction`` 0). The shapes set
    without ``val_data`` has none: its recipes name another seed."""
    data = config.data
    if config.val_data is not None or data.source == "shapes":
        return data, config.val_data
    splits = data_layout(data).splits
    split = data.split if data.split is not None else _shipped(splits, "train")
    if split is not None and _shipped(splits, "val") not in (None, split):
        return dataclasses.replace(data, split=split), dataclasses.replace(data, split=_shipped(splits, "val"))
    data = dataclasses.replace(data, split=split)
    if data.val_fraction == 0:
        return data, None
    return dataclasses.replace(data, part="train"), dataclasses.replace(data, part="val")

def _shipped(splits: Sequence[str], name: str) -> str | None:
    """The split called ``name``, or the only one whose name contains it (``instances_val2017``)."""
    if name in splits:
        return name
    named = [s for s in splits if name in s]
    return named[0] if len(named) == 1 else None

def evaluation_data(spec: str | None, images_dir: str | None = None, annotations_dir: str | None = None) -> DataConfig:
    """The data ``detect eval --data`` names: a training recipe (the validation data its run used: ``val_data``,
    a shipped ``val`` split or its hold-out part; else its ``data``), or data on disk as :func:`data_config`.
    A ``data.yaml`` is data, not a recipe."""
    if spec and spec.endswith((".yaml", ".yml")) and not _is_data_yaml(spec):
        recipe = load_recipe(spec)
        return data_splits(recipe)[1] or recipe.data
    return data_config(spec, images_dir, annotations_dir)

def _is_data_yaml(path: str) -> bool:
    try:
        document = load_yaml(Path(path).read_text(encoding="utf-8"), path)
    except (OSError, ConfigError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and "names" in document and "train" in document

SHORT_SIDE_SLOT = 0x5CA1E  # the augmentation generator slot of a batch's short side (image slots are 0..B-1)

class TrainBatches(torch.utils.data.Dataset):
    """Iteration ``i`` -> its batch, a pure function of ``(seed, i)`` (see the module docstring): a dict of
    ``images`` (``uint8`` ``(H, W, 3)`` tensors), ``boxes``, ``labels``, ``proposals`` (region detectors, else
    ``None``) and ``short_side`` (``None`` without multi-scale training)."""

    def __init__(
        self, dataset: Any, config: TrainConfig, cache: ProposalCache | None = None, data: DataConfig | None = None
    ) -> None:
        self.dataset, self.config, self.cache, self.data = dataset, config, cache, data
        self.augment = Augment(config.augment)
        # -- distributed training (detect.training.distributed): this process's slots of the GLOBAL batch, and
        # where the global sample order stood at `origin_iteration` (a resume with another world size) --
        self.global_batch = config.batch_size
        self.slots = range(config.batch_size)
        self.origin_iteration, self.origin_position = 0, 0
        # the detector's own resize, (short sides, max side), where the loader may do it for the detector
        # (detect.transform.shrink_to_input): set by the trainer for detectors that resize with RCNNTransform
        self.input_size: tuple[tuple[int, ...], int] | None = None

    def shard(self, rank: int, world: int) -> None:
        """Make this the batches of process ``rank`` of ``world``: the global batch is ``batch_size * world`` and
        rank ``r`` takes its slots ``r*b .. (r+1)*b - 1``, so the global sample order is the same for any world."""
        b = self.config.batch_size
        self.global_batch, self.slots = b * world, range(rank * b, (rank + 1) * b)

    def position(self, iteration: int) -> int:
        """The global sample position of slot 0 of ``iteration`` (samples the run has drawn before it)."""
        return self.origin_position + (iteration - self.origin_iteration) * self.global_batch

    def __len__(self) -> int:
        return self.config.max_iterations

    def samples(self, iteration: int) -> list[tuple[np.ndarray, dict]]:
        """The data set's samples of ``iteration``: one seeded permutation per epoch."""
        cfg, n = self.config, len(self.dataset)
        samples = []
        for slot in self.slots:
            position = self.position(iteration) + slot
            order = np.random.default_rng([cfg.seed, position // n]).permutation(n)
            image, target = self.dataset[int(order[position % n])]
            samples.append((image, dict(target)))
        return samples

    def __getitem__(self, iteration: int) -> dict[str, Any]:
        cfg = self.config
        samples = self.samples(iteration)
        if self.cache is not None:
            images, targets = [s[0] for s in samples], [s[1] for s in samples]
            for target, boxes in zip(targets, self.cache(images, cache_keys(self.data or cfg.data, targets))):
                target["proposals"] = boxes
        side = self.augment.short_side(np.random.default_rng([cfg.seed, iteration, SHORT_SIDE_SLOT]))
        finish = self.finish(side)
        out = [
            self.augment(image, target, np.random.default_rng([cfg.seed, iteration, k]), finish)
            for k, (image, target) in zip(self.slots, samples)
        ]
        return {
            "images": [torch.from_numpy(np.ascontiguousarray(image)) for image, _ in out],
            "boxes": [torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4) for _, t in out],
            "labels": [torch.as_tensor(t["labels"], dtype=torch.int64) for _, t in out],
            "proposals": [torch.as_tensor(t["proposals"]) for _, t in out] if self.cache is not None else None,
            "short_side": side,
        }

    def finish(self, side: int | None) -> Callable[[np.ndarray, dict], tuple[np.ndarray, dict]] | None:
        """The step between the augmentation's geometry and its jitter that brings an image to the detector's
        input size (:func:`detect.transform.shrink_to_input`), for a batch resized to ``side`` (``None``: the
        detector's own short side, when it has one); None where the detector's resize is not known here or draws
        its side per image."""
        if self.input_size is None:
            return None
        sides, max_size = self.input_size
        if side is None and len(sides) != 1:
            return None
        short = int(side if side is not None else sides[0])

        def shrink(image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
            done = shrink_to_input(image, {k: target[k] for k in BOX_KEYS if k in target}, short, max_size)
            return (image, target) if done is None else (done[0], {**target, **done[1]})

        return shrink

def _as_is(batch: Any) -> Any:
    """The loader's collate function: a :class:`TrainBatches` item is a whole batch already."""
    return batch

def batch_loader(batches: TrainBatches, start: int, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches ``start .. max_iterations - 1`` in order, built by ``workers`` processes (0: in this one)."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, len(batches)),
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(batches.config.seed),  # not the global generator: exact resume
        prefetch_factor=2 if workers else None,
    )

def model_inputs(
    batch: Mapping[str, Any], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Tensor]], list[Tensor] | None]:
    """A :class:`TrainBatches` item on ``device``: float ``(3, H, W)`` images in [0, 1] (computed as
    :func:`detect.transform.as_image_tensor` does), targets and proposals."""
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    images = [move(image).permute(2, 0, 1).float().div(255) for image in batch["images"]]
    targets = [{"boxes": move(b), "labels": move(label)} for b, label in zip(batch["boxes"], batch["labels"])]
    proposals = [move(p) for p in batch["proposals"]] if batch["proposals"] is not None else None
    return images, targets, proposals

def describe_validation(train_data: DataConfig, val_data: DataConfig | None, dataset: Any) -> int | None:
    """Say on stderr where validation comes from when the run chose it (a shipped split or the hold-out split);
    returns the number of held-out images (``None`` otherwise)."""
    if val_data is None or val_data.source == "shapes":
        return None
    if val_data.part == "val":
        count = len(make_dataset(val_data))
        print(
            f"validation: no val_data, holding out {count} of {count + len(dataset)} images of {train_data.path} "
            f"(val_fraction {val_data.val_fraction}, split_seed {val_data.split_seed}); data.val_fraction: 0 "
            "trains on all",
            file=sys.stderr,
        )
        return count
    if val_data.split != train_data.split:
        print(f"validation: split {val_data.split!r} of {val_data.path} (training on {train_data.split!r})", file=sys.stderr)
    return None
