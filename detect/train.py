"""Training: one loop for R-CNN, SPP-Net and Faster R-CNN, driven by a recipe file (``detect train``), and
evaluation of a trained model (``detect eval``).

Decisions:

- A recipe is YAML mapping onto :class:`TrainConfig` (frozen dataclasses with defaults); a recipe only overrides
  fields, and an unknown key anywhere raises :class:`ConfigError` naming its dotted path. ``detector_config``
  overrides the chosen detector's own config dataclass (``RCNNConfig``, ``SPPNetConfig`` or ``FasterRCNNConfig``)
  starting from the detector's registry default (:data:`detect.detectors.DETECTORS`, read from its builder's
  signature, so it is written in one place).
- Detectors by name are the registry's. Besides the paper architectures (ImageNet-sized: AlexNet, VGG16,
  ResNet-50-FPN) there is a ``*_tiny`` variant of each on :func:`detect.backbones.tiny` (seven 3x3 convs with
  GroupNorm, stride 8, trained from scratch) so that the bundled ``shapes`` models train within an hour on two
  CPU cores.
- ``init_backbone`` starts a detector's backbone from trained weights (a ``detect train`` file or a registered
  name): the bundled region detectors start from the bundled Faster R-CNN's, where the papers start from ImageNet.
- ``init`` (``detect train --init``) starts the whole detector from another (a registered name, a ``detect train``
  file or a torchvision checkpoint): every tensor that fits is copied, the class layers are rebuilt for the new
  classes, keeping the rows of classes the source has (:mod:`detect.finetune`); the report is printed.
  ``trainable_backbone_layers`` (torchvision's meaning) then freezes the lower backbone stages.
- ``pretrain`` (off unless ``pretrain.iterations`` > 0) first trains the backbone to classify crops of the
  training set's ground-truth boxes (:mod:`detect.pretrain`), the stand-in for ImageNet pre-training when nothing
  can be downloaded; its time counts in ``train_seconds`` and a checkpoint follows it, so a resume skips it.
- One step: ``losses = model(images, targets[, proposals])[1]``; the loss is their sum. SGD with momentum and
  weight decay or AdamW; gradient-norm clipping; linear warm-up then step or cosine decay. The learning rate is a
  pure function of the iteration (:func:`lr_factor`), so the iteration *is* the scheduler's state.
- Determinism and exact resume: the images of iteration ``i`` are a pure function of ``(seed, i)`` (one
  permutation per epoch from ``default_rng([seed, epoch])``, augmentation from ``default_rng([seed, i, slot])``,
  the multi-scale short side from ``default_rng([seed, i, SHORT_SIDE_SLOT])``), and the checkpoint holds the
  model, optimizer, grad scaler, torch RNG states and iteration. So a run killed and resumed from its last
  checkpoint computes the same losses as an uninterrupted run (same device and threads).
- Data loading: :class:`TrainBatches` is a ``torch.utils.data.Dataset`` indexed by the iteration, read by a
  ``DataLoader`` (``batch_size=None``) whose sampler is ``range(first iteration, max_iterations)``: with
  ``workers`` > 0, worker processes decode and augment ahead of the step, and the batch of iteration ``i`` stays
  the same whichever worker builds it. The loader draws its base seed from a generator of its own, so starting it
  leaves torch's global generator (the model's samplers) alone. Images travel as ``uint8`` ``HxWx3`` tensors
  (pinned on CUDA, copied without blocking) and become the model's float form on the device, the very arithmetic
  of :func:`detect.transform.as_image_tensor`.
- Multi-scale training: the batch's short side (``augment.short_sides``) becomes the detector's resize target for
  that step (Faster R-CNN's ``transform.config.min_size``, SPP-Net's ``config.scales``), restored afterwards, so
  evaluation and the saved model keep their own.
- Checkpoints (``checkpoint.pt``, every ``checkpoint_every`` iterations and at the end) are written atomically
  (temporary file + rename): a kill never leaves a half-written file. Read back with ``weights_only=True``.
- Proposals for R-CNN/SPP-Net: selective search runs once per original image and is cached as ``.npy`` under
  ``<cache>/<hash of the search config>/<hash of the data config>-<image id>.npy`` (default cache: the out dir's
  ``proposals/``), reused across iterations, epochs and runs; augmentation then transforms the cached boxes with
  the image (:mod:`detect.data.augment`).
- After fine-tuning, R-CNN/SPP-Net fit their box regressors (and optionally SVMs) in closed form on features of
  ``region_fit_images`` training images (:meth:`RegionDetector.collect_regions`), as in the papers.
- Mixed precision (fp16 autocast + grad scaler) only when the device is CUDA; it is ignored on CPU.
- Outputs in ``out_dir``: ``checkpoint.pt``, ``model.safetensors`` (weights + detector name, class names and
  config in the metadata, see :func:`detect.weights.write_detector`), ``metrics.jsonl`` or ``metrics.csv`` (one row per
  ``log_every`` iterations), ``evaluations.jsonl`` (one row per evaluation), ``loss.png``, and with validation data
  ``report.json`` and per-class precision-recall plots, and ``summary.json`` (iterations, optimisation seconds
  carried across resumes, thread count, final mAP and the data it was measured on), which
  :func:`bundle_run` (``detect weights add``) copies into a weights manifest. Progress goes to stderr
  (:mod:`detect.progress`: a tqdm bar on a terminal, a plain line every ``progress_seconds`` otherwise). With
  ``tensorboard: true`` the same rows (and validation mAP, pre-training figures) also go to a TensorBoard event
  file in ``tensorboard/`` (the optional ``tensorboard`` package: ``pip install 'detect[tensorboard]'``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from detect import weights
from detect.config import override
from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.data.augment import Augment, AugmentConfig
from detect.data.layouts import Layout, Subset, detect_layout, holdout, open_dataset
from detect import detectors
from detect.detectors.region import RegionDetector, RegionFeatures
from detect.errors import ConfigError, WeightsError
from detect.evaluate import DetectionEvaluator, plot_confusion_matrix, plot_pr_curves, write_report
from detect.io import atomic_write
from detect.finetune import InitReport, freeze_backbone, init_detector
from detect.pretrain import PretrainConfig, find_backbone, pretrain_backbone
from detect.progress import Progress
from proposals.selective_search import SelectiveSearch, SelectiveSearchConfig

__all__ = [
    "DataConfig",
    "OptimizerConfig",
    "ProposalCache",
    "ScheduleConfig",
    "TrainBatches",
    "TrainConfig",
    "Trainer",
    "evaluate_detector",
    "init_backbone",
    "bundle_run",
    "data_config",
    "evaluate_weights",
    "evaluation_data",
    "load_recipe",
    "lr_factor",
    "make_dataset",
    "train",
]


# --- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where images come from: ``source`` ``"shapes"`` (the built-in synthetic set, ``shapes`` its config), or data
    on disk at ``path`` in any layout :func:`detect.data.layouts.detect_layout` recognises: ``"auto"`` takes what
    it finds, ``"voc"``/``"coco"``/``"yolo"``/``"labelme"`` also insist on that annotation format. ``images_dir``
    with ``annotations_dir`` name an image + annotation folder pair (``path`` may then be left out); alone, it is a
    COCO JSON's image folder. ``split`` picks a split the data ships (VOC image set, ``data.yaml`` key, COCO file).
    ``class_names`` fixes the label order; ``on_error`` ``"skip"`` trains on the valid rest of a set with bad
    annotations (each listed), ``"raise"`` refuses it.

    ``part`` ``"train"``/``"val"`` is one side of the seeded hold-out split (:func:`detect.data.layouts.holdout`,
    ``val_fraction`` of the images by ``split_seed``); :func:`data_splits` sets it when a run has no validation
    data. ``split_seed`` is apart from the training seed, so runs with other seeds validate on the same images."""

    source: str = "shapes"
    path: str | None = None
    split: str | None = None
    images_dir: str | None = None
    annotations_dir: str | None = None
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    class_names: tuple[str, ...] | None = None
    on_error: str = "raise"
    val_fraction: float = 0.1
    split_seed: int = 0
    part: str = "all"

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source != "shapes" and not (self.path or (self.images_dir and self.annotations_dir)):
            raise ConfigError(f"data source {self.source!r} needs a path (or images_dir and annotations_dir)")
        if self.on_error not in ("raise", "skip") or self.part not in ("all", "train", "val"):
            raise ConfigError(f"data on_error must be 'raise' or 'skip', part 'all', 'train' or 'val': {self}")
        if not 0 <= self.val_fraction < 1 or self.split_seed < 0:
            raise ConfigError(f"data val_fraction must be in [0, 1) and split_seed >= 0, got {self}")


DATA_SOURCES = ("shapes", "auto", "voc", "coco", "yolo", "labelme")


@dataclass(frozen=True)
class OptimizerConfig:
    """``name`` ``"sgd"`` (momentum, weight decay) or ``"adamw"``; ``clip_grad_norm`` ``None`` disables clipping."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float | None = 10.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer name must be 'sgd' or 'adamw', got {self.name!r}")
        if self.lr <= 0 or self.weight_decay < 0 or (self.clip_grad_norm is not None and self.clip_grad_norm <= 0):
            raise ConfigError(f"invalid {self}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up from ``warmup_factor * lr`` over ``warmup_iterations``, then ``"step"`` (times ``gamma`` at
    each of ``milestones``) or ``"cosine"`` (to 0 at the last iteration)."""

    kind: str = "step"
    warmup_iterations: int = 100
    warmup_factor: float = 0.001
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("step", "cosine"):
            raise ConfigError(f"schedule kind must be 'step' or 'cosine', got {self.kind!r}")
        if (
            self.warmup_iterations < 0
            or not 0 < self.warmup_factor <= 1
            or list(self.milestones) != sorted(self.milestones)
        ):
            raise ConfigError(f"invalid {self}: need warmup_iterations >= 0, 0 < warmup_factor <= 1, sorted milestones")


@dataclass(frozen=True)
class TrainConfig:
    """A training run (see the module docstring). ``eval_every`` 0 evaluates only at the end (when ``val_data``
    is set); ``device`` ``"auto"`` takes CUDA when present. ``init`` starts the whole detector from another,
    ``init_backbone`` only its backbone (one or the other); ``trainable_backbone_layers`` ``None`` keeps the
    builder's freezing. ``workers`` loader processes (0: the training process itself); ``progress_seconds``
    between plain progress lines when stderr is not a terminal; ``tensorboard`` also writes TensorBoard events."""

    detector: str = "fasterrcnn_tiny"
    detector_config: Mapping[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: DataConfig | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_iterations: int = 1000
    batch_size: int = 2
    mixed_precision: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 0
    log_every: int = 1
    log_format: str = "jsonl"
    out_dir: str = "runs/train"
    device: str = "auto"
    proposal_cache: str | None = None
    init_backbone: str | None = None
    init: str | None = None
    trainable_backbone_layers: int | None = None
    workers: int = 0
    progress_seconds: float = 30.0
    tensorboard: bool = False
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fit_box_regressor: bool = True
    fit_svms: bool = False
    region_fit_images: int = 100

    def __post_init__(self) -> None:
        detectors.entry(self.detector)  # ConfigError naming the known detectors
        if self.log_format not in ("jsonl", "csv"):
            raise ConfigError(f"log_format must be 'jsonl' or 'csv', got {self.log_format!r}")
        positive = {
            "max_iterations": self.max_iterations,
            "batch_size": self.batch_size,
            "checkpoint_every": self.checkpoint_every,
            "log_every": self.log_every,
        }
        if bad := [name for name, value in positive.items() if value < 1]:
            raise ConfigError(f"{', '.join(bad)} must be positive")
        if self.eval_every < 0 or self.seed < 0 or self.region_fit_images < 0:
            raise ConfigError("eval_every, seed and region_fit_images must be >= 0")
        if self.workers < 0 or self.progress_seconds <= 0 or (self.trainable_backbone_layers or 0) < 0:
            raise ConfigError("workers and trainable_backbone_layers must be >= 0, progress_seconds positive")
        if self.init and self.init_backbone:
            raise ConfigError("give init (the whole detector) or init_backbone (its backbone), not both")


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML recipe (then ``overrides``, same shape); the detector config is built
    once here so that its errors surface before training starts."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read recipe {path}: {err}") from err
    config = override(override(TrainConfig(), data), overrides)
    detector_config(config)
    return config


# --- detectors -------------------------------------------------------------------------------------------------


def detector_config(config: TrainConfig) -> Any:
    """The detector's config: its registry default with the recipe's ``detector_config`` applied."""
    return override(detectors.entry(config.detector).default_config, config.detector_config, "detector_config.")


def bundle_run(
    run: str | Path, name: str, directory: str | Path | None = None, recipe: str | Path | None = None
) -> "weights.WeightsEntry":
    """Register a finished training run as weights ``name`` in ``directory`` (e.g. the bundled ``weights/``).

    ``run`` is a run folder (``model.safetensors`` and ``summary.json`` written by :class:`Trainer`) or a
    ``model.safetensors`` in one. The manifest entry gets the run's validation mAP and the data it was measured
    on, its optimisation time and iteration count, and the recipe (the file's path and parsed contents) when given.
    """
    run = Path(run)
    model_path = run if run.suffix == ".safetensors" else run / "model.safetensors"
    summary_path = model_path.parent / "summary.json"
    model = weights.load_detector(model_path)
    _, _, config = weights.saved_architecture(model_path)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{summary_path}: the run has no readable summary ({err}); did training finish?") from err
    recipe_entry: dict[str, Any] = {}
    if recipe is not None:
        recipe_path = Path(recipe)
        try:
            recipe_entry = {"path": recipe_path.as_posix(), "contents": yaml.safe_load(recipe_path.read_text("utf-8"))}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read recipe {recipe_path}: {err}") from err
    metrics = {
        "voc_map50": summary.get("mAP"),
        "iterations": summary.get("iterations"),
        "torch_threads": summary.get("torch_threads"),
        "eval_data": summary.get("val_data"),
    }
    directory = Path(directory) if directory is not None else weights.weights_dirs()[0]
    return weights.save_detector(
        model,
        directory / f"{name}.safetensors",
        name=name,
        config=config,
        recipe=recipe_entry,
        metrics=metrics,
        training_time_s=summary.get("train_seconds"),
        source="trained with detect train",
    )


# --- data ------------------------------------------------------------------------------------------------------


def init_backbone(model: nn.Module, source: str | Path) -> int:
    """Copy the backbone body of trained weights ``source`` (a ``detect train`` model file or a registered name)
    into ``model``'s: the region detectors start from the shapes-trained Faster R-CNN's features, as the papers
    start from ImageNet's. Every body tensor of ``model`` must be found with its shape; returns how many."""
    donor = weights.load_detector(source)
    theirs = find_backbone(donor).body.state_dict()
    body = find_backbone(model).body
    own = body.state_dict()
    if bad := [k for k, v in own.items() if k not in theirs or theirs[k].shape != v.shape]:
        raise ConfigError(f"init_backbone {source}: its backbone does not fit ({bad[:3]})")
    body.load_state_dict({k: theirs[k] for k in own})
    return len(own)


def data_layout(config: DataConfig) -> Layout:
    """The layout of a :class:`DataConfig` on disk; :class:`ConfigError` when it is not the ``source`` asked for."""
    if config.annotations_dir:
        layout = detect_layout(config.path, config.images_dir, config.annotations_dir)
    else:
        layout = detect_layout(config.path)
        if config.images_dir and layout.format == "coco":
            layout = dataclasses.replace(layout, images=Path(config.images_dir))
    if config.source not in ("auto", layout.format):
        raise ConfigError(f"data source is {config.source!r} but {config.path} holds {layout.describe()}")
    return layout


def make_dataset(config: DataConfig) -> Any:
    """The data set a :class:`DataConfig` describes (index-addressable ``(image, target)`` with ``class_names``),
    restricted to its ``part`` of the hold-out split."""
    if config.source == "shapes":
        dataset = ShapesDataset(config.shapes)
    else:
        dataset = open_dataset(data_layout(config), config.split, config.class_names, config.on_error)
    if config.part == "all":
        return dataset
    train_indices, val_indices = holdout(dataset, config.val_fraction, config.split_seed)
    return Subset(dataset, train_indices if config.part == "train" else val_indices)


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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config_digest(config: Any) -> str:
    return _digest(json.dumps(dataclasses.asdict(config), sort_keys=True))


class ProposalCache:
    """Selective search once per original image, stored as ``.npy`` (see the module docstring); ``cache(images,
    keys)`` gives float32 ``(N_i, 4)`` proposals, computing and storing only the missing ones (in one batch)."""

    def __init__(self, directory: str | Path, config: SelectiveSearchConfig, workers: int | None = 0) -> None:
        self.directory = Path(directory) / _config_digest(config)
        self.search = SelectiveSearch(config, workers=workers)

    def path(self, key: str) -> Path:
        return self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.npy"

    def __call__(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> list[np.ndarray]:
        paths = [self.path(key) for key in keys]
        missing = [i for i, p in enumerate(paths) if not p.exists()]
        if missing:
            for i, boxes in zip(missing, self.search([images[i] for i in missing])):
                buffer = io.BytesIO()
                np.save(buffer, boxes.cpu().numpy().astype(np.float32))
                atomic_write(paths[i], buffer.getvalue())
        return [np.load(p) for p in paths]


def _cache_keys(data: DataConfig, targets: Sequence[Mapping[str, Any]]) -> list[str]:
    digest = _config_digest(data)
    return [f"{digest}-{t['image_id']}" for t in targets]


# --- schedule and logs -----------------------------------------------------------------------------------------


def lr_factor(schedule: ScheduleConfig, iteration: int, max_iterations: int) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based): warm-up times step or cosine decay."""
    warm = 1.0
    if iteration < schedule.warmup_iterations:
        alpha = iteration / schedule.warmup_iterations
        warm = schedule.warmup_factor * (1 - alpha) + alpha
    if schedule.kind == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * iteration / max_iterations))
    return warm * schedule.gamma ** sum(iteration >= m for m in schedule.milestones)


class MetricsLog:
    """Rows of scalars appended to ``metrics.jsonl`` or ``metrics.csv`` (columns fixed by the first row)."""

    def __init__(self, path: Path, log_format: str) -> None:
        self.path = path
        self.format = log_format

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            if self.format == "jsonl":
                return [json.loads(line) for line in handle if line.strip()]
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]

    def truncate(self, iteration: int) -> None:
        """Keep the rows up to ``iteration`` (a resumed run rewrites what followed its checkpoint)."""
        kept = [row for row in self.rows() if row["iteration"] <= iteration]
        self.path.unlink(missing_ok=True)
        for row in kept:
            self.append(row)

    def append(self, row: Mapping[str, float]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            if self.format == "jsonl":
                handle.write(json.dumps(row) + "\n")
                return
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def plot_losses(rows: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Each loss column against the iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    its = [row["iteration"] for row in rows]
    for key in [k for k in rows[0] if k.startswith("loss")]:
        axes.plot(its, [row[key] for row in rows], label=key, linewidth=1)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --- the loop --------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    """``"auto"`` (CUDA when present) or a torch device name; :class:`ConfigError` for one this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device {name!r}: {err}") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r}: no such CUDA device here ({torch.cuda.device_count()} found)")
    return device


@torch.no_grad()
@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 4,
    proposals: Callable[..., list[np.ndarray]] | None = None,
    *,
    score_threshold: float | None = None,
) -> dict:
    """VOC AP (area under the curve, IoU 0.5, difficult ignored) of ``model`` on ``dataset``; ``proposals``
    ``(images, targets) -> boxes`` feeds region detectors. With ``score_threshold``, the whole
    :meth:`~detect.evaluate.DetectionEvaluator.report` instead (COCO metrics, confusion matrix at that score)."""
    model.eval()
    evaluator = DetectionEvaluator(dataset.class_names)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images, targets = [s[0] for s in samples], [s[1] for s in samples]
        extra = {"proposals": [torch.from_numpy(p) for p in proposals(images, targets)]} if proposals else {}
        detections, _ = model(images, **extra)
        for target, found in zip(targets, detections):
            evaluator.add(target["image_id"], found, target)
    return evaluator.compute() if score_threshold is None else evaluator.report(score_threshold)


# --- batches, the loader, multi-scale, TensorBoard -----------------------------------------------------------------

SHORT_SIDE_SLOT = 0x5CA1E  # the augmentation generator slot of a batch's short side (image slots are 0..B-1)


class TrainBatches(torch.utils.data.Dataset):
    """Iteration ``i`` -> its batch, a pure function of ``(seed, i)`` (see the module docstring): a dict of
    ``images`` (``uint8`` ``(H, W, 3)`` tensors), ``boxes``, ``labels``, ``proposals`` (region detectors, else
    ``None``) and ``short_side`` (``None`` without multi-scale training)."""

    def __init__(
        self, dataset: Any, config: "TrainConfig", cache: "ProposalCache | None" = None, data: DataConfig | None = None
    ) -> None:
        self.dataset, self.config, self.cache, self.data = dataset, config, cache, data
        self.augment = Augment(config.augment)

    def __len__(self) -> int:
        return self.config.max_iterations

    def samples(self, iteration: int) -> list[tuple[np.ndarray, dict]]:
        """The data set's samples of ``iteration``: one seeded permutation per epoch."""
        cfg, n = self.config, len(self.dataset)
        samples = []
        for slot in range(cfg.batch_size):
            position = iteration * cfg.batch_size + slot
            order = np.random.default_rng([cfg.seed, position // n]).permutation(n)
            image, target = self.dataset[int(order[position % n])]
            samples.append((image, dict(target)))
        return samples

    def __getitem__(self, iteration: int) -> dict[str, Any]:
        cfg = self.config
        samples = self.samples(iteration)
        if self.cache is not None:
            images, targets = [s[0] for s in samples], [s[1] for s in samples]
            for target, boxes in zip(targets, self.cache(images, _cache_keys(self.data or cfg.data, targets))):
                target["proposals"] = boxes
        out = [
            self.augment(image, target, np.random.default_rng([cfg.seed, iteration, k]))
            for k, (image, target) in enumerate(samples)
        ]
        return {
            "images": [torch.from_numpy(np.ascontiguousarray(image)) for image, _ in out],
            "boxes": [torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4) for _, t in out],
            "labels": [torch.as_tensor(t["labels"], dtype=torch.int64) for _, t in out],
            "proposals": [torch.as_tensor(t["proposals"]) for _, t in out] if self.cache is not None else None,
            "short_side": self.augment.short_side(np.random.default_rng([cfg.seed, iteration, SHORT_SIDE_SLOT])),
        }


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


def _short_side_field(model: nn.Module) -> str | None:
    """Where a detector keeps its resize target: ``"scales"`` (SPP-Net's config), ``"min_size"`` (a transform's
    config) or ``None`` (R-CNN warps regions, no image resize to steer)."""
    if "scales" in getattr(getattr(model, "config", None), "__dataclass_fields__", {}):
        return "scales"
    if "min_size" in getattr(getattr(getattr(model, "transform", None), "config", None), "__dataclass_fields__", {}):
        return "min_size"
    return None


@contextmanager
def short_side(model: nn.Module, side: int | None) -> Iterator[None]:
    """Make ``side`` the detector's resize target inside the block (multi-scale training), then restore it."""
    where = _short_side_field(model) if side is not None else None
    if where is None:
        yield
        return
    owner = model if where == "scales" else model.transform
    saved = owner.config
    owner.config = dataclasses.replace(saved, **{where: (int(side),)})
    try:
        yield
    finally:
        owner.config = saved


def _summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`ConfigError` when the optional ``tensorboard`` package
    is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "tensorboard: true needs the tensorboard package: pip install 'detect[tensorboard]' (or tensorboard)"
        ) from err
    return SummaryWriter


def tensorboard_writer(directory: Path, purge_step: int | None = None) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``directory``; a resumed run passes its iteration as ``purge_step``
    so the events the killed run wrote after its checkpoint are dropped."""
    return _summary_writer()(str(directory), purge_step=purge_step)


class Trainer:
    """One training run of :class:`TrainConfig` into ``config.out_dir`` (see the module docstring)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out_dir)
        self.device = _device(config.device)
        self.train_data, self.val_data = data_splits(config)
        self.dataset = make_dataset(self.train_data)
        self.val_images = _describe_validation(self.train_data, self.val_data, self.dataset)
        self.detector_config = detector_config(config)
        torch.manual_seed(config.seed)
        self.model = detectors.build(config.detector, self.dataset.class_names, self.detector_config).to(self.device)
        self.region = isinstance(self.model, RegionDetector)
        if config.init_backbone:
            init_backbone(self.model, config.init_backbone)
        self.init_report: InitReport | None = None
        if config.init:
            self.init_report = init_detector(self.model, config.init)
            print(self.init_report.summary(), file=sys.stderr)
        if config.trainable_backbone_layers is not None:
            freeze_backbone(self.model, config.trainable_backbone_layers)
        if config.augment.short_sides and _short_side_field(self.model) is None:
            raise ConfigError(f"augment.short_sides: {config.detector} does not resize images (R-CNN warps regions)")
        cache_dir = Path(config.proposal_cache) if config.proposal_cache else self.out / "proposals"
        self.cache = ProposalCache(cache_dir, self.detector_config.proposals) if self.region else None
        self.batches = TrainBatches(self.dataset, config, self.cache, config.data)
        if config.tensorboard:
            _summary_writer()  # a missing package is a ConfigError now, before any training
        self.writer: Any = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optimizer
        if opt.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.amp = config.mixed_precision and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.augment = self.batches.augment
        self.log = MetricsLog(self.out / f"metrics.{config.log_format}", config.log_format)
        self.evaluations = MetricsLog(self.out / "evaluations.jsonl", "jsonl")
        self.iteration = 0
        self.train_seconds = 0.0  # optimisation time so far, carried across resumes in the checkpoint
        self.pretrain_seconds = 0.0  # the part of it spent in the pretrain stage
        self.pretrain_heldout: dict[str, float] = {}  # the stage's held-out crop accuracy, chance and crop count

    # -- data --

    def proposals_for(self, data: DataConfig) -> Callable[..., list[np.ndarray]]:
        return lambda images, targets: self.cache(images, _cache_keys(data, targets))

    def batch(self, iteration: int) -> tuple[list[Tensor], list[dict], list[Tensor] | None]:
        """The augmented images, targets (and proposals) of ``iteration`` on the device: a pure function of the
        seed and it (what the loader yields, built here in the calling process)."""
        return model_inputs(self.batches[iteration], self.device)

    # -- TensorBoard --

    def open_writer(self, resume: bool) -> None:
        """The TensorBoard writer of a ``tensorboard: true`` run (a resumed one drops the events after its
        checkpoint)."""
        if self.config.tensorboard and self.writer is None:
            self.writer = tensorboard_writer(self.out / "tensorboard", purge_step=self.iteration if resume else None)

    def write_scalars(self, group: str, row: Mapping[str, Any]) -> None:
        """``row``'s numbers as ``group/name`` scalars at its ``iteration`` (nothing without a writer)."""
        if self.writer is None:
            return
        for name, value in row.items():
            if name != "iteration" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{group}/{name}", value, int(row["iteration"]))

    # -- checkpoints --

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "pretrain_seconds": self.pretrain_seconds,
            "pretrain_heldout": self.pretrain_heldout,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> None:
        if not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.pretrain_seconds = float(state.get("pretrain_seconds", 0.0))
        self.pretrain_heldout = dict(state.get("pretrain_heldout", {}))
        self.log.truncate(self.iteration)
        self.evaluations.truncate(self.iteration)

    # -- steps --

    def step(self, batch: Mapping[str, Any] | None = None) -> dict[str, float]:
        """One optimisation step at ``self.iteration`` on ``batch`` (its :class:`TrainBatches` item, built here
        when not given); returns the losses as floats."""
        cfg = self.config
        batch = batch if batch is not None else self.batches[self.iteration]
        images, targets, proposals = model_inputs(batch, self.device)
        lr = cfg.optimizer.lr * lr_factor(cfg.schedule, self.iteration, cfg.max_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        extra = {"proposals": proposals} if proposals is not None else {}
        with short_side(self.model, batch["short_side"]), torch.autocast(
            self.device.type, dtype=torch.float16, enabled=self.amp
        ):
            _, losses = self.model(images, targets, **extra)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {losses}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optimizer.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optimizer.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        row = {"iteration": self.iteration, "lr": lr, "loss": float(loss.detach()), **values}
        return row | ({"short_side": batch["short_side"]} if batch["short_side"] is not None else {})

    def run(self, resume: bool = False, progress: bool = True) -> dict:
        """Train to ``max_iterations`` (from the checkpoint with ``resume``), fit the region detectors' extras,
        save the model, plot the losses and evaluate; returns the last evaluation (empty without val data)."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
            self.open_writer(resume=True)
        else:
            for stale in (self.log.path, self.evaluations.path, self.out / "pretrain.jsonl"):
                stale.unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            self.open_writer(resume=False)
            if cfg.pretrain.iterations:
                self.pretrain(progress)
        bar = None
        if progress:
            bar = Progress(cfg.max_iterations, self.iteration, desc="train", interval=cfg.progress_seconds)
        loader = batch_loader(self.batches, self.iteration, cfg.workers, self.device.type == "cuda")
        began = time.perf_counter()
        for batch in loader:  # waiting for a batch counts: it is what the loader workers are there to hide
            row = self.step(batch)
            self.train_seconds += time.perf_counter() - began
            if self.iteration % cfg.log_every == 0:
                self.log.append(row)
                self.write_scalars("train", row)
            if bar:
                bar.update(self.iteration, {k.removeprefix("loss_"): v for k, v in row.items() if k.startswith("loss")})
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.max_iterations:
                self.save_checkpoint()
            if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.iteration < cfg.max_iterations:
                self.write_scalars("val", {"iteration": self.iteration, "mAP": self.evaluate().get("mAP")})
            began = time.perf_counter()
        if bar:
            bar.close()
        if self.region:
            began = time.perf_counter()
            self.fit_region_extras()
            self.train_seconds += time.perf_counter() - began
        weights.write_detector(self.model, self.out / "model.safetensors", getattr(self.model, "config", self.detector_config))
        if rows := self.log.rows():
            plot_losses(rows, self.out / "loss.png")
        result = self.evaluate(report=True)
        self.write_scalars("val", {"iteration": self.iteration, "mAP": result.get("mAP")})
        if self.writer is not None:
            self.writer.close()
        summary = {
            "detector": cfg.detector,
            "iterations": self.iteration,
            "train_seconds": round(self.train_seconds, 1),
            "pretrain_seconds": round(self.pretrain_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "val_data": dataclasses.asdict(self.val_data) if self.val_data else None,
            "val_images": self.val_images,
            "mAP": result.get("mAP"),
            "pretrain_heldout": self.pretrain_heldout or None,
            "init": {"source": self.init_report.source, "copied": len(self.init_report.copied),
                     "mapped": self.init_report.mapped} if self.init_report else None,
            "workers": cfg.workers,
        }
        atomic_write(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return result

    def pretrain(self, progress: bool) -> None:
        """The recipe's ``pretrain`` stage (:mod:`detect.pretrain`) on the training data, logged to
        ``pretrain.jsonl``; its time counts in ``train_seconds``. A checkpoint follows, so a resume skips it."""
        cfg = self.config
        log = MetricsLog(self.out / "pretrain.jsonl", "jsonl")
        bar = Progress(cfg.pretrain.iterations, desc="pretrain", interval=cfg.progress_seconds) if progress else None

        def on_step(row: dict[str, float]) -> None:
            if row["iteration"] % cfg.log_every == 0:
                log.append(row)
                self.write_scalars("pretrain", row)
            if bar:
                bar.update(int(row["iteration"]), {"loss": row["loss"], "batch accuracy": row["accuracy"]})

        result = pretrain_backbone(find_backbone(self.model), self.dataset, cfg.pretrain, cfg.seed, on_step)
        if bar:
            bar.close()
        self.pretrain_heldout = {k: result[k] for k in ("heldout_accuracy", "heldout_chance", "heldout_crops")}
        print(
            f"pretrain: held-out crop accuracy {result['heldout_accuracy']:.3f} "
            f"(chance {result['heldout_chance']:.3f}, {result['heldout_crops']} crops of images no step drew)",
            file=sys.stderr,
        )
        self.write_scalars("pretrain", {"iteration": cfg.pretrain.iterations, **self.pretrain_heldout})
        self.pretrain_seconds = result["seconds"]
        self.train_seconds += result["seconds"]
        self.save_checkpoint()

    def evaluate(self, report: bool = False) -> dict:
        """Validation mAP (logged to ``evaluations.jsonl``); with ``report`` also the JSON report and PR plots."""
        data = self.val_data
        if data is None:
            return {}
        dataset = make_dataset(data)
        proposals = self.proposals_for(data) if self.region else None
        result = evaluate_detector(self.model, dataset, self.config.batch_size, proposals)
        self.evaluations.append({"iteration": self.iteration, "mAP": result["mAP"]})
        if report:
            write_report(result, self.out / "report.json")
            plot_pr_curves(result, self.out / "pr_curves")
        return result

    @torch.no_grad()
    def fit_region_extras(self) -> None:
        """Box regressors (and SVMs) of R-CNN/SPP-Net on the first ``region_fit_images`` training images."""
        cfg = self.config
        count = min(cfg.region_fit_images, len(self.dataset))
        if count == 0 or not (cfg.fit_box_regressor or cfg.fit_svms):
            return
        self.model.eval()
        parts = []
        for start in range(0, count, cfg.batch_size):
            samples = [self.dataset[i] for i in range(start, min(start + cfg.batch_size, count))]
            images, targets = [s[0] for s in samples], [s[1] for s in samples]
            proposals = [torch.from_numpy(p) for p in self.proposals_for(cfg.data)(images, targets)]
            model_targets = [
                {"boxes": torch.as_tensor(t["boxes"]), "labels": torch.as_tensor(t["labels"])} for t in targets
            ]
            parts.append(self.model.collect_regions(images, model_targets, proposals))
        features = RegionFeatures.cat(parts)
        if cfg.fit_box_regressor:
            self.model.fit_box_regressor(features.pooled, features.boxes, features.gt_boxes, features.gt_labels)
        if cfg.fit_svms:
            generator = torch.Generator().manual_seed(cfg.seed)
            self.model.fit_svms(features.fc7, features.labels, features.overlaps, generator=generator)


def _describe_validation(train_data: DataConfig, val_data: DataConfig | None, dataset: Any) -> int | None:
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


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run :class:`Trainer` on ``config``; returns the final evaluation (empty without ``val_data``)."""
    return Trainer(config).run(resume=resume, progress=progress)


# --- entry points ----------------------------------------------------------------------------------------------


def data_config(path: str | None, images_dir: str | None = None, annotations_dir: str | None = None) -> DataConfig:
    """A :class:`DataConfig` for data named on the command line: a folder, COCO JSON or ``data.yaml`` in any
    recognised layout, or an image + annotation folder pair. The layout is checked here, so a wrong path fails
    before anything is built."""
    config = DataConfig(source="auto", path=path, images_dir=images_dir, annotations_dir=annotations_dir)
    data_layout(config)
    return config


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
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and "names" in document and "train" in document


def evaluate_weights(
    weights_name: str | Path,
    data: DataConfig,
    out: str | Path,
    batch_size: int = 4,
    score_threshold: float = 0.5,
    device: str = "auto",
) -> dict:
    """VOC AP, COCO metrics and the confusion matrix (detections scoring at least ``score_threshold``) of trained
    weights (a file or a registered name) on ``data``, read in the model's class order (a class the model does not
    know is an error, not a silent shift of labels). Writes ``report.json``, ``pr_curves/`` and
    ``confusion_matrix.png`` into ``out`` (region detectors' proposals are cached under ``out/proposals``)."""
    model = weights.load_detector(weights_name).to(_device(device))
    if data.source != "shapes" and data.class_names is None:
        data = dataclasses.replace(data, class_names=tuple(model.class_names))
    dataset = make_dataset(data)
    proposals = None
    if isinstance(model, RegionDetector):
        cache = ProposalCache(Path(out) / "proposals", model.config.proposals)
        proposals = lambda images, targets: cache(images, _cache_keys(data, targets))  # noqa: E731
    result = evaluate_detector(model, dataset, batch_size, proposals, score_threshold=score_threshold)
    write_report(result, Path(out) / "report.json")
    plot_pr_curves(result, Path(out) / "pr_curves")
    plot_confusion_matrix(result["confusion_matrix"], Path(out) / "confusion_matrix.png")
    return result
