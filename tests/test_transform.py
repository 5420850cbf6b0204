"""detect.transform against torchvision's GeneralizedRCNNTransform (the reference our checkpoints expect)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detect.transform import (
    IMAGENET_MEAN, IMAGENET_STD, RCNNTransform, TransformConfig, resized_size, shrink_to_input,
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torchvision's transform on one thread: ours always resizes on one (its bilinear kernel's last bits follow
    the thread count, see :mod:`detect.ops.threads`), so the bitwise comparison needs theirs on one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(min_size: int | tuple[int, ...] = 800, max_size: int = 1333) -> GeneralizedRCNNTransform:
    return GeneralizedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))


def random_targets(sizes: list[tuple[int, int]], generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    targets = []
    for h, w in sizes:
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(5, 2, generator=generator) * torch.tensor([w / 2, h / 2]) + 1
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.arange(1, 6)})
    return targets


@pytest.mark.exact
@pytest.mark.parametrize("min_size", [800, 480])  # 480: the 480x640 images keep their size
def test_batch_and_targets_match_torchvision_bitwise(
    min_size: int, generator: torch.Generator, one_thread: None
) -> None:
    sizes = [(480, 640), (300, 400), (480, 640), (333, 517), (1000, 300)]
    images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    targets = random_targets(sizes, generator)
    theirs, their_targets = reference(min_size).eval()(images, targets)
    ours, our_targets = RCNNTransform(TransformConfig(min_size=(min_size,))).eval()(images, targets)
    assert ours.image_sizes == theirs.image_sizes
    assert ours.original_sizes == sizes
    assert ours.tensors.shape == theirs.tensors.shape and ours.tensors.shape[-1] % 32 == 0
    assert torch.equal(ours.tensors, theirs.tensors)
    for a, b in zip(our_targets, their_targets):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    back = RCNNTransform().postprocess([t["boxes"] for t in our_targets], ours)
    assert ours.image_sizes[0] == (min_size, min_size * 4 // 3)
    for restored, original in zip(back, targets):
        torch.testing.assert_close(restored, original["boxes"], rtol=1e-5, atol=1e-3)


@given(h=st.integers(1, 2000), w=st.integers(1, 2000), min_size=st.integers(16, 800), max_size=st.integers(16, 1333))
def test_resized_size_matches_torchvision_interpolate(h: int, w: int, min_size: int, max_size: int) -> None:
    scale = min(min_size / min(h, w), max_size / max(h, w))
    if min(h, w) * scale < 1:  # torchvision fails on such extreme aspect ratios; we keep one pixel
        assert min(resized_size((h, w), min_size, max_size)) == 1
        return
    image = torch.zeros(1, 1, h, w)
    out = torch.nn.functional.interpolate(
        image, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )
    assert resized_size((h, w), min_size, max_size) == tuple(out.shape[-2:])


def test_uint8_arrays_equal_float_tensors(rng: np.random.Generator) -> None:
    array = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    transform = RCNNTransform(TransformConfig(min_size=(64,), max_size=100)).eval()
    a, _ = transform([array])
    b, _ = transform([tensor])
    c, _ = transform(array)  # a single image is a batch of one
    assert torch.equal(a.tensors, b.tensors) and torch.equal(a.tensors, c.tensors)
    assert a.image_sizes == [(64, 91)]


@pytest.mark.exact
def test_multiscale_training_draws_like_torchvision(one_thread: None) -> None:
    images = [torch.rand(3, 120, 160), torch.rand(3, 90, 100), torch.rand(3, 200, 150)]
    theirs_transform = reference((96, 128, 160), 1000).train()
    ours_transform = RCNNTransform(TransformConfig(min_size=(96, 128, 160), max_size=1000)).train()
    torch.manual_seed(3)
    theirs, _ = theirs_transform(images)
    after_theirs = torch.rand(4)
    torch.manual_seed(3)
    ours, _ = ours_transform(images)
    assert ours.image_sizes == theirs.image_sizes
    assert torch.equal(ours.tensors, theirs.tensors)
    assert torch.equal(torch.rand(4), after_theirs)  # the generator is left in the same state


def test_rejects_bad_images() -> None:
    transform = RCNNTransform()
    with pytest.raises(ValueError):
        transform([np.zeros((10, 10), dtype=np.uint8)])
    with pytest.raises(ValueError):
        transform([np.zeros((10, 10, 3), dtype=np.float32)])
    with pytest.raises(ValueError):
        transform([torch.zeros(3, 10, 10, dtype=torch.uint8)])
    with pytest.raises(ValueError):
        transform([])


def test_runs_on_the_device(device: torch.device) -> None:
    images = [np.zeros((40, 60, 3), dtype=np.uint8), torch.rand(3, 50, 50)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 20.0]]), "labels": torch.tensor([1])}] * 2
    batch, moved = RCNNTransform(TransformConfig(min_size=(32,), max_size=64)).eval()(images, targets, device=device)
    assert batch.tensors.device.type == device.type
    assert all(t["boxes"].device.type == device.type and t["labels"].device.type == device.type for t in moved)
    assert batch.tensors.shape == (2, 3, 32, 64)


@pytest.mark.parametrize("shape", [(333, 517), (1000, 300), (480, 640)])
def test_a_training_image_shrunk_ahead_gives_what_the_model_would(
    shape: tuple[int, int], rng: np.random.Generator, generator: torch.Generator, one_thread: None
) -> None:
    """The loader's shrink to the input size (``shrink_to_input``) against torchvision's transform of the whole
    photo: the same size, the boxes bit for bit, and the pixels within the rounding to uint8 (half a grey level,
    0.5 / 255 / std after normalisation, std >= 0.224), and our transform then leaves the size alone."""
    h, w = shape
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = random_targets([shape], generator)[0]["boxes"]
    side, max_size = 160, 288
    theirs, their_targets = reference(side, max_size).train()(
        [torch.from_numpy(image).permute(2, 0, 1).float().div(255)], [{"boxes": boxes, "labels": torch.arange(1, 6)}]
    )
    done = shrink_to_input(image, {"boxes": boxes.numpy()}, side, max_size)
    assert done is not None
    small, moved = done
    assert small.dtype == np.uint8 and small.shape[:2] == resized_size(shape, side, max_size)
    assert torch.equal(torch.from_numpy(moved["boxes"]), their_targets[0]["boxes"])
    ours, our_targets = RCNNTransform(TransformConfig(min_size=(side,), max_size=max_size)).train()(
        [small], [{"boxes": torch.from_numpy(moved["boxes"]), "labels": torch.arange(1, 6)}]
    )
    assert ours.image_sizes == theirs.image_sizes == [small.shape[:2]]
    assert torch.equal(our_targets[0]["boxes"], their_targets[0]["boxes"])  # scaled by exactly 1
    h2, w2 = ours.image_sizes[0]
    gap = (ours.tensors[0, :, :h2, :w2] - theirs.tensors[0, :, :h2, :w2]).abs().max().item()
    assert gap <= 0.5 / 255 / min(IMAGENET_STD) + 1e-5


def test_a_size_the_model_would_resize_twice_is_left_alone() -> None:
    """Where the truncation leaves the short side a pixel short, the model would resize the shrunk image again
    (a second blur that its own path does not have): such images are not shrunk, nor ones already at size."""
    side, max_size = 160, 288
    odd = next((h, w) for h in range(161, 2000) for w in (h + 7, 2 * h)
               if resized_size(resized_size((h, w), side, max_size), side, max_size) != resized_size((h, w), side, max_size))
    image = np.zeros((*odd, 3), np.uint8)
    assert shrink_to_input(image, {"boxes": np.zeros((0, 4), np.float32)}, side, max_size) is None
    fits = np.zeros((160, 200, 3), np.uint8)
    assert shrink_to_input(fits, {"boxes": np.zeros((0, 4), np.float32)}, side, max_size) is None
