"""Training: recipe validation, schedule, proposal cache, exact resume, and an end-to-end train -> kill -> resume ->
eval run that must reach a stated mAP."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detect.cli import train as train_cli
from detect.config import override
from detect.errors import ConfigError
from detect.weights import load_detector
from detect.evaluate import ProposalCache
from detect.training import (
    ScheduleConfig,
    TrainConfig,
    Trainer,
    load_recipe,
    lr_factor,
)
from proposals.selective_search import SelectiveSearchConfig
from tests.helpers import TINY_SHAPES, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


# --- recipes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        ({"optimiser": {}}, "'optimiser'"),
        ({"optimizer": {"lrr": 0.1}}, "optimizer.'lrr'"),
        ({"data": {"shapes": {"num_imgs": 3}}}, "data.shapes.'num_imgs'"),
        ({"detector_config": {"rpn": {"nms": 0.5}}}, "detector_config.rpn.'nms'"),
        ({"val_data": {"sauce": "voc"}}, "val_data.'sauce'"),
    ],
)
def test_unknown_recipe_keys_are_named(tmp_path: Path, recipe: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_recipe(_write(tmp_path / "r.yaml", recipe))


@pytest.mark.parametrize(
    "recipe",
    [
        {"detector": "yolo"},
        {"log_format": "xml"},
        {"optimizer": {"name": "rmsprop"}},
        {"schedule": {"kind": "linear"}},
        {"schedule": {"milestones": [20, 10]}},
        {"max_iterations": 0},
        {"data": {"source": "voc"}},  # no path
        {"detector": "rcnn_tiny", "detector_config": {"proposals": {"mode": "slowest"}}},  # a ValueError inside
        {"optimizer": "sgd"},  # not a mapping
    ],
)
def test_invalid_recipe_values(tmp_path: Path, recipe: dict) -> None:
    with pytest.raises(ConfigError):
        load_recipe(_write(tmp_path / "r.yaml", recipe))


def test_unreadable_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipe(tmp_path / "bad.yaml")


def test_recipe_overrides_only_what_it_names(tmp_path: Path) -> None:
    config = load_recipe(_write(tmp_path / "r.yaml", {"optimizer": {"lr": 0.5}, "schedule": {"milestones": [3, 7]}}))
    assert config.optimizer.lr == 0.5 and config.optimizer.momentum == TrainConfig().optimizer.momentum
    assert config.schedule.milestones == (3, 7)  # YAML list -> tuple, hashable and frozen
    assert config.val_data is None


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_load(path: Path) -> None:
    config = load_recipe(path)
    assert config.val_data is not None
    if config.data.source == "shapes":
        assert config.val_data.shapes.seed != config.data.shapes.seed  # held out
    else:  # data on disk (the fine-tuning recipe): another split or another folder
        assert (config.val_data.path, config.val_data.split) != (config.data.path, config.data.split)


# --- schedule --------------------------------------------------------------------------------------------------


def test_lr_factor_hand_computed() -> None:
    step = ScheduleConfig(kind="step", warmup_iterations=10, warmup_factor=0.1, milestones=(20, 30), gamma=0.5)
    assert lr_factor(step, 0, 100) == pytest.approx(0.1)
    assert lr_factor(step, 5, 100) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor(step, 10, 100) == 1.0
    assert lr_factor(step, 19, 100) == 1.0
    assert lr_factor(step, 20, 100) == 0.5
    assert lr_factor(step, 35, 100) == 0.25
    cosine = ScheduleConfig(kind="cosine", warmup_iterations=0)
    assert lr_factor(cosine, 0, 100) == 1.0
    assert lr_factor(cosine, 50, 100) == pytest.approx(0.5)
    assert lr_factor(cosine, 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


# --- proposal cache --------------------------------------------------------------------------------------------


def test_proposal_cache_computes_once_per_image_and_config(tmp_path: Path) -> None:
    calls: list[int] = []

    def fake_search(images):
        calls.append(len(images))
        return [torch.tensor([[0.0, 0.0, float(im.shape[1]), float(im.shape[0])]]) for im in images]

    images = [np.zeros((10, 20, 3), np.uint8), np.zeros((30, 40, 3), np.uint8)]
    cache = ProposalCache(tmp_path, SelectiveSearchConfig())
    cache.search = fake_search
    first = cache(images, ["a-0", "a-1"])
    again = ProposalCache(tmp_path, SelectiveSearchConfig())  # a later run, same config: read from disk
    again.search = fake_search
    second = again(images, ["a-0", "a-1"])
    assert calls == [2]
    for a, b, expected in zip(first, second, ([0, 0, 20, 10], [0, 0, 40, 30])):
        np.testing.assert_array_equal(a, [expected])
        np.testing.assert_array_equal(b, [expected])
    other = ProposalCache(tmp_path, SelectiveSearchConfig(max_boxes=5))  # another config: another folder
    other.search = fake_search
    other(images[:1], ["a-0"])
    assert calls == [2, 1]


# --- training --------------------------------------------------------------------------------------------------


def test_resume_gives_the_same_losses(tmp_path: Path) -> None:
    """Stop after 3 iterations (checkpoint), resume in a fresh Trainer to 6: the same rows as a straight run."""
    straight = override(TrainConfig(), tiny_recipe(tmp_path / "a", val_data=None, log_format="csv"))
    Trainer(straight).run(progress=False)
    expected = Trainer(straight).log.rows()
    split = override(TrainConfig(), tiny_recipe(tmp_path / "b", val_data=None, log_format="csv", max_iterations=3))
    Trainer(split).run(progress=False)
    resumed = Trainer(override(split, {"max_iterations": 6}))
    resumed.run(resume=True, progress=False)
    rows = resumed.log.rows()
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows == expected
    assert (Path(split.out_dir) / "loss.png").stat().st_size > 0
    assert rows[0]["lr"] == pytest.approx(0.01 * 0.001)  # warm-up starts at warmup_factor * lr


def test_resume_without_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(override(TrainConfig(), tiny_recipe(tmp_path))).run(resume=True, progress=False)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    bad = _write(tmp_path / "bad.yaml", {"max_iterations": -1})
    args = parser.parse_args(["train", "--recipe", str(bad)])
    assert args.func(args) == 2
    not_weights = tmp_path / "x.safetensors"
    not_weights.write_bytes(b"nope")
    args = parser.parse_args(["eval", "--weights", str(not_weights), "--data", str(bad)])
    assert args.func(args) == 2
    assert "detect eval" in capsys.readouterr().err


@pytest.mark.slow
def test_train_kill_resume_eval_reaches_map(tmp_path: Path) -> None:
    """A real kill: the training subprocess gets SIGKILL after its first checkpoint; ``--resume`` finishes the run
    and ``detect eval`` on the saved weights reaches mAP@0.5 >= 0.6 on its 8 training images (memorisation: the
    check is that the whole pipeline learns, not that it generalises; an untrained model scores near 0). The run
    is deterministic (exact resume), so where the kill lands does not change the result."""
    recipe = tiny_recipe(
        tmp_path,
        max_iterations=150,
        checkpoint_every=10,
        optimizer={"lr": 0.01},
        detector_config={"proposals": {"max_boxes": 100}, "dropout": 0.0},
        fit_box_regressor=True,
    )
    path = _write(tmp_path / "recipe.yaml", recipe)
    checkpoint = Path(recipe["out_dir"]) / "checkpoint.pt"
    command = [sys.executable, "-m", "detect", "train", "--recipe", str(path)]
    child = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert child.poll() is None, "training ended before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 0 < killed_at < 150
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--recipe", str(path), "--resume"])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in (Path(recipe["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 151))
    assert np.mean([r["loss"] for r in rows[-10:]]) < 0.5 * np.mean([r["loss"] for r in rows[:10]])
    weights = Path(recipe["out_dir"]) / "model.safetensors"
    assert load_detector(weights).name == "sppnet_tiny"
    out = tmp_path / "eval"
    args = parser.parse_args(["eval", "--weights", str(weights), "--data", str(path), "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mAP"] >= 0.6


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_trains_from_files_on_disk(tmp_path: Path, fmt: str) -> None:
    """The same 4 shapes images written as VOC or COCO train through ``--data`` (2 steps, Faster R-CNN tiny)."""
    from detect.data.shapes import ShapesConfig, ShapesDataset, write_coco, write_voc

    dataset = ShapesDataset(ShapesConfig(num_images=4, image_size=96, seed=0))
    path = write_coco(dataset, tmp_path / "coco") if fmt == "coco" else write_voc(dataset, tmp_path / "voc")
    data = str(path if fmt == "coco" else tmp_path / "voc")
    recipe = _write(tmp_path / "r.yaml", {"detector": "fasterrcnn_tiny", "max_iterations": 2, "batch_size": 2})
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--recipe", str(recipe), "--data", data, "--out", str(tmp_path / "run")])
    assert args.func(args) == 0
    assert load_detector(tmp_path / "run" / "model.safetensors").name == "fasterrcnn_tiny"


def test_bundles_a_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``detect weights add RUN`` registers the trained model with the run's measured mAP and time; loading it by
    name gives the same detections as the run's own file."""
    from detect import weights
    from detect.cli import main

    recipe = tiny_recipe(tmp_path, max_iterations=4)
    path = _write(tmp_path / "r.yaml", recipe)
    Trainer(load_recipe(path)).run(progress=False)
    summary = json.loads((Path(recipe["out_dir"]) / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["train_seconds"] > 0
    bundle = tmp_path / "bundle"
    code = main(["weights", "add", recipe["out_dir"], "--name", "shapes_test", "--dir", str(bundle), "--recipe", str(path)])
    assert code == 0
    entry = weights.load_manifest(bundle)["shapes_test"]
    assert entry.metrics["voc_map50"] == pytest.approx(summary["mAP"])
    assert entry.training_time_s == pytest.approx(summary["train_seconds"])
    assert entry.recipe["contents"]["detector"] == "sppnet_tiny"
    assert entry.architecture["builder"] == "sppnet_tiny" and entry.sha256 == weights.sha256_file(entry.path)

    monkeypatch.setenv(weights.ENV_VAR, str(bundle))
    bundled = weights.load_detector("shapes_test")
    trained = weights.load_detector(Path(recipe["out_dir"]) / "model.safetensors")
    from detect.data.shapes import ShapesConfig, ShapesDataset

    image, _ = ShapesDataset(ShapesConfig(**{**TINY_SHAPES, "seed": 5}))[0]
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 90.0, 80.0], [30.0, 5.0, 60.0, 95.0]])
    with torch.no_grad():
        a = bundled([image], proposals=[boxes])[0][0]
        b = trained([image], proposals=[boxes])[0][0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert main(["weights", "add", str(tmp_path / "nowhere"), "--name", "x", "--dir", str(bundle)]) == 2


def test_init_backbone_copies_the_donor_body_into_any_detector(tmp_path: Path) -> None:
    """A Faster R-CNN's backbone body lands in R-CNN's ``features.body`` and SPP-Net's ``backbone.body`` unchanged;
    the heads keep their own initialisation; a donor whose body does not fit is refused."""
    from detect.detectors.faster_rcnn import TINY_CONFIG, fasterrcnn_tiny
    from detect.detectors import build
    from detect.training import init_backbone
    from detect.weights import write_detector

    torch.manual_seed(1)
    donor = fasterrcnn_tiny(class_names=("a", "b"))
    write_detector(donor, tmp_path / "donor.safetensors", TINY_CONFIG)
    body = {k: v for k, v in donor.state_dict().items() if k.startswith("backbone.body.")}
    for name, prefix in (("rcnn_tiny", "features."), ("sppnet_tiny", "")):
        model = build(name, ("x", "y", "z"))
        heads_before = {k: v.clone() for k, v in model.state_dict().items() if ".body." not in f".{k}"}
        assert init_backbone(model, tmp_path / "donor.safetensors") == len(body)
        state = model.state_dict()
        for key, value in body.items():
            target = prefix + key[len("backbone."):] if prefix else key
            assert torch.equal(state[target], value)
        assert all(torch.equal(state[k], v) for k, v in heads_before.items())

    from detect.detectors.rcnn import RCNNConfig

    alexnet_rcnn = build("rcnn_alexnet", ("x",), RCNNConfig())
    with pytest.raises(ConfigError, match="does not fit"):
        init_backbone(alexnet_rcnn, tmp_path / "donor.safetensors")


# --- loader workers, augmentation, multi-scale, progress, TensorBoard (issue 13) ----------------------------------

FULL_AUGMENT = {
    "flip_prob": 0.5,
    "short_sides": [64, 96, 128],
    "brightness": 0.3,
    "contrast": 0.3,
    "saturation": 0.3,
    "hue": 0.05,
    "crop_prob": 0.5,
}


def _faster_recipe(tmp_path: Path, **changes) -> dict:
    """A tiny Faster R-CNN run on 8 small shapes images with every augmentation on."""
    recipe = {
        "detector": "fasterrcnn_tiny",
        "data": {"shapes": TINY_SHAPES},
        "augment": FULL_AUGMENT,
        "optimizer": {"lr": 0.01},
        "schedule": {"warmup_iterations": 2},
        "max_iterations": 6,
        "batch_size": 2,
        "checkpoint_every": 3,
        "out_dir": str(tmp_path / "run"),
    }
    recipe.update(changes)
    return recipe


@pytest.mark.slow
def test_killed_run_with_workers_and_augmentation_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """A run with 2 loader workers and every augmentation dies at iteration 4 (after its checkpoint at 2, with
    batches prefetched); resumed in a fresh Trainer it logs the very rows of a straight run built in-process."""
    straight = override(TrainConfig(), _faster_recipe(tmp_path / "a", workers=0, max_iterations=5, checkpoint_every=2))
    Trainer(straight).run(progress=False)
    expected = Trainer(straight).log.rows()
    assert len({row.get("short_side") for row in expected}) > 1  # the short side really varies

    config = override(TrainConfig(), _faster_recipe(tmp_path / "b", workers=2, max_iterations=5, checkpoint_every=2))
    step = Trainer.step

    def dies_at_four(self, batch=None):
        if self.iteration == 3:
            raise KeyboardInterrupt("killed")
        return step(self, batch)

    monkeypatch.setattr(Trainer, "step", dies_at_four)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).run(progress=False)
    monkeypatch.setattr(Trainer, "step", step)
    assert torch.load(Path(config.out_dir) / "checkpoint.pt", weights_only=True)["iteration"] == 2
    resumed = Trainer(config)
    resumed.run(resume=True, progress=False)
    assert resumed.log.rows() == expected


def test_the_batch_short_side_is_the_models_resize_target(tmp_path: Path) -> None:
    """Multi-scale: each step's images reach the backbone at the batch's short side (96-pixel images, sides that
    are multiples of 32, so no padding); evaluation afterwards uses the model's own side again."""
    trainer = Trainer(override(TrainConfig(), _faster_recipe(tmp_path, max_iterations=3, augment={
        "flip_prob": 0.0, "short_sides": [64, 96, 128]})))
    seen: list[tuple[int, int]] = []
    hook = trainer.model.backbone.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    sides = [trainer.step()["short_side"] for _ in range(3)]
    assert seen == [(side, side) for side in sides] and len(set(sides)) > 1
    seen.clear()
    trainer.model.eval()
    with torch.no_grad():
        trainer.model([np.zeros((96, 96, 3), np.uint8)])
    hook.remove()
    assert seen == [(160, 160)]  # fasterrcnn_tiny's own short side, restored after every step
    with pytest.raises(ConfigError, match="short_sides"):
        Trainer(override(TrainConfig(), _faster_recipe(tmp_path / "r", detector="rcnn_tiny",
                                                       augment={"short_sides": [96]})))


def test_the_loader_shrinks_images_to_the_models_input(tmp_path: Path) -> None:
    """Faster R-CNN's batches arrive at the size the model resizes to (its 96-pixel shapes images shrunk to the
    batch's 64-pixel side), the backbone sees what it saw when the model resized them itself, and the loader
    leaves images alone where the model would enlarge them (its own side, 160) and for region detectors, whose
    cached proposals are in the photo's pixels."""
    trainer = Trainer(override(TrainConfig(), _faster_recipe(tmp_path, max_iterations=2, augment={
        "flip_prob": 0.0, "short_sides": [64]})))
    assert trainer.batches.input_size == ((160,), 400)  # fasterrcnn_tiny's transform
    batch = trainer.batches[0]
    assert [tuple(image.shape) for image in batch["images"]] == [(64, 64, 3)] * 2
    plain = trainer.batches.samples(0)[0][1]["boxes"]  # the first image's boxes before any augmentation
    assert torch.equal(batch["boxes"][0], torch.as_tensor(plain, dtype=torch.float32) * (64 / 96))
    seen: list[tuple[int, int]] = []
    hook = trainer.model.backbone.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    trainer.step(batch)
    hook.remove()
    assert seen == [(64, 64)]
    own = Trainer(override(TrainConfig(), _faster_recipe(tmp_path / "own", max_iterations=2, augment={"flip_prob": 0.0})))
    assert [tuple(image.shape) for image in own.batches[0]["images"]] == [(96, 96, 3)] * 2
    region = Trainer(override(TrainConfig(), tiny_recipe(tmp_path / "spp", detector="sppnet_tiny")))
    assert region.batches.input_size is None


def test_progress_writes_plain_lines_when_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import io

    from detect.progress import Progress

    stream = io.StringIO()
    bar = Progress(3, desc="train", stream=stream, interval=0.0)
    for done in (1, 2, 3):
        bar.update(done, {"loss": 0.5})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[-1].startswith("train 3/3 (100%) loss 0.5 |") and "ETA 0:00:00" in lines[-1]
    budgeted = io.StringIO()  # a time budget's ETA is the time left, whatever the rate says
    Progress(100, desc="train", stream=budgeted, interval=0.0).update(1, {}, elapsed=1.0, eta=754.0)
    assert budgeted.getvalue().rstrip().endswith("ETA 0:12:34")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = Progress(3, desc="train", stream=tty)
    bar.update(3, {"loss": 0.5})
    bar.close()
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()  # a live bar

    Trainer(override(TrainConfig(), _faster_recipe(tmp_path, max_iterations=2, progress_seconds=0.001))).run()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("train ")] == ["train 1/2", "train 2/2"]


def test_predict_progress_is_plain_lines_in_a_log(tmp_path: Path) -> None:
    import io

    from detect.engines.local import PredictOptions, run
    from tests.helpers import StubDetector

    src = tmp_path / "src"
    src.mkdir()
    from PIL import Image

    for k in range(3):
        Image.new("RGB", (20, 16)).save(src / f"{k}.png")
    log = io.StringIO()
    run(PredictOptions((str(src),), str(tmp_path / "out"), batch_size=1), StubDetector(), progress=log)
    assert "\r" not in log.getvalue()
    assert log.getvalue().startswith("predict 3/3 (100%)")


def test_tensorboard_writer_mirrors_the_metrics(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = override(TrainConfig(), _faster_recipe(tmp_path, max_iterations=2, tensorboard=True, augment={}))
    trainer = Trainer(config)
    trainer.run(progress=False)
    events = EventAccumulator(str(Path(config.out_dir) / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(row["iteration"], pytest.approx(row["loss"])) for row in trainer.log.rows()]


def test_missing_tensorboard_or_device_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"pip install 'detect\[tensorboard\]'"):
        Trainer(override(TrainConfig(), _faster_recipe(tmp_path, tensorboard=True)))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA device"):
            Trainer(override(TrainConfig(), _faster_recipe(tmp_path, device="cuda")))


# --- run identity and damaged checkpoints (issue 21, items 2 and 7) -----------------------------------------------


def test_a_fresh_run_killed_before_its_first_checkpoint_never_resumes_an_older_run(tmp_path: Path, monkeypatch) -> None:
    """An older run's checkpoint.pt in --out: a fresh run with another seed deletes it at its start, so a kill
    before its own first checkpoint leaves nothing to resume (was: the older run loaded and saved as the new model)."""
    old = override(TrainConfig(), tiny_recipe(tmp_path, val_data=None, max_iterations=3))
    Trainer(old).run(progress=False)
    checkpoint = Path(old.out_dir) / "checkpoint.pt"
    assert checkpoint.exists()
    new = override(old, {"seed": 7})

    def killed(self, batch=None):
        raise KeyboardInterrupt  # the kill, before the first step of the new run ends

    monkeypatch.setattr(Trainer, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(new).run(progress=False)
    monkeypatch.undo()
    assert not checkpoint.exists()
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(new).run(resume=True, progress=False)


def test_resume_refuses_a_checkpoint_of_another_run_naming_both(tmp_path: Path) -> None:
    old = override(TrainConfig(), tiny_recipe(tmp_path, val_data=None, max_iterations=3))
    Trainer(old).run(progress=False)
    other = override(old, {"seed": 7, "optimizer": {"lr": 0.02}})
    with pytest.raises(ConfigError, match=r"another run \(recipe, seed differ\).*seed 0\].*seed 7\]"):
        Trainer(other).run(resume=True, progress=False)
    # where the run writes and how long it goes on are not its identity: resuming to go on longer works
    Trainer(override(old, {"max_iterations": 4, "workers": 0})).run(resume=True, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle"])
def test_a_damaged_checkpoint_is_a_clear_error_without_torchs_unpickling_advice(tmp_path: Path, damage: str) -> None:
    config = override(TrainConfig(), tiny_recipe(tmp_path, val_data=None, max_iterations=3))
    Trainer(config).run(progress=False)
    checkpoint = Path(config.out_dir) / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif damage == "garbage":
        checkpoint.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        torch.save({"model": {}, "iteration": 1, "payload": ConfigError("an object")}, checkpoint)
    with pytest.raises(ConfigError, match=r"cannot read checkpoint") as info:
        Trainer(config).run(resume=True, progress=False)
    assert "weights_only=False" not in str(info.value)
    if damage == "pickle":
        assert "not a safe checkpoint" in str(info.value)


def _voc_with_a_truncated_jpeg(tmp_path: Path) -> Path:
    from detect.data.shapes import ShapesConfig, ShapesDataset, write_voc

    write_voc(ShapesDataset(ShapesConfig(**TINY_SHAPES)), tmp_path / "voc")
    jpeg = tmp_path / "voc" / "JPEGImages" / "000002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    return tmp_path / "voc"


def test_on_error_skip_drops_and_lists_an_unreadable_image(tmp_path: Path, capsys) -> None:
    """A truncated JPEG (valid header) is dropped before training with on_error: skip, listed on stderr and counted
    in summary.json (was: the run stopped at it, at its first evaluation, with no model)."""
    voc = _voc_with_a_truncated_jpeg(tmp_path)
    data = {"source": "auto", "path": str(voc), "on_error": "skip", "val_fraction": 0.5}
    config = override(TrainConfig(), tiny_recipe(tmp_path, data=data, val_data=None, max_iterations=1))
    Trainer(config).run(progress=False)
    err = capsys.readouterr().err
    assert "skipped 1 item(s) (on_error: skip)" in err and "000002.jpg" in err and "truncated" in err
    summary = json.loads((Path(config.out_dir) / "summary.json").read_text())
    assert summary["skipped"]["count"] == 1 and "000002.jpg" in summary["skipped"]["items"][0]


def test_on_error_raise_stops_before_training_at_an_unreadable_image(tmp_path: Path) -> None:
    from detect.errors import DatasetError

    voc = _voc_with_a_truncated_jpeg(tmp_path)
    config = override(TrainConfig(), tiny_recipe(tmp_path, data={"source": "auto", "path": str(voc)}, val_data=None))
    with pytest.raises(DatasetError, match="000002.jpg.*truncated"):
        Trainer(config)
