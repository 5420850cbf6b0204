"""Issue 12, the command line: an unwritable ``--out`` (item 3), file names that are not UTF-8 in every output
format (4), invalid ``DETECT_*`` settings for ``detect serve`` (5), weights that must be refused (11) and the
empty class filter (13). Each failure is one ``error[code]: message`` line and exit 2, never a traceback."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from detect import cli
from detect.cli import predict
from detect.errors import WeightsError
from detect.weights import load_detector
from tests.helpers import StubDetector, png


def one_error_line(capsys: pytest.CaptureFixture, code: str) -> str:
    """stderr holds exactly one line, ``error[code]: ...``, and no traceback; returns it."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), err
    return lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    path.write_bytes(png(40, 20))
    return path


# --- item 3 --------------------------------------------------------------------------------------------------
def unwritable_outputs(tmp_path: Path) -> list[Path]:
    """Folders nobody can write to, root included: an existing file, a path below a file, and (Linux) a folder
    inside /proc, where no file can be created."""
    existing = tmp_path / "a-file"
    existing.write_text("not a folder")
    paths = [existing, existing / "below"]
    if sys.platform.startswith("linux") and os.path.isdir("/proc/self"):
        paths.append(Path("/proc/detect-hardening-test"))
    return paths


def test_unwritable_out_is_one_line_and_exit_2_before_any_work(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture
) -> None:
    for out in unwritable_outputs(tmp_path):
        # weights that do not exist: a weights_error would mean the model was looked for before --out was checked
        argv = ["predict", str(image), "--out", str(out), "--weights", str(tmp_path / "no.safetensors")]
        assert cli.main(argv) == 2, out
        assert str(out) in one_error_line(capsys, "unwritable_output")


# --- item 4 --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that stores names as bytes")
def test_a_file_name_that_is_not_utf8_round_trips_through_every_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = b"caf\xe9 \xff.png"  # Latin-1 e-acute and a byte no UTF-8 text contains
    name = os.fsdecode(raw)  # what Python makes of it: lone surrogates for the two bytes
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    with open(os.path.join(os.fsencode(src), raw), "wb") as f:
        f.write(png(40, 20))
    monkeypatch.setattr(predict, "load_model", lambda *a: StubDetector())
    formats = [arg for f in ("jsonl", "coco", "csv", "yolo") for arg in ("--format", f)]
    assert cli.main(["predict", str(src), "--out", str(out), "--weights", "unused", *formats]) == 0

    folder = os.fsencode(out)
    assert {raw + b".json", raw + b".txt"} <= set(os.listdir(folder))  # per-image JSON and YOLO, same bytes
    (line,) = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert os.fsencode(json.loads(line)["file"]) == raw
    coco = json.loads((out / "coco_results.json").read_text(encoding="utf-8"))
    assert len(coco) == 3 and {os.fsencode(c["file_name"]) for c in coco} == {raw}  # the stub's three boxes
    text = (out / "detections.csv").read_bytes().decode("utf-8", "surrogateescape")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3 and {os.fsencode(r["file"]) for r in rows} == {raw}
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    (record,) = [r for r in lines if "input" in r]  # the first line records the run's settings
    assert record["status"] == "done"
    assert os.fsencode(record["input"]) == os.path.join(os.fsencode(src), raw)
    assert os.fsencode(record["output"]) == raw + b".json"


# --- item 5 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("DETECT_MODELS", "notjson", "not valid JSON"),
        ("DETECT_CORS_ORIGINS", "http://a.example", "not valid JSON"),
        ("DETECT_MODELS", '{"m": 5}', "valid dictionary"),
        ("DETECT_MAX_BATCH", "0", "greater than 0"),
        ("DETECT_REQUEST_TIMEOUT_S", "soon", "valid number"),
    ],
)
def test_invalid_serve_settings_are_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert cli.main(["serve", "--port", "1"]) == 2  # refused before anything binds the port
    line = one_error_line(capsys, "config_error")
    assert f"{variable}={value!r}" in line and problem in line


def test_an_invalid_api_key_setting_is_never_echoed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DETECT_API_KEY", "s3cret")
    monkeypatch.setenv("DETECT_MAX_BATCH", "-1")  # an error elsewhere prints only that variable
    assert cli.main(["serve", "--port", "1"]) == 2
    assert "s3cret" not in one_error_line(capsys, "config_error")


# --- item 11 -------------------------------------------------------------------------------------------------
class _Custom:
    """A class the safe unpickler does not know: a checkpoint holding one needs pickled code to load."""


def test_a_refused_pickle_never_suggests_weights_only_false(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "custom.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Custom()}, path)
    with pytest.raises(WeightsError) as caught:
        load_detector(path)
    message = caught.value.message
    assert "not a safe checkpoint" in message and "_Custom" in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert cli.main(["predict", str(image), "--out", str(tmp_path / "o"), "--weights", str(path)]) == 2
    line = one_error_line(capsys, "weights_error")
    assert "not a safe checkpoint" in line and "weights_only" not in line


# --- item 13 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", ["", ",", " , "])
def test_an_empty_class_filter_is_refused(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, classes: str
) -> None:
    monkeypatch.setattr(predict, "load_model", lambda *a: StubDetector())
    out = tmp_path / "out"
    assert cli.main(["predict", str(image), "--out", str(out), "--weights", "unused", "--classes", classes]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (out / "a.png.json").exists()
