"""Two-stage object detection: selective search, R-CNN, SPP-Net and Faster R-CNN on shared batched kernels.

``from detect import Detector`` is the way in for Python users (:mod:`detect.detector`). ``import detect``
itself stays light (no torch): the names below are imported on first use, so ``detect --version`` starts fast.
"""

from __future__ import annotations

from typing import Any

from detect.errors import DetectError

__version__ = "0.1.0"
__all__ = ["DetectError", "Detections", "Detector", "Result", "__version__"]

_LAZY = {"Detections": "detect.structures", "Detector": "detect.detector", "Result": "detect.detector"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'detect' has no attribute {name!r}")
