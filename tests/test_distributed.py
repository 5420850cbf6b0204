"""Data-parallel training (detect.training.distributed): the global sample order for any number of processes,
2 processes x batch 2 against 1 process x batch 4, the sharded evaluation against the one-process one, a rank
killed mid-run and resumed, a resume with another world size, Ray Train against --nproc, and bad set-ups.

The recipe below makes the batch's loss exactly the mean of its images' losses, so that two processes averaging
their half-batch gradients compute the one-process gradient: every image has one object (a fixed ground-truth
count), the same size (the same padding, the same anchor count), RPN and RoI sampling take every candidate
(``batch_size_per_image`` above any count, ``positive_fraction`` 1, fg = bg threshold so nothing is ignored), so
no random draw decides a sample and every image contributes the same number of anchors and RoIs to the
normalisers, and no augmentation. What remains is the order of float32 sums (the all-reduce adds two
half-batch means where one process sums four images), about 1e-7 relative per step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from detect.data.config import make_dataset
from detect.errors import ConfigError
from detect.evaluate import evaluate_detector
from detect.training import TrainBatches, load_recipe
from detect.training import launch as distributed
from detect.training.data import data_splits
from detect.weights import load_detector

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"num_images": 10, "image_size": 48, "min_objects": 1, "max_objects": 1, "object_size": [0.3, 0.5]}
ALL = {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5, "batch_size_per_image": 1_000_000, "positive_fraction": 1.0}
STEPS = 20
# Weights after STEPS SGD steps: float32 reduction-order differences (~1e-7 relative per step) grow through the
# steps' nonlinearity; 2e-4 absolute is ~100x what we measure and far below what one differently drawn image or a
# different learning rate changes (>1e-2).
ATOL = 2e-4


def recipe(tmp_path: Path, batch_size: int, **changes) -> Path:
    config = {
        "detector": "fasterrcnn_tiny",
        "detector_config": {
            "transform": {"min_size": [48], "max_size": 48},
            "rpn": {**ALL, "pre_nms_top_n_train": 100, "post_nms_top_n_train": 8},
            "roi_heads": ALL,
        },
        "data": {"shapes": {**SHAPES, "seed": 0}},
        "val_data": {"shapes": {**SHAPES, "num_images": 5, "seed": 1}},
        "augment": {"flip_prob": 0.0},
        "optimizer": {"lr": 0.02},
        "schedule": {"warmup_iterations": 4},
        "max_iterations": STEPS,
        "batch_size": batch_size,
        "checkpoint_every": 10,
        "device": "cpu",
        "log_every": 1,
    } | changes
    path = tmp_path / f"recipe-{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "detect", "train", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --- the sampler: no processes needed -------------------------------------------------------------------------


def test_every_world_size_draws_the_same_global_batches(tmp_path: Path) -> None:
    config = load_recipe(recipe(tmp_path, 1), {"batch_size": 1})
    dataset = make_dataset(config.data)
    ids = lambda batches, i: [int(t["image_id"]) for _, t in batches.samples(i)]
    for world in (1, 2, 4):  # global batch 4 = batch_size x world
        config_w = load_recipe(recipe(tmp_path, 4 // world), {"batch_size": 4 // world})
        ranks = [TrainBatches(dataset, config_w) for _ in range(world)]
        for rank, batches in enumerate(ranks):
            batches.shard(rank, world)
        global_ids = [[image for b in ranks for image in ids(b, i)] for i in range(10)]
        # independent reference: position p of the run is element p % n of epoch p // n's seeded permutation
        n = len(dataset)
        expected = [[int(np.random.default_rng([config.seed, p // n]).permutation(n)[p % n])
                     for p in range(4 * i, 4 * i + 4)] for i in range(10)]
        assert global_ids == expected, world
        flat = [image for batch in global_ids for image in batch]
        assert sorted(flat[:n]) == list(range(n)) and sorted(flat[n:2 * n]) == list(range(n))  # each epoch: all, once
    # a resume with another world size continues the global order where the checkpoint left it
    two = TrainBatches(dataset, load_recipe(recipe(tmp_path, 2), {"batch_size": 2}))
    two.shard(1, 2)
    two.origin_iteration, two.origin_position = 3, 12  # 3 iterations of a 1-process x 4 run
    assert ids(two, 4) == expected[4][2:]


def test_linear_lr_scaling_is_an_explicit_option(tmp_path: Path) -> None:
    from detect.errors import ConfigError
    from detect.training.schedule import base_lr

    config = load_recipe(recipe(tmp_path, 2), {"optimizer": {"scale_lr": "linear", "base_batch_size": 2}})
    assert base_lr(config.optimizer, 8) == pytest.approx(0.02 * 8 / 2)
    assert base_lr(load_recipe(recipe(tmp_path, 2)).optimizer, 8) == 0.02
    with pytest.raises(ConfigError, match="base_batch_size"):
        load_recipe(recipe(tmp_path, 2), {"optimizer": {"scale_lr": "linear"}})


# --- processes ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-process x batch 2 run (CLI --nproc 2) and a 1-process x batch 4 run (CLI)."""
    tmp = tmp_path_factory.mktemp("dist")
    two, one = tmp / "two", tmp / "one"
    done = cli("--recipe", str(recipe(tmp, 2)), "--out", str(two), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    done = cli("--recipe", str(recipe(tmp, 4)), "--out", str(one))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"two": two, "one": one, "tmp": tmp}


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(runs: dict[str, Path]) -> None:
    difference = max_difference(weights_of(runs["two"]), weights_of(runs["one"]))
    assert difference < ATOL, difference
    # the logged losses are the means over the processes: the one-process losses, to reduction order
    rows = lambda run: [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    two, one = rows(runs["two"]), rows(runs["one"])
    assert [r["iteration"] for r in two] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    # only rank 0 wrote: one metrics row per iteration, one summary naming both processes
    assert yaml.safe_load((runs["two"] / "summary.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process_evaluation(runs: dict[str, Path]) -> None:
    """The 2-process run evaluated its final model in two shards gathered on rank 0: exactly the mAP that one
    process computes for that model on the same data."""
    config = load_recipe(recipe(runs["tmp"], 2))
    model = load_detector(runs["two"] / "model.safetensors")
    reference = evaluate_detector(model, make_dataset(data_splits(config)[1]), config.batch_size)
    reported = json.loads((runs["two"] / "report.json").read_text())
    assert reported["num_images"] == len(make_dataset(data_splits(config)[1])) == 5
    plain = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731 - report.json writes NaN as null
    for key in ("mAP", "ap", "num_detections", "num_gt"):
        theirs = reference[key]
        theirs = {k: plain(v) for k, v in theirs.items()} if isinstance(theirs, dict) else plain(theirs)
        assert reported[key] == theirs, key
    assert sum(reported["num_detections"].values()) > 0  # the model detects something: the AP compare is not vacuous


@pytest.mark.slow
def test_a_killed_rank_stops_every_rank_and_resume_finishes_the_run(runs: dict[str, Path]) -> None:
    out = runs["tmp"] / "killed"
    args = ["--recipe", str(recipe(runs["tmp"], 2)), "--out", str(out), "--nproc", "2"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "detect", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                            text=True).stdout.split()]
    ranks = [p for p in ranks if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 60
    assert launcher.returncode != 0
    assert "rank" in stderr and "killed by signal SIGKILL" in stderr, stderr[-2000:]
    for pid in ranks:  # every rank is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not (out / "model.safetensors").exists()
    done = cli(*args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_difference(weights_of(out), weights_of(runs["two"])) == 0.0  # same processes: same arithmetic


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(runs: dict[str, Path]) -> None:
    """A 2 x 2 run checkpointed at iteration 10 resumed by 1 process (global batch 2 from then on): it continues
    the global sample order at position 40 (see the sampler test) and ends at position 40 + 10 x 2."""
    out = runs["tmp"] / "resized"
    first = cli("--recipe", str(recipe(runs["tmp"], 2, max_iterations=10)), "--out", str(out), "--nproc", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["samples_seen"] == 40
    resumed = cli("--recipe", str(recipe(runs["tmp"], 2)), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["iteration"], state["samples_seen"], state["world_size"]) == (STEPS, 40 + 10 * 2, 1)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == STEPS


@pytest.mark.slow
def test_ray_train_gives_the_weights_of_nproc(runs: dict[str, Path], ray_cluster) -> None:
    out = runs["tmp"] / "ray"
    config = load_recipe(recipe(runs["tmp"], 2), {"out_dir": str(out)})
    assert distributed.run_ray(config, workers=2, gpus_per_worker=0, resume=False) == 0
    assert max_difference(weights_of(out), weights_of(runs["two"])) == 0.0
    assert any((out / "ray").rglob("checkpoint.pt"))  # checkpoints reported to Ray


# --- bad set-ups ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_process_counts_are_usage_errors(tmp_path: Path) -> None:
    done = cli("--recipe", str(recipe(tmp_path, 2)), "--out", str(tmp_path / "r"), "--nproc", "0", timeout=120)
    assert done.returncode == 2 and "--nproc must be at least 1" in done.stderr
    config = load_recipe(recipe(tmp_path, 2), {"device": "cuda"})
    with pytest.raises(ConfigError, match="CUDA device"):
        distributed.check_processes(config, torch.cuda.device_count() + 1)


def test_more_cpu_ranks_than_cores_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed.check_processes(load_recipe(recipe(tmp_path, 2)), 2)
    assert any("share cores" in str(w.message) for w in caught)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MASTER_ADDR": "no-such-host.invalid"}, "does not resolve"),
        ({"MASTER_ADDR": "192.0.2.1"}, "not an address of this machine"),  # TEST-NET-1: never local
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9",
          "DETECT_DIST_CONNECT_TIMEOUT": "2"}, "unreachable"),  # torchrun's variables, nobody listening
    ],
)
def test_an_unreachable_master_is_a_set_up_error_not_a_hang(tmp_path: Path, env: dict, message: str) -> None:
    began = time.monotonic()
    args = ["--recipe", str(recipe(tmp_path, 2)), "--out", str(tmp_path / "r")]
    done = cli(*args, *([] if "RANK" in env else ["--nproc", "2"]), env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert time.monotonic() - began < 100
