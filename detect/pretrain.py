"""Backbone pre-training by classifying object crops of the training data (the ``pretrain`` stage of a recipe).

The papers start every detector from an ImageNet-trained classifier; the detection step then only has to learn
where objects are. A backbone trained from scratch inside a detector learns both at once, slowly: on the shapes
set the tiny Faster R-CNN found 99 % of the objects (RPN recall) long before it could name them. This stage gives
the same head start without outside data: before detector training, the detector's own backbone, followed by
global average pooling and a linear layer, learns to classify crops of the training set's ground-truth boxes,
and to tell them from background crops.

Decisions:

- Each step draws ``images_per_batch`` training images (a pure function of ``(seed, step)``, like the detector
  steps) and crops every non-difficult object from them with RoI Align to ``crop_size`` squared, its box jittered
  (centre moved by up to ``jitter`` of the box's size, sides enlarged by up to ``enlarge``) and flipped at random.
- Background is a class (label 0, the detectors' own background index): ``background_ratio`` background crops per
  object crop (default ``None``: 1 for a data set of one class, which would otherwise be degenerate, and 0 for
  several, so the recipes tuned on object crops alone keep their meaning; set it to add background to any set).
  They are windows the size of one of the image's objects (times 0.75-1.5; a tenth to a half of the image's sides
  when it has none) placed at random where their IoU with every object, difficult ones included, stays below
  ``background_iou``. So a data set with one class still poses a task (object or not: what a detector's
  classifier must learn), where crops of one class alone give a loss of 0 and an accuracy of 1 from the first step.
  A task with fewer than two classes (one class and no background crops) is warned about.
- Held-out accuracy: a seeded ``heldout_fraction`` of the images (at least one when there are two) is never drawn
  for the steps; at the end the stage classifies their crops (objects and background, jittered as in training, not
  flipped) and reports that accuracy beside the chance level (the share of the most common label), with a warning
  when it does not beat chance. The per-step ``accuracy`` is on the training batch, for the progress line only.
- SGD with momentum and weight decay (or AdamW), linear warm-up then cosine decay to 0 over ``iterations``
  steps; the linear layer is thrown away afterwards. Only the training data's boxes and labels are used: no
  validation data leaks.
- Images are normalised with the ImageNet mean and std, as every detector's transform here does.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
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

__all__ = [
    "PretrainConfig",
    "background_batch",
    "background_boxes",
    "crop_batch",
    "find_backbone",
    "heldout_split",
    "pretrain_backbone",
]


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
    background_ratio: float | None = None
    background_iou: float = 0.3
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.images_per_batch < 1 or self.crop_size < 1 or self.warmup_iterations < 0:
            raise ConfigError(f"invalid {self}: need iterations >= 0, images_per_batch >= 1, crop_size >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.jitter < 0 or self.enlarge < 0:
            raise ConfigError(f"invalid {self}: lr must be positive, weight_decay, jitter and enlarge >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"pretrain optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"pretrain flip_prob must lie in [0, 1], got {self.flip_prob}")
        if (self.background_ratio or 0) < 0 or not 0 < self.background_iou <= 1 or not 0 <= self.heldout_fraction < 1:
            raise ConfigError(
                f"invalid {self}: need background_ratio >= 0, 0 < background_iou <= 1, 0 <= heldout_fraction < 1"
            )


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


def _flipped(x: Tensor, config: PretrainConfig, rng: np.random.Generator) -> Tensor:
    flip = torch.from_numpy(rng.random(len(x)) < config.flip_prob)
    x[flip] = x[flip].flip(-1)
    return x


def _empty(config: PretrainConfig) -> tuple[Tensor, Tensor]:
    return torch.zeros(0, 3, config.crop_size, config.crop_size), torch.zeros(0, dtype=torch.int64)


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
        return _empty(config)
    return _flipped(torch.cat(crops), config, rng), torch.cat(labels)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(A, B)`` of xyxy boxes ``a (A, 4)`` and ``b (B, 4)``, float64."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def background_boxes(
    boxes: np.ndarray, size: tuple[int, int], count: int, config: PretrainConfig, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``count`` xyxy windows ``(K, 4)`` inside an image of ``size`` ``(H, W)`` whose IoU with every box of
    ``boxes`` ``(N, 4)`` is below ``background_iou``, sized like the objects (see the module docstring)."""
    height, width = size
    tries = 8 * count
    if len(boxes):
        sides = (boxes[:, 2:] - boxes[:, :2])[rng.integers(len(boxes), size=tries)] * rng.uniform(0.75, 1.5, (tries, 1))
    else:
        sides = rng.uniform(0.1, 0.5, (tries, 2)) * (width, height)
    sides = np.clip(sides, 2.0, (width, height))  # (T, 2) as (w, h)
    corner = rng.random((tries, 2)) * ((width, height) - sides)
    windows = np.concatenate([corner, corner + sides], 1)  # (T, 4)
    if len(boxes):
        windows = windows[_iou(windows, boxes).max(1) < config.background_iou]
    return windows[:count]


def background_batch(
    samples: list[tuple[np.ndarray, Mapping[str, Any]]], config: PretrainConfig, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Flipped ``(K, 3, crop, crop)`` background crops of ``samples`` (``background_ratio`` per non-difficult
    object, at least one per image) and their labels (all 0)."""
    crops = []
    for image, target in samples:
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        objects = len(boxes) - int(np.asarray(target.get("difficult", np.zeros(len(boxes), bool)), bool).sum())
        count = max(1, round(config.background_ratio * objects)) if config.background_ratio else 0
        windows = background_boxes(boxes, image.shape[:2], count, config, rng) if count else np.zeros((0, 4))
        if len(windows):
            rois = [torch.from_numpy(windows).float()]
            crops.append(roi_align(_normalised(image)[None], rois, config.crop_size, 1.0, 2, aligned=True))
    if not crops:
        return _empty(config)
    x = _flipped(torch.cat(crops), config, rng)
    return x, torch.zeros(len(x), dtype=torch.int64)


def _pooled(backbone: Backbone, x: Tensor) -> Tensor:
    features = backbone(x)
    levels = list(features.values()) if isinstance(features, Mapping) else [features]
    return torch.stack([level.mean((2, 3)) for level in levels]).mean(0)


def heldout_split(count: int, config: PretrainConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(training indices, held-out indices)`` of ``count`` images: a seeded ``heldout_fraction`` held out, at
    least one image when there are two or more (and always at least one left for training)."""
    order = np.random.default_rng([seed, 0x4E1D]).permutation(count)
    wanted = max(1 if config.heldout_fraction else 0, round(count * config.heldout_fraction))
    held = 0 if count < 2 else min(count - 1, wanted)
    return np.sort(order[held:]), np.sort(order[:held])


def _batch(
    dataset: Any, indices: np.ndarray, config: PretrainConfig, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Object and background crops of the images ``indices``, objects first."""
    samples = [dataset[int(i)] for i in indices]
    x, y = crop_batch(samples, config, rng)
    if not len(x):
        return x, y
    bx, by = background_batch(samples, config, rng)
    return torch.cat([x, bx]), torch.cat([y, by])


@torch.no_grad()
def heldout_accuracy(
    backbone: Backbone, head: nn.Module, dataset: Any, indices: np.ndarray, config: PretrainConfig, seed: int
) -> dict[str, float]:
    """Accuracy on the crops of the held-out images ``indices`` (objects and background, jittered, not
    flipped), the chance level (share of the most common label) and the number of crops."""
    device = next(backbone.parameters()).device
    rng = np.random.default_rng([seed, 0x4E1D, 1])
    unflipped = dataclasses.replace(config, flip_prob=0.0)
    was_training = backbone.training
    backbone.eval()
    right, labels = 0, []
    for start in range(0, len(indices), config.images_per_batch):
        x, y = _batch(dataset, indices[start : start + config.images_per_batch], unflipped, rng)
        if len(x):
            right += int((head(_pooled(backbone, x.to(device))).argmax(1).cpu() == y).sum())
            labels.append(y)
    backbone.train(was_training)
    if not labels:
        return {"heldout_accuracy": float("nan"), "heldout_chance": float("nan"), "heldout_crops": 0}
    every = torch.cat(labels)
    chance = float(torch.bincount(every).max()) / len(every)
    return {"heldout_accuracy": right / len(every), "heldout_chance": chance, "heldout_crops": len(every)}


def _with_background(dataset: Any, config: PretrainConfig) -> PretrainConfig:
    """``config`` with ``background_ratio`` settled: its own, else 1 for one class and 0 for several."""
    if config.background_ratio is not None:
        return config
    return dataclasses.replace(config, background_ratio=1.0 if len(dataset.class_names) == 1 else 0.0)


def _warn_if_degenerate(dataset: Any, config: PretrainConfig) -> None:
    if len(dataset.class_names) + (1 if config.background_ratio else 0) < 2:
        warnings.warn(
            "pretrain: one class and no background crops (background_ratio 0): every crop has the same label, so the "
            "loss is 0 from the start and the backbone learns nothing; set background_ratio > 0",
            stacklevel=3,
        )


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` group (distributed ``detect train``: each
    process takes its share of every step's crops), ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_processes(params: list[nn.Parameter], loss: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the gradients of ``params`` (a missing one counts as zeros), the loss and the correct count over the
    process group, in one flat all-reduce."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.reshape(1), correct.to(loss.device).reshape(1)])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-2], flat[-1]


def pretrain_backbone(
    backbone: Backbone,
    dataset: Any,
    config: PretrainConfig,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Train ``backbone`` in place on crop classification over ``dataset`` (index-addressable ``(image,
    target)`` with ``class_names``) for ``config.iterations`` steps; ``on_step`` gets each step's row
    (iteration, lr, loss, batch accuracy); ``stop()`` true before a step ends the stage there (a time budget's
    share spent; the learning rate then has not decayed fully). Returns the last row plus ``seconds`` and the held-out
    ``heldout_accuracy``, ``heldout_chance`` and ``heldout_crops`` (see the module docstring)."""
    config = _with_background(dataset, config)
    _warn_if_degenerate(dataset, config)
    device = next(backbone.parameters()).device
    head = nn.Linear(backbone.out_channels, len(dataset.class_names) + 1).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    training, heldout = heldout_split(len(dataset), config, seed)
    began, row = time.perf_counter(), {}
    was_training = backbone.training
    backbone.train()
    for step in range(config.iterations):
        if stop is not None and step and stop():
            break
        rng = np.random.default_rng([seed, 0x5EED, step])
        x, y = torch.zeros(0), torch.zeros(0)
        for _ in range(10):  # images without objects give no crops: draw again, a bounded number of times
            x, y = _batch(dataset, training[rng.integers(len(training), size=config.images_per_batch)], config, rng)
            if len(x):
                break
        if not len(x):
            raise ConfigError("pretrain: the training images hold no (non-difficult) objects to crop")
        warm = min(1.0, (step + 1) / config.warmup_iterations) if config.warmup_iterations else 1.0
        lr = config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / config.iterations))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rank, world = _process_group()
        mine = slice(*np.linspace(0, len(x), world + 1).astype(int)[[rank, rank + 1]])  # this process's crops
        logits = head(_pooled(backbone, x[mine].to(device)))
        # the batch mean as each process's sum over the whole batch's count: summed over processes, the gradient
        # is the one-process gradient of the whole batch (to float32 reduction order)
        loss = nn.functional.cross_entropy(logits, y[mine].to(device), reduction="sum") / len(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        correct = (logits.argmax(1).cpu() == y[mine]).sum().float()
        if world > 1:
            loss, correct = _sum_over_processes(params, loss.detach(), correct)
        optimizer.step()
        accuracy = float(correct) / len(x)
        row = {"iteration": step + 1, "lr": lr, "loss": float(loss.detach()), "accuracy": accuracy}
        if on_step:
            on_step(row)
    backbone.train(was_training)
    seconds = time.perf_counter() - began
    result = heldout_accuracy(backbone, head, dataset, heldout, config, seed)
    if not result["heldout_crops"]:
        warnings.warn("pretrain: no held-out images (fewer than two images): no held-out accuracy", stacklevel=2)
    elif config.iterations and not result["heldout_accuracy"] > result["heldout_chance"]:
        warnings.warn(
            f"pretrain: held-out crop accuracy {result['heldout_accuracy']:.3f} does not beat chance "
            f"({result['heldout_chance']:.3f}): the stage taught the backbone nothing measurable",
            stacklevel=2,
        )
    return {**row, "seconds": seconds, **result}
