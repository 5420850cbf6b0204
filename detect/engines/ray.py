"""The Ray batch engine behind ``detect predict --engine ray``: the same inputs and the same outputs as
:mod:`detect.engines.local`, with listing, decoding and the model spread over a Ray cluster (Ray Data).

Decisions:

* **Where things run.** Listing runs in Ray tasks (one for all local paths, with the local engine's own
  :func:`~detect.engines.local.collect_inputs`, so relative paths are the same; one per URL source), so it
  happens where the data is mounted; on a one-node cluster on the driver's machine the driver lists local paths
  itself (same files, and no worker to start and fill with imports: 7 s of a 20 s start-up on the 2-core
  machine). Decoding runs in Ray Data map tasks with :func:`detect.io.decode_image`,
  the same defences and the same per-image errors as everywhere. The model runs in a fixed pool of
  ``actors`` Ray actors, each loading it once with :func:`detect.inference.load_model` and running
  micro-batches of ``batch_size`` images through :func:`detect.inference.forward_batch`; an actor asks for
  ``gpus_per_actor`` GPUs (default 1 when ``--device`` is CUDA), Ray pins it to them (``CUDA_VISIBLE_DEVICES``),
  and it uses its first one. ``cpus_per_actor`` is both the Ray reservation and the actor's torch threads.
* **One writer: the driver.** Results (per-image JSON text, or an error's code and message) stream back to the
  driver, which writes every file through :mod:`detect.engines.outputs`, the local engine's writer, so the
  per-image JSON and the aggregates are the same bytes and ``manifest.jsonl`` the same records (in arrival
  order), and ``--resume`` works across engines. Results are written and recorded as each block arrives and the
  manifest is flushed per block, so a killed driver loses at most the blocks in flight; ``--resume`` skips the
  rest.
* **Exactly one result per input.** A dead actor is restarted and its task retried (``max_restarts`` and
  ``max_task_retries`` unlimited: Ray Data's defaults for actor pools), a lost decoding task is retried, so an
  input can come back twice; the driver writes the first and drops the others
  (:meth:`~detect.engines.outputs.Manifest.has_result`).
* **Decoding apart from the model.** A decoding task reserves ``decode_cpus`` (0.5: decoding waits on storage
  part of the time) and an actor ``cpus_per_actor`` (1) and its GPUs. Ray Data fuses consecutive operators
  whose reservations are equal, which would put decoding inside the actors and leave the model idle while they
  decode; the different defaults (and any GPU) keep them apart.
* **Same bytes.** An image's JSON is the same bytes as the local engine's whatever the thread counts
  (``cpus_per_actor`` sets the actor's torch threads, the local engine keeps the process's) and batch sizes: the
  detectors run every image alone on the CPU, and the kernels whose last bits followed the thread count (MKL's
  matrix products, bilinear resizing, PyTorch's 1x1-convolution choice) on one thread
  (:mod:`detect.ops.threads`). Before issue 21 the engines differed in a score's fifth decimal for 4 of 8 photos
  (the actor ran on 1 thread, the local engine on all cores). Decoding is :func:`detect.io.decode_image` on
  both sides (from the file, or from the bytes of a URL).
* **Inputs.** Local paths, or fsspec URLs (``s3://`` with ``s3fs``, ``gs://`` with ``gcsfs``, ``file://``), not
  both in one run. URL inputs keep their URL in the manifest; their relative paths are taken from their common
  root like local ones (``file://`` URLs give the same relative paths as the plain paths, other protocols
  start with the protocol's name: ``s3/bucket/key.jpg``). Folders contribute files with image extensions.
* **The cluster.** ``address`` (``auto``, ``ray://host:10001``, a GCS address) is passed to ``ray.init``; without
  it Ray's own rule applies (``RAY_ADDRESS``, else a new local cluster for the run). A Ray session this process
  already holds is used as it is and left running. ``--weights`` is resolved on the actors, so a registered
  name means the cluster's weights, and a path must be visible to the cluster's nodes.
* **Scale.** The driver holds one small record per pending input (its path and relative path) and the set of
  inputs done, about 200 bytes each: tens of millions of inputs per run are fine; split larger sets by prefix
  into several runs (or RayJobs), each with its own ``--out``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import ModuleType
from typing import Any, TextIO

import numpy as np

from detect.engines.local import IMAGE_EXTENSIONS, PredictOptions, collect_inputs
from detect.engines.outputs import (
    Input,
    Manifest,
    Summary,
    check_formats,
    finish_run,
    prepare_output_dir,
    remove_stale_temporaries,
    result_settings,
    write_image_outputs,
)
from detect.drawing import Style
from detect.errors import ConfigError, DetectError, OutputError, UnreadableFileError

RAY_MISSING = "--engine ray needs Ray, which is not installed: pip install 'detect[ray]'"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ModelSource:
    """Which model the actors load: weights (a registered name or a path the cluster sees), device, family."""

    weights: str
    device: str = "cpu"
    family: str | None = None


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the job runs (see the module docstring)."""

    address: str | None = None
    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the device is CUDA, else 0
    cpus_per_actor: float = 1.0
    decode_cpus: float = 0.5  # CPUs reserved by each decoding task

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus_per_actor <= 0 or self.decode_cpus <= 0:
            raise ConfigError("--actors and --cpus-per-actor must be positive")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("--gpus-per-actor must be 0 or more")

    def gpus(self, device: str) -> float:
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if device.startswith("cuda") else 0.0


def require_ray() -> ModuleType:
    """The ``ray`` module, or a :class:`ConfigError` (one line, exit 2) saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


@contextmanager
def connected(address: str | None) -> Iterator[ModuleType]:
    """A Ray session for the run: the one this process holds, else a new connection, closed at the end."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    local = address is None and not os.environ.get("RAY_ADDRESS")
    extra = {"include_dashboard": False} if local else {}
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **extra)
    try:
        yield ray
    finally:
        ray.shutdown()


# --- the run -------------------------------------------------------------------------------------------------
def run(
    options: PredictOptions, model: ModelSource, ray_options: RayOptions = RayOptions(), progress: TextIO | None = sys.stderr
) -> Summary:
    """Detect objects in every input of ``options`` on Ray and write the outputs; see the module docstring."""
    start = time.perf_counter()
    check_formats(options.formats)
    out_dir = prepare_output_dir(options.out_dir)
    summary = Summary()
    startup = StartupClock(start)
    with connected(ray_options.address) as ray:
        startup.mark("connect")
        inputs, failures = list_inputs(ray, options.sources, str(out_dir), options.recursive)
        startup.mark("listing")
        manifest = Manifest(out_dir, options.resume, result_settings(options))
        remove_stale_temporaries(out_dir)
        pending = [i for i in inputs if manifest.done.get(i.path) != i.rel or not (out_dir / f"{i.rel}.json").is_file()]
        summary.skipped = len(inputs) - len(pending)
        total = len(pending) + len(failures)
        try:
            for item, (code, reason) in failures:
                _fail(manifest, summary, item, code, reason)
            for rows in _results(ray, pending, options, model, ray_options):
                startup.first_result(rows)
                for row in rows:
                    _write(row, out_dir, options, manifest, summary)
                manifest.flush()
                _report(progress, summary, total, time.perf_counter() - start)
        finally:
            manifest.close()
    if progress is not None:
        progress.write("\n" + startup.line())
    return finish_run(out_dir, manifest, options.formats, summary, start, progress)


class StartupClock:
    """Where a run's time goes before its first result: connecting to the cluster, listing the inputs, and, on
    the actors, importing the libraries and loading the model (each actor reports its own with its first
    block), up to the first result at the driver."""

    def __init__(self, start: float) -> None:
        self.start, self.last, self.marks = start, start, {}
        self.first_s: float | None = None
        self.actors: list[tuple[float, float, float]] = []  # (process s, import s, model load s) per actor

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name], self.last = now - self.last, now

    def first_result(self, rows: list[dict]) -> None:
        if self.first_s is None:
            self.first_s = time.perf_counter() - self.start
        self.actors += [(r["process_s"], r["import_s"], r["load_s"]) for r in rows if r.get("load_s") is not None]

    def line(self) -> str:
        """One line: ``ray start-up: connect 1.2 s, listing 0.1 s, first result at 9.8 s; 1 actor(s): worker up
        6.0 s before the model, import 0.0 s, model load 0.4 s`` (medians over the actors that sent a block)."""
        parts = [f"{name} {seconds:.2f} s" for name, seconds in self.marks.items()]
        if self.first_s is not None:
            parts.append(f"first result at {self.first_s:.2f} s")
        text = "ray start-up: " + ", ".join(parts)
        if self.actors:
            processes, imports, loads = (np.array(v, dtype=float) for v in zip(*self.actors))
            text += (f"; {len(self.actors)} actor(s): worker up {np.nanmedian(processes):.2f} s before the model, "
                     f"import {np.median(imports):.2f} s, model load {np.median(loads):.2f} s")
        return text + "\n"


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that is not known."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


def _write(row: dict, out_dir: Any, options: PredictOptions, manifest: Manifest, summary: Summary) -> None:
    """One result from the cluster: written and recorded unless this run already has it."""
    import json

    item = Input(row["path"], row["rel"])
    if manifest.has_result(item):
        return
    if row["code"] is not None:
        _fail(manifest, summary, item, row["code"], row["reason"])
        return
    result = json.loads(row["result"])
    try:
        write_image_outputs(out_dir, item.rel, result, options.formats, row["annotated"])
    except OutputError as err:  # this input's outputs only: the run goes on and writes its aggregates
        _fail(manifest, summary, item, err.code, err.message)
        return
    manifest.record(item)
    summary.images += 1
    summary.detections += len(result["detections"])


def _fail(manifest: Manifest, summary: Summary, item: Input, code: str, reason: str) -> None:
    manifest.record_failure(item, code, reason)
    summary.failed += 1
    summary.failures.append((item.path, f"{code}: {reason}"))


def _report(stream: TextIO | None, summary: Summary, total: int, seconds: float) -> None:
    if stream is None:
        return
    rate = summary.images / seconds if seconds > 0 else 0.0
    stream.write(f"\r{summary.images + summary.failed}/{total} images, {rate:.1f} img/s (ray)")
    stream.flush()


# --- listing -------------------------------------------------------------------------------------------------
Failure = tuple[Input, tuple[str, str]]  # an input that cannot be read, with its error's code and message


def list_inputs(ray: ModuleType, sources: Sequence[str], out_dir: str, recursive: bool) -> tuple[list[Input], list[Failure]]:
    """Expand the sources in Ray tasks: local paths with the local engine's rules, URLs with fsspec."""
    urls = [bool(_URL.match(s)) for s in sources]
    if any(urls) and not all(urls):
        raise ConfigError("give either local paths or URLs (s3://, gs://, file://), not both in one run")
    if not any(urls):
        if _single_node_here(ray):  # the driver sees the cluster's files: no worker to start (seconds, cold)
            return _list_local(list(sources), out_dir, recursive)
        return ray.get(ray.remote(_list_local).options(num_cpus=0).remote(list(sources), out_dir, recursive))
    listed = ray.get([ray.remote(_list_url).options(num_cpus=0).remote(s, out_dir, recursive) for s in sources])
    common = os.path.commonpath([root for root, _, _ in listed])
    found: dict[str, str] = {}
    failures: list[Failure] = []
    for _, files, errors in listed:
        found.update((url, os.path.relpath(key, common)) for url, key in files)
        failures += [(Input(url, os.path.relpath(key, common)), error) for url, key, error in errors]
    return [Input(url, found[url]) for url in sorted(found)], failures


def _single_node_here(ray: ModuleType) -> bool:
    """Whether the cluster is one node on this machine (a local cluster), so that local paths mean the same
    files to the driver as to the tasks."""
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        return len(alive) == 1 and alive[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()
    except Exception:  # an older or remote API without these fields: list where the data is, in a task
        return False


def _list_local(sources: list[str], out_dir: str, recursive: bool) -> tuple[list[Input], list[Failure]]:
    collected = collect_inputs(sources, out_dir, recursive)
    return collected.inputs, [(item, (err.code, err.message)) for item, err in collected.failures]


def _list_url(source: str, out_dir: str, recursive: bool) -> tuple[str, list[tuple[str, str]], list[tuple[str, str, tuple[str, str]]]]:
    """One URL source -> (its root's key, [(url, key)], [(url, key, (code, message))]). A key is the local path
    for ``file://``, else ``/<protocol>/<path>``: one namespace in which the common root is taken."""
    fs, path = _filesystem(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")

    def key(p: str) -> str:
        return os.path.normpath(p) if local else str(PurePosixPath("/", protocol, p.lstrip("/")))

    if _GLOB_MAGIC.search(path):
        root = path[: _GLOB_MAGIC.search(path).start()].rpartition("/")[0] or "/"
        paths = [p for p in fs.glob(path) if not fs.isdir(p)]
    elif fs.isdir(path):
        root = path.rstrip("/") or "/"
        found = fs.find(path, maxdepth=None if recursive else 1)
        paths = [p for p in found if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
    elif fs.exists(path):
        root, paths = path.rpartition("/")[0] or "/", [path]
    else:
        error = UnreadableFileError(f"no such file: {source!r}")
        return key(path.rpartition("/")[0] or "/"), [], [(source, key(path), (error.code, error.message))]
    out = os.path.abspath(out_dir)
    keep = [p for p in sorted(paths) if not (local and (key(p) == out or key(p).startswith(out + os.sep)))]
    return key(root), [(fs.unstrip_protocol(p), key(p)) for p in keep], []


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:  # s3fs, gcsfs, ...: optional extras
        raise ConfigError(f"cannot read {url.split('://')[0]}:// URLs: {err}") from None
    except ValueError as err:  # an unknown protocol
        raise ConfigError(f"cannot read {url!r}: {err}") from None


# --- the dataset ---------------------------------------------------------------------------------------------
def _results(
    ray: ModuleType, pending: Sequence[Input], options: PredictOptions, model: ModelSource, ray_options: RayOptions
) -> Iterator[list[dict]]:
    """Blocks of result rows, in the order the cluster finishes them."""
    if not pending:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver reports progress itself, one line
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    blocks = max(1, min(math.ceil(len(pending) / max(1, options.batch_size)), 4096))
    dataset = ray.data.from_items([{"path": i.path, "rel": i.rel} for i in pending], override_num_blocks=blocks)
    decoded = dataset.map_batches(
        _decode_batch,
        batch_format="pyarrow",
        batch_size=options.batch_size,
        num_cpus=ray_options.decode_cpus,
        fn_kwargs={"max_pixels": options.max_pixels, "max_side": options.max_side},
    )
    gpus = ray_options.gpus(model.device)
    results = decoded.map_batches(
        Detector,
        batch_format="pyarrow",
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ray_options.actors),
        num_cpus=ray_options.cpus_per_actor,
        num_gpus=gpus,
        fn_constructor_kwargs={
            "model": ModelSource(model.weights, "cuda" if gpus >= 1 else model.device, model.family),
            "refinement": options.refinement,
            "save_images": options.save_images,
            "style": options.style,
            "threads": max(1, int(ray_options.cpus_per_actor)),
        },
    )
    for block in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        columns = ["path", "rel", "code", "reason", "result", "annotated", "process_s", "import_s", "load_s"]
        yield block.select(columns).to_pylist()


def _schema(columns: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.schema([(name, kind) for name, kind in columns.items()])


def _decoded_schema() -> Any:
    import pyarrow as pa

    return _schema({"path": pa.string(), "rel": pa.string(), "code": pa.string(), "reason": pa.string(),
                    "pixels": pa.large_binary(), "height": pa.int64(), "width": pa.int64()})


def _result_schema() -> Any:
    import pyarrow as pa

    return _schema({"path": pa.string(), "rel": pa.string(), "code": pa.string(), "reason": pa.string(),
                    "result": pa.large_string(), "annotated": pa.large_binary(), "process_s": pa.float64(),
                    "import_s": pa.float64(), "load_s": pa.float64()})


def _decode_batch(batch: Any, max_pixels: int, max_side: int) -> Any:
    """In a Ray task: decode each input of the batch; pixels as raw RGB bytes, or the error's code and message."""
    import pyarrow as pa

    rows = []
    for row in batch.to_pylist():
        out = {**row, "code": None, "reason": None, "pixels": None, "height": None, "width": None}
        try:
            image = decode_source(row["path"], max_pixels, max_side)
            out.update(pixels=image.tobytes(), height=image.shape[0], width=image.shape[1])
        except DetectError as err:
            out.update(code=err.code, reason=err.message)
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=_decoded_schema())


def decode_source(path: str, max_pixels: int, max_side: int) -> np.ndarray:
    """A local path (decoded from the file) or a URL (its bytes read with fsspec, then decoded), with the
    defences of :func:`detect.io.decode_image`; an unreadable URL is an :class:`UnreadableFileError`."""
    from detect.io import decode_image

    if not _URL.match(path):
        return decode_image(path, max_pixels=max_pixels, max_side=max_side)
    import fsspec

    try:
        with fsspec.open(path, "rb") as stream:
            data = stream.read()
    except (OSError, ValueError) as err:
        raise UnreadableFileError(f"cannot read {path!r}: {err}", path=path) from None
    return decode_image(data, max_pixels=max_pixels, max_side=max_side)


class Detector:
    """A Ray Data actor: one model, loaded once; each call runs one micro-batch and returns its JSON results."""

    def __init__(self, model: ModelSource, refinement: Any, save_images: bool, threads: int, style: Any = None) -> None:
        started = time.perf_counter()
        process_s = _process_age_s()  # the worker's start and imports, before this constructor ran
        import torch

        from detect.inference import load_model

        torch.set_num_threads(threads)
        loading = time.perf_counter()
        self.detector = load_model(model.weights, model.device, model.family)
        self.startup = {"process_s": process_s, "import_s": loading - started, "load_s": time.perf_counter() - loading}
        self.refinement, self.save_images = refinement, save_images
        self.style = style if style is not None else Style()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from detect.inference import forward_batch

        rows = batch.to_pylist()
        good = [r for r in rows if r["code"] is None]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3).copy() for r in good]
        results = dict(zip(map(id, good), forward_batch(self.detector, images)))
        images_by_row = dict(zip(map(id, good), images))
        out = [self._row(r, results.get(id(r)), images_by_row.get(id(r))) for r in rows]
        if out and self.startup:  # the first block of each actor carries its start-up times
            out[0].update(self.startup)
            self.startup = {}
        return pa.Table.from_pylist(out, schema=_result_schema())

    def _row(self, row: dict, result: Any, image: np.ndarray | None) -> dict:
        import json

        from detect.drawing import draw_detections, encode_like

        out = {"path": row["path"], "rel": row["rel"], "code": row["code"], "reason": row["reason"], "result": None, "annotated": None}
        if isinstance(result, DetectError):
            out.update(code=result.code, reason=result.message)
        elif result is not None:
            detections = self.refinement.apply(result.to("cpu"))
            out["result"] = json.dumps(detections.to_json(self.detector.class_names))
            if self.save_images:
                out["annotated"] = encode_like(
                    draw_detections(image, detections, self.detector.class_names, self.style), row["rel"]
                )
        return out
