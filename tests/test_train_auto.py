"""``detect train --data DIR``: the recipe derived from the data (:mod:`detect.training.auto`), the time budget
(:mod:`detect.training.budget`, driven here by a simulated clock), the best model (:mod:`detect.training.best`),
resume inside a budget and the bad-input messages."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detect.cli import train as train_cli
from detect.config import override
from detect.errors import ConfigError, DatasetError
from detect.training import Trainer, TrainConfig, load_recipe
from detect.training import auto
from detect.training.budget import Budget, parse_duration
from detect.training.checkpoints import run_identity
from tests.helpers import TINY_SHAPES


# --- hand-built statistics -----------------------------------------------------------------------------------------

def _stats(boxes_wh, image_side: float = 320.0, n_images: int = 50) -> auto.DataStats:
    boxes_wh = np.asarray(boxes_wh, dtype=np.float64)
    return auto.DataStats(
        class_names=("thing",),
        image_sizes=np.full((n_images, 2), image_side),
        boxes_wh=boxes_wh,
        box_short_sides=np.full(len(boxes_wh), image_side),
    )


def _derive(stats: auto.DataStats, **kwargs) -> auto.Derivation:
    return auto.derive_recipe(stats, {"source": "auto", "path": "x"}, **kwargs)


def _side(derivation: auto.Derivation) -> int:
    return derivation.recipe["detector_config"]["transform"]["min_size"][0]


def test_tiny_objects_get_a_larger_input_than_large_ones() -> None:
    rng = np.random.default_rng(0)
    large = _derive(_stats(rng.uniform(80, 160, (200, 2))))
    tiny = _derive(_stats(rng.uniform(5, 8, (200, 2))))
    assert _side(large) == 320  # the images' own short side, objects big enough
    # 10th percentile side ~5.3 px of 320: 24 px at the input needs 320 * 24 / 5.3 > 640, so the cap
    assert _side(tiny) == auto.MAX_SHORT_SIDE
    assert not any("under 8 pixels" in note for note in tiny.notes)  # 5 px at 320 are 10 px at 640
    medium = _derive(_stats(rng.uniform(14, 16, (200, 2))))
    assert 320 < _side(medium) < auto.MAX_SHORT_SIDE  # 24 / 14.x of 320 -> 544 or so


def test_objects_larger_than_a_cell_sees_get_a_smaller_input() -> None:
    # the tiny backbone's receptive field by hand: strides 2, 2, 1, 2, 1, 1, 1 and dilations 1 (x5), 2, 4 of 3x3
    # convs: 1 + 2 (1 + 2 + 4 + 4 + 8 + 2*8 + 4*8) = 135
    assert auto.RECEPTIVE_FIELD == 135
    rng = np.random.default_rng(2)
    huge = rng.uniform(240, 280, (200, 2))  # about 0.8 of the 320-pixel images: 260 px at 320
    assert _side(_derive(_stats(huge))) == 160  # 135 / 0.81 = 166 -> 160 (and never below 160)
    half = rng.uniform(155, 165, (200, 2))  # 0.5 of the image: 135 / 0.5 = 270 -> 256
    derivation = _derive(_stats(half))
    assert _side(derivation) == 256 and "larger than what one cell" in derivation.rows[0][2]
    sppnet = _derive(_stats(huge), model="sppnet")  # pooled over the region: no such limit
    assert sppnet.recipe["detector_config"]["scales"] == [320]
    # small objects beside large ones keep what they need: 10th percentile 20 px needs 24 / (20 / 320) = 384
    mixed = np.concatenate([rng.uniform(19, 21, (30, 2)), rng.uniform(240, 280, (170, 2))])
    assert _side(_derive(_stats(mixed))) == 384


def test_tall_objects_get_tall_anchors_and_a_better_best_possible_recall() -> None:
    rng = np.random.default_rng(1)
    w = rng.uniform(12, 20, 300)
    derivation = _derive(_stats(np.stack([w, 5 * w], axis=1)))  # height five times the width
    ratios = derivation.recipe["detector_config"]["anchor_ratios"]
    assert max(ratios) > 3.5  # height / width of the anchors follows the boxes
    assert derivation.bpr_fitted > derivation.bpr_default
    # hand check of the BPR: a 10 x 50 box against the default 16-128 x (0.5, 1, 2) grid: the best is size 32 ratio
    # 2 (22.6 x 45.3 -> rounded as computed here unrounded): IoU = 10*45.25 / (500 + 1024 - 452.5) < 0.5
    assert auto.anchor_bpr(np.array([[10.0, 50.0]]), (16, 32, 64, 128), (0.5, 1.0, 2.0)) == 0.0
    assert auto.anchor_bpr(np.array([[10.0, 50.0]]), (22.36,), (5.0,)) == 1.0  # the same shape: IoU 1


def test_square_objects_keep_the_default_anchors_when_the_fit_does_not_beat_them() -> None:
    sides = np.repeat([32.0, 64.0, 128.0], 20)  # big enough for the 320-pixel input: no rescale
    derivation = _derive(_stats(np.stack([sides, sides], axis=1)))
    assert derivation.bpr_default == 1.0
    assert "anchor_sizes" not in derivation.recipe["detector_config"]


def test_bpr_against_a_float64_loop() -> None:
    rng = np.random.default_rng(2)
    boxes = rng.uniform(4, 200, (50, 2))
    sizes, ratios = (16, 40, 90), (0.4, 1.0, 2.5)
    hits = 0
    for bw, bh in boxes:
        best = 0.0
        for r in ratios:
            for s in sizes:
                aw, ah = s / math.sqrt(r), s * math.sqrt(r)
                inter = min(bw, aw) * min(bh, ah)
                best = max(best, inter / (bw * bh + aw * ah - inter))
        hits += best >= 0.5
    assert auto.anchor_bpr(boxes, sizes, ratios) == pytest.approx(hits / len(boxes))


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("2", 120)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0m", "-5m", "abc", "5 parsecs", "", "m"])
def test_bad_budgets_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("text", ["0", "-5m", "soon"])
def test_cli_bad_budget_is_a_usage_error(text: str, tmp_path: Path, capsys) -> None:
    assert _cli(["train", "--data", str(tmp_path), f"--time={text}"]) == 2
    assert "--time" in capsys.readouterr().err


# --- the budget and the best model, with a simulated clock ---------------------------------------------------------

class FakeClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, **changes) -> TrainConfig:
    recipe = {
        "detector": "fasterrcnn_tiny",
        "data": {"shapes": TINY_SHAPES},
        "val_data": {"shapes": {**TINY_SHAPES, "num_images": 4, "seed": 9}},
        "max_iterations": 100000,
        "batch_size": 1,
        "checkpoint_every": 5,
        "schedule": {"warmup_iterations": 100},
        "time_budget": 60.0,
        "out_dir": str(tmp_path / "run"),
    }
    return override(TrainConfig(), recipe | changes)


def _simulate(trainer: Trainer, clock: FakeClock, scores, step_seconds: float = 0.5, eval_seconds: float = 2.0,
              kill_at: int | None = None) -> list[int]:
    """Replace the model's step and evaluation by simulated ones (the clock advances by their cost); every step
    moves a weight, so each iteration's model differs. ``scores(k)`` is the ``k``-th evaluation's (mAP@0.5,
    mAP@[.5:.95]). Returns the iterations evaluated at."""
    evaluated: list[int] = []
    param = next(p for p in trainer.model.parameters() if p.requires_grad)

    def step(batch=None):
        if kill_at is not None and trainer.iteration == kill_at:
            raise KeyboardInterrupt
        clock.now += step_seconds
        with torch.no_grad():
            param.view(-1)[0] = float(trainer.iteration + 1)
        trainer.iteration += 1
        return {"iteration": trainer.iteration, "loss": 1.0}

    def evaluate(report=False, full=False):
        clock.now += eval_seconds
        voc, coco = scores(len(evaluated))
        evaluated.append(trainer.iteration)
        return {"mAP": voc, "mAP@0.5": voc, "coco": {"AP": coco}, "iou_thresholds": [0.5], "ap": {}}

    trainer.step = step
    trainer.evaluate = evaluate
    trainer.report = lambda result: None
    return evaluated


def test_a_60s_budget_ends_on_time_with_warmup_and_evaluations_inside(tmp_path: Path) -> None:
    clock = FakeClock()
    trainer = Trainer(_config(tmp_path), clock=clock)
    evaluated = _simulate(trainer, clock, lambda k: (0.1 * k, 0.0))
    trainer.run(progress=False)
    assert 57.0 <= clock.now <= 63.0  # the budget +-5 %
    # 60 s at 0.5 s/step with 2-second evaluations: evaluations take at most EVAL_SHARE of the time
    assert len(evaluated) >= 2
    assert sum(2.0 for _ in evaluated) <= 0.15 * 60 + 2.0 + 2.0
    assert trainer.schedule.warmup_iterations <= trainer.iteration // 10 + 1  # warm-up fitted into the plan
    assert trainer.max_iterations == trainer.iteration
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["wall_seconds"] == pytest.approx(clock.now, abs=0.01)


def test_the_plan_counts_waiting_for_batches_and_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """A step costs 0.3 s of compute, each batch 0.2 s of loading and each checkpoint 1 s: the plan (the schedule's
    length and the ETA) must count all of it."""
    import detect.training.loop as loop

    clock = FakeClock()
    real_loader = loop.batch_loader

    def slow_loader(*args, **kwargs):
        for batch in real_loader(*args, **kwargs):
            clock.now += 0.2
            yield batch

    monkeypatch.setattr(loop, "batch_loader", slow_loader)
    trainer = Trainer(_config(tmp_path), clock=clock)
    _simulate(trainer, clock, lambda k: (0.1 * k, 0.0), step_seconds=0.3)
    save = trainer.save_checkpoint

    def slow_save():
        clock.now += 1.0
        save()

    trainer.save_checkpoint = slow_save
    planned: list[int] = []
    step = trainer.step
    trainer.step = lambda batch=None: (planned.append(trainer.max_iterations), step(batch))[1]
    trainer.run(progress=False)
    assert 57.0 <= clock.now <= 63.0
    # about 0.5 s a step plus 1 s every 5 steps: 0.7 s; a plan from the compute alone (0.3 s) would have planned
    # more than twice the steps that fit
    # about 0.5 s a step plus 1 s every 5 steps (0.7 s): from the twentieth step on, the plan is the run's real length
    # (a plan from the compute alone, 0.3 s, would say twice the steps, then shrink step after step while the
    # cosine decay is squeezed into the end)
    assert all(abs(p - trainer.iteration) <= 0.1 * trainer.iteration for p in planned[20:])
    assert 65 <= trainer.iteration <= 85


def test_best_model_is_kept_not_the_last(tmp_path: Path) -> None:
    clock = FakeClock()
    trainer = Trainer(_config(tmp_path, time_budget=None, max_iterations=25, eval_every=5), clock=clock)
    # evaluations at 5, 10, 15, 20 and the end (25): the second is best; the fourth ties it on mAP@0.5 but loses
    # the tie-break on mAP@[.5:.95]
    sequence = [(0.3, 0.1), (0.6, 0.3), (0.5, 0.2), (0.6, 0.25), (0.4, 0.1)]
    evaluated = _simulate(trainer, clock, lambda k: sequence[k])
    trainer.run(progress=False)
    assert evaluated == [5, 10, 15, 20, 25]  # the best's result is reused, not evaluated again
    run = tmp_path / "run"
    best, last, model = (load_file(run / f"{name}.safetensors") for name in ("best", "last", "model"))
    key = next(k for k in best if not torch.equal(best[k], last[k]))
    assert all(torch.equal(best[k], model[k]) for k in best)
    assert json.loads((run / "summary.json").read_text())["best_iteration"] == 10


def test_a_higher_tie_break_wins_and_patience_stops_early(tmp_path: Path) -> None:
    clock = FakeClock()
    trainer = Trainer(_config(tmp_path, time_budget=None, max_iterations=100, eval_every=5, patience=2),
                      clock=clock)
    sequence = [(0.5, 0.1), (0.5, 0.2), (0.4, 0.3), (0.5, 0.2), (0.9, 0.9)]
    evaluated = _simulate(trainer, clock, lambda k: sequence[k])
    trainer.run(progress=False)
    assert evaluated[:4] == [5, 10, 15, 20]  # best at 10 (tie on 0.5, better mAP@[.5:.95]); 15 and 20 are worse
    assert trainer.iteration == 20  # patience 2 evaluations: stopped, the 0.9 never came
    assert trainer.best.iteration == 10


def test_resume_inside_a_budget_continues_its_schedule_and_spends_what_is_left(tmp_path: Path) -> None:
    config = _config(tmp_path)
    clock = FakeClock()
    whole = Trainer(config, clock=clock)
    _simulate(whole, clock, lambda k: (0.1 * k, 0.0))
    whole.run(progress=False)
    uninterrupted = (whole.iteration, clock.now)

    clock = FakeClock()
    first = Trainer(override(config, {"out_dir": str(tmp_path / "resumed")}), clock=clock)
    _simulate(first, clock, lambda k: (0.1 * k, 0.0), kill_at=42)
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=False)
    planned = first.max_iterations
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 40 and checkpoint["budget"]["spent"] > 0 and checkpoint["best"]["score"]
    clock = FakeClock(5000.0)  # another process, another clock origin
    second = Trainer(override(config, {"out_dir": str(tmp_path / "resumed")}), clock=clock)
    _simulate(second, clock, lambda k: (0.1 * (k + 10), 0.0))
    second.load_checkpoint()
    assert second.max_iterations == checkpoint["plan"]["max_iterations"] <= planned + 1
    assert second.best.score == tuple(checkpoint["best"]["score"])
    second = Trainer(override(config, {"out_dir": str(tmp_path / "resumed")}), clock=clock)
    _simulate(second, clock, lambda k: (0.1 * (k + 10), 0.0))
    second.run(resume=True, progress=False)
    spent = checkpoint["budget"]["spent"] + (clock.now - 5000.0)
    assert 57.0 <= spent <= 63.0  # one budget over both sessions (less the 2 steps lost to the kill)
    assert abs(second.iteration - uninterrupted[0]) <= 6
    with pytest.raises(ConfigError, match="time budget"):
        third = Trainer(override(config, {"out_dir": str(tmp_path / "resumed"), "time_budget": 120.0}))
        third.load_checkpoint()


# --- data on disk: the derived recipe, written and reread; bad input -------------------------------------------------

def _voc_pair(root: Path, images: list[tuple[tuple[int, int], list[tuple[str, tuple[float, ...]]]]]) -> Path:
    """A pair layout (``images/`` + ``annotations/`` VOC XML) of plain images ``(w, h)`` with their boxes."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, ((w, h), objects) in enumerate(images):
        image = np.full((h, w, 3), (40 * (i % 5), 90, 160), np.uint8)
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), image)
        objs = "".join(
            f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
            f"<ymax>{b[3]}</ymax></bndbox></object>"
            for name, b in objects
        )
        (root / "annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>{w}</width><height>{h}</height></size>"
            f"{objs}</annotation>"
        )
    return root


def _plain_set(root: Path, n: int = 10) -> Path:
    return _voc_pair(root, [((120, 90), [("cat", (10, 10, 50, 70)), ("dog", (60, 20, 110, 60))]) for _ in range(n)])


def test_a_derived_recipe_written_and_reread_gives_the_same_run(tmp_path: Path, capsys) -> None:
    data = _plain_set(tmp_path / "pets")
    derivation = auto.derive_for({"source": "auto", "path": str(data)}, None, budget_seconds=600,
                                 out_dir=str(tmp_path / "run"))
    table = auto.format_derivation(derivation)
    assert "input short side" in table and "anchors" in table and "BPR@0.5" in table
    assert "weight average" in table and derivation.recipe["ema"] == 0.999
    path = tmp_path / "recipe.yaml"
    auto.write_recipe(path, derivation.recipe, "a header")
    config = load_recipe(path)
    assert config == override(TrainConfig(), derivation.recipe)  # the file holds the derivation, field for field
    auto.write_recipe(tmp_path / "again.yaml", {**derivation.recipe})
    assert load_recipe(tmp_path / "again.yaml") == config
    assert config.detector == "fasterrcnn_tiny" and config.time_budget == 600 and config.patience == auto.PATIENCE
    assert config.pretrain.iterations > 0 and config.augment.crop_prob > 0 and config.ema == 0.999
    # the same run: the same identity (recipe digest, data fingerprint, seed) as a run of the derivation itself
    a, b = Trainer(config), Trainer(override(TrainConfig(), derivation.recipe))
    assert run_identity(a.config, a.train_data, a.dataset) == run_identity(b.config, b.train_data, b.dataset)
    assert len(a.dataset) == 8 and a.val_data is not None  # a fifth held out


def test_cli_writes_the_recipe_and_explicit_fields_win(tmp_path: Path, monkeypatch, capsys) -> None:
    data = _plain_set(tmp_path / "pets")
    ran = {}
    monkeypatch.setattr("detect.training.train", lambda config, resume=False, started=None: ran.setdefault("config", config) and {})
    out = tmp_path / "run"
    assert _cli(["train", "--data", str(data), "--out", str(out), "--time", "2m", "--iterations", "77",
                 "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "derived recipe" in printed and f"wrote {out / 'recipe.yaml'}" in printed
    config = ran["config"]
    assert config.max_iterations == 77 and config.time_budget == 120 and config.out_dir == str(out)
    assert config.seed == 3 and config.data.split_seed == 0  # another seed, the same held-out images
    assert load_recipe(out / "recipe.yaml") == config


def _messages(tmp_path: Path, root: Path) -> str:
    derivation = auto.derive_for({"source": "auto", "path": str(root)}, None, budget_seconds=600)
    return "\n".join(derivation.notes), derivation


def test_no_boxes_at_all_is_a_clear_usage_error(tmp_path: Path, capsys) -> None:
    data = _voc_pair(tmp_path / "empty", [((64, 48), []) for _ in range(6)])
    assert _cli(["train", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no boxes at all" in err and "Traceback" not in err


def test_one_image_trains_without_validation_and_says_so(tmp_path: Path) -> None:
    data = _voc_pair(tmp_path / "one", [((64, 48), [("cat", (5, 5, 40, 40))])])
    notes, derivation = _messages(tmp_path, data)
    assert "only 1 image" in notes and derivation.recipe["data"]["val_fraction"] == 0.0
    assert derivation.recipe["batch_size"] == 1


def test_boxes_larger_than_the_image_are_named_and_clipped(tmp_path: Path) -> None:
    data = _voc_pair(tmp_path / "big", [((64, 48), [("cat", (5, 5, 40, 40))])] * 5
                     + [((64, 48), [("cat", (0, 0, 200, 150))])])
    notes, _ = _messages(tmp_path, data)
    assert "reach past their image" in notes or "problem" in notes


def test_a_class_missing_from_validation_is_named(tmp_path: Path) -> None:
    data = _voc_pair(tmp_path / "rare", [((64, 48), [("cat", (5, 5, 40, 40))])] * 9
                     + [((64, 48), [("cat", (5, 5, 40, 40)), ("owl", (40, 10, 60, 30))])])
    notes, _ = _messages(tmp_path, data)
    assert "owl" in notes and "no object in the" in notes


def test_ten_thousand_tiny_boxes(tmp_path: Path) -> None:
    grid = [("dot", (x, y, x + 2, y + 2)) for x in range(1, 400, 4) for y in range(1, 400, 4)]  # 10,000 boxes
    data = _voc_pair(tmp_path / "dots", [((400, 400), grid)] * 2)
    notes, derivation = _messages(tmp_path, data)
    assert "under 8 pixels" in notes and "detections per image raised to 10000" in notes
    assert _side(derivation) == auto.MAX_SHORT_SIDE
    assert derivation.recipe["detector_config"]["roi_heads"]["detections_per_img"] == 10000


def test_budget_plan_fits_with_a_simulated_clock() -> None:
    clock = FakeClock()
    budget = Budget(60.0, clock, eval_images=10, batch_size=2, final_evaluations=1)
    budget.start()
    for _ in range(6):
        clock.now += 0.5
        budget.record_step(0.5)
    plan = budget.fit(6)
    # left 57 s minus the reserve (one evaluation at 0.35 * 0.5 * 10 / 2 = 0.875 s, two steps: 1 s) = 55.125 s;
    # evaluations before the final one: min(10 - 1, 0.15 * 55.125 // 0.875 = 9) -> 9 at 0.875 s; steps
    # (55.125 - 7.875) // 0.5 = 94, so an evaluation every ceil(94 / 10) steps (the tenth is the final one)
    assert plan.evaluations == 9 and plan.max_iterations == 6 + 94 and plan.eval_every == math.ceil(94 / 10)


@pytest.mark.parametrize("model, detector", [("sppnet", "sppnet_tiny"), ("rcnn", "rcnn_tiny")])
def test_region_detectors_derive_their_recipes(tmp_path: Path, model: str, detector: str) -> None:
    data = _plain_set(tmp_path / "pets")
    derivation = auto.derive_for({"source": "auto", "path": str(data)}, None, model=model, budget_seconds=600)
    auto.write_recipe(tmp_path / "r.yaml", derivation.recipe)
    config = load_recipe(tmp_path / "r.yaml")
    assert config.detector == detector and config.fit_box_regressor
    assert config.ema == 0.0  # the weight average was measured on Faster R-CNN only
    assert derivation.bpr_default is None  # selective search, no anchors
    trainer = Trainer(override(config, {"out_dir": str(tmp_path / "run")}))
    assert trainer.region and trainer.budget is not None


@pytest.mark.slow
def test_a_budgeted_sppnet_run_end_to_end(tmp_path: Path, capsys) -> None:
    """A real (tiny) run through the CLI: 8 training images, a 25-second budget; proposals are computed once per
    image before the timed steps, the best model is written beside the last, and the run ends near its budget."""
    data = _plain_set(tmp_path / "pets")
    out = tmp_path / "run"
    assert _cli(["train", "--data", str(data), "--model", "sppnet", "--time", "25s", "--out", str(out)]) == 0
    for name in ("best", "last", "model", "recipe"):
        assert (out / f"{name}.{'yaml' if name == 'recipe' else 'safetensors'}").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["time_budget"] == 25 and summary["wall_seconds"] <= 25 * 1.05 + 15  # the final fits and report
    assert len(list((out / "proposals").rglob("*.npy"))) >= 8  # each training image searched once
    assert "AP@0.5" in capsys.readouterr().out


def test_epochs_give_the_length_in_passes_over_the_training_images(tmp_path: Path, monkeypatch, capsys) -> None:
    data = _plain_set(tmp_path / "pets")  # 10 images: 8 train, 2 held out
    ran = {}
    monkeypatch.setattr("detect.training.train", lambda config, resume=False, started=None: ran.setdefault("config", config) and {})
    out = tmp_path / "run"
    assert _cli(["train", "--data", str(data), "--out", str(out), "--epochs", "2.5", "--device", "cpu"]) == 0
    config = ran["config"]
    assert config.epochs == 2.5 and config.time_budget == auto.DEFAULT_BUDGET  # a cap under the CPU's default
    trainer = Trainer(override(config, {"batch_size": 3}))
    assert len(trainer.dataset) == 8 and trainer.config.max_iterations == 7  # ceil(2.5 * 8 / 3)
    assert trainer.budget.cap == 7
    for bad in (["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "2", "--iterations", "5"]):
        assert _cli(["train", "--data", str(data), "--out", str(out), *bad]) == 2
        assert "--epochs" in capsys.readouterr().err
