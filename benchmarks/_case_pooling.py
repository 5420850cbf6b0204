"""RoI Align's gradient on the CPU against torchvision's ``_roi_align_backward`` (``benchmarks/kernels.py``).

The case is the tiny Faster R-CNN's training step with the derived recipe (``detect train --data``): 8 images at
a 224-pixel input (a 28 x 38 map at stride 8, 128 channels), 128 sampled RoIs per image, 7 x 7 bins, sampling
ratio 2. ``ours`` is :func:`detect.ops.pooling.roi_align_grad` (the numba loop behind ``roi_align``'s backward),
``peer`` torchvision's kernel, ``floor`` writing the gradient once. Both give the same tensor, bit for bit.
"""

from __future__ import annotations

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)

from benchmarks._timing import median_seconds
from detect.ops.pooling import roi_align_grad

IMAGES, CHANNELS, HEIGHT, WIDTH, PER_IMAGE, SCALE = 8, 128, 28, 38, 128, 0.125


def roi_align_grad_case(repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    index = torch.arange(IMAGES).repeat_interleave(PER_IMAGE)[:, None].float()
    corner = torch.rand(IMAGES * PER_IMAGE, 2, generator=g) * torch.tensor([WIDTH, HEIGHT]) / SCALE * 0.7
    side = 16 + torch.rand(IMAGES * PER_IMAGE, 2, generator=g) * 150
    rois = torch.cat([index, corner, corner + side], 1)
    grad = torch.randn(IMAGES * PER_IMAGE, CHANNELS, 7, 7, generator=g)
    shape = (IMAGES, CHANNELS, HEIGHT, WIDTH)

    def ours() -> torch.Tensor:
        return roi_align_grad(grad, rois, shape, SCALE, 2, False)

    def peer() -> torch.Tensor:
        return torch.ops.torchvision._roi_align_backward(grad, rois, SCALE, 7, 7, *shape, 2, False)

    same = torch.equal(ours(), peer())
    t = median_seconds({"ours": ours, "peer": peer, "floor": lambda: torch.zeros(shape)}, repeats)
    return {
        "case": f"roi_align backward: {IMAGES} x {PER_IMAGE} RoIs, {CHANNELS} ch vs torchvision",
        "ours_s": t["ours"], "peer_s": t["peer"], "floor_s": t["floor"], "ratio": t["peer"] / t["ours"],
        "note": f"gradients {'bitwise equal' if same else 'DIFFER'}",
    }


def run(repeats: int) -> list[dict]:
    return [roi_align_grad_case(repeats)]
