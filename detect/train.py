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
- ``pretrain`` (off unless ``pretrain.iterations`` > 0) first trains the backbone to classify crops of the
  training set's ground-truth boxes (:mod:`detect.pretrain`), the stand-in for ImageNet pre-training when nothing
  can be downloaded; its time counts in ``train_seconds`` and a checkpoint follows it, so a resume skips it.
- One step: ``losses = model(images, targets[, proposals])[1]``; the loss is their sum. SGD with momentum and
  weight decay or AdamW; gradient-norm clipping; linear warm-up then step or cosine decay. The learning rate is a
  pure function of the iteration (:func:`lr_factor`), so the iteration *is* the scheduler's state.
- Determinism and exact resume: the images of iteration ``i`` are a pure function of ``(seed, i)`` (one
  permutation per epoch from ``default_rng([seed, epoch])``, augmentation from ``default_rng([seed, i, slot])``),
  and the checkpoint holds the model, optimizer, grad scaler, torch RNG states and iteration. So a run killed and
  resumed from its last checkpoint computes the same losses as an uninterrupted run (same device and threads).
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
  :func:`bundle_run` (``detect weights add``) copies into a weights manifest. A progress line (losses, s/it, ETA)
  goes to stderr.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from detect import weights
from detect.config import override
from detect.data.coco import CocoDataset
from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.data.augment import Augment, AugmentConfig
from detect.data.voc import VocDataset
from detect import detectors
from detect.detectors.region import RegionDetector, RegionFeatures
from detect.errors import ConfigError, WeightsError
from detect.evaluate import DetectionEvaluator, plot_pr_curves, write_report
from detect.io import atomic_write
from detect.pretrain import PretrainConfig, find_backbone, pretrain_backbone
from proposals.selective_search import SelectiveSearch, SelectiveSearchConfig

__all__ = [
    "DataConfig",
    "OptimizerConfig",
    "ProposalCache",
    "ScheduleConfig",
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
    """Where images come from: ``source`` ``"shapes"`` (the built-in synthetic set, ``shapes`` its config),
    ``"voc"`` (``path`` a VOC folder, ``split`` an ImageSets list) or ``"coco"`` (``path`` the JSON, ``images_dir``
    its images, default as :class:`~detect.data.coco.CocoDataset` says). ``class_names`` fixes the label order."""

    source: str = "shapes"
    path: str | None = None
    split: str | None = None
    images_dir: str | None = None
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data source must be one of {DATA_SOURCES}, got {self.source!r}")
        if self.source != "shapes" and not self.path:
            raise ConfigError(f"data source {self.source!r} needs a path")


DATA_SOURCES = ("shapes", "voc", "coco")


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
    is set); ``device`` ``"auto"`` takes CUDA when present."""

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


def make_dataset(config: DataConfig) -> Any:
    """The data set a :class:`DataConfig` describes (index-addressable ``(image, target)`` with ``class_names``)."""
    if config.source == "shapes":
        return ShapesDataset(config.shapes)
    if config.source == "coco":
        return CocoDataset(config.path, config.images_dir, config.class_names)
    return VocDataset(config.path, config.split, config.class_names)


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


class Progress:
    """A one-line progress bar on stderr, redrawn with ``\\r`` at most every ``interval`` seconds."""

    def __init__(self, total: int, start: int, interval: float = 0.5) -> None:
        self.total, self.start, self.interval = total, start, interval
        self.began = self.last = time.perf_counter()

    def update(self, iteration: int, losses: Mapping[str, float]) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval and iteration < self.total:
            return
        self.last = now
        per_it = (now - self.began) / max(iteration - self.start, 1)
        eta = time.strftime("%H:%M:%S", time.gmtime(per_it * (self.total - iteration)))
        parts = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items())
        sys.stderr.write(f"\r{iteration}/{self.total} {parts} | {per_it:.2f} s/it ETA {eta}  ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


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
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


@torch.no_grad()
@torch.no_grad()
def evaluate_detector(
    model: nn.Module, dataset: Any, batch_size: int = 4, proposals: Callable[..., list[np.ndarray]] | None = None
) -> dict:
    """VOC AP (area under the curve, IoU 0.5, difficult ignored) of ``model`` on ``dataset``; ``proposals``
    ``(images, targets) -> boxes`` feeds region detectors."""
    model.eval()
    evaluator = DetectionEvaluator(dataset.class_names)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images, targets = [s[0] for s in samples], [s[1] for s in samples]
        extra = {"proposals": [torch.from_numpy(p) for p in proposals(images, targets)]} if proposals else {}
        detections, _ = model(images, **extra)
        for target, found in zip(targets, detections):
            evaluator.add(target["image_id"], found, target)
    return evaluator.compute()


class Trainer:
    """One training run of :class:`TrainConfig` into ``config.out_dir`` (see the module docstring)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out_dir)
        self.device = _device(config.device)
        self.dataset = make_dataset(config.data)
        self.detector_config = detector_config(config)
        torch.manual_seed(config.seed)
        self.model = detectors.build(config.detector, self.dataset.class_names, self.detector_config).to(self.device)
        self.region = isinstance(self.model, RegionDetector)
        if config.init_backbone:
            init_backbone(self.model, config.init_backbone)
        cache_dir = Path(config.proposal_cache) if config.proposal_cache else self.out / "proposals"
        self.cache = ProposalCache(cache_dir, self.detector_config.proposals) if self.region else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optimizer
        if opt.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.amp = config.mixed_precision and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.augment = Augment(config.augment)
        self.log = MetricsLog(self.out / f"metrics.{config.log_format}", config.log_format)
        self.evaluations = MetricsLog(self.out / "evaluations.jsonl", "jsonl")
        self.iteration = 0
        self.train_seconds = 0.0  # optimisation time so far, carried across resumes in the checkpoint
        self.pretrain_seconds = 0.0  # the part of it spent in the pretrain stage

    # -- data --

    def proposals_for(self, data: DataConfig) -> Callable[..., list[np.ndarray]]:
        return lambda images, targets: self.cache(images, _cache_keys(data, targets))

    def batch(self, iteration: int) -> tuple[list[np.ndarray], list[dict], list[Tensor] | None]:
        """The augmented images, targets (and proposals) of ``iteration``: a pure function of the seed and it."""
        cfg, n = self.config, len(self.dataset)
        samples = []
        for slot in range(cfg.batch_size):
            position = iteration * cfg.batch_size + slot
            order = np.random.default_rng([cfg.seed, position // n]).permutation(n)
            samples.append(self.dataset[int(order[position % n])])
        images, targets = [s[0] for s in samples], [dict(s[1]) for s in samples]
        if self.region:
            for target, boxes in zip(targets, self.proposals_for(cfg.data)(images, targets)):
                target["proposals"] = boxes
        out = [
            self.augment(im, t, np.random.default_rng([cfg.seed, iteration, k]))
            for k, (im, t) in enumerate(zip(images, targets))
        ]
        images = [o[0] for o in out]
        model_targets = [{"boxes": torch.as_tensor(t["boxes"]), "labels": torch.as_tensor(t["labels"])} for _, t in out]
        proposals = [torch.as_tensor(t["proposals"]) for _, t in out] if self.region else None
        return images, model_targets, proposals

    # -- checkpoints --

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "pretrain_seconds": self.pretrain_seconds,
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
        self.log.truncate(self.iteration)
        self.evaluations.truncate(self.iteration)

    # -- steps --

    def step(self) -> dict[str, float]:
        """One optimisation step at ``self.iteration``; returns the losses as floats."""
        cfg = self.config
        images, targets, proposals = self.batch(self.iteration)
        lr = cfg.optimizer.lr * lr_factor(cfg.schedule, self.iteration, cfg.max_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        extra = {"proposals": proposals} if proposals is not None else {}
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
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
        return {"iteration": self.iteration, "lr": lr, "loss": float(loss.detach()), **values}

    def run(self, resume: bool = False, progress: bool = True) -> dict:
        """Train to ``max_iterations`` (from the checkpoint with ``resume``), fit the region detectors' extras,
        save the model, plot the losses and evaluate; returns the last evaluation (empty without val data)."""
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        else:
            for stale in (self.log.path, self.evaluations.path, self.out / "pretrain.jsonl"):
                stale.unlink(missing_ok=True)
            if cfg.pretrain.iterations:
                self.pretrain(progress)
        bar = Progress(cfg.max_iterations, self.iteration) if progress else None
        while self.iteration < cfg.max_iterations:
            began = time.perf_counter()
            row = self.step()
            self.train_seconds += time.perf_counter() - began
            if self.iteration % cfg.log_every == 0:
                self.log.append(row)
            if bar:
                bar.update(self.iteration, {k: v for k, v in row.items() if k.startswith("loss")})
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.max_iterations:
                self.save_checkpoint()
            if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.iteration < cfg.max_iterations:
                self.evaluate()
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
        summary = {
            "detector": cfg.detector,
            "iterations": self.iteration,
            "train_seconds": round(self.train_seconds, 1),
            "pretrain_seconds": round(self.pretrain_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "val_data": dataclasses.asdict(cfg.val_data) if cfg.val_data else None,
            "mAP": result.get("mAP"),
        }
        atomic_write(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return result

    def pretrain(self, progress: bool) -> None:
        """The recipe's ``pretrain`` stage (:mod:`detect.pretrain`) on the training data, logged to
        ``pretrain.jsonl``; its time counts in ``train_seconds``. A checkpoint follows, so a resume skips it."""
        cfg = self.config
        log = MetricsLog(self.out / "pretrain.jsonl", "jsonl")
        bar = Progress(cfg.pretrain.iterations, 0) if progress else None

        def on_step(row: dict[str, float]) -> None:
            if row["iteration"] % cfg.log_every == 0:
                log.append(row)
            if bar:
                bar.update(int(row["iteration"]), {"pretrain": row["loss"], "accuracy": row["accuracy"]})

        result = pretrain_backbone(find_backbone(self.model), self.dataset, cfg.pretrain, cfg.seed, on_step)
        if bar:
            bar.close()
        self.pretrain_seconds = result["seconds"]
        self.train_seconds += result["seconds"]
        self.save_checkpoint()

    def evaluate(self, report: bool = False) -> dict:
        """Validation mAP (logged to ``evaluations.jsonl``); with ``report`` also the JSON report and PR plots."""
        data = self.config.val_data
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


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run :class:`Trainer` on ``config``; returns the final evaluation (empty without ``val_data``)."""
    return Trainer(config).run(resume=resume, progress=progress)


# --- entry points ----------------------------------------------------------------------------------------------


def data_config(path: str) -> DataConfig:
    """A :class:`DataConfig` for a path given on the command line: a COCO JSON file or a VOC folder."""
    return DataConfig(source="coco" if path.endswith(".json") else "voc", path=path)


def evaluation_data(spec: str) -> DataConfig:
    """The data ``detect eval --data`` names: a recipe (its ``val_data``, else ``data``), a VOC folder or a COCO
    JSON."""
    if spec.endswith((".yaml", ".yml")):
        recipe = load_recipe(spec)
        return recipe.val_data or recipe.data
    return data_config(spec)


def evaluate_weights(weights_name: str | Path, data: DataConfig, out: str | Path, batch_size: int = 4) -> dict:
    """VOC mAP of trained weights (a file or a registered name) on ``data``; writes ``report.json`` and the PR
    plots into ``out`` (region detectors' proposals are cached under ``out/proposals``)."""
    model = weights.load_detector(weights_name)
    dataset = make_dataset(data)
    proposals = None
    if isinstance(model, RegionDetector):
        cache = ProposalCache(Path(out) / "proposals", model.config.proposals)
        proposals = lambda images, targets: cache(images, _cache_keys(data, targets))  # noqa: E731
    result = evaluate_detector(model, dataset, batch_size, proposals)
    write_report(result, Path(out) / "report.json")
    plot_pr_curves(result, Path(out) / "pr_curves")
    return result
