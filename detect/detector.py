"""``Detector``: the Python object users hold. Load once, call on images, get results that draw themselves.

```python
from detect import Detector

det = Detector("faster_rcnn")            # a family, a detector or weights name, a weights file, an .onnx export
result = det("photo.jpg")                # a path, bytes, a numpy array or a PIL image -> one Result
results = det(["a.jpg", "b.png"])        # a list -> a list of Results
result.boxes, result.scores, result.labels, result.names
result.save("photo.annotated.jpg")
```

Decisions:

- **The object is the path.** Loading is :func:`detect.inference.load_model`, the forward pass
  :func:`detect.inference.forward_batch` and the request thresholds :class:`detect.inference.Refinement`: the
  functions ``detect predict`` (every engine) and the REST API call, so the three give the same detections for
  the same image and settings. Drawing is :mod:`detect.drawing`, as for ``--save-images``.
- **What ``model`` may be**, tried in this order: an existing file (``.onnx``: an export from ``detect export``, run
  by ONNX Runtime; anything else: weights, see :func:`detect.weights.load_detector`); a family (``faster_rcnn``,
  ``sppnet``, ``rcnn``: its bundled ``<family>_shapes`` weights); registered weights (``detect weights list``); a
  detector name of :data:`detect.detectors.DETECTORS` with registered weights of that architecture. Anything else
  is :class:`~detect.errors.UnknownModelError`, or :class:`~detect.errors.WeightsNotFoundError` when it looks like
  a path (has a folder or a file extension).
- **Defaults for people**: ``score_threshold`` 0.25 (:data:`detect.inference.DEFAULT_SCORE_THRESHOLD`; 0 keeps what
  the model keeps), ``device="auto"`` (CUDA when present).
- **Inputs.** Paths and bytes are decoded by :func:`detect.io.decode_image` (EXIF-upright RGB, size limits, every
  problem an :class:`~detect.errors.ImageError` with its code); PIL images are turned upright by their EXIF tag
  and converted to RGB; arrays must be ``uint8`` ``(H, W)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (alpha dropped).
  Anything else is :class:`~detect.errors.UnsupportedInputError`, never a bare ``TypeError``. A call raises the
  first input's error (Python callers expect exceptions; ``detect predict`` is the tool that keeps going).
- **Batches.** A list is run ``batch_size`` images per forward pass; an image's detections never depend on its
  batch mates (the project-wide rule), so the batch size changes only speed and memory.
- **One core.** Every source ends up in :meth:`Detector.predict_arrays` (decoded RGB arrays in, :class:`Result`
  out). ``slice=640`` (and ``overlap=``) there runs sliced inference (:func:`detect.slicing.detect_sliced`, the
  function ``detect predict --slice`` and ``POST /detect``'s ``slice`` use) for very large images; combine it with
  ``max_pixels=`` in the constructor to accept images above the default pixel limit.
- **URLs** (``https://...``) are fetched with the CLI's guards (:func:`detect.sources.fetch_url`: timeouts, a byte
  cap, at most 5 redirects, no private or loopback address unless ``allow_private_urls=True``).
- **Video**: :meth:`Detector.video` is a generator of per-frame results for a video file, a stream URL or a camera
  index (:func:`detect.engines.video.iter_video_results`, what ``detect predict clip.mp4`` runs), with
  ``track=True`` for track ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from detect import weights as registered_weights
from detect.detectors import DETECTORS, families
from detect.drawing import Style, draw_detections, encode_like
from detect.slicing import SliceOptions, detect_sliced
from detect.sources import UrlPolicy, allow_pixels, fetch_url, kind_of
from detect.errors import (
    ConfigError,
    DetectError,
    UnknownModelError,
    UnsupportedInputError,
    WeightsNotFoundError,
)
from detect.inference import (
    DEFAULT_SCORE_THRESHOLD,
    Refinement,
    default_weights,
    forward_batch,
    load_model,
    resolve_classes,
    resolve_device,
)
from detect.io import atomic_write, decode_image
from detect.structures import Detections

__all__ = ["Detection", "Detector", "Result"]

ImageLike = Any  # str | os.PathLike | bytes | np.ndarray | PIL.Image.Image


class Detection(NamedTuple):
    """One detected object: ``box`` ``(x1, y1, x2, y2)`` in pixels, ``score``, 1-based ``class_id``, ``class_name``."""

    box: tuple[float, float, float, float]
    score: float
    class_id: int
    class_name: str


@dataclass
class Result:
    """The detections of one image, with the image (RGB ``uint8``) to draw them on.

    ``boxes`` ``(N, 4)`` float32 ``xyxy`` pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` 1-based class ids (numpy,
    best score first), ``names`` the class name of each, ``class_names`` the model's whole class list;
    ``len(result)`` and ``for d in result`` go over the :class:`Detection` items."""

    detections: Detections
    class_names: list[str]
    image: np.ndarray
    source: str

    @property
    def boxes(self) -> np.ndarray:
        return self.detections.boxes.detach().cpu().numpy().astype(np.float32, copy=False)

    @property
    def scores(self) -> np.ndarray:
        return self.detections.scores.detach().cpu().numpy().astype(np.float32, copy=False)

    @property
    def labels(self) -> np.ndarray:
        return self.detections.labels.detach().cpu().numpy().astype(np.int64, copy=False)

    @property
    def names(self) -> list[str]:
        return [d["class_name"] for d in self.to_json()["detections"]]

    def __len__(self) -> int:
        return len(self.detections)

    def __iter__(self) -> Iterator[Detection]:
        for d in self.to_json()["detections"]:
            yield Detection(tuple(d["box"]), d["score"], d["class_id"], d["class_name"])

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for name in self.names:
            counts[name] = counts.get(name, 0) + 1
        found = ", ".join(f"{n} {name}" for name, n in counts.items()) or "nothing"
        return f"<Result {self.source}: {self.image.shape[1]}x{self.image.shape[0]}, {found}>"

    def to_json(self) -> dict:
        """``{width, height, detections: [{box, score, class_id, class_name}]}``: the JSON ``detect predict`` writes
        per image and ``POST /detect`` answers per image."""
        return self.detections.to_json(self.class_names)

    def to_pandas(self) -> Any:
        """A DataFrame, one row per detection: ``x1 y1 x2 y2 score class_id class_name`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("to_pandas() needs pandas: pip install pandas") from None
        rows = [(*d.box, d.score, d.class_id, d.class_name) for d in self]
        return pd.DataFrame(rows, columns=["x1", "y1", "x2", "y2", "score", "class_id", "class_name"])

    def plot(self, line_width: int | None = None, hide_labels: bool = False, hide_scores: bool = False) -> np.ndarray:
        """The image with its boxes and labels drawn (:func:`detect.drawing.draw_detections`), RGB ``uint8``."""
        return np.asarray(draw_detections(self.image, self.detections, self.class_names, Style(line_width, hide_labels, hide_scores)))

    def save(self, path: str | os.PathLike, **style: Any) -> Path:
        """Write :meth:`plot`'s picture to ``path`` (``.jpg``: JPEG quality 90, ``.png``, ``.webp``), atomically;
        ``style`` as for :meth:`plot`. Returns the path."""
        path = Path(path)
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            raise ConfigError(f"save() writes .jpg, .png or .webp files, not {path.suffix or 'no extension'!r}")
        atomic_write(path, encode_like(Image.fromarray(self.plot(**style)), path))
        return path


class Detector:
    """A loaded detector to call on images (see the module docstring for what ``model`` may be).

    ``score_threshold``, ``iou_threshold``, ``max_detections`` and ``classes`` (names or 1-based ids) are the
    defaults of every call; a call may override them by keyword."""

    def __init__(
        self,
        model: str | os.PathLike = "faster_rcnn",
        *,
        device: str = "auto",
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        iou_threshold: float | None = None,
        max_detections: int | None = None,
        classes: Sequence[str | int] | None = None,
        batch_size: int = 4,
        slice: int | None = None,  # noqa: A002 - the option's name everywhere (CLI --slice, the API's slice)
        overlap: float = 0.2,
        max_pixels: int | None = None,
        allow_private_urls: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        weights, backend = _weights_of(model)
        self.device = resolve_device(device)
        self.weights = weights
        self.model = load_model(weights, self.device, backend=backend)
        self.class_names: list[str] = list(self.model.class_names)
        self.batch_size = batch_size
        self.defaults = {
            "score_threshold": score_threshold,
            "iou_threshold": iou_threshold,
            "max_detections": max_detections,
            "classes": classes,
            "slice": slice,
            "overlap": overlap,
        }
        self.max_pixels = max_pixels
        if max_pixels is not None:
            allow_pixels(max_pixels)  # a deliberate limit above Pillow's 89 MP ceiling, as detect predict --max-pixels
        self.url_policy = UrlPolicy(allow_private=allow_private_urls)
        self._refinement(**self._thresholds(self.defaults))  # refuse bad thresholds or classes now, not at the first call
        self._slicing(slice, overlap)

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", type(self.model).__name__))

    def __repr__(self) -> str:
        return f"<Detector {self.name} ({self.weights}), {len(self.class_names)} classes on {self.device}>"

    def __call__(self, source: ImageLike | Sequence[ImageLike], **overrides: Any) -> Result | list[Result]:
        """Detect objects in one image (-> :class:`Result`) or a list of images (-> ``list[Result]``)."""
        if isinstance(source, (list, tuple)):
            arrays = [self._read(s) for s in source]
            return self.predict_arrays(arrays, [_describe(s, i) for i, s in enumerate(source)], **overrides)
        return self.predict_arrays([self._read(source)], [_describe(source, 0)], **overrides)[0]

    def _read(self, source: ImageLike) -> np.ndarray:
        """One input as RGB: a URL fetched with the guards first; paths and bytes decoded under ``max_pixels``."""
        if isinstance(source, str) and kind_of(source) == "url":
            source = fetch_url(source, self.url_policy)
        if self.max_pixels is not None and isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
            data = os.fspath(source) if isinstance(source, (str, os.PathLike)) else bytes(source)
            return decode_image(data, max_pixels=self.max_pixels)
        return to_rgb(source)

    def video(self, source: str | int, *, stride: int = 1, track: bool = False, **overrides: Any) -> Iterator[Any]:
        """Per-frame results of a video file, a stream URL (``rtsp://``, ``http(s)://...mp4``) or a camera index,
        in order: :class:`detect.engines.video.FrameResult` (``frame``, ``timestamp_s``, ``detections``,
        ``track_ids`` with ``track=True``, ``to_json(class_names)``). A source that cannot be opened raises
        :class:`~detect.errors.UnreadableVideoError`; a later failure is a last item with ``error`` set."""
        from detect.engines.video import iter_video_results

        options = self._options(overrides)
        return iter_video_results(
            self.model, source, stride=stride, batch_size=self.batch_size, refinement=self._refinement(**self._thresholds(options)),
            track=track, slicing=self._slicing(options["slice"], options["overlap"]),
        )

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ConfigError(f"unknown option {sorted(unknown)[0]!r}; known: {', '.join(self.defaults)}")
        return {**self.defaults, **overrides}

    @staticmethod
    def _thresholds(options: dict[str, Any]) -> dict[str, Any]:
        return {k: options[k] for k in ("score_threshold", "iou_threshold", "max_detections", "classes")}

    def _slicing(self, size: int | None, overlap: float) -> SliceOptions | None:
        return None if size is None else SliceOptions(int(size), float(overlap), batch_size=self.batch_size)

    def predict_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str] | None = None, **overrides: Any) -> list[Result]:
        """The core of every call: decoded RGB ``uint8`` ``(H, W, 3)`` arrays in, one :class:`Result` each out."""
        options = self._options(overrides)
        refinement = self._refinement(**self._thresholds(options))
        slicing = self._slicing(options["slice"], options["overlap"])
        sources = list(sources) if sources is not None else [f"image {i}" for i in range(len(images))]
        results: list[Result] = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            found_all = forward_batch(self.model, batch) if slicing is None else detect_sliced(self.model, batch, slicing)
            for offset, found in enumerate(found_all):
                if isinstance(found, DetectError):
                    raise found
                results.append(Result(refinement.apply(found.to("cpu")), self.class_names, batch[offset], sources[start + offset]))
        return results

    def _refinement(self, score_threshold: float | None, iou_threshold: float | None, max_detections: int | None, classes: Any) -> Refinement:
        ids = None if classes is None else resolve_classes([classes] if isinstance(classes, (str, int)) else classes, self.class_names)
        return Refinement(score_threshold, iou_threshold, max_detections, ids)


def _weights_of(model: str | os.PathLike) -> tuple[str, str]:
    """``(weights, backend)`` for the ``model`` a user named (the order of the module docstring)."""
    if not isinstance(model, (str, os.PathLike)):
        raise UnknownModelError(f"model must be a name or a path, not {type(model).__name__}")
    text = os.fspath(model)
    path = Path(text)
    if path.is_file():
        return text, "onnxruntime" if path.suffix.lower() == ".onnx" else "torch"
    if text in families():
        return default_weights(text), "torch"
    registered = {entry.name: entry for entry in registered_weights.list_weights()}
    if text in registered:
        return text, "torch"
    if text in DETECTORS:
        for entry in registered.values():
            if entry.architecture.get("builder") == text:
                return entry.name, "torch"
        raise UnknownModelError(
            f"no registered weights for detector {text!r}: `detect weights pull` downloads official checkpoints, "
            f"`detect train` trains on your photos, or pass a weights file"
        )
    if path.suffix or os.sep in text or (os.altsep and os.altsep in text):
        raise WeightsNotFoundError(f"no such weights file: {text}")
    known = sorted({*families(), *registered})
    raise UnknownModelError(f"unknown model {text!r}; known: {', '.join(known)} (or a weights file)")


def to_rgb(source: ImageLike) -> np.ndarray:
    """An input as RGB ``uint8`` ``(H, W, 3)`` (see the module docstring); :class:`ImageError` otherwise."""
    if isinstance(source, (str, os.PathLike)):
        return decode_image(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source))
    if isinstance(source, Image.Image):
        return np.ascontiguousarray(np.asarray(ImageOps.exif_transpose(source).convert("RGB"), dtype=np.uint8))
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise UnsupportedInputError(f"image arrays must be uint8 (0-255 RGB), got {source.dtype}")
        if source.ndim == 2:
            source = np.repeat(source[:, :, None], 3, axis=2)
        if source.ndim != 3 or source.shape[2] not in (3, 4) or 0 in source.shape:
            raise UnsupportedInputError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got {source.shape}")
        return np.ascontiguousarray(source[:, :, :3])
    raise UnsupportedInputError(
        f"cannot read an image from {type(source).__name__}: give a path, bytes, a numpy array or a PIL image"
    )


def _describe(source: ImageLike, index: int) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"image {index}"

