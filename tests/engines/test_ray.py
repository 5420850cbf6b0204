"""``detect predict --engine ray`` against the local engine: the same bytes for good, corrupt, empty and oversized
images, one result per input when an actor or the driver is killed, file:// URLs, and the missing-Ray error.

All Ray tests share one local cluster (``ray_cluster``, 2 CPUs). The local engine's reference runs torch on two
threads and the Ray actors on one (``cpus_per_actor=1``): an image's results do not depend on the thread count
(issue 21, :mod:`detect.ops.threads`), so the engines write the same bytes without matching their threads."""

from __future__ import annotations

import io
import re
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from detect import cli
from detect.engines import ray as ray_engine
from detect.engines.local import PredictOptions, run
from detect.inference import DEFAULT_SCORE_THRESHOLD, Refinement, load_model
from tests.helpers import png

FORMATS = ("jsonl", "coco", "csv", "yolo", "parquet")
EXPECTED_FAILURES = {"corrupt.png": "corrupt_image", "empty.jpg": "empty_input", "oversized.png": "image_too_large"}
GOOD = ["good0.png", "good1.png", "good2.png", "good3.png", "sub/good4.png"]
MAX_PIXELS = 250_000  # oversized.png is 600 x 600


def noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five good images (one in a sub-folder), a truncated PNG, an empty file and one above ``MAX_PIXELS``."""
    src = tmp_path_factory.mktemp("mixed")
    (src / "sub").mkdir()
    for i, (w, h) in enumerate([(64, 48), (80, 80), (40, 96), (96, 40)]):
        (src / f"good{i}.png").write_bytes(noise_png(w, h, seed=i))
    (src / "sub" / "good4.png").write_bytes(noise_png(72, 56, seed=4))
    (src / "corrupt.png").write_bytes(png(30, 30)[:60])
    (src / "empty.jpg").write_bytes(b"")
    (src / "oversized.png").write_bytes(png(600, 600))
    return src


def files(out: Path) -> dict[str, bytes]:
    """Every output file by relative path, the manifest as its sorted lines (its order is arrival order)."""
    found = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    found["manifest.jsonl"] = b"".join(sorted(found["manifest.jsonl"].splitlines(keepends=True)))
    return found


def records(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return [r for r in lines if "input" in r]  # the first line records the run's settings


def two_thread_local(src: Path, out: Path, weights: str | Path, **changes) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(PredictOptions((str(src),), out, **changes), load_model(weights), progress=None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_reference(mixed_images: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    options = {"recursive": True, "batch_size": 3, "formats": FORMATS, "save_images": True, "max_pixels": MAX_PIXELS}
    two_thread_local(mixed_images, out, tiny_weights, **options)
    return out


def test_local_reference_is_what_the_inputs_imply(local_reference: Path) -> None:
    """The reference itself, against facts written by hand: one JSON per good input, the failures' codes."""
    status = {Path(r["input"]).name: (r["status"], r.get("code")) for r in records(local_reference)}
    assert status == {**{Path(g).name: ("done", None) for g in GOOD}, **{k: ("failed", v) for k, v in EXPECTED_FAILURES.items()}}
    assert sorted(str(p.relative_to(local_reference)) for p in local_reference.rglob("*.png.json")) == [f"{g}.json" for g in GOOD]


@pytest.mark.exact
def test_ray_output_is_byte_equal_to_local(ray_cluster: ModuleType, mixed_images: Path, tiny_weights: Path,
                                           local_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = PredictOptions((str(mixed_images),), out, recursive=True, batch_size=2, formats=FORMATS,
                             save_images=True, max_pixels=MAX_PIXELS)
    summary = ray_engine.run(options, ray_engine.ModelSource(str(tiny_weights)), ray_engine.RayOptions(actors=1), progress=None)
    assert (summary.images, summary.failed, summary.skipped) == (5, 3, 0)
    ours, reference = files(out), files(local_reference)
    assert sorted(ours) == sorted(reference)
    assert [name for name in ours if ours[name] != reference[name]] == []


@pytest.mark.exact
@pytest.mark.parametrize("weights", ["rcnn_shapes", "sppnet_shapes", "faster_rcnn_shapes"])
def test_ray_writes_the_local_bytes_for_every_bundled_model(ray_cluster: ModuleType, weights: str,
                                                            tmp_path: Path) -> None:
    """Every detector family (the region detectors run selective search in the actor, in-process), hand-made
    shapes images of several sizes, the local engine on two threads in batches of 3, Ray's actor on one in
    batches of 2: byte-equal per-image JSON."""
    from detect.data.shapes import ShapesConfig, ShapesDataset

    src = tmp_path / "src"
    src.mkdir()
    for index, (height, width) in enumerate([(96, 96), (100, 150), (120, 90), (64, 128), (40, 120)]):
        scene = ShapesDataset(ShapesConfig(num_images=1, image_size=height, seed=300 + index))[0][0]
        Image.fromarray(scene).resize((width, height)).save(src / f"{index}.png")
    local, ours = tmp_path / "local", tmp_path / "ray"
    two_thread_local(src, local, weights, batch_size=3)
    options = PredictOptions((str(src),), ours, batch_size=2)
    summary = ray_engine.run(options, ray_engine.ModelSource(weights), ray_engine.RayOptions(actors=1), progress=None)
    assert (summary.images, summary.failed) == (5, 0)
    expected = {p.name: p.read_bytes() for p in sorted(local.glob("*.png.json"))}
    assert len(expected) == 5 and {p.name: p.read_bytes() for p in sorted(ours.glob("*.png.json"))} == expected


def test_startup_line_says_where_the_time_before_the_first_result_went(ray_cluster: ModuleType, mixed_images: Path,
                                                                          tiny_weights: Path, tmp_path: Path) -> None:
    progress = io.StringIO()
    options = PredictOptions((str(mixed_images / "sub"),), tmp_path / "out", batch_size=2)
    start = time.perf_counter()
    ray_engine.run(options, ray_engine.ModelSource(str(tiny_weights)), ray_engine.RayOptions(actors=1), progress=progress)
    elapsed = time.perf_counter() - start
    line = next(line for line in progress.getvalue().splitlines() if line.startswith("ray start-up: "))
    seconds = {name: float(value) for name, value in
               re.findall(r"(connect|listing|first result at|import|model load|worker up) ([0-9.]+) s", line)}
    assert set(seconds) == {"connect", "listing", "first result at", "worker up", "import", "model load"}, line
    assert "1 actor(s)" in line
    assert seconds["connect"] + seconds["listing"] <= seconds["first result at"] <= elapsed
    assert seconds["model load"] > 0


def test_listing_in_the_driver_equals_listing_in_a_task(ray_cluster: ModuleType, mixed_images: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the one-node test cluster the driver lists local paths itself; a task (multi-node clusters) lists the
    same inputs with the same relative paths."""
    assert ray_engine._single_node_here(ray_cluster)
    here = ray_engine.list_inputs(ray_cluster, [str(mixed_images)], str(tmp_path / "out"), True)
    monkeypatch.setattr(ray_engine, "_single_node_here", lambda ray: False)
    in_task = ray_engine.list_inputs(ray_cluster, [str(mixed_images)], str(tmp_path / "out"), True)
    assert here == in_task
    assert sorted(i.rel for i in here[0]) == sorted([*GOOD, *EXPECTED_FAILURES])


def test_parquet_holds_the_per_image_json(ray_cluster: ModuleType, local_reference: Path) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(local_reference / "predictions.parquet").to_pylist()
    assert [r["file"] for r in rows] == GOOD
    for row in rows:
        image = json.loads((local_reference / f"{row['file']}.json").read_text())
        assert (row["width"], row["height"]) == (image["width"], image["height"])
        assert row["detections"] == image["detections"]


def test_cli_with_file_urls(ray_cluster: ModuleType, mixed_images: Path, tiny_weights: Path, local_reference: Path,
                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``file://`` inputs go through fsspec: same relative paths and JSON as the plain paths, URLs in the manifest."""
    out = tmp_path / "out"
    argv = ["predict", f"file://{mixed_images}", "--out", str(out), "-r", "--weights", str(tiny_weights),
            "--engine", "ray", "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "4"]
    assert cli.main(argv) == cli.EXIT_PARTIAL  # the corrupt and empty ones (the oversized one fits the default limit)
    for good in GOOD:
        assert (out / f"{good}.json").read_bytes() == (local_reference / f"{good}.json").read_bytes()
    assert all(r["input"].startswith(f"file://{mixed_images}/") for r in records(out))
    assert "error[" not in capsys.readouterr().err


def test_killing_an_actor_mid_run_gives_one_result_per_input(ray_cluster: ModuleType, tiny_weights: Path,
                                                            tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    names = [f"img{i:02d}.png" for i in range(16)]
    for i, name in enumerate(names):
        (src / name).write_bytes(noise_png(128, 128, seed=i))
    killed = threading.Event()
    killer = threading.Thread(target=kill_detector_actor_after_first_results, args=(ray_cluster, out, killed), daemon=True)
    killer.start()
    options = PredictOptions((str(src),), out, batch_size=1)
    summary = ray_engine.run(options, ray_engine.ModelSource(str(tiny_weights)), ray_engine.RayOptions(actors=1), progress=None)
    killer.join(5)
    assert killed.is_set(), "the run ended before an actor could be killed"
    assert summary.images == len(names)
    assert Counter(Path(r["input"]).name for r in records(out)) == Counter(names)
    assert sorted(p.name for p in out.glob("*.png.json")) == [f"{n}.json" for n in names]


def kill_detector_actor_after_first_results(ray: ModuleType, out: Path, killed: threading.Event) -> None:
    """Once the manifest has a result, ``ray.kill`` the Detector actor (Ray restarts it, its task is retried).
    The handle comes from the GCS actor table: Ray Data's pool actors have no name to ``ray.get_actor``."""
    from ray._private.state import actors
    from ray._raylet import ActorID

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        manifest = out / "manifest.jsonl"
        if manifest.is_file() and manifest.read_text().count('"done"') >= 1:
            for info in actors().values():
                if "Detector" in info["ActorClassName"] and info["State"] == "ALIVE":
                    handle = ray._private.worker.global_worker.core_worker.get_actor_handle(ActorID.from_hex(info["ActorID"]))
                    ray.kill(handle, no_restart=False)
                    killed.set()
                    return
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_driver_resumes_to_one_result_per_input(ray_cluster: ModuleType, tiny_weights: Path,
                                                       tmp_path: Path) -> None:
    """A driver (a second process on the same cluster) is SIGKILLed mid-run; ``--resume`` finishes the job."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    names = [f"img{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        (src / name).write_bytes(noise_png(160, 160, seed=i))
    address = ray_cluster.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "detect", "predict", str(src), "--out", str(out), "--weights", str(tiny_weights),
            "--engine", "ray", "--address", address, "--batch-size", "1"]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            manifest = out / "manifest.jsonl"
            if manifest.is_file() and manifest.read_text().count('"done"') >= 2:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the driver finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    before = {r["input"] for r in records(out) if r["status"] == "done"}
    assert 2 <= len(before) < len(names)
    # the settings the CLI ran with (its default score threshold for people): --resume refuses others
    options = PredictOptions((str(src),), out, batch_size=4, resume=True, refinement=Refinement(DEFAULT_SCORE_THRESHOLD))
    summary = ray_engine.run(options, ray_engine.ModelSource(str(tiny_weights)), ray_engine.RayOptions(actors=1), progress=None)
    assert summary.skipped == len(before) and summary.images == len(names) - len(before)
    done = Counter(Path(r["input"]).name for r in records(out) if r["status"] == "done")
    assert done == Counter(names)
    assert sorted(p.name for p in out.glob("*.png.json")) == [f"{n}.json" for n in names]


def test_engine_ray_without_ray_is_one_line_and_exit_2(mixed_images: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = cli.main(["predict", str(mixed_images), "--out", str(tmp_path / "out"), "--engine", "ray"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE
    assert err == "error[config_error]: --engine ray needs Ray, which is not installed: pip install 'detect[ray]'"
    assert cli.main(["serve", "--engine", "ray"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == err


def test_ray_flags_need_engine_ray(mixed_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["predict", str(mixed_images), "--out", str(tmp_path / "o"), "--actors", "2"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == "error[config_error]: --actors needs --engine ray"


def test_ingress_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--ingress`` belongs to ``--engine ray``; ``--ingress haproxy`` without the program is refused before a
    cluster starts (api/ray_serve.py chooses the ingress)."""
    pytest.importorskip("ray.serve")
    assert cli.main(["serve", "--ingress", "proxy"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == (
        "error[config_error]: --address, --replicas, --autoscale and --ingress need --engine ray")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    assert cli.main(["serve", "--engine", "ray", "--ingress", "haproxy"]) == cli.EXIT_USAGE
    assert "--ingress haproxy needs the haproxy program on PATH" in capsys.readouterr().err
