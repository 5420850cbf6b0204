"""``detect predict`` on videos (tracking, stride, annotated video, resume, failures), URLs, stdin, slices and
``--max-pixels``, with the bundled shapes model on tiny generated inputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import pytest

from detect import cli
from detect.data.shapes_video import MovingShapesConfig, moving_shapes, write_video
from detect.engines.video import iter_video_results
from detect.inference import DEFAULT_SCORE_THRESHOLD, Refinement, load_model
from tests.helpers import capture_failing_after, image_server, png

FRAMES = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    frames = [image for image, _ in moving_shapes(MovingShapesConfig(frames=FRAMES, width=192, height=160, objects=2,
                                                                     size=(60.0, 80.0)))]
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=10.0)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_video_with_tracking_stride_and_annotated_video(clip, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["predict", str(clip), "--out", str(out), "--track", "--save-video", "--vid-stride", "2",
                     "--score-threshold", "0.5"])
    assert code == 0
    records = lines(out / "clip.mp4.jsonl")
    assert [r["frame"] for r in records] == [0, 2, 4]
    assert [r["timestamp_s"] for r in records] == pytest.approx([0.0, 0.2, 0.4])
    assert all(r["width"] == 192 and r["height"] == 160 for r in records)
    tracked = [d["track_id"] for r in records for d in r["detections"]]
    for r in records:  # two shapes, two tracks, kept from frame to frame; a duplicate guess has no track (null)
        ids = [d["track_id"] for d in r["detections"] if d["track_id"] is not None]
        assert sorted(ids) == [1, 2]
    assert all(d["score"] >= 0.5 for r in records for d in r["detections"])
    video = cv2.VideoCapture(str(out / "clip.mp4.annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (192, 160)
    assert video.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    video.release()
    summary = json.loads((out / "clip.mp4.summary.json").read_text())
    assert summary["frames"] == 3 and summary["finished"] and sum(summary["detections"].values()) == len(tracked)
    assert "3 frames" in capsys.readouterr().err
    assert not list(out.glob(".*tmp*"))


def test_resume_continues_after_the_last_complete_line(clip, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(["predict", str(clip), "--out", str(full)]) == 0
    expected = (full / "clip.mp4.jsonl").read_text()
    resumed.mkdir()
    kept = "".join(expected.splitlines(keepends=True)[:3])
    (resumed / "clip.mp4.jsonl").write_text(kept + '{"frame": 3, "timestamp_s": 0.3, "wid')  # torn by a kill
    assert cli.main(["predict", str(clip), "--out", str(resumed), "--resume", "--save-video"]) == 0
    assert (resumed / "clip.mp4.jsonl").read_text() == expected  # a frame's detections do not depend on the run
    summary = json.loads((resumed / "clip.mp4.summary.json").read_text())
    assert summary["frames"] == FRAMES and summary["frames_this_run"] == FRAMES - 3
    video = cv2.VideoCapture(str(resumed / "clip.mp4.annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES  # the done frames redrawn from the JSONL
    video.release()
    assert cli.main(["predict", str(clip), "--out", str(resumed), "--resume"]) == 0  # finished: skipped
    assert (resumed / "clip.mp4.jsonl").read_text() == expected


def test_a_corrupt_frame_stops_the_video_keeping_what_was_written(clip, tmp_path, monkeypatch, capsys):
    real = cv2.VideoCapture
    monkeypatch.setattr(cv2, "VideoCapture", capture_failing_after(4))
    out = tmp_path / "out"
    assert cli.main(["predict", str(clip), "--out", str(out), "--save-video", "--batch-size", "3"]) == 1
    err = capsys.readouterr().err
    assert "error[corrupt_frame]" in err and "frame 4" in err
    assert [r["frame"] for r in lines(out / "clip.mp4.jsonl")] == [0, 1, 2, 3]
    summary = json.loads((out / "clip.mp4.summary.json").read_text())
    assert summary["error"]["code"] == "corrupt_frame" and summary["error"]["frame"] == 4 and not summary["finished"]
    monkeypatch.setattr(cv2, "VideoCapture", real)
    video = cv2.VideoCapture(str(out / "clip.mp4.annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 4  # finalised, readable
    video.release()


def test_unreadable_video_and_images_in_one_run(clip, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[: len(clip.read_bytes()) // 3])
    image = tmp_path / "a.png"
    image.write_bytes(png(64, 48))
    out = tmp_path / "out"
    assert cli.main(["predict", str(broken), str(image), "--out", str(out)]) == 1
    assert "error[unreadable_video]" in capsys.readouterr().err
    assert (out / "a.png.json").is_file()


def test_generator_gives_the_same_results_as_the_cli(clip, tmp_path):
    model = load_model("faster_rcnn_shapes")
    refinement = Refinement(DEFAULT_SCORE_THRESHOLD)  # the CLI's default threshold for people
    results = list(iter_video_results(model, str(clip), batch_size=1, refinement=refinement))  # the CLI batches 4
    assert cli.main(["predict", str(clip.parent / "*.mp4"), "--out", str(tmp_path)]) == 0  # a glob of videos
    assert [r.to_json(model.class_names) for r in results] == lines(tmp_path / "clip.mp4.jsonl")


def test_url_and_stdin_inputs(tmp_path, monkeypatch):
    with image_server() as base:
        out = tmp_path / "out"
        assert cli.main(["predict", f"{base}/image.png", "--out", str(out), "--allow-private-urls"]) == 0
        result = json.loads((out / "urls" / "127.0.0.1" / "image.png.json").read_text())
        assert (result["width"], result["height"]) == (32, 24)
        listing = tmp_path / "urls.txt"
        listing.write_text(f"{base}/image.png\n{base}/missing\n")
        refused = tmp_path / "refused"
        assert cli.main(["predict", str(listing), "--out", str(refused)]) == 1  # loopback without the flag
        records = [json.loads(line) for line in (refused / "manifest.jsonl").read_text().splitlines()]
        records = [r for r in records if "input" in r]  # the first line records the run's settings
        assert {r["code"] for r in records} == {"url_refused"} and len(records) == 2
    stdin = tmp_path / "stdin"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(png(40, 30))))
    assert cli.main(["predict", "-", "--out", str(stdin)]) == 0
    assert json.loads((stdin / "stdin.json").read_text())["width"] == 40


def test_slice_flags_and_max_pixels(tmp_path, monkeypatch, capsys):
    from benchmarks.sliced import make_scene
    from PIL import Image

    scene, target = make_scene(1280, 1280, 400, (140.0, 260.0), seed=1)
    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    whole, sliced = tmp_path / "whole", tmp_path / "sliced"
    common = ["--score-threshold", "0.5"]
    assert cli.main(["predict", str(path), "--out", str(whole), *common]) == 0
    assert cli.main(["predict", str(path), "--out", str(sliced), "--slice", "640", "--overlap", "0.2", *common]) == 0
    found = lambda out: len(json.loads((out / "scene.png.json").read_text())["detections"])  # noqa: E731
    assert found(sliced) >= 0.75 * len(target["boxes"]) > found(whole)
    assert cli.main(["predict", str(path), "--out", str(tmp_path / "x"), "--overlap", "0.3"]) == 2
    assert cli.main(["predict", str(path), "--out", str(tmp_path / "x"), "--slice", "640", "--overlap", "1.5"]) == 2
    assert cli.main(["predict", str(path), "--out", str(tmp_path / "x"), "--track"]) == 2  # no video given
    capsys.readouterr()
    # --max-pixels below the image refuses it; above Pillow's own ceiling it raises that ceiling deliberately
    assert cli.main(["predict", str(path), "--out", str(tmp_path / "small"), "--max-pixels", "1000000"]) == 1
    assert "image_too_large" in (tmp_path / "small" / "manifest.jsonl").read_text()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    assert cli.main(["predict", str(path), "--out", str(tmp_path / "big"), "--max-pixels", "50000000",
                     "--slice", "640", *common]) == 0
    assert Image.MAX_IMAGE_PIXELS == 50_000_000
