"""An image's detections do not depend on the other images in its batch, the batch size, the thread count or
``--proposal-workers`` (issues 12 and 21).

The reference for every image is the detector run on that image alone; a batch of any composition (sizes mixed,
repeated, in any order) must give each image the same raw float32 boxes, scores and labels, bitwise, on the CPU
(on CUDA, where a padded-size group is one batch and cuDNN picks kernels by batch size, within 1e-4). Every
detector family runs with random weights (many low-confidence detections, so that near-threshold decisions are
exercised) and with the bundled weights (the models users get), through :func:`detect.inference.load_model` as
every engine loads them. The same holds end to end for ``detect predict``: ``--batch-size 1`` and ``--batch-size
4`` (and, for the region detectors, ``--proposal-workers 2``) write byte-equal files.

No test compares against a stored value: each compares two runs in one process, so the tests hold on any CPU
whatever its vector width (run them under ``ATEN_CPU_CAPABILITY=default`` and ``=avx2`` too, as ``.ci/run`` does).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detect.data.shapes import SHAPES_CLASSES, ShapesConfig, ShapesDataset
from detect.detectors import DETECTORS
from detect.inference import load_model
from detect.structures import Detections
from proposals.selective_search import selective_search

pytestmark = pytest.mark.exact

CUDA_TOLERANCE = 1e-4  # CUDA only: a padded-size group runs as one batch there, and cuDNN picks kernels by batch size

# (height, width): two of the same size, two that differ but pad to the same size once resized (160 x 240 and
# 160 x 256, padded to 160 x 256), portrait and landscape, and one whose long side hits max_size (40 x 120).
SIZES = ((96, 96), (96, 96), (100, 150), (100, 160), (120, 90), (64, 128), (40, 120), (72, 100))
RANDOM = ("fasterrcnn_tiny", "sppnet_tiny", "rcnn_tiny")
BUNDLED = ("faster_rcnn_shapes", "sppnet_shapes", "rcnn_shapes")


@functools.lru_cache(maxsize=None)
def pool() -> tuple[np.ndarray, ...]:
    """Shapes images (RGB uint8) of :data:`SIZES`, each a different scene."""
    images = []
    for index, (height, width) in enumerate(SIZES):
        config = ShapesConfig(num_images=1, image_size=height, image_size_max=None, seed=100 + index)
        scene = ShapesDataset(config)[0][0]  # (h, h, 3)
        images.append(np.ascontiguousarray(np.asarray(Image.fromarray(scene).resize((width, height)))))
    return tuple(images)


@functools.lru_cache(maxsize=None)
def model(name: str, device: str) -> torch.nn.Module:
    """A tiny detector with random weights (seeded) or bundled weights, in eval mode on ``device``."""
    if name in BUNDLED:
        return load_model(name, device)
    torch.manual_seed(0)
    return DETECTORS[name].build(SHAPES_CLASSES).to(device).eval()


@functools.lru_cache(maxsize=None)
def alone(name: str, device: str, index: int) -> Detections:
    """The reference: image ``index`` of the pool run on its own."""
    with torch.inference_mode():
        return model(name, device)([pool()[index]])[0][0]


def assert_same(actual: Detections, expected: Detections, where: str, exact: bool = True) -> None:
    """Bitwise on the CPU: raw float32 boxes and scores, int64 labels, not rounded JSON (``exact=False``: within
    :data:`CUDA_TOLERANCE`, for what runs as a batch on purpose)."""
    assert actual.image_size == expected.image_size, where
    assert torch.equal(actual.labels.cpu(), expected.labels.cpu()), f"{where}: labels differ"
    if exact and actual.boxes.device.type == "cpu":
        assert torch.equal(actual.boxes, expected.boxes), f"{where}: boxes differ"
        assert torch.equal(actual.scores, expected.scores), f"{where}: scores differ"
        return
    torch.testing.assert_close(actual.boxes, expected.boxes, rtol=0, atol=CUDA_TOLERANCE, msg=f"{where}: boxes")
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=CUDA_TOLERANCE, msg=f"{where}: scores")


def check_batch(name: str, device: str, indices: list[int]) -> None:
    with torch.inference_mode():
        detections, _ = model(name, device)([pool()[i] for i in indices])
    for position, (index, actual) in enumerate(zip(indices, detections)):
        assert_same(actual, alone(name, device, index), f"{name}: image {index} at {position} of {indices}")


batches = st.lists(st.integers(0, len(SIZES) - 1), min_size=2, max_size=4)
property_settings = settings(
    max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def test_the_pool_mixes_padded_sizes() -> None:
    """The pool has what the property needs: repeated sizes, equal padded sizes from different sizes, and
    different padded sizes (Faster R-CNN's tiny transform: short side 160, long side at most 400, multiples of 32)."""
    transform = model("fasterrcnn_tiny", "cpu").transform
    resized = transform.resize(list(pool()))[0]
    padded = [transform.padded_size(image.shape[1:]) for image in resized]
    assert padded[2] == padded[3] == (160, 256) and resized[2].shape != resized[3].shape
    assert resized[6].shape[1:] == (133, 400)
    assert len(set(padded)) >= 5


def test_grouped_pads_each_image_as_it_would_be_padded_alone() -> None:
    transform = model("fasterrcnn_tiny", "cpu").transform
    images = list(pool())
    groups = transform.grouped(images)
    assert sorted(index for group in groups for index in group.indices) == list(range(len(images)))
    assert len(groups) < len(images)  # images of one padded size share a batch
    for group in groups:
        for row, index in enumerate(group.indices):
            alone, _ = transform([images[index]])
            assert torch.equal(group.batch.tensors[row], alone.tensors[0])
            assert group.batch.image_sizes[row] == alone.image_sizes[0]
            assert group.batch.original_sizes[row] == alone.original_sizes[0] == images[index].shape[:2]


@pytest.mark.parametrize("name", RANDOM)
@property_settings
@given(indices=batches)
def test_random_weights_detect_the_same_in_any_batch(name: str, device: torch.device, indices: list[int]) -> None:
    check_batch(name, str(device), indices)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
@property_settings
@given(indices=batches)
def test_bundled_weights_detect_the_same_in_any_batch(name: str, device: torch.device, indices: list[int]) -> None:
    check_batch(name, str(device), indices)


@pytest.mark.parametrize("name", BUNDLED)
def test_the_reported_pair(name: str, device: torch.device) -> None:
    """The issue's case: two images of different sizes, each alone and together, in both orders."""
    check_batch(name, str(device), [0, 3])
    check_batch(name, str(device), [3, 0])


def test_losses_of_a_mixed_batch_are_the_image_weighted_mean_of_its_groups() -> None:
    """With targets, a batch of two padded sizes gives each loss as the image-weighted mean of the two groups'
    (run here one after the other from the same seed, so the samplers draw the same anchors and RoIs)."""
    detector = model("fasterrcnn_tiny", "cpu")
    images = [pool()[i] for i in (0, 6, 1)]  # padded 160 x 160, 160 x 416, 160 x 160: groups {0, 2} and {1}
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([k])} for k in (1, 2, 3)]
    with torch.no_grad():
        torch.manual_seed(1)
        detections, mixed = detector(images, targets)
        torch.manual_seed(1)
        _, first = detector([images[0], images[2]], [targets[0], targets[2]])
        _, second = detector([images[1]], [targets[1]])
    assert set(mixed) == set(first) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    for key in mixed:
        torch.testing.assert_close(mixed[key], first[key] * (2 / 3) + second[key] / 3, rtol=1e-6, atol=1e-7)
    for index, actual in zip((0, 6, 1), detections):
        # with targets (losses) a padded-size group runs as one batch, as in training: equal up to float rounding
        assert_same(actual, alone("fasterrcnn_tiny", "cpu", index), f"image {index} with targets", exact=False)


def _write_pool(folder: Path) -> None:
    folder.mkdir()
    for index, image in enumerate(pool()):
        Image.fromarray(image).save(folder / f"{index}.png")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["faster_rcnn", "sppnet", "rcnn"])
def test_predict_batch_size_does_not_change_the_output_files(family: str, tmp_path: Path) -> None:
    from detect import cli  # imported here: a CLI broken mid-refactor fails this test only

    source = tmp_path / "images"
    _write_pool(source)
    written = {}
    for batch_size in (1, 4):
        out = tmp_path / f"batch{batch_size}"
        argv = ["predict", str(source), "--out", str(out), "--model", family, "--batch-size", str(batch_size)]
        assert cli.main([*argv, "--proposal-workers", "0"]) == 0
        written[batch_size] = {p.name: p.read_bytes() for p in sorted(out.glob("*.png.json"))}
    assert len(written[1]) == len(SIZES)
    assert written[1] == written[4]
    if family != "faster_rcnn":  # selective search in two worker processes: the same files
        out = tmp_path / "workers"
        argv = ["predict", str(source), "--out", str(out), "--model", family, "--batch-size", "3"]
        assert cli.main([*argv, "--proposal-workers", "2"]) == 0
        assert {p.name: p.read_bytes() for p in sorted(out.glob("*.png.json"))} == written[1]
    assert any(b'"detections": [{' in data or b'"detections":[{' in data for data in written[1].values())


# --- raw outputs, bitwise: batch mates, batch size, thread count, proposal workers (issue 21) ------------------


@functools.lru_cache(maxsize=None)
def proposals(name: str) -> tuple[torch.Tensor, ...]:
    """Selective search's boxes for every pool image (region detectors), computed once and given to every run,
    so that the runs below differ only in what they test."""
    return tuple(selective_search(image, model(name, "cpu").proposer.config) for image in pool())


def raw(name: str, indices: list[int], threads: int | None = None) -> list[Detections]:
    """The detector's raw per-image detections for pool ``indices`` as one batch, on ``threads`` intra-op threads
    (the process's count when ``None``)."""
    detector = model(name, "cpu")
    extra = {"proposals": [proposals(name)[i] for i in indices]} if hasattr(detector, "proposer") else {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.inference_mode():
            return list(detector([pool()[i] for i in indices], **extra)[0])
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def raw_alone(name: str) -> tuple[Detections, ...]:
    """The reference: every pool image alone, on one thread."""
    return tuple(raw(name, [i], threads=1)[0] for i in range(len(SIZES)))


def assert_all_alone(name: str, indices: list[int], detections: list[Detections], what: str) -> None:
    assert len(detections) == len(indices)
    for position, (index, actual) in enumerate(zip(indices, detections)):
        assert_same(actual, raw_alone(name)[index], f"{name}: image {index} at {position} of {indices}, {what}")


@pytest.mark.parametrize("name", BUNDLED)
def test_raw_outputs_do_not_depend_on_batch_mates_or_batch_size(name: str) -> None:
    """Batch sizes 1, 2 and 4 over the pool, in order and shuffled (different mates each time), repeats included."""
    assert sum(len(d) for d in raw_alone(name)) > 0, "the bundled model should detect something in the pool"
    order = [5, 0, 3, 1, 7, 2, 6, 4]
    for size in (2, 4):
        for sequence in (list(range(len(SIZES))), order):
            for lo in range(0, len(sequence), size):
                batch = sequence[lo : lo + size]
                assert_all_alone(name, batch, raw(name, batch), f"batch size {size}")
    assert_all_alone(name, [2, 2, 6], raw(name, [2, 2, 6]), "a repeated image")


@pytest.mark.parametrize("name", BUNDLED)
def test_raw_outputs_do_not_depend_on_the_thread_count(name: str) -> None:
    """1 thread (the reference) against 2 threads, alone and in a batch of 4 (the Ray engine's actors run on
    ``--cpus-per-actor`` threads, the local engine on the process's)."""
    for index in range(len(SIZES)):
        assert_same(raw(name, [index], threads=2)[0], raw_alone(name)[index], f"{name}: image {index}, 2 threads")
    assert_all_alone(name, [1, 6, 4, 3], raw(name, [1, 6, 4, 3], threads=2), "2 threads")


@pytest.mark.parametrize("name", ["rcnn_shapes", "sppnet_shapes"])
def test_proposal_workers_give_the_in_process_boxes(name: str) -> None:
    """``--proposal-workers 2`` (selective search in spawned processes, OpenCV on one thread) gives the boxes of
    the in-process search bitwise, hence the same detections."""
    from detect.engines.local import ProposalPool

    images = list(pool())
    search = ProposalPool.for_detector(model(name, "cpu"), 2)
    try:
        futures = search.submit(images)
        boxes = [search.result(future, image) for future, image in zip(futures, images)]
    finally:
        search.close()
    for index, (ours, theirs) in enumerate(zip(boxes, proposals(name))):
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs), f"{name}: image {index}'s proposals differ"
