"""Seeded random weights that make parity checks against torchvision meaningful, shared by the tests and the
benchmarks (no pretrained weights can be downloaded there).

A freshly built detector has identity frozen BatchNorm and a near-silent classifier, so almost nothing passes the
score threshold and a comparison would check empty outputs. :func:`randomise_frozen_bn` gives every frozen BN random
statistics and affine (eps 0, as in torchvision's COCO checkpoints) and :data:`CLS_SCALE` scales the classifier's
weights so dozens of detections per image survive.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detect.detectors import tiny_detector
from detect.weights import save_detector

CLS_SCALE = 40.0  # random heads give logits of std ~0.06; scaled up, dozens of scores pass the 0.05 threshold


@torch.no_grad()
def randomise_frozen_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Random frozen-BN statistics and affine (weights ~0.5 keep a random ResNet's activations O(1)), eps 0 as
    in torchvision's COCO checkpoints."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.weight.numel()
            module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.25)
            module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.eps = 0.0


def save_random_tiny(family: str, path: Path, name: str, class_names: Sequence[str]) -> Path:
    """A freshly initialised (seed it first) tiny detector of ``family`` saved as weights ``name`` at ``path``,
    with its manifest entry: a stand-in for the bundled weights where the test or benchmark needs no accuracy."""
    detector = tiny_detector(family)
    model = detector.build(class_names).eval()
    save_detector(model, path, name=name, config=getattr(model, "config", None) or detector.default_config)
    return path


def zero_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A hostile upload: an all-zero 8-bit RGB PNG compressed row by row, so 40 MP (8000x5000) takes ~116 KB and
    120 MB once decoded. ``rows`` rows of pixel data are written (default all; 0: a header promising pixels the
    file lacks, refused or failed before any decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" + bytes(width * 3)  # filter byte 0, then the row's samples
    idat = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
