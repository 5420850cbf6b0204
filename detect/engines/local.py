"""The local batch engine behind ``detect predict``: files and folders in, per-image results and aggregates out,
in this process. The model is loaded and run through :mod:`detect.inference`, like everywhere else.

Decisions for the batch run (:func:`run`):

* **Output layout.** Every input maps to ``DIR/<rel>.json``, where ``<rel>`` is its path relative to the common
  ancestor of the roots given on the command line (a folder, a file's folder, a glob's fixed prefix). The
  input's extension is kept, so ``a.jpg`` and ``a.png`` give ``a.jpg.json`` and ``a.png.json``; relative paths of
  normalised absolute paths under a common root contain no ``..``, so nothing is written outside ``DIR``.
  That per-image JSON is the one output per input (``detections: []`` when nothing is found); ``yolo`` adds
  ``<rel>.txt`` beside it, ``--save-images`` ``<rel>.annotated.<ext>``
  (a JPEG input's copy is a JPEG, see :mod:`detect.drawing`). The aggregate formats (``jsonl``,
  ``coco``, ``csv``) are rebuilt at the end of every run from the per-image JSON of all inputs done so far,
  so a resumed run still produces complete files.
* **One writer.** Output folder, per-image files, manifest and aggregates are written by
  :mod:`detect.engines.outputs`, the code the Ray engine's driver writes with too.
* **Nothing lost.** Every file is written atomically (:func:`detect.io.atomic_write`); temporary files a killed
  run left are deleted when the next run starts. ``DIR/manifest.jsonl``
  gets one line per input, ``done`` or ``failed`` with the error code and reason, appended and flushed after the
  input's outputs exist, so ``done`` in the manifest implies its outputs are complete. ``--resume`` skips
  inputs whose last record is ``done`` (a torn last line after a kill is ignored); without it a run starts a
  fresh manifest.
* **Walking folders.** Symbolic links are followed, but a folder already visited (same device and inode) is
  skipped, so link loops end; unreadable folders and files are recorded as failed and the run goes on. Files
  under ``DIR`` are never inputs. Folders contribute files with image extensions; files named explicitly are
  always tried (the format is sniffed from content).
* **URLs, stdin, lists, slices** (:mod:`detect.sources`, :mod:`detect.slicing`). A ``.txt`` source is a list of
  sources; an ``http(s)`` image URL is fetched within ``url_policy``'s limits in the decoding threads and written
  as ``DIR/urls/<host>/<path>.json``; ``-`` reads one image from stdin (``DIR/stdin.json``). With ``slicing`` set,
  each image is detected tile by tile (:func:`detect.slicing.detect_sliced`) and proposals are left to the
  detector. Videos, streams and cameras are not inputs here: :mod:`detect.engines.video` runs them.
* **Batching.** Images are decoded by a thread pool (Pillow releases the GIL) and forwarded ``batch_size`` at a
  time. If a batch's forward pass raises, its images are retried one by one, so one image the model cannot
  handle fails alone.
* **Selective search across processes.** For a region detector (R-CNN, SPP-Net: a :class:`SelectiveSearch`
  ``proposer``) the proposals of each image are computed in a pool of ``proposal_workers`` *spawned* processes
  (forking a parent whose OpenCV or OpenMP pools have run can deadlock the child; each worker runs OpenCV
  single-threaded) and passed to ``forward(proposals=...)``. The pool lives for the whole run, so its start-up
  (an interpreter, the imports and numba's compilation: a few seconds) is paid once, and batches are prepared
  one ahead: batch k+1 is decoded and its search started before batch k goes through the model. The boxes are
  those of the in-process search (same function, same config). An image whose search fails (or kills its
  worker: the pool is restarted and the image retried once) fails alone. ``proposal_workers=0`` leaves the
  search to the detector, in-process; a custom ``proposer`` is always left to the detector.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import torch

from detect.engines.outputs import (
    Input,
    Manifest,
    Summary,
    finish_run,
    prepare_output_dir,
    remove_stale_temporaries,
    result_settings,
    write_image_outputs,
)
from detect.errors import ConfigError, DetectError, OutputError, ProposalError, UnreadableFileError
from detect.drawing import Style, draw_detections, encode_like
from detect.inference import Refinement, forward_batch
from detect.io import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, decode_image
from detect.progress import Progress
from detect.slicing import SliceOptions, detect_sliced
from detect.sources import UrlPolicy, expand_lists, fetch_url, is_url, kind_of, read_stdin, url_name
from detect.structures import Detections

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
_GLOB_MAGIC = re.compile(r"[*?\[]")


def default_proposal_workers(cpus: int | None = None) -> int:
    """Selective-search processes for a region detector: none on 1-2 CPUs, where the model's forward already
    keeps every core busy (64 images on 2 cores: 22.1 s in-process, 24.7 s with one worker), else one per spare
    core up to 4."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(4, cpus - 1)


# --- inputs --------------------------------------------------------------------------------------------------
@dataclass
class Collected:
    inputs: list[Input]
    failures: list[tuple[Input, DetectError]]  # unreadable folders, sources that do not exist


def collect_inputs(sources: Sequence[str], out_dir: str | os.PathLike, recursive: bool) -> Collected:
    """Expand files, folders, globs and ``.txt`` lists into :class:`Input` items (deduplicated, sorted, never under
    ``out_dir``); URLs and ``-`` (stdin) come after the files, in the order given."""
    out = os.path.abspath(out_dir)
    found: dict[str, None] = {}
    roots: list[str] = []
    failures: list[tuple[str, DetectError]] = []
    others: dict[str, Input] = {}
    try:
        sources = expand_lists(sources)
    except DetectError as err:
        failures.append((os.path.abspath(err.details.get("path", "list")), err))
        sources = [s for s in sources if kind_of(s) != "list"]
    for source in sources:
        kind = kind_of(source)
        if kind == "url":
            others.setdefault(source, Input(source, url_name(source)))
            continue
        if kind == "stdin":
            others.setdefault(source, Input("-", "stdin"))
            continue
        if _GLOB_MAGIC.search(source):
            root = os.path.abspath(_glob_prefix(source))
            paths = [os.path.abspath(p) for p in sorted(glob.glob(source, recursive=True)) if not os.path.isdir(p)]
        elif os.path.isdir(source):
            root = os.path.abspath(source)
            paths = list(_walk(root, recursive, failures))
        else:
            root = os.path.dirname(os.path.abspath(source))
            paths = [os.path.abspath(source)]
            if not os.path.lexists(source):
                failures.append((paths[0], UnreadableFileError(f"no such file: {source!r}")))
                paths = []
        roots.append(root)
        found.update((p, None) for p in paths if not _is_under(p, out))
    common = os.path.commonpath(roots) if roots else os.getcwd()
    as_input = lambda p: Input(p, os.path.relpath(p, common))  # noqa: E731
    files = [as_input(p) for p in sorted(found)]
    return Collected(files + list(others.values()), [(as_input(p), err) for p, err in failures])


def _glob_prefix(pattern: str) -> str:
    """The folder part of ``pattern`` before its first wildcard (``.`` when it starts with one)."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p))]
    return os.path.join(*fixed) if fixed else "."


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(root: str, recursive: bool, failures: list[tuple[str, DetectError]]) -> Iterator[str]:
    """Image files under ``root``; links followed, each real folder visited once (link loops end)."""
    seen: set[tuple[int, int]] = set()

    def on_error(err: OSError) -> None:
        failures.append((os.path.abspath(err.filename), UnreadableFileError(f"cannot list {err.filename!r}: {err.strerror}")))

    for folder, subdirs, files in os.walk(root, followlinks=True, onerror=on_error):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            subdirs.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        if not recursive:
            subdirs.clear()
        subdirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(folder, name)


# --- options -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictOptions:
    sources: tuple[str, ...]
    out_dir: Path
    recursive: bool = False
    batch_size: int = 4
    refinement: Refinement = Refinement()
    formats: tuple[str, ...] = ("jsonl",)
    save_images: bool = False
    style: Style = Style()
    resume: bool = False
    workers: int = 2
    proposal_workers: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    model: str = ""  # what produced the results (weights and family), recorded in the manifest for --resume
    slicing: SliceOptions | None = None
    url_policy: UrlPolicy = UrlPolicy()


# --- the run -------------------------------------------------------------------------------------------------
def run(
    options: PredictOptions,
    detector: Callable,
    progress: TextIO | None = sys.stderr,
) -> Summary:
    """Detect objects in every input of ``options`` and write the outputs; see the module docstring."""
    start = time.perf_counter()
    out_dir = prepare_output_dir(options.out_dir)
    collected = collect_inputs(options.sources, out_dir, options.recursive)
    manifest = Manifest(out_dir, options.resume, result_settings(options))
    remove_stale_temporaries(out_dir)
    summary = Summary()
    pending = [i for i in collected.inputs if manifest.done.get(i.path) != i.rel or not (out_dir / f"{i.rel}.json").is_file()]
    summary.skipped = len(collected.inputs) - len(pending)
    total = len(pending) + len(collected.failures)
    workers = 0 if options.slicing is not None else min(options.proposal_workers, len(pending))
    proposal_pool = ProposalPool.for_detector(detector, workers)
    try:
        for item, error in collected.failures:
            _fail(manifest, summary, item, error)
        with ThreadPoolExecutor(max(1, options.workers)) as pool:
            decode = lambda batch: list(pool.map(lambda i: _decode(i, options), batch))  # noqa: E731
            for batch, images, proposals in _prepared(_batches(pending, options.batch_size), decode, proposal_pool):
                _process(batch, images, detector, options, out_dir, manifest, summary, proposals)
                manifest.flush()
                _progress(progress, summary, total, time.perf_counter() - start)
    finally:
        manifest.close()
        if proposal_pool is not None:
            proposal_pool.close()
    return finish_run(out_dir, manifest, options.formats, summary, start, progress)


def _batches(items: Sequence[Input], size: int) -> Iterator[Sequence[Input]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _search(image: np.ndarray, config: Any) -> np.ndarray:
    """In a worker: selective search on one image -> float32 ``(R, 4)`` boxes (numpy travels back cheaply)."""
    from proposals.selective_search import selective_search

    return selective_search(image, config).numpy()


class ProposalPool:
    """Selective search for a region detector's images in spawned worker processes (see the module docstring)."""

    MAX_RESTARTS = 3
    """Pool restarts in a row (no search succeeding in between) after which the pool counts as unusable."""

    def __init__(self, config: Any, workers: int) -> None:
        self.config, self.workers = config, workers
        self._executor = self._start()
        self._restarts_in_a_row = 0

    @classmethod
    def for_detector(cls, detector: Any, workers: int) -> "ProposalPool | None":
        """A pool for ``detector``'s proposer when it is a :class:`SelectiveSearch` and ``workers > 0``, else None."""
        proposer = getattr(detector, "proposer", None)
        if workers <= 0 or proposer is None:
            return None
        from proposals.selective_search import SelectiveSearch

        return cls(proposer.config, workers) if isinstance(proposer, SelectiveSearch) else None

    def _start(self) -> ProcessPoolExecutor:
        from proposals.selective_search import init_worker

        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=init_worker)

    def submit(self, images: Sequence[np.ndarray | DetectError]) -> list[Future | None]:
        """Start the search of every decoded image (``None`` for the ones that failed to decode)."""
        return [self._resubmit(image) if isinstance(image, np.ndarray) else None for image in images]

    def result(self, future: Future, image: np.ndarray) -> torch.Tensor | DetectError:
        """The boxes of one submitted image; a dead worker restarts the pool and the image is searched again once."""
        for attempt in range(2):
            try:
                boxes = torch.from_numpy(future.result())
                self._restarts_in_a_row = 0
                return boxes
            except BrokenProcessPool:
                if attempt == 0:
                    future = self._resubmit(image)
            except Exception as err:  # noqa: BLE001 - a failure in the search fails this image only
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                return ProposalError(f"selective search failed on this image: {reason}")
        return ProposalError("selective search killed its worker process twice on this image")

    def _resubmit(self, image: np.ndarray) -> Future:
        """Search ``image``, in a new pool when the current one is broken (the first caller restarts it; the other
        searches lost with it are resubmitted to the new one). A pool that keeps dying with no search succeeding
        (workers that cannot start, say) is a :class:`ConfigError`: the run stops, its finished inputs kept."""
        try:
            return self._executor.submit(_search, image, self.config)
        except BrokenProcessPool:
            self._restarts_in_a_row += 1
            if self._restarts_in_a_row > self.MAX_RESTARTS:
                raise ConfigError(
                    "the selective search worker processes keep dying; run with --proposal-workers 0 to search "
                    "in-process"
                ) from None
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
            return self._executor.submit(_search, image, self.config)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


Searches = tuple[ProposalPool, list["Future | None"]]  # a batch's searches, aligned with its images


def _prepared(
    batches: Iterable[Sequence[Input]], decode: Callable, proposal_pool: ProposalPool | None
) -> Iterator[tuple[Sequence[Input], list[np.ndarray | DetectError], Searches | None]]:
    """Decoded batches, each one ahead of the caller: batch k+1 is decoded (and its search started) first."""
    ahead = None
    for batch in batches:
        images = decode(batch)
        futures = proposal_pool.submit(images) if proposal_pool is not None else None
        if ahead is not None:
            yield ahead
        ahead = (batch, images, None if futures is None else (proposal_pool, futures))
    if ahead is not None:
        yield ahead


def _decode(item: Input, options: PredictOptions) -> np.ndarray | DetectError:
    try:
        if item.path == "-":
            source = read_stdin(options.url_policy.max_bytes)
        elif is_url(item.path):
            source = fetch_url(item.path, options.url_policy)
        else:
            source = item.path
        return decode_image(source, max_pixels=options.max_pixels, max_side=options.max_side)
    except DetectError as err:
        return err


def _process(
    batch: Sequence[Input],
    images: list[np.ndarray | DetectError],
    detector: Callable,
    options: PredictOptions,
    out_dir: Path,
    manifest: Manifest,
    summary: Summary,
    searches: Searches | None = None,
) -> None:
    boxes: list[torch.Tensor | DetectError | None] = [None] * len(batch)
    if searches is not None:
        pool, futures = searches
        boxes = [pool.result(f, image) if f is not None else None for f, image in zip(futures, images)]
    images = [b if isinstance(b, DetectError) else image for image, b in zip(images, boxes)]
    good = [(item, image, b) for item, image, b in zip(batch, images, boxes) if isinstance(image, np.ndarray)]
    for item, image in zip(batch, images):
        if isinstance(image, DetectError):
            _fail(manifest, summary, item, image)
    proposals = None if searches is None else [b for _, _, b in good]
    good_images = [image for _, image, _ in good]
    if options.slicing is not None:
        results = detect_sliced(detector, good_images, options.slicing)
    else:
        results = forward_batch(detector, good_images, proposals)
    for (item, image, _), result in zip(good, results):
        if isinstance(result, DetectError):
            _fail(manifest, summary, item, result)
            continue
        detections = options.refinement.apply(result.to("cpu"))
        try:
            _write_outputs(out_dir, item, image, detections, detector.class_names, options)
        except OutputError as err:  # this input's outputs only: the run goes on and writes its aggregates
            _fail(manifest, summary, item, err)
            continue
        manifest.record(item)
        summary.images += 1
        summary.detections += len(detections)


def _write_outputs(
    out_dir: Path, item: Input, image: np.ndarray, detections: Detections, class_names: Sequence[str], options: PredictOptions
) -> None:
    annotated = None
    if options.save_images:
        annotated = encode_like(draw_detections(image, detections, class_names, options.style), item.rel)
    write_image_outputs(out_dir, item.rel, detections.to_json(class_names), options.formats, annotated)


def _fail(manifest: Manifest, summary: Summary, item: Input, error: DetectError) -> None:
    manifest.record(item, error)
    summary.failed += 1
    summary.failures.append((item.path, f"{error.code}: {error.message}"))


_BARS: dict[int, tuple[Progress, float]] = {}  # id(stream) -> (its bar, the run's seconds at the last call)


def _progress(stream: TextIO | None, summary: Summary, total: int, seconds: float) -> None:
    """After each batch: a tqdm bar when ``stream`` is a terminal, else a plain line every
    :data:`detect.progress.DEFAULT_INTERVAL` seconds and at the end (:class:`detect.progress.Progress`). A call
    whose ``seconds`` (since its run started) went back, or whose ``total`` differs, belongs to a new run and
    starts a new bar; the bar ends when every input is done."""
    if stream is None:
        return
    done = summary.images + summary.failed
    bar, last = _BARS.get(id(stream), (None, 0.0))
    if bar is None or seconds < last or bar.total != total:
        if bar is not None:
            bar.close()
        bar = Progress(total, desc="predict", unit="img", stream=stream)
    bar.update(done, elapsed=seconds)
    if done >= total:
        bar.close()
        _BARS.pop(id(stream), None)
    else:
        _BARS[id(stream)] = (bar, seconds)
