"""The weights' moving average (recipe ``ema``): the update against a float64 loop written here, a run's saved
model against the average of the weights it recorded after each step, and an exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from detect.config import override
from detect.errors import ConfigError
from detect.training import TrainConfig, Trainer
from detect.training.ema import WeightEMA, ema_decay
from detect.weights import load_detector
from tests.helpers import TINY_SHAPES


def _reference(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The average of float64 weight snapshots (one per step, the first step's included), by the formula of
    :mod:`detect.training.ema` written out: ``a = w_1``, then ``a = d_t a + (1 - d_t) w_t``, ``d_t = min(decay,
    (1 + t) / (10 + t))``."""
    average = {k: v.clone() for k, v in snapshots[0].items()}
    for t, weights in enumerate(snapshots[1:], start=2):
        d = min(decay, (1 + t) / (10 + t))
        for k, w in weights.items():
            average[k] = average[k] * d + w * (1 - d) if w.is_floating_point() else w.clone()
    return average


def test_the_decay_ramps_up_to_its_value() -> None:
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 100_000) == 0.999
    assert ema_decay(0.5, 20) == 0.5  # 21 / 30 is past 0.5
    assert ema_decay(0.5, 3) == pytest.approx(4 / 13)


def test_the_update_follows_a_float64_loop() -> None:
    """Five updates of a layer with a float and an integer buffer. float32 against float64: each lerp rounds
    once per element (relative 6e-8), five steps stay within 1e-6."""
    torch.manual_seed(0)
    model = nn.Linear(7, 3)
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    model.register_buffer("scale", torch.ones(3))
    ema, snapshots = None, []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.scale.mul_(1.5)
            model.count.add_(1)
        if ema is None:
            ema = WeightEMA(model, 0.6)
        ema.update(model)
        snapshots.append({k: v.double() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()})
    expected = _reference(snapshots, 0.6)
    ours = ema.module.state_dict()
    assert ema.updates == 5
    assert int(ours["count"]) == 5
    for name in ("weight", "bias", "scale"):
        torch.testing.assert_close(ours[name].double(), expected[name], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ours[name].double(), snapshots[-1][name])  # the average is not the last weights
    assert all(not p.requires_grad for p in ema.module.parameters())


def _recipe(out: Path, **changes) -> dict:
    recipe = {
        "detector": "fasterrcnn_tiny",
        "data": {"shapes": TINY_SHAPES},
        "optimizer": {"lr": 0.02},
        "schedule": {"warmup_iterations": 1},
        "max_iterations": 6,
        "batch_size": 2,
        "checkpoint_every": 3,
        "ema": 0.7,
        "out_dir": str(out),
    }
    return recipe | changes


def test_a_run_saves_the_average_of_its_steps_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []
    step = Trainer.step

    def recording(self, batch=None):
        row = step(self, batch)
        snapshots.append({k: v.double() if v.is_floating_point() else v.clone()
                          for k, v in self.model.state_dict().items()})
        return row

    monkeypatch.setattr(Trainer, "step", recording)
    config = override(TrainConfig(), _recipe(tmp_path / "run"))
    Trainer(config).run(progress=False)
    assert len(snapshots) == 6
    expected = _reference(snapshots, 0.7)
    for name in ("model.safetensors", "last.safetensors"):
        saved = load_detector(tmp_path / "run" / name).state_dict()
        assert saved.keys() == expected.keys()
        moved = 0
        for key, value in saved.items():
            if value.is_floating_point():
                # float32 lerps against float64 sums over six steps: relative error a few 1e-7
                torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6)
                moved += not torch.allclose(value.double(), snapshots[-1][key], rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(value, expected[key])
        assert moved > 10  # most tensors are not the raw last step's


def test_resume_continues_the_average_exactly(tmp_path: Path) -> None:
    """Stopped at its checkpoint after 3 steps and resumed to 6: the very weights of a straight run."""
    straight = override(TrainConfig(), _recipe(tmp_path / "a"))
    Trainer(straight).run(progress=False)
    split = override(TrainConfig(), _recipe(tmp_path / "b", max_iterations=3))
    Trainer(split).run(progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ema"]["updates"] == 3
    Trainer(override(split, {"max_iterations": 6})).run(resume=True, progress=False)
    ours = load_detector(tmp_path / "b" / "model.safetensors").state_dict()
    theirs = load_detector(tmp_path / "a" / "model.safetensors").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    without = override(TrainConfig(), _recipe(tmp_path / "c", ema=0.0))
    Trainer(without).run(progress=False)
    raw = load_detector(tmp_path / "c" / "model.safetensors").state_dict()
    assert not all(torch.equal(raw[k], theirs[k]) for k in theirs)  # the average is not the raw run's weights


@pytest.mark.parametrize("ema", [-0.1, 1.0, 2.0])
def test_an_ema_outside_zero_to_one_is_a_config_error(tmp_path: Path, ema: float) -> None:
    with pytest.raises(ConfigError, match="ema must be a decay"):
        override(TrainConfig(), _recipe(tmp_path, ema=ema))
