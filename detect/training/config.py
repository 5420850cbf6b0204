"""A training run's configuration: :class:`TrainConfig` (frozen dataclasses with defaults) and the YAML recipe that
overrides its fields (:func:`load_recipe`; an unknown key anywhere is a :class:`ConfigError` naming its dotted
path). ``detector_config`` overrides the chosen detector's own config dataclass, starting from its registry default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from detect import detectors
from detect.bundled import recipe_path
from detect.config import load_yaml, override
from detect.data.augment import AugmentConfig
from detect.data.config import DataConfig
from detect.errors import ConfigError
from detect.pretrain import PretrainConfig

__all__ = ["DataConfig", "OptimizerConfig", "ScheduleConfig", "TrainConfig", "detector_config", "load_recipe"]


@dataclass(frozen=True)
class OptimizerConfig:
    """``name`` ``"sgd"`` (momentum, weight decay) or ``"adamw"``; ``clip_grad_norm`` ``None`` disables clipping.
    ``scale_lr`` ``"linear"`` (Goyal et al.'s rule, for data-parallel runs): the learning rate used is ``lr *
    global batch / base_batch_size`` (global batch: ``batch_size`` x processes), reached through the schedule's
    warm-up; ``"none"`` uses ``lr`` whatever the global batch."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float | None = 10.0
    scale_lr: str = "none"
    base_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer name must be 'sgd' or 'adamw', got {self.name!r}")
        if self.scale_lr not in ("none", "linear"):
            raise ConfigError(f"optimizer.scale_lr must be 'none' or 'linear', got {self.scale_lr!r}")
        if self.scale_lr == "linear" and (self.base_batch_size is None or self.base_batch_size < 1):
            raise ConfigError("optimizer.scale_lr 'linear' needs optimizer.base_batch_size (the global batch that "
                              "optimizer.lr is meant for), a positive integer")
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
    between plain progress lines when stderr is not a terminal; ``tensorboard`` also writes TensorBoard events.
    ``time_budget`` (seconds) fits the run into that wall time (:mod:`detect.training.budget`; ``max_iterations``
    is then a cap and ``eval_every`` the budget's); ``patience`` evaluations without a better validation score stop
    it early (0: never; :mod:`detect.training.best`). ``epochs``, when set, gives the run's length in passes over
    the training images instead of ``max_iterations`` (which the trainer sets from it and the global batch).
    ``ema`` > 0 keeps an exponential moving average of the weights with that decay (:mod:`detect.training.ema`):
    evaluations, the best model and the saved files are the average's; 0 is off."""

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
    time_budget: float | None = None
    patience: int = 0
    epochs: float | None = None
    ema: float = 0.0

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
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be a positive number, got {self.epochs}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(f"time_budget must be a positive number of seconds, got {self.time_budget}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be a decay in [0, 1) (0: no moving average), got {self.ema}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0 (0: no early stop), got {self.patience}")
        if self.init and self.init_backbone:
            raise ConfigError("give init (the whole detector) or init_backbone (its backbone), not both")

def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML recipe (then ``overrides``, same shape); the detector config is built
    once here so that its errors surface before training starts."""
    try:
        data = load_yaml(recipe_path(path).read_text(encoding="utf-8"), f"recipe {path}") or {}
    except ConfigError as err:
        raise ConfigError(f"cannot read {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read recipe {path}: {err}") from err
    config = override(override(TrainConfig(), data), overrides)
    detector_config(config)
    return config


def detector_config(config: TrainConfig) -> Any:
    """The detector's config: its registry default with the recipe's ``detector_config`` applied."""
    return override(detectors.entry(config.detector).default_config, config.detector_config, "detector_config.")
