"""Issue 21, items 3, 4, 6 and 7: class ids that only look like digits, COCO image ids unique per run, ``--resume``
with other settings refused, and an unwritable part of ``--out`` failing its inputs alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detect import cli
from detect.cli import predict
from detect.engines.local import PredictOptions, run
from detect.engines.outputs import coco_image_ids
from detect.errors import ConfigError, UnknownClassError
from detect.inference import Refinement, resolve_classes
from tests.helpers import StubDetector, png

NAMES = ("cat", "dog", "bird")


# --- item 3 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["²", "١", "1" * 5000, "٣", "1.0", "-1", "0", "4"])
def test_class_ids_are_ascii_digits_in_range_only(text: str) -> None:
    """``"²".isdigit()`` is true and ``int("²")`` raises; ``int("١")`` is 1; ``int("1" * 5000)`` raises: each is a
    name here, and an unknown one (was: a 500, a traceback, or silently class 1)."""
    with pytest.raises(UnknownClassError):
        resolve_classes([text], NAMES)


def test_class_ids_and_names_still_resolve() -> None:
    assert resolve_classes(["1", " dog ", "3", 2], NAMES) == (1, 2, 3)


def test_cli_unicode_class_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(png(20, 20))
    monkeypatch.setattr(predict, "load_model", lambda *a, **k: StubDetector())
    code = cli.main(["predict", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--weights", "x.safetensors",
                     "--classes", "²"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "unknown class" in err


def test_api_unicode_class_is_a_422(client) -> None:
    import base64

    image = {"data": base64.b64encode(png(40, 40)).decode()}
    for value in (["²"], ["1" * 5000], ["١"]):
        r = client.post("/detect", json={"images": [image], "classes": value})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "unknown_class"
    r = client.post("/detect", files={"images": ("a.png", png(40, 40), "image/png")}, data={"classes": "²"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_class"


@pytest.fixture
def client():
    from tests.helpers import running

    with running(StubDetector()) as c:
        yield c


# --- item 4 --------------------------------------------------------------------------------------------------------


def test_coco_image_ids_are_unique_per_run() -> None:
    """Hand-computed: 000042 keeps 42 (its number alone); 2.jpg and sub/2.jpg share 2, so neither keeps it; b.jpg
    and both 2s get 43, 44, 45 in sorted order (was: 2, 2 and 2 for 2.jpg, b.jpg (index 2) and sub/2.jpg)."""
    ids = coco_image_ids(["2.jpg", "b.jpg", "sub/2.jpg", "000042.png", "٣.png"])
    assert ids == {"000042.png": 42, "2.jpg": 43, "b.jpg": 44, "sub/2.jpg": 45, "٣.png": 46}


def test_coco_results_and_images_agree(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for rel in ("2.png", "b.png", "sub/2.png"):
        (src / rel).write_bytes(png(16, 12))
    run(PredictOptions((str(src),), out, recursive=True, formats=("coco",)), StubDetector(), progress=None)
    images = json.loads((out / "coco_images.json").read_text())
    by_name = {i["file_name"]: i["id"] for i in images}
    assert len(set(by_name.values())) == 3 and set(by_name) == {"2.png", "b.png", "sub/2.png"}
    results = json.loads((out / "coco_results.json").read_text())
    assert {(r["file_name"], r["image_id"]) for r in results} == set(by_name.items())


# --- item 6 --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"refinement": Refinement(score_threshold=0.5)}, "score_threshold"),
        ({"save_images": True}, "save_images"),
        ({"model": "sppnet:other.safetensors:torch"}, "model"),
        ({"formats": ("jsonl", "coco")}, "formats"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_setting(tmp_path: Path, change: dict, setting: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(png(16, 16))
    first = PredictOptions((str(src),), out, model="faster_rcnn:a.safetensors:torch")
    run(first, StubDetector(), progress=None)
    (src / "b.png").write_bytes(png(16, 16))
    with pytest.raises(ConfigError, match=rf"other settings \({setting} "):
        run(PredictOptions((str(src),), out, resume=True, **({"model": first.model} | change)), StubDetector(),
            progress=None)
    assert not (out / "b.png.json").exists()
    summary = run(PredictOptions((str(src),), out, resume=True, model=first.model), StubDetector(), progress=None)
    assert (summary.skipped, summary.images) == (1, 1)


def test_cli_resume_with_another_threshold_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(png(20, 20))
    monkeypatch.setattr(predict, "load_model", lambda *a, **k: StubDetector())
    base = ["predict", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--weights", "x.safetensors"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--resume", "--score-threshold", "0.6"]) == 2
    err = capsys.readouterr().err
    assert "score_threshold" in err and "Traceback" not in err


# --- item 7 --------------------------------------------------------------------------------------------------------


def test_an_output_path_blocked_by_a_file_fails_that_input_alone(tmp_path: Path) -> None:
    """A file where an input's output folder should be (as a read-only subfolder does for a user other than root):
    that input fails with ``unwritable_output``, the others and the aggregates are written (was: a traceback)."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png(16, 16))
    (src / "sub" / "b.png").write_bytes(png(16, 16))
    out.mkdir()
    (out / "sub").write_bytes(b"a file in the way")
    summary = run(PredictOptions((str(src),), out, recursive=True), StubDetector(), progress=None)
    assert (summary.images, summary.failed) == (1, 1)
    assert summary.failures[0][1].startswith("unwritable_output: cannot write the outputs of sub/b.png")
    assert [json.loads(line)["file"] for line in (out / "predictions.jsonl").read_text().splitlines()] == ["a.png"]
