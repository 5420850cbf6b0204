"""``detect predict``: outputs, manifest, formats, collisions, link loops, exit codes, kill and resume."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect import cli
from detect.cli import predict
from detect.engines.local import PredictOptions, run
from detect.inference import Refinement
from tests.helpers import StubDetector, isolate_weights, png

ROOT = Path(__file__).resolve().parent.parent


def stub_box(w: int, h: int) -> list[float]:
    return [0.0, 0.0, w / 2, h / 2]  # the stub's best detection (cat, 0.9), see tests/helpers.py


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (50, 60, 70)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def manifest(out: Path) -> dict[str, dict]:
    lines = map(json.loads, (out / "manifest.jsonl").read_text().splitlines())
    return {r["input"]: r for r in lines if "input" in r}  # the first line records the run's settings


def outputs(out: Path, suffix: str = ".json") -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(f"*{suffix}") if p.name != "coco_results.json")


def test_mixed_good_and_corrupt_inputs(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "a.png", png(40, 20))
    write(src / "sub" / "c.png", png(10, 30))
    write(src / "bad.jpg", jpeg(16, 16)[:40])
    write(src / "fake.png", b"plain text")
    write(src / "notes.txt", b"not an image extension: ignored")
    summary = run(PredictOptions((str(src),), out, recursive=True, batch_size=2), StubDetector(), progress=None)
    assert (summary.images, summary.failed, summary.detections) == (2, 2, 6)
    assert outputs(out) == ["a.png.json", "sub/c.png.json"]
    a = json.loads((out / "a.png.json").read_text())
    assert (a["width"], a["height"], a["detections"][0]["box"]) == (40, 20, stub_box(40, 20))
    records = manifest(out)
    assert {Path(k).name: (r["status"], r.get("code")) for k, r in records.items()} == {
        "a.png": ("done", None),
        "c.png": ("done", None),
        "bad.jpg": ("failed", "corrupt_image"),
        "fake.png": ("failed", "unsupported_format"),
    }


def test_collisions_and_output_tree(tmp_path: Path) -> None:
    d1, d2, out = tmp_path / "d1", tmp_path / "d2", tmp_path / "d1" / "out"
    write(d1 / "a.jpg", jpeg(8, 8))
    write(d1 / "a.png", png(8, 8))
    write(d2 / "a.png", png(12, 8))
    run(PredictOptions((str(d1), str(d2)), out), StubDetector(), progress=None)
    assert outputs(out) == ["d1/a.jpg.json", "d1/a.png.json", "d2/a.png.json"]
    assert json.loads((out / "d2/a.png.json").read_text())["width"] == 12
    summary = run(PredictOptions((str(d1),), out, recursive=True), StubDetector(), progress=None)
    assert summary.images == 2  # the outputs under d1/out are never inputs


def test_symlink_loop_and_broken_links_do_not_stop_the_run(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "real.png", png(8, 8))
    (src / "loop").symlink_to(src, target_is_directory=True)
    (src / "self.png").symlink_to(src / "self.png")
    summary = run(PredictOptions((str(src),), out, recursive=True), StubDetector(), progress=None)
    assert outputs(out) == ["real.png.json"]
    assert summary.failed == 1
    assert manifest(out)[str(src / "self.png")]["code"] == "unreadable_file"


def test_each_format_parses_back(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write(src / "000000000042.png", png(40, 20))
    write(src / "empty.png", png(30, 30))
    detector = StubDetector()
    options = PredictOptions((str(src / "000000000042.png"),), out, formats=("jsonl", "coco", "yolo", "csv"), save_images=True)
    run(options, detector, progress=None)
    empty = PredictOptions((str(src / "empty.png"),), tmp_path / "out2", refinement=Refinement(class_ids=(3,)),
                           formats=options.formats)
    run(empty, detector, progress=None)  # no bird: an empty output

    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["file"], len(r["detections"])) for r in lines] == [("000000000042.png", 3)]
    lines = [json.loads(line) for line in (tmp_path / "out2" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["file"], len(r["detections"])) for r in lines] == [("empty.png", 0)]
    coco = json.loads((out / "coco_results.json").read_text())
    assert {c["image_id"] for c in coco} == {42}
    assert [c["bbox"] for c in coco][0] == [0.0, 0.0, 20.0, 10.0]  # xywh of [0, 0, 20, 10]
    rows = list(csv.DictReader(io.StringIO((out / "detections.csv").read_text())))
    assert len(rows) == 3 and [float(rows[0][k]) for k in ("x1", "y1", "x2", "y2")] == stub_box(40, 20)
    assert rows[2]["class_name"] == "dog"
    cls, cx, cy, w, h, score = (out / "000000000042.png.txt").read_text().splitlines()[0].split()
    assert (int(cls), float(cx) * 40, float(cy) * 20, float(w) * 40, float(h) * 20, float(score)) == (0, 10, 5, 20, 10, 0.9)
    assert (tmp_path / "out2" / "empty.png.txt").read_text() == ""
    assert json.loads((tmp_path / "out2" / "empty.png.json").read_text())["detections"] == []
    assert Image.open(out / "000000000042.png.annotated.png").size == (40, 20)


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    isolate_weights(monkeypatch, tmp_path)  # nothing registered: no default weights
    monkeypatch.setattr(predict, "load_model", lambda *a: StubDetector())
    write(tmp_path / "good" / "a.png", png(8, 8))
    write(tmp_path / "mixed" / "b.png", b"garbage")
    weights = ["--weights", "unused"]
    assert cli.main(["predict", str(tmp_path / "good"), "--out", str(tmp_path / "o1"), *weights]) == 0
    assert cli.main(["predict", str(tmp_path / "good"), str(tmp_path / "mixed"), "--out", str(tmp_path / "o2"), *weights]) == 1
    assert "1 failed" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "nothing*.png"), "--out", str(tmp_path / "o3"), *weights]) == 2
    assert cli.main(["predict", str(tmp_path / "good"), "--out", str(tmp_path / "o4")]) == 2  # no weights at all
    assert cli.main(["predict", str(tmp_path / "good"), "--out", str(tmp_path / "o5"), "--classes", "zebra", *weights]) == 2
    assert cli.main(["predict", "--out", "x"]) == 2  # no SRC


def test_missing_weights_is_a_setup_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write(tmp_path / "a.png", png(8, 8))
    assert cli.main(["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "no")]) == 2
    assert "error[weights_error]" in capsys.readouterr().err


_CHILD = """
import sys
from pathlib import Path
from detect.engines.local import PredictOptions, run
from tests.helpers import StubDetector
run(PredictOptions((sys.argv[1],), Path(sys.argv[2]), batch_size=1), StubDetector(delay=0.1))
"""


@pytest.mark.slow
def test_kill_and_resume_gives_exactly_one_output_per_input(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(30):
        write(src / f"{i:02d}.png", png(8 + i, 8))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out)], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "manifest.jsonl").is_file() or len((out / "manifest.jsonl").read_text().splitlines()) < 6:  # settings + 5
            assert time.monotonic() < deadline and child.poll() is None, "the child finished or stalled"
            time.sleep(0.02)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    done_before = {k for k, r in manifest(out).items() if r["status"] == "done"}
    assert 5 <= len(done_before) < 30

    detector = StubDetector()
    summary = run(PredictOptions((str(src),), out, resume=True, batch_size=4), detector, progress=None)
    assert summary.skipped == len(done_before) and summary.images == 30 - len(done_before)
    assert outputs(out) == [f"{i:02d}.png.json" for i in range(30)]
    assert not list(out.rglob("*.tmp"))
    assert all(r["status"] == "done" for r in manifest(out).values()) and len(manifest(out)) == 30
    assert [json.loads((out / f"{i:02d}.png.json").read_text())["width"] for i in range(30)] == [8 + i for i in range(30)]


def test_predict_with_registered_weights_by_name_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--weights takes a registered name or a manifest-listed file: rebuilt from the manifest, hash verified."""
    from detect.detectors.rcnn import RCNNConfig, rcnn_alexnet
    from detect.weights import save_detector

    weights_dir = tmp_path / "w"
    model = rcnn_alexnet(("circle", "square"), config=RCNNConfig(representation_size=16))
    save_detector(model, weights_dir / "tiny.safetensors", name="tiny")
    monkeypatch.setenv("DETECT_WEIGHTS_DIR", str(weights_dir))
    image = write(tmp_path / "in" / "a.jpg", jpeg(96, 64))

    for weights in ("tiny", str(weights_dir / "tiny.safetensors")):
        out = tmp_path / f"out-{len(weights)}"
        assert cli.main(["predict", str(image), "--out", str(out), "--weights", weights, "--model", "sppnet",
                         "--proposal-workers", "0"]) == 0
        result = json.loads((out / "a.jpg.json").read_text())
        assert (result["width"], result["height"]) == (96, 64)

    assert cli.main(["predict", str(image), "--out", str(tmp_path / "o"), "--weights", "nope"]) == 2
    assert "no weights named 'nope'" in capsys.readouterr().err
    data = bytearray((weights_dir / "tiny.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (weights_dir / "tiny.safetensors").write_bytes(bytes(data))
    assert cli.main(["predict", str(image), "--out", str(tmp_path / "o2"), "--weights", "tiny"]) == 2
    assert "weights_checksum" in capsys.readouterr().err


def test_default_weights_are_the_registered_shapes_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Without --weights, --model F uses the registered ``F_shapes``; unregistered, a weights_error naming the
    command that lists what is registered."""
    from detect.detectors.rcnn import rcnn_tiny
    from detect.weights import save_detector

    folder = isolate_weights(monkeypatch, tmp_path)
    save_detector(rcnn_tiny(("circle", "square")).eval(), folder / "r.safetensors", name="rcnn_shapes")
    loaded = []
    real_load = predict.load_model
    monkeypatch.setattr(predict, "load_model", lambda *a: loaded.append(a) or real_load(*a))
    image = write(tmp_path / "in" / "a.png", png(40, 30))

    out = tmp_path / "o1"
    assert cli.main(["predict", str(image), "--out", str(out), "--model", "rcnn", "--proposal-workers", "0"]) == 0
    assert loaded == [("rcnn_shapes", "auto", "rcnn")]  # the device default: CUDA when present
    assert json.loads((out / "a.png.json").read_text())["width"] == 40

    for family in ("faster_rcnn", "sppnet"):
        assert cli.main(["predict", str(image), "--out", str(tmp_path / f"o-{family}"), "--model", family]) == 2
        err = capsys.readouterr().err
        assert "error[weights_error]" in err and f"'{family}_shapes'" in err and "detect weights list" in err
    assert len(loaded) == 1  # nothing was loaded for the unregistered defaults


def test_defaults_for_people(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Without --out a run writes runs/predict, then runs/predict2; the score threshold is 0.25 unless
    --score-threshold says otherwise (0: everything the model keeps); the last line says where the results are."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(predict, "load_model", lambda *a, **k: StubDetector(scores=(0.9, 0.2, 0.05)))
    image = write(tmp_path / "in" / "a.png", png(40, 20))
    weights = ["--weights", "unused"]

    assert cli.main(["predict", str(image), *weights]) == 0
    first = json.loads((tmp_path / "runs" / "predict" / "a.png.json").read_text())
    assert [d["score"] for d in first["detections"]] == [0.9]
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == f"saved 1 result to {Path('runs') / 'predict'}"

    assert cli.main(["predict", str(image), "--score-threshold", "0", *weights]) == 0
    second = json.loads((tmp_path / "runs" / "predict2" / "a.png.json").read_text())
    assert [round(d["score"], 2) for d in second["detections"]] == [0.9, 0.2, 0.05]
    assert capsys.readouterr().err.rstrip().endswith(f"saved 1 result to {Path('runs') / 'predict2'}")

    assert cli.main(["predict", str(image), "--resume", *weights]) == 2  # resuming needs the run's folder
    assert "error[config_error]: --resume needs --out" in capsys.readouterr().err


def test_annotated_copy_keeps_the_input_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG's annotated copy is a JPEG (quality 90), a PNG's a PNG; the stub's best box (class 1) is drawn in the
    first palette colour, with the chosen line width."""
    from detect.drawing import PALETTE

    monkeypatch.setattr(predict, "load_model", lambda *a, **k: StubDetector(scores=(0.9, 0.2, 0.05)))
    photo = write(tmp_path / "in" / "photo.jpg", jpeg(200, 100))
    shot = write(tmp_path / "in" / "shot.png", png(200, 100, value=0))
    out = tmp_path / "out"
    args = ["predict", str(photo), str(shot), "--out", str(out), "--weights", "x", "--save-images", "--line-width", "3"]
    assert cli.main(args) == 0
    jpeg_copy, png_copy = Image.open(out / "photo.jpg.annotated.jpg"), Image.open(out / "shot.png.annotated.png")
    assert (jpeg_copy.format, jpeg_copy.size, png_copy.format, png_copy.size) == ("JPEG", (200, 100), "PNG", (200, 100))
    assert not (out / "photo.jpg.annotated.png").exists()
    pixels = np.asarray(png_copy)
    # the box [0, 0, 100, 50]: its bottom edge is rows 48-50 (3 px, inside the box's last row) in the class colour,
    # the rows either side untouched
    assert [tuple(pixels[y, 60]) for y in (48, 49, 50)] == [PALETTE[0]] * 3
    assert tuple(pixels[47, 60]) == tuple(pixels[51, 60]) == (0, 0, 0)

    no_labels = tmp_path / "plain"
    assert cli.main([*args[:4], str(no_labels), "--weights", "x", "--save-images", "--hide-labels"]) == 0
    drawn = np.asarray(Image.open(no_labels / "photo.jpg.annotated.jpg")).astype(int)
    assert np.abs(drawn[10:40, 10:90] - np.array([50, 60, 70])).max() <= 8  # inside the box: the photo, no label
