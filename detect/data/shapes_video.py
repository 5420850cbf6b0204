"""Synthetic videos of the shapes set: shapes moving on known paths over a fixed background, with ground-truth
track ids, for tracking tests and ``benchmarks/tracking.py``.

Decisions:

* **Paths.** Each object moves in a straight line at a constant velocity (``speed`` pixels a frame, random
  direction) and bounces off the frame border, so paths cross. Objects keep their class, size, angle and colour
  (drawn by :func:`detect.data.shapes.shape_object` on one background per video).
* **Occlusion and ground truth.** Objects are stacked in a fixed order; where paths cross, the one in front hides
  the other. Every frame is drawn and annotated by the set's own rules
  (:func:`detect.data.shapes.render_annotated`): an object more than 60 % hidden is not in the ground truth of
  that frame; ``ids`` is each annotated object's index in the video (its track id, 0-based).
* **Deterministic**: video ``i`` of ``seed`` comes from ``default_rng([seed, i])``.
* :func:`write_video` writes frames to an MP4 (``mp4v``) under a temporary name and renames it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from detect.data.shapes import SHAPES_CLASSES, Scene, background, render_annotated, shape_object

__all__ = ["MovingShapesConfig", "moving_shapes", "write_video"]


@dataclass(frozen=True)
class MovingShapesConfig:
    frames: int = 60
    width: int = 320
    height: int = 320
    objects: int = 4
    size: tuple[float, float] = (70.0, 120.0)  # longest side in pixels
    speed: tuple[float, float] = (2.0, 6.0)  # pixels per frame
    distractors: int = 6
    seed: int = 0


def moving_shapes(config: MovingShapesConfig, index: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
    """Frames ``(image RGB uint8, target)`` of video ``index``; ``target`` as the shapes set's, plus ``ids``."""
    rng = np.random.default_rng([config.seed, index])
    canvas = background(rng, config.height, config.width, config.distractors)
    templates, positions, velocities = [], [], []
    for _ in range(config.objects):
        size = rng.uniform(*config.size)
        label = int(rng.integers(len(SHAPES_CLASSES))) + 1
        centre = rng.uniform((size / 2, size / 2), (config.width - size / 2, config.height - size / 2))
        placed = shape_object(rng, label, size, tuple(centre), canvas)  # colour contrasting with where it starts
        templates.append(type(placed)(label, placed.polygon - centre, placed.color))
        angle = rng.uniform(0, 2 * np.pi)
        positions.append(centre)
        velocities.append(rng.uniform(*config.speed) * np.array([np.cos(angle), np.sin(angle)]))
    positions, velocities = np.array(positions), np.array(velocities)
    limits = np.array([config.width, config.height], dtype=np.float64)
    for _ in range(config.frames):
        objects = tuple(
            type(t)(t.label, t.polygon + positions[k], t.color) for k, t in enumerate(templates)
        )
        image, target = render_annotated(Scene(canvas, objects))
        target["ids"] = target.pop("object_index")
        yield image, target
        positions = positions + velocities
        for k, template in enumerate(templates):  # bounce: keep the whole polygon inside the frame
            low = template.polygon.min(0) + positions[k]
            high = template.polygon.max(0) + positions[k]
            for axis in range(2):
                if low[axis] < 0 or high[axis] > limits[axis]:
                    velocities[k, axis] = -velocities[k, axis]
                    shift = -low[axis] if low[axis] < 0 else limits[axis] - high[axis]
                    positions[k, axis] += 2 * shift


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 25.0) -> Path:
    """RGB frames (all one size) -> an MP4 at ``path`` (``mp4v``), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.mp4")
    os.close(fd)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
