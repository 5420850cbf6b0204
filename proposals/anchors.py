"""Anchors: the reference boxes the Region Proposal Network regresses from (Ren et al. 2015, section 3.1).

At every cell of a feature map sit ``len(sizes) * len(aspect_ratios)`` anchors centred on the cell's top-left
pixel in image coordinates. With a feature pyramid (Lin et al. 2017) each level gets its own size.

Decisions:

- Layout and rounding are torchvision's (``torchvision.models.detection.anchor_utils.AnchorGenerator``), so a
  head trained there predicts for the same anchor at the same index here: the zero-centred cell anchors are
  ``[-w/2, -h/2, w/2, h/2]`` rounded to whole pixels (half to even), aspect ratio ``r = h/w`` with ``h = s*sqrt(r)``
  and ``w = s/sqrt(r)``, ordered ratio-major then size; per level the anchors run row by row over the grid and,
  within a cell, through the cell anchors; levels are concatenated in order.
- By default a level's stride is derived, like torchvision, as ``padded_size // feature_size`` per axis. A fixed
  stride per level can be given instead (the single-level paper configuration uses 16): derived strides go wrong
  on small images whose backbone floors sizes (a 47-pixel side pooled four times is 2 cells: 47 // 2 = 23).
- Every image of a padded batch shares one grid, so ``forward`` returns ONE ``(sum_l H_l*W_l*A_l, 4)`` tensor
  rather than a list of identical copies; expand it if a per-image view is needed.
- Grids are cached per (feature sizes, strides, device, dtype, inference mode) in a small LRU. The cached tensor
  is returned as is: callers must not modify it in place.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

FPN_SIZES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
FPN_ASPECT_RATIOS: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5

_CACHE_LOCK = threading.Lock()  # guards every generator's cache: the service may run two forwards at once


class ImageBatch(Protocol):
    """A padded batch of images: what the RPN and the anchor generator read from their ``images`` argument.

    ``tensors`` is ``(B, C, H, W)`` (every image padded to the same ``H, W``, content at the top left) and
    ``image_sizes`` the ``(h, w)`` of each image before padding. torchvision's ``ImageList`` satisfies it.
    """

    tensors: Tensor
    image_sizes: list[tuple[int, int]]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred anchors of one level, float32 ``(len(aspect_ratios) * len(sizes), 4)``, ratio-major.

    The float32 operations follow torchvision's order (``1/sqrt(r)`` times the size, halved, rounded) so the
    results are bitwise the same, including which half-pixel values round up.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)  # (S,)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)  # (R,)
    h_factor = torch.sqrt(ratios)  # (R,)
    w_factor = 1 / h_factor
    widths = (w_factor[:, None] * scales[None, :]).reshape(-1)  # (R*S,)
    heights = (h_factor[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()  # (R*S, 4)


def shifted_anchors(base: Tensor, grid_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Tile ``base (A, 4)`` over a ``(H, W)`` grid with ``(stride_h, stride_w)``: ``(H*W*A, 4)``, row by row.

    Shifts are integers added to ``base``'s dtype, so the result is exact whatever the dtype can represent.
    """
    (height, width), (stride_h, stride_w) = grid_size, stride
    ys = torch.arange(height, dtype=torch.int64, device=base.device) * stride_h  # (H,)
    xs = torch.arange(width, dtype=torch.int64, device=base.device) * stride_w  # (W,)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)  # (H*W*A, 4)


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature maps, one set of sizes and aspect ratios per map.

    ``sizes[l]`` and ``aspect_ratios[l]`` give level ``l`` its ``len(sizes[l]) * len(aspect_ratios[l])`` anchors
    per location. The default is torchvision's FPN configuration (one size per level, 32 to 512, three ratios).
    ``strides`` fixes each level's stride in pixels; ``None`` derives it from the padded image size.
    The module has no parameters or buffers, so its (empty) state dict matches torchvision's.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = FPN_SIZES,
        aspect_ratios: Sequence[Sequence[float]] = FPN_ASPECT_RATIOS,
        strides: Sequence[int] | None = None,
        cache_size: int = 16,
    ) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"{len(sizes)} levels of sizes but {len(aspect_ratios)} of aspect ratios")
        if strides is not None and len(strides) != len(sizes):
            raise ValueError(f"{len(sizes)} levels of sizes but {len(strides)} strides")
        self.sizes = tuple(tuple(level) for level in sizes)
        self.aspect_ratios = tuple(tuple(level) for level in aspect_ratios)
        self.strides = None if strides is None else tuple(int(s) for s in strides)
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @classmethod
    def single_level(
        cls,
        sizes: Sequence[float] = (128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        stride: int = 16,
    ) -> "AnchorGenerator":
        """The paper's configuration: one feature map of stride 16 with 3 sizes x 3 ratios = 9 anchors."""
        return cls((tuple(sizes),), (tuple(aspect_ratios),), strides=(stride,))

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def level_strides(
        self, image_size: tuple[int, int], grid_sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """``(stride_h, stride_w)`` per level: the fixed strides, or ``padded_size // grid_size`` per axis."""
        if self.strides is not None:
            return [(s, s) for s in self.strides]
        return [(image_size[0] // h, image_size[1] // w) for h, w in grid_sizes]

    def grid_anchors(
        self,
        image_size: tuple[int, int],
        grid_sizes: Sequence[tuple[int, int]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """All levels' anchors for a padded image of ``image_size``, ``(sum_l H_l*W_l*A_l, 4)``, cached."""
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(f"{len(grid_sizes)} feature maps for {len(self.cell_anchors)} anchor levels")
        grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]
        strides = self.level_strides(image_size, grid_sizes)
        key = (tuple(grid_sizes), tuple(strides), str(device), dtype, torch.is_inference_mode_enabled())
        with _CACHE_LOCK:
            anchors = self._cache.get(key)
            if anchors is not None:
                self._cache.move_to_end(key)
                return anchors
        anchors = torch.cat(
            [
                shifted_anchors(base.to(device=device, dtype=dtype), size, stride)
                for base, size, stride in zip(self.cell_anchors, grid_sizes, strides)
            ]
        )
        with _CACHE_LOCK:
            self._cache[key] = anchors
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return anchors

    def forward(self, images: ImageBatch, feature_maps: Sequence[Tensor]) -> Tensor:
        """Anchors shared by every image of the batch, ``(sum_l H_l*W_l*A_l, 4)`` in ``feature_maps[0]``'s dtype."""
        padded = images.tensors.shape[-2:]
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        if torch.compiler.is_compiling():  # torch.export: symbolic sizes, so no int() and no cache
            first = feature_maps[0]
            strides = self.level_strides(tuple(padded), grid_sizes)
            return torch.cat(
                [
                    shifted_anchors(base.to(device=first.device, dtype=first.dtype), size, stride)
                    for base, size, stride in zip(self.cell_anchors, grid_sizes, strides)
                ]
            )
        return self.grid_anchors(
            (int(padded[0]), int(padded[1])), grid_sizes, feature_maps[0].device, feature_maps[0].dtype
        )
