"""The detector registry: every list of detectors derives from it, and adding a detector is one module plus one
registry line (the README's recipe, followed here to the letter)."""

from __future__ import annotations

import importlib
import inspect
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from detect import detectors, inference, weights
from detect.cli import main
from detect.detectors import DETECTORS, _entry
from detect.detectors.faster_rcnn import FasterRCNN
from detect.errors import ConfigError

MODULE = '''
"""A detector added the README's way: Faster R-CNN's tiny architecture under a name and family of its own."""
from detect.detectors.faster_rcnn import TINY_CONFIG, FasterRCNNConfig, fasterrcnn_tiny


def mine_tiny(class_names, *, config: FasterRCNNConfig = TINY_CONFIG):
    model = fasterrcnn_tiny(class_names=class_names, config=config)
    model.name = "mine_tiny"
    return model
'''


def test_each_entry_matches_its_builder_and_class() -> None:
    """Name, class, default config (the builder's own ``config`` default) and family agree for every entry."""
    for name, entry in DETECTORS.items():
        assert entry.name == name == entry.builder.__name__
        assert entry.default_config == inspect.signature(entry.builder).parameters["config"].default
        assert name.startswith({"faster_rcnn": "fasterrcnn_", "rcnn": "rcnn_", "sppnet": "sppnet_"}[entry.family])
        assert entry.tiny == name.endswith("_tiny")
    assert detectors.families() == ("faster_rcnn", "sppnet", "rcnn")  # the service's default model is first
    model = detectors.build("rcnn_tiny", ["a", "b"])
    assert model.name == "rcnn_tiny" and tuple(model.class_names) == ("a", "b")
    assert isinstance(model, DETECTORS["rcnn_tiny"].cls)
    assert inference.proposal_methods(model) == ("selective_search",)
    with pytest.raises(ConfigError, match="unknown detector 'nope'; known: fasterrcnn_resnet50_fpn"):
        detectors.build("nope", ["a"])
    with pytest.raises(ConfigError, match="takes a RCNNConfig"):
        detectors.build("rcnn_tiny", ["a"], config=DETECTORS["sppnet_tiny"].default_config)


def test_a_detector_added_by_one_module_and_one_line_is_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = importlib.import_module("mine")
    monkeypatch.setitem(DETECTORS, "mine_tiny", _entry(mine.mine_tiny, "mine", FasterRCNN, ("rpn",)))  # the line

    assert "mine" in detectors.families() and detectors.tiny_detector("mine").name == "mine_tiny"
    torch.manual_seed(0)
    model = detectors.build("mine_tiny", ["circle", "square"]).eval()

    # weights: saved with its manifest entry, rebuilt by name from the manifest alone, same tensors
    folder = tmp_path / "w"
    weights.save_detector(model, folder / "mine_shapes.safetensors", name="mine_shapes", config=DETECTORS["mine_tiny"].default_config)
    monkeypatch.setenv(weights.ENV_VAR, str(folder))
    loaded = weights.load_detector("mine_shapes")
    assert loaded.name == "mine_tiny" and detectors.family_of(loaded) == "mine"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    # the CLI offers the family, and its default weights are the registered mine_shapes
    image = np.zeros((48, 64, 3), np.uint8)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "a.png"), "--out", str(out), "--model", "mine"]) == 0
    assert json.loads((out / "a.png.json").read_text())["width"] == 64

    # the service serves it under its family name
    from api.service import configured_models
    from api.settings import Settings

    assert configured_models(Settings())["mine"].weights == "mine_shapes"
    capsys.readouterr()


def test_compare_takes_its_columns_from_the_registry() -> None:
    """One family table (issue 21, item 11): detect compare's columns are the registry's families, oldest paper
    first, titled by their model classes."""
    from detect import compare, detectors

    assert compare.FAMILIES == (("rcnn", "R-CNN"), ("sppnet", "SPP-Net"), ("faster_rcnn", "Faster R-CNN"))
    assert {family for family, _ in compare.FAMILIES} == set(detectors.families())
