"""Inside-the-model preprocessing for two-stage detectors: normalise, resize, pad into a batch; and back.

Images enter as the library's public forms (RGB ``uint8`` ``HxWx3`` arrays, or float ``(3, H, W)`` tensors in
[0, 1]) and leave as one padded ``(B, 3, H, W)`` tensor plus each image's resized size. Detections are mapped
back to the original pixels by :meth:`RCNNTransform.postprocess`.

Decisions:

- The arithmetic is torchvision's ``GeneralizedRCNNTransform`` step for step, so a torchvision checkpoint sees the
  same pixels: normalise ``(x - mean) / std`` first, then resize with one scale factor
  ``min(min_size / short_side, max_size / long_side)`` to ``(int(h * scale), int(w * scale))`` by bilinear
  interpolation (``align_corners=False``), then pad at the bottom and right with zeros to a multiple of
  ``size_divisible``. Boxes are rescaled by float32 ratios ``new_size / old_size`` per axis.
- Batched: images of the same size (and the same target size) are stacked and normalised and resized in one
  ``interpolate`` call; resizing images of different sizes needs one call per distinct size. Target and output
  boxes of the whole batch are rescaled in one multiplication.
- Multi-scale training: ``min_size`` may list several short sides; in training mode each image draws one with
  ``torch.empty(1).uniform_`` on the CPU generator, exactly as torchvision does, so a seed draws the same sizes
  AND leaves the generator in the same state for the samplers that follow. In eval mode the last entry is used.
- Batch invariance: ``forward`` pads the whole batch to its largest size, as torchvision does (its parity tests
  and checkpoints rely on it), but the detectors call :meth:`RCNNTransform.grouped` instead, which pads every
  image only to its own size rounded up to ``size_divisible`` and batches together the images whose padded size
  is the same. Padding is not neutral for a CNN: GroupNorm's statistics include the padded zeros, a stride-2 conv
  writes non-zero activations one cell into the padded zone (its window still touches the image's last row), and
  any norm or bias makes the whole zone non-zero for the next layer, whose windows then read it instead of the
  zeros of the conv's own padding; the RPN also scores anchors over the padded zone. With ``grouped`` an image is
  computed on exactly the pixels it would be alone, whatever its batchmates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detect.ops.threads import one_thread

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ImageInput = Union[np.ndarray, Tensor]


@dataclass(frozen=True)
class TransformConfig:
    """Resizing and normalisation of a detector's input. Defaults are torchvision's COCO settings (the paper
    used a 600-pixel short side and a 1000-pixel cap: ``TransformConfig(min_size=(600,), max_size=1000)``)."""

    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    size_divisible: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.min_size, int):
            object.__setattr__(self, "min_size", (self.min_size,))
        if not self.min_size or min(self.min_size) < 1 or self.max_size < 1 or self.size_divisible < 1:
            raise ValueError(f"invalid sizes in {self}")


@dataclass
class ImageBatch:
    """A padded batch: ``tensors (B, 3, H, W)`` with each image at the top left, ``image_sizes`` the resized
    ``(h, w)`` of each image before padding and ``original_sizes`` its ``(h, w)`` as given. Satisfies
    ``proposals.anchors.ImageBatch``."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


@dataclass
class PaddedGroup:
    """The images of a batch that share one padded size (see :meth:`RCNNTransform.grouped`): their positions
    ``indices`` in the batch, in order, their :class:`ImageBatch` and their targets (``None`` without targets)."""

    indices: list[int]
    batch: ImageBatch
    targets: list[dict[str, Tensor]] | None


def as_image_tensor(image: ImageInput, device: torch.device | str | None = None) -> Tensor:
    """One image in the model-facing form: float ``(3, H, W)`` in [0, 1] on ``device``.

    Accepts an RGB ``uint8`` ``HxWx3`` NumPy array (divided by 255 after the move, so only bytes travel) or a
    floating ``(3, H, W)`` tensor (returned as is, moved to ``device`` when one is given).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image arrays must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
        if not image.flags.writeable:  # e.g. a decoded buffer: torch warns on read-only memory, so copy (bytes only)
            image = image.copy()
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device)  # (H, W, 3) uint8
        return pixels.permute(2, 0, 1).float().div(255)  # (3, H, W)
    if isinstance(image, Tensor):
        if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be float (3, H, W) in [0, 1], got {image.dtype} {tuple(image.shape)}")
        return image if device is None else image.to(device)
    raise TypeError(f"an image must be a numpy array or a torch tensor, got {type(image).__name__}")


def as_target(target: Mapping[str, object], device: torch.device | str | None = None) -> dict[str, object]:
    """A target dict with its array entries (NumPy arrays or tensors: ``boxes``, ``labels``, ...) as tensors on
    ``device``; other entries (an image id) unchanged."""
    return {
        key: torch.as_tensor(value).to(device) if isinstance(value, (np.ndarray, Tensor)) else value
        for key, value in target.items()
    }


def as_image_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """A non-empty list of images from one image, a list of them, or a ``(B, 3, H, W)`` tensor."""
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 3:
        return [images]
    if isinstance(images, Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, (list, tuple)) and len(images) > 0:
        return list(images)
    raise ValueError("images must be an image, a (B, 3, H, W) tensor or a non-empty list of images")


def resized_size(size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """The ``(h, w)`` torchvision's transform resizes ``size`` to: the short side to ``min_size`` unless the long
    side would exceed ``max_size``, with the same float arithmetic and truncation as ``F.interpolate``'s
    ``recompute_scale_factor=True``. A side that would round to 0 (aspect ratios beyond ``max_size : 1``, where
    torchvision fails) is kept at 1 pixel."""
    height, width = size
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(int(height * scale), 1), max(int(width * scale), 1)


def shrink_to_input(
    image: np.ndarray, boxes: Mapping[str, np.ndarray], min_size: int, max_size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """A training image brought to the size :class:`RCNNTransform` would resize it to, ahead of the model: the
    same size (:func:`resized_size`), the same bilinear ``F.interpolate`` on float pixels, rounded back to
    ``uint8`` ``(h, w, 3)``; ``boxes`` (name -> ``(N, 4)`` xyxy) scaled by :func:`rescale_boxes`, bit for bit as
    the model would. The model then finds the image at its size, skips its resize and scales the boxes by 1.

    What it buys: the loader's photometric jitter, the float conversion and the normalisation then touch the
    input's pixels, not the photo's (a 12 MP photo is 250 times a 160-pixel input). What differs from the model's
    own resize: the rounding to ``uint8`` (at most half a grey level), and the interpolation runs on 0-255 values
    before the normalisation instead of after it (the same linear map, a last-bit difference).

    None when the model would not shrink the image (an enlargement would gain nothing and add the rounding), or
    when it would resize the result again: ``resized_size`` of the result must be the result (for about 2 % of
    sizes the truncation makes the short side one pixel short, and the model would then resize a second time;
    those images stay as they are)."""
    height, width = image.shape[:2]
    size = resized_size((height, width), min_size, max_size)
    if size[0] * size[1] >= height * width or resized_size(size, min_size, max_size) != size:
        return None
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    with one_thread(pixels):  # its last bits would follow the thread count (detect.ops.threads)
        resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    out = resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    names = list(boxes)
    scaled = rescale_boxes([torch.as_tensor(np.asarray(boxes[n], np.float32).reshape(-1, 4)) for n in names],
                           [(height, width)] * len(names), [size] * len(names))
    return out, {n: b.numpy() for n, b in zip(names, scaled)}


def rescale_boxes(
    boxes: Sequence[Tensor], old_sizes: Sequence[tuple[int, int]], new_sizes: Sequence[tuple[int, int]]
) -> list[Tensor]:
    """Scale each image's ``(N_i, 4)`` xyxy boxes from ``old_sizes[i]`` to ``new_sizes[i]`` pixels, all images in
    one multiplication. Ratios are float32 ``new / old`` per axis, as torchvision's ``resize_boxes``."""
    if not boxes:
        return []
    device = boxes[0].device
    new = torch.tensor(new_sizes, dtype=torch.float32, device=device)  # (B, 2) as (h, w)
    old = torch.tensor(old_sizes, dtype=torch.float32, device=device)
    ratios = (new / old)[:, [1, 0, 1, 0]]  # (B, 4) as (w, h, w, h)
    counts = [len(b) for b in boxes]
    per_box = ratios.repeat_interleave(torch.tensor(counts, device=device), dim=0, output_size=sum(counts))  # (N, 4)
    return list((torch.cat(list(boxes)) * per_box).split(counts))


class RCNNTransform(nn.Module):
    """Normalise, resize and batch images (and their targets' boxes) for an R-CNN style detector.

    ``forward(images, targets=None, device=None)`` returns ``(ImageBatch, targets)``: the targets are new dicts
    with the boxes rescaled to the resized images, array entries as tensors on the images' device. The module has no
    parameters or buffers; images are moved to ``device`` when given (the detector passes its own).
    ``grouped(...)`` takes the same arguments and returns the batch cut into :class:`PaddedGroup` s by padded size.
    """

    def __init__(self, config: TransformConfig = TransformConfig()) -> None:
        super().__init__()
        self.config = config

    def target_short_sides(self, count: int) -> list[int]:
        """The short side each of ``count`` images is resized to (random per image in training)."""
        sides = self.config.min_size
        if not self.training:
            return [sides[-1]] * count
        return [sides[int(torch.empty(1).uniform_(0.0, float(len(sides))).item())] for _ in range(count)]

    def normalize_and_resize(self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """``(image - mean) / std`` then bilinear resize of each ``(3, h, w)`` image to ``sizes[i]``; images that
        share their input and output size go through one call."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (image, size) in enumerate(zip(images, sizes)):
            groups[(tuple(image.shape), size)].append(index)
        first = images[0]
        mean = torch.as_tensor(self.config.image_mean, dtype=first.dtype, device=first.device)[:, None, None]
        std = torch.as_tensor(self.config.image_std, dtype=first.dtype, device=first.device)[:, None, None]
        out: list[Tensor] = [first] * len(images)
        for (_, size), members in groups.items():
            stack = torch.stack([images[i] for i in members])  # (k, 3, h, w)
            resized = (stack - mean) / std
            if size != tuple(stack.shape[-2:]):  # a same-size bilinear resize is the identity: skip it
                with one_thread(resized):  # its last bits would follow the thread count (detect.ops.threads)
                    resized = F.interpolate(resized, size=size, mode="bilinear", align_corners=False)
            for i, image in zip(members, resized):  # (k, 3, h', w') -> k views
                out[i] = image
        return out

    def padded_size(self, size: Sequence[int]) -> tuple[int, int]:
        """``(h, w)`` rounded up to multiples of ``size_divisible``: the size an image is padded to alone."""
        step = self.config.size_divisible
        return -(-int(size[0]) // step) * step, -(-int(size[1]) // step) * step

    def pad(self, images: Sequence[Tensor], size: tuple[int, int] | None = None) -> Tensor:
        """Zero-pad ``(3, h_i, w_i)`` images at the bottom and right into ``(B, 3, H, W)``; ``(H, W)`` is ``size``
        when given (at least every image's), else the largest sides rounded up to ``size_divisible``."""
        if size is None:
            size = self.padded_size((max(img.shape[1] for img in images), max(img.shape[2] for img in images)))
        batch = images[0].new_zeros((len(images), images[0].shape[0], *size))
        for i, image in enumerate(images):  # B copies into the padded tensor
            batch[i, :, : image.shape[1], : image.shape[2]].copy_(image)
        return batch

    def padded_groups(self, images: Sequence[Tensor]) -> list[tuple[tuple[int, int], list[int]]]:
        """``(padded size, positions)`` of the images ``(3, h_i, w_i)`` that share a :meth:`padded_size`, in
        order of first appearance."""
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            members[self.padded_size(image.shape[1:])].append(index)
        return list(members.items())

    def resize(
        self,
        images: Sequence[ImageInput] | ImageInput,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[list[Tensor], list[tuple[int, int]], list[tuple[int, int]], list[dict[str, Tensor]] | None]:
        """Normalised and resized images ``(3, h_i, w_i)``, their resized and original sizes, and the targets
        with boxes in resized pixels (``None`` without targets): everything but the padding."""
        images = as_image_list(images)
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images")
        tensors = [as_image_tensor(image, device) for image in images]
        original = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        sides = self.target_short_sides(len(tensors))
        sizes = [resized_size(size, side, self.config.max_size) for size, side in zip(original, sides)]
        resized = self.normalize_and_resize(tensors, sizes)
        if targets is None:
            return resized, sizes, original, None
        moved = [as_target(t, tensors[0].device) for t in targets]
        boxes = rescale_boxes([t["boxes"] for t in moved], original, sizes)
        return resized, sizes, original, [{**t, "boxes": b} for t, b in zip(moved, boxes)]

    def forward(
        self,
        images: Sequence[ImageInput] | ImageInput,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        """torchvision's transform: the whole batch padded to its largest size (see :meth:`grouped`)."""
        resized, sizes, original, targets = self.resize(images, targets, device)
        return ImageBatch(self.pad(resized), sizes, original), targets

    def grouped(
        self,
        images: Sequence[ImageInput] | ImageInput,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        device: torch.device | str | None = None,
    ) -> list[PaddedGroup]:
        """Like :meth:`forward`, but each image is padded only to its own :meth:`padded_size` and the images that
        share one form a batch: one :class:`PaddedGroup` per padded size, in order of first appearance. A batch
        of same-size images is one group, the same tensors as :meth:`forward`'s."""
        resized, sizes, original, targets = self.resize(images, targets, device)
        return [
            PaddedGroup(
                indices,
                ImageBatch(
                    self.pad([resized[i] for i in indices], size),
                    [sizes[i] for i in indices],
                    [original[i] for i in indices],
                ),
                None if targets is None else [targets[i] for i in indices],
            )
            for size, indices in self.padded_groups(resized)
        ]

    def postprocess(self, boxes: Sequence[Tensor], batch: ImageBatch) -> list[Tensor]:
        """Map each image's ``(N_i, 4)`` boxes from resized to original pixels (one multiplication)."""
        return rescale_boxes(boxes, batch.image_sizes, batch.original_sizes)
