"""Fine-tuning from a full detector (detect.finetune, ``init`` in a recipe, ``detect train --init``): a torchvision
Faster R-CNN checkpoint with random weights, onto a generated VOC set whose classes differ but for ``dog``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from detect.cli import train as train_cli
from detect.config import override
from detect.detectors.faster_rcnn import COCO_CLASS_NAMES
from detect.errors import ConfigError
from detect.finetune import backbone_stages, class_map, freeze_backbone, init_detector
from detect.training import TrainConfig, Trainer

CLASS_KEYS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")
DOG = COCO_CLASS_NAMES.index("dog") + 1  # its row in torchvision's COCO classifier (18)
TINY_INPUT = {"transform": {"min_size": [128], "max_size": 160},
              "rpn": {"pre_nms_top_n_train": 200, "post_nms_top_n_train": 100, "batch_size_per_image": 64},
              "roi_heads": {"batch_size_per_image": 32}}


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """torchvision's fasterrcnn_resnet50_fpn with random weights (constant initial tensors such as BN statistics
    and zero biases perturbed, so that a copy cannot pass for a fresh initialisation), saved as a ``.pth``."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = model.state_dict()
    for value in state.values():
        if value.is_floating_point() and value.numel() > 1 and float(value.std()) == 0:
            value.add_(torch.rand_like(value) * 0.1)  # running_var stays positive
    path = tmp_path_factory.mktemp("checkpoint") / "fasterrcnn_random.pth"
    torch.save(state, path)
    return path, {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


class _DogsAndWidgets:
    """Shapes images relabelled: odd shape labels are ``dog`` (a COCO class), even ones ``widget`` (none)."""

    class_names = ("dog", "widget")

    def __init__(self) -> None:
        from detect.data.shapes import ShapesConfig, ShapesDataset

        self.shapes = ShapesDataset(ShapesConfig(num_images=2, image_size=96, seed=0, max_objects=3))

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int):
        image, target = self.shapes[index]
        return image, {**target, "labels": np.where(np.asarray(target["labels"]) % 2 == 1, 1, 2)}


@pytest.fixture(scope="module")
def voc_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detect.data.shapes import write_voc

    out = tmp_path_factory.mktemp("voc") / "dogs"
    data = _DogsAndWidgets()
    assert {int(c) for i in range(len(data)) for c in data[i][1]["labels"]} == {1, 2}  # both classes present
    write_voc(data, out)
    return out


def _config(tmp_path: Path, checkpoint: Path, voc: Path, **changes) -> TrainConfig:
    recipe = {
        "detector": "fasterrcnn_resnet50_fpn",
        "detector_config": TINY_INPUT,
        "data": {"source": "voc", "path": str(voc), "val_fraction": 0.0},
        "init": str(checkpoint),
        "optimizer": {"lr": 0.005, "clip_grad_norm": 10.0},
        "schedule": {"warmup_iterations": 0},
        "augment": {"flip_prob": 0.0},
        "max_iterations": 3,
        "batch_size": 2,
        "checkpoint_every": 3,
        "out_dir": str(tmp_path / "run"),
    }
    recipe.update(changes)
    return override(TrainConfig(), recipe)


def test_init_copies_every_fitting_tensor_and_maps_the_shared_class(
    tmp_path: Path, torchvision_checkpoint: tuple[Path, dict], voc_folder: Path
) -> None:
    checkpoint, source = torchvision_checkpoint
    trainer = Trainer(_config(tmp_path, checkpoint, voc_folder))
    model = trainer.model
    state = model.state_dict()
    names = model.class_names
    assert sorted(names) == ["dog", "widget"]
    shared = [k for k in state if not k.startswith(CLASS_KEYS)]
    assert set(shared) <= set(source) and len(shared) > 250
    for key in shared:  # backbone, FPN, RPN and box head: bit for bit
        assert torch.equal(state[key], source[key]), key
    cls_w, box_w = state["roi_heads.box_predictor.cls_score.weight"], state["roi_heads.box_predictor.bbox_pred.weight"]
    assert cls_w.shape == (3, 1024) and box_w.shape == (12, 1024)
    assert state["roi_heads.box_predictor.cls_score.bias"].shape == (3,)
    dog, widget = names.index("dog") + 1, names.index("widget") + 1
    src_cls = source["roi_heads.box_predictor.cls_score.weight"]
    src_box = source["roi_heads.box_predictor.bbox_pred.weight"]
    for row, src_row in ((0, 0), (dog, DOG)):  # background and dog keep the source's rows
        assert torch.equal(cls_w[row], src_cls[src_row])
        assert torch.equal(box_w[4 * row : 4 * row + 4], src_box[4 * src_row : 4 * src_row + 4])
        assert torch.equal(state["roi_heads.box_predictor.cls_score.bias"][row],
                           source["roi_heads.box_predictor.cls_score.bias"][src_row])
    assert not any(torch.equal(cls_w[widget], r) for r in src_cls)  # widget starts afresh
    report = trainer.init_report
    assert report.mapped == {"dog": "dog"} and report.new_classes == ("widget",)
    assert len(report.copied) == len(shared) and len(report.reinitialised) == 4 and not report.skipped
    assert "copied" in report.summary() and "dog <- dog" in report.summary()
    frozen_bn = [m for m in model.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
    assert frozen_bn and all(m.eps == 0.0 for m in frozen_bn)  # torchvision checkpoints' eps travels too


@pytest.mark.slow
def test_finetuning_trains_and_reduces_the_loss(
    tmp_path: Path, torchvision_checkpoint: tuple[Path, dict], voc_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    """``detect train --init FILE`` runs (2 steps); repeated steps on one batch reduce the loss."""
    checkpoint, _ = torchvision_checkpoint
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump({
        "detector": "fasterrcnn_resnet50_fpn", "detector_config": TINY_INPUT,
        "data": {"source": "voc", "path": str(voc_folder), "val_fraction": 0.0}, "max_iterations": 2,
        "batch_size": 2, "trainable_backbone_layers": 2,
    }))
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--recipe", str(path), "--init", str(checkpoint), "--device", "cpu",
                              "--out", str(tmp_path / "cli")])
    assert args.func(args) == 0
    assert "dog <- dog" in capsys.readouterr().err

    trainer = Trainer(_config(tmp_path, checkpoint, voc_folder, max_iterations=6, trainable_backbone_layers=2))
    batch = trainer.batches[0]
    torch.manual_seed(0)
    losses = [trainer.step(batch)["loss"] for _ in range(6)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0]


def test_trainable_backbone_layers_match_torchvision(tmp_path: Path) -> None:
    """The parameters left trainable are torchvision's resnet_fpn_backbone's for every count 0-5; the FPN trains."""
    from detect.detectors import build
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    model = build("fasterrcnn_resnet50_fpn", ("a",))
    assert len(backbone_stages(model.backbone)) == 5
    for layers in range(6):
        freeze_backbone(model, layers)
        ours = {k.removeprefix("backbone."): p.requires_grad for k, p in model.named_parameters()
                if k.startswith("backbone.")}
        theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=layers)
        assert ours == {k: p.requires_grad for k, p in theirs.named_parameters()}, layers
    tiny = build("fasterrcnn_tiny", ("a",))
    freeze_backbone(tiny, 3)
    body = [(k, p) for k, p in tiny.named_parameters() if k.startswith("backbone.body.")]
    trainable = {k.split(".")[2] for k, p in body if p.requires_grad}
    assert trainable == {"conv5", "conv6", "conv7"}
    with pytest.raises(ConfigError, match=r"\[0, 7\]"):
        freeze_backbone(tiny, 8)


def test_class_names_match_across_spellings() -> None:
    assert class_map(("Dog", "dining_table", "aeroplane", "widget"), ("cat", "dog", "dining table", "airplane")) == {
        0: 1, 1: 2, 2: 3
    }


def test_init_refuses_a_source_that_does_not_fit(tmp_path: Path) -> None:
    """A tiny Faster R-CNN shares no tensor shape with R-CNN AlexNet: nothing to copy is an error, not a no-op."""
    from detect.detectors import build
    from detect.detectors.faster_rcnn import TINY_CONFIG
    from detect.weights import write_detector

    donor = build("fasterrcnn_tiny", ("a", "b"))
    write_detector(donor, tmp_path / "donor.safetensors", TINY_CONFIG)
    with pytest.raises(ConfigError, match="no tensor"):
        init_detector(build("rcnn_tiny", ("a",)), tmp_path / "donor.safetensors")
    with pytest.raises(ConfigError, match="not both"):
        override(TrainConfig(), {"init": "x", "init_backbone": "y"})


def test_init_from_a_tiny_detector_maps_classes_by_name(tmp_path: Path) -> None:
    """Our own files work as sources too; classes map by name whatever their order."""
    from detect.detectors import build
    from detect.detectors.faster_rcnn import TINY_CONFIG
    from detect.weights import write_detector

    torch.manual_seed(2)
    donor = build("fasterrcnn_tiny", ("circle", "square", "triangle"))
    write_detector(donor, tmp_path / "donor.safetensors", TINY_CONFIG)
    model = build("fasterrcnn_tiny", ("triangle", "star"))
    report = init_detector(model, tmp_path / "donor.safetensors")
    assert report.mapped == {"triangle": "triangle"} and report.new_classes == ("star",)
    ours, theirs = model.state_dict(), donor.state_dict()
    weight = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(ours[weight][1], theirs[weight][3]) and torch.equal(ours[weight][0], theirs[weight][0])
    box = "roi_heads.box_predictor.bbox_pred.weight"
    assert torch.equal(ours[box][4:8], theirs[box][12:16])
    assert all(torch.equal(ours[k], theirs[k]) for k in report.copied)
