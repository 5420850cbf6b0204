"""Backbone pre-training by classifying object crops of the training data (the ``pretrain`` stage of a recipe).

The papers start every detector from an ImageNet-trained classifier; the detection step then only has to learn
where objects are. A backbone trained from scratch inside a detector learns both at once, slowly: on the shapes
set the tiny Faster R-CNN found 99 % of the objects (RPN recall) long before it could name them. This stage gives
the same head start without outside data: before detector training, the detector's own backbone, followed by
global average pooling and a linear layer, learns to classify crops of the training set's ground-truth boxes.

Decisions:

- Each step draws ``images_per_batch`` training images (a pure function of ``(seed, step)``, like the detector
  steps) and crops every non-difficult object from them with RoI Align to ``crop_size`` squared, its box jittered
  (centre moved by up to ``jitter`` of the box's size, sides enlarged by up to ``enlarge``) and flipped at random.
- SGD with momentum and weight decay (or AdamW), linear warm-up then cosine decay to 0 over ``iterations``
  steps; the linear layer is thrown away afterwards. Only the training data's boxes and labels are used: no validation data leaks.
- Images are normalised with the ImageNet mean and std, as every detector's transform here does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from detect.backbones import Backbone
from detect.errors import ConfigError
from detect.transform import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PretrainConfig", "crop_batch", "find_backbone", "pretrain_backbone"]


@dataclass(frozen=True)
class PretrainConfig:
    """Crop-classification pre-training of the backbone (see the module docstring); ``iterations`` 0 skips it."""

    iterations: int = 0
    images_per_batch: int = 32
    crop_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    jitter: float = 0.1
    enlarge: float = 0.3
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.images_per_batch < 1 or self.crop_size < 1 or self.warmup_iterations < 0:
            raise ConfigError(f"invalid {self}: need iterations >= 0, images_per_batch >= 1, crop_size >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.jitter < 0 or self.enlarge < 0:
            raise ConfigError(f"invalid {self}: lr must be positive, weight_decay, jitter and enlarge >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"pretrain optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"pretrain flip_prob must lie in [0, 1], got {self.flip_prob}")


def find_backbone(model: nn.Module) -> Backbone:
    """The detector's :class:`~detect.backbones.Backbone` (every detector here has exactly one): what the pretrain
    stage trains and ``init_backbone`` copies."""
    found = [m for m in model.modules() if isinstance(m, Backbone)]
    if len(found) != 1:
        raise ConfigError(f"expected a detector with one backbone, found {len(found)} in {type(model).__name__}")
    return found[0]


def _normalised(image: np.ndarray) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def crop_batch(
    samples: list[tuple[np.ndarray, Mapping[str, Any]]], config: PretrainConfig, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Jittered, flipped ``(N, 3, crop, crop)`` crops of every non-difficult object in ``samples`` and their
    labels."""
    crops, labels = [], []
    for image, target in samples:
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        keep = ~np.asarray(target.get("difficult", np.zeros(len(boxes), bool)), dtype=bool)
        boxes, kept = boxes[keep], np.asarray(target["labels"])[keep]
        if not len(boxes):
            continue
        size = boxes[:, 2:] - boxes[:, :2]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + rng.uniform(-1, 1, size.shape) * config.jitter * size
        half = size * (1 + rng.uniform(0, config.enlarge, (len(boxes), 1))) / 2
        jittered = torch.from_numpy(np.concatenate([centre - half, centre + half], 1)).float()
        crops.append(roi_align(_normalised(image)[None], [jittered], config.crop_size, 1.0, 2, aligned=True))
        labels.append(torch.as_tensor(kept, dtype=torch.int64))
    if not crops:
        return torch.zeros(0, 3, config.crop_size, config.crop_size), torch.zeros(0, dtype=torch.int64)
    x, y = torch.cat(crops), torch.cat(labels)
    flip = torch.from_numpy(rng.random(len(x)) < config.flip_prob)
    x[flip] = x[flip].flip(-1)
    return x, y


def _pooled(backbone: Backbone, x: Tensor) -> Tensor:
    features = backbone(x)
    levels = list(features.values()) if isinstance(features, Mapping) else [features]
    return torch.stack([level.mean((2, 3)) for level in levels]).mean(0)


def pretrain_backbone(
    backbone: Backbone,
    dataset: Any,
    config: PretrainConfig,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train ``backbone`` in place on crop classification over ``dataset`` (index-addressable ``(image,
    target)`` with ``class_names``) for ``config.iterations`` steps; ``on_step`` gets each step's row
    (iteration, lr, loss, accuracy). Returns the last row plus ``seconds``."""
    device = next(backbone.parameters()).device
    head = nn.Linear(backbone.out_channels, len(dataset.class_names) + 1).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    began, row = time.perf_counter(), {}
    was_training = backbone.training
    backbone.train()
    for step in range(config.iterations):
        rng = np.random.default_rng([seed, 0x5EED, step])
        x, y = torch.zeros(0), torch.zeros(0)
        for _ in range(10):  # images without objects give no crops: draw again, a bounded number of times
            indices = rng.integers(len(dataset), size=config.images_per_batch)
            x, y = crop_batch([dataset[int(i)] for i in indices], config, rng)
            if len(x):
                break
        if not len(x):
            raise ConfigError("pretrain: the training images hold no (non-difficult) objects to crop")
        warm = min(1.0, (step + 1) / config.warmup_iterations) if config.warmup_iterations else 1.0
        lr = config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / config.iterations))
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = head(_pooled(backbone, x.to(device)))
        loss = nn.functional.cross_entropy(logits, y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = float((logits.argmax(1).cpu() == y).float().mean())
        row = {"iteration": step + 1, "lr": lr, "loss": float(loss.detach()), "accuracy": accuracy}
        if on_step:
            on_step(row)
    backbone.train(was_training)
    return {**row, "seconds": time.perf_counter() - began}
