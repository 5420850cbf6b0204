"""``detect.Detector``: the Python object. Loads by family, weights name or file; takes paths, bytes, arrays and PIL
images alike; finds the drawn shape (checked against the generated scene's ground truth); gives the same
detections as ``detect predict`` for the same image; refuses bad input with our error codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detect import cli
from detect.ops.boxes import box_iou


@pytest.fixture(scope="module")
def det():
    from detect import Detector

    return Detector("faster_rcnn", device="cpu")


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, dict]:
    from detect.data.shapes import ShapesDataset

    return ShapesDataset()[0]


def test_import_detect_stays_light() -> None:
    code = "import sys, detect; assert 'torch' not in sys.modules; from detect import Detector; assert 'torch' in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_finds_the_drawn_shape_from_every_kind_of_input(det, scene, tmp_path: Path) -> None:
    image, target = scene
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    results = det([path, str(path), path.read_bytes(), image, Image.open(path), rgba])
    assert len(results) == 6
    first = results[0]
    truth = torch.from_numpy(target["boxes"])
    assert len(first) >= 1 and first.scores.min() >= 0.25  # the default threshold for people
    assert float(box_iou(torch.from_numpy(first.boxes[:1]), truth)[0].max()) > 0.5
    assert first.labels[0] == int(target["labels"][0]) and first.names[0] == det.class_names[first.labels[0] - 1]
    for other in results[1:]:
        assert np.array_equal(other.boxes, first.boxes) and np.array_equal(other.labels, first.labels)
    one = det(image)  # one image in, one Result out
    assert np.array_equal(one.boxes, first.boxes) and one.source == "image 0" and results[0].source == str(path)
    assert [d.class_name for d in one] == one.names and one.class_names == det.class_names


def test_same_detections_as_detect_predict(det, scene, tmp_path: Path) -> None:
    image, _ = scene
    path = tmp_path / "in" / "scene.png"
    path.parent.mkdir()
    Image.fromarray(image).save(path)
    out = tmp_path / "out"
    assert cli.main(["predict", str(path), "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "scene.png.json").read_text()) == det(path).to_json()
    # on a busier scene the model's own threshold (0.01) keeps weak boxes: the default is exactly those >= 0.25
    from detect.data.shapes import ShapesDataset

    busy = ShapesDataset()[3][0]
    everything, default = det(busy, score_threshold=0.0), det(busy)
    assert len(everything) > len(default)
    assert np.array_equal(default.scores, everything.scores[everything.scores >= 0.25])


def test_results_draw_save_and_tabulate(det, scene, tmp_path: Path) -> None:
    from detect.drawing import PALETTE

    image, _ = scene
    result = det(image)
    picture = result.plot(line_width=3, hide_labels=True)
    assert picture.shape == image.shape and picture.dtype == np.uint8
    x1, y1, x2, y2 = (int(round(v)) for v in result.boxes[0])
    assert tuple(picture[(y1 + y2) // 2, x1 + 1]) == PALETTE[(result.labels[0] - 1) % 20]
    assert (picture[y2 + 5 :, :] == image[y2 + 5 :, :]).all() or y2 + 5 >= image.shape[0]  # nothing drawn below
    saved = result.save(tmp_path / "scene.jpg")
    assert Image.open(saved).format == "JPEG"
    with pytest.raises(Exception) as refused:
        result.save(tmp_path / "scene.gif")
    assert getattr(refused.value, "code", None) == "config_error"
    pandas = pytest.importorskip("pandas")
    table = result.to_pandas()
    assert isinstance(table, pandas.DataFrame) and list(table["class_name"]) == result.names
    assert np.allclose(table[["x1", "y1", "x2", "y2"]].to_numpy(), result.boxes, atol=0.01)


def test_bad_models_and_inputs_are_our_errors(det, tmp_path: Path) -> None:
    from detect import DetectError, Detector

    def code(call) -> str:
        with pytest.raises(DetectError) as err:
            call()
        return err.value.code

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert code(lambda: Detector("no_such_model")) == "unknown_model"
    assert code(lambda: Detector(tmp_path / "missing.safetensors")) == "weights_not_found"
    assert code(lambda: Detector("fasterrcnn_resnet50_fpn")) == "unknown_model"  # no weights: says how to get some
    assert code(lambda: Detector(3)) == "unknown_model"
    assert code(lambda: Detector("faster_rcnn", score_threshold=2.0)) == "config_error"
    assert code(lambda: det(tmp_path / "missing.jpg")) == "unreadable_file"
    assert code(lambda: det(text)) == "unsupported_format"
    assert code(lambda: det(b"not an image")) == "unsupported_format"
    assert code(lambda: det(12)) == "unsupported_input"
    assert code(lambda: det(np.zeros((8, 8, 3), np.float32))) == "unsupported_input"
    assert code(lambda: det(np.zeros((8, 8, 2), np.uint8))) == "unsupported_input"
    assert code(lambda: det(np.zeros((8, 8, 3), np.uint8), classes=["zebra"])) == "unknown_class"
    assert code(lambda: det(np.zeros((8, 8, 3), np.uint8), nonsense=1)) == "config_error"


def test_slice_and_video_are_the_cli_s_functions(det, tmp_path: Path) -> None:
    """Detector(slice=...) gives what detect.slicing.detect_sliced gives; Detector.video what iter_video_results
    gives (the object is the path: the same functions as detect predict --slice and detect predict clip.mp4)."""
    from detect.data.shapes_video import MovingShapesConfig, moving_shapes, write_video
    from detect.engines.video import iter_video_results
    from detect.inference import Refinement
    from detect.slicing import SliceOptions, detect_sliced

    frames = [image for image, _ in moving_shapes(MovingShapesConfig(frames=3, width=192, height=160, objects=2,
                                                                     size=(60.0, 80.0)))]
    big = np.concatenate([frames[0], frames[1]], axis=1)  # 384 x 160
    sliced = det(big, slice=128, overlap=0.25)
    (expected,) = detect_sliced(det.model, [big], SliceOptions(128, 0.25, batch_size=det.batch_size))
    expected = Refinement(0.25).apply(expected.to("cpu"))
    assert np.array_equal(sliced.boxes, expected.boxes.numpy()) and np.array_equal(sliced.scores, expected.scores.numpy())

    clip = write_video(tmp_path / "clip.mp4", frames, fps=10.0)
    ours = [r.to_json(det.class_names) for r in det.video(str(clip), track=True)]
    theirs = [r.to_json(det.class_names) for r in iter_video_results(
        det.model, str(clip), batch_size=det.batch_size, refinement=Refinement(0.25), track=True)]
    assert len(ours) == 3 and ours == theirs
    from detect.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'slize'"):
        det(big, slize=128)


def test_max_pixels_above_pillows_ceiling_takes_effect(det, tmp_path: Path) -> None:
    """Detector(max_pixels=...) raises Pillow's process-wide bomb ceiling as detect predict --max-pixels does; the
    default refuses the same image with our code."""
    from PIL import Image as PILImage

    from detect import Detector
    from detect.errors import ImageTooLargeError

    path = tmp_path / "wide.png"
    PILImage.new("RGB", (9_600, 9_600)).save(path)  # 92 MP: above Pillow's 89 MP and our 40 MP defaults
    with pytest.raises(ImageTooLargeError):
        det(str(path))
    saved = PILImage.MAX_IMAGE_PIXELS
    try:
        big = Detector("faster_rcnn", device="cpu", max_pixels=100_000_000)
        assert big(str(path), slice=4800).to_json()["width"] == 9_600
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved
