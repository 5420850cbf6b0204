"""What a run reads: :class:`DataConfig` (the built-in shapes set, or data on disk in any layout
:func:`detect.data.layouts.detect_layout` recognises) and the data set it names (:func:`make_dataset`). Training,
evaluation and the CLI all open data through here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detect.data.layouts import Layout, Subset, detect_layout, holdout, open_dataset
from detect.data.shapes import ShapesConfig, ShapesDataset
from detect.errors import ConfigError

__all__ = ["DATA_SOURCES", "DataConfig", "data_config", "data_layout", "make_dataset", "readable_part"]


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


def data_config(path: str | None, images_dir: str | None = None, annotations_dir: str | None = None) -> DataConfig:
    """A :class:`DataConfig` for data named on the command line: a folder, COCO JSON or ``data.yaml`` in any
    recognised layout, or an image + annotation folder pair. The layout is checked here, so a wrong path fails
    before anything is built."""
    config = DataConfig(source="auto", path=path, images_dir=images_dir, annotations_dir=annotations_dir)
    data_layout(config)
    return config


def readable_part(dataset: Any, config: DataConfig) -> tuple[Any, list[str]]:
    """``dataset`` without the images that do not decode, and a message for each one dropped.

    Data on disk is decoded in full once, before a run starts (a truncated JPEG passes every header check and
    fails only when its pixels are read, which used to end a run at its first evaluation). With ``on_error:
    "raise"`` the first such image is the :class:`~detect.errors.DatasetError`, now rather than hours later; with
    ``"skip"`` each is dropped and listed. The shapes set is drawn, never read: it is returned as it is."""
    from detect.errors import DetectError

    if config.source == "shapes":
        return dataset, []
    keep, dropped = [], []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except DetectError as err:
            if config.on_error == "raise":
                raise
            dropped.append(err.message)
        else:
            keep.append(i)
    return (dataset if not dropped else Subset(dataset, keep)), dropped
