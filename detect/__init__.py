"""Two-stage object detection: selective search, R-CNN, SPP-Net and Faster R-CNN on shared batched kernels."""

from detect.errors import DetectError
from detect.structures import Detections

__version__ = "0.1.0"
__all__ = ["DetectError", "Detections", "__version__"]
