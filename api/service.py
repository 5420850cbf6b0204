"""The detection service behind the HTTP layer: models, micro-batching, per-request refinement and metrics.

Decisions:

* **One inference thread, fed by an asyncio queue.** Each image of a request is one job on a bounded
  ``asyncio.Queue``. A dispatcher task takes the first job, gathers up to ``max_batch`` jobs for the same model
  and options, waiting at most ``max_wait_ms`` for the batch to fill, and runs ONE forward pass on a
  single-thread executor, so the event loop never runs model code and the model never runs twice at once
  (``DETECT_INFERENCE_WORKERS=2`` allows two forwards at once, and ``DETECT_TORCH_THREADS`` sizes torch's
  intra-op pool from the inference thread; neither helped the tiny Faster R-CNN's throughput, see
  ``benchmarks/service.py``).
  It waits only while other images are on their way (requests being decoded, or queued): a request announces
  its images when it starts, so a lone request is dispatched at once instead of paying ``max_wait_ms`` for
  company that cannot come. While a forward runs, new jobs queue up, so under load batches fill without
  waiting. Jobs for another model are held for the next round. Results are handed back through each job's future.
* **Models.** ``DETECT_MODELS`` names them; unset, every registered ``<family>_shapes`` entry (the bundled
  weights) is served under its family name, in the registry's family order (``faster_rcnn`` first and so the
  default). Loading and running go through :mod:`detect.inference`, the path ``detect predict`` uses too. Weights are a registered
  name or a file; the version reported is the first 12 hex digits of the weights' SHA-256 (the manifest's for a
  name).
* **Back-pressure and deadlines.** A request with more images than ``image_limit`` (``max_images_per_request``,
  capped by ``queue_size``) can never be served: 413 ``too_many_images``. One whose images do not fit in the
  queue now is refused at once (:class:`ServiceBusyError`, 503 with ``Retry-After``), before its images are
  decoded, and again when they are queued (the queue may have filled meanwhile). Each request has one
  deadline (``request_timeout_s``) over everything after its body arrived: decoding, queueing, the forward pass
  and building the answer. Past it the request answers 504; its decodes are abandoned (the threads finish
  unobserved) and its jobs still queued are skipped by the dispatcher.
* **Decoding** and building the answers (thresholds, JSON, annotation PNGs) run on the service's own pool of
  ``request_workers`` threads (default one per core, at most 8), never on the event loop; Pillow releases the
  GIL. This is CPU work: more threads than cores add no throughput, only memory (images in flight, and a malloc
  arena per thread). With anyio's pool of 40 threads the server's RSS grew 10 % over a 300 s soak; see
  ``benchmarks/soak.py``. The limits of :func:`detect.io.decode_image` are checked from the header before
  decoding.
* **Latency under load.** Answers that need no forward pass (503, 413, probes) must stay fast while forward
  passes saturate the CPU. Two measured causes of their slow tail are removed: the garbage collector's full
  passes over the models' objects (a service that loaded its own models freezes its heap once ready, see
  :func:`freeze_heap`; injected detectors leave the embedding process's collector alone), and the scheduler
  running forward passes before the event loop (``DETECT_INFERENCE_NICE`` lowers the inference threads'
  priority on Linux, see :func:`init_inference_thread`). Figures in ``benchmarks/soak.py``.
* **Readiness.** When every model is loaded and warmed up, ``/readyz`` turns 200 and the service logs one line
  ``ready: serving NAME (N classes), ... on DEVICE at http://HOST:PORT ...`` (:meth:`DetectionService.ready_line`).
  Loading and warm-up failures keep the service not ready (``/readyz`` and every ``/detect``
  answer 503 ``not_ready``); the message names the model and the error code, never a file-system path (the
  full message goes to the server log). A model whose warm-up forward fails is not ready either.
* **Per-image failures.** In a request with several images each one fails alone: its item carries ``error``
  and the others their detections. A request with ONE image answers with that image's error status instead
  (413/415/422), which is what a client sending one image expects.
* **Stage timings** (ms, per image): ``decode``, ``queue`` (waiting for the forward), ``inference`` (the
  batch's forward pass; the detector's own stages instead when its ``Detections.extras["timings_ms"]`` has them),
  ``postprocess`` (request thresholds, JSON, annotation). ``batch_size`` says how many images shared the forward.
* **Proposal methods.** A model supports ``detector.proposal_methods`` when it declares them, else ``rpn`` when it
  has an ``rpn`` module and ``selective_search`` when it has a ``proposer``. A request naming a method the model
  lacks is refused (422); a model declaring several gets ``proposal_method=`` in its ``forward``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from api.memory import MemoryBudget, Reservation, decode_fit, to_original
from api.schemas import DetectParams
from api.settings import ModelSpec, Settings
from detect import weights as registered_weights
from detect.errors import (
    BadBase64Error,
    DetectError,
    NotReadyError,
    RequestTimeoutError,
    ServiceBusyError,
    TooManyImagesError,
    UnknownModelError,
    UnsupportedProposalsError,
    WeightsError,
)
from detect.io import Fit, decode_fitted, plan_decode
from detect.ops import warmup as ops_warmup
from detect.detectors import families
from detect.drawing import draw_detections
from detect.inference import (
    DEFAULT_SCORE_THRESHOLD,
    Refinement,
    bundled_weights_name,
    forward_batch,
    load_model,
    png_base64,
    proposal_methods,
    registered_names,
    resolve_classes,
    resolve_device,
)
from detect.slicing import SliceOptions, detect_sliced
from detect.sources import UrlPolicy
from detect.structures import Detections

log = logging.getLogger("detect.api")

STAGES = ("decode", "queue", "inference", "postprocess")
WARMUP_SIZE = 64


# --- metrics ---------------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) for one label set."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """The service's metrics in the Prometheus text exposition format (written here: four metric families do not
    justify a dependency). Thread-safe: the inference thread observes batch sizes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.in_flight = 0
        self.request_latency = Histogram(LATENCY_BUCKETS)
        self.stages = {stage: Histogram(LATENCY_BUCKETS) for stage in STAGES}
        self.batch_sizes = Histogram(BATCH_BUCKETS)

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_finished(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            self.request_latency.observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stages[stage].observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes.observe(size)

    def render(self, queue_depth: int) -> str:
        with self._lock:
            lines = ["# HELP detect_requests_total HTTP requests by path and status.", "# TYPE detect_requests_total counter"]
            lines += [f'detect_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
            lines += ["# HELP detect_requests_in_flight Requests being served.", "# TYPE detect_requests_in_flight gauge"]
            lines += [f"detect_requests_in_flight {self.in_flight}"]
            lines += ["# HELP detect_queue_depth Images waiting for inference.", "# TYPE detect_queue_depth gauge"]
            lines += [f"detect_queue_depth {queue_depth}"]
            lines += ["# HELP detect_request_seconds Request latency.", "# TYPE detect_request_seconds histogram"]
            lines += self.request_latency.lines("detect_request_seconds", "")
            lines += ["# HELP detect_stage_seconds Per-image time by stage.", "# TYPE detect_stage_seconds histogram"]
            for stage, histogram in self.stages.items():
                lines += histogram.lines("detect_stage_seconds", f'stage="{stage}"')
            lines += ["# HELP detect_batch_size Images per forward pass.", "# TYPE detect_batch_size histogram"]
            lines += self.batch_sizes.lines("detect_batch_size", "")
        return "\n".join(lines) + "\n"


# --- models ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    name: str
    detector: Any  # any object with ``class_names`` and ``__call__(images, **kwargs) -> (detections, losses)``
    version: str
    proposals: tuple[str, ...]

    @classmethod
    def wrap(cls, name: str, detector: Any, version: str | None = None) -> "LoadedModel":
        return cls(name, detector, version or getattr(detector, "version", "unversioned"), proposal_methods(detector))

    def forward_kwargs(self, proposals: str | None) -> dict[str, str]:
        if proposals is None:
            return {}
        if proposals not in self.proposals:
            raise UnsupportedProposalsError(
                f"model {self.name!r} does not support {proposals!r} proposals; it supports: {', '.join(self.proposals) or 'none to choose'}"
            )
        return {"proposal_method": proposals} if len(self.proposals) > 1 else {}


def configured_models(settings: Settings) -> dict[str, ModelSpec]:
    """``settings.models``, or when it is empty every registered ``<family>_shapes`` entry under its family name."""
    if settings.models:
        return dict(settings.models)
    names = registered_names()
    return {
        family: ModelSpec(family=family, weights=bundled_weights_name(family))
        for family in families()
        if bundled_weights_name(family) in names
    }


# --- micro-batching --------------------------------------------------------------------------------------------
@dataclass
class Job:
    model: LoadedModel
    image: np.ndarray
    kwargs: dict[str, str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    slicing: SliceOptions | None = None  # sliced inference: the job's tiles run in batches of max_batch

    @property
    def key(self) -> tuple:
        return (self.model.name, tuple(sorted(self.kwargs.items())), self.slicing)


@dataclass(frozen=True)
class Inference:
    detections: Detections | DetectError
    queue_s: float
    forward_s: float
    batch_size: int


@dataclass
class Ticket:
    """Images a request announced to the :class:`Batcher` and has not queued yet (see :meth:`Batcher.announce`)."""

    left: int


class Batcher:
    """Groups queued images into forward passes on one inference thread (see the module docstring).

    ``expected`` counts the images that could still join a batch: announced by requests being decoded, or queued
    and not yet taken by the dispatcher. The dispatcher waits for company (up to ``max_wait_ms``) only while it is
    above zero, so a lone request is dispatched at once and sequential clients pay no batching delay. Only the
    event-loop thread touches it.
    """

    def __init__(
        self,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: Metrics,
        workers: int = 1,
        torch_threads: int | None = None,
        inference_nice: int = 0,
    ) -> None:
        self.max_batch = max_batch
        self.workers = workers
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.metrics = metrics
        self.expected = 0
        self._changed = asyncio.Event()  # set whenever ``expected`` changes other than by a take
        self._held: deque[Job] = deque()
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="inference",
            initializer=init_inference_thread,
            initargs=(torch_threads, inference_nice),
        )
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def announce(self, images: int) -> Ticket:
        """Say that ``images`` images are on their way (a request starts decoding): batches wait for them."""
        self.expected += images
        self._changed.set()
        return Ticket(images)

    def withdraw(self, ticket: Ticket) -> None:
        """The announced images that will not come (bad images, a refused or failed request)."""
        self.expected -= ticket.left
        ticket.left = 0
        self._changed.set()

    def check_room(self, images: int, retry_after: int) -> None:
        """:class:`ServiceBusyError` when ``images`` images do not fit in the queue now."""
        if self.queue.maxsize - self.queue.qsize() < images:
            raise ServiceBusyError("the server is busy; retry later", retry_after=retry_after)

    def submit(
        self,
        model: LoadedModel,
        images: Sequence[np.ndarray],
        kwargs: dict[str, str],
        retry_after: int,
        slicing: SliceOptions | None = None,
    ) -> list[asyncio.Future]:
        """Queue every image or none: a request that does not fit is refused whole. The caller withdraws its
        announcement right after (no await between), so queued images are never counted twice."""
        self.check_room(len(images), retry_after)
        loop = asyncio.get_running_loop()
        jobs = [Job(model, image, kwargs, loop.create_future(), slicing=slicing) for image in images]
        for job in jobs:
            self.queue.put_nowait(job)
        self.expected += len(jobs)
        self._changed.set()
        return [job.future for job in jobs]

    async def run_now(self, model: LoadedModel, images: list[np.ndarray]) -> list[Detections | DetectError]:
        """A forward pass on the inference thread outside the queue (warm-up)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, forward_batch, model.detector, images)

    async def _dispatch(self) -> None:
        """Gather a batch once a worker is free (so batches fill while all are busy), run it, repeat."""
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            batch = await self._gather()
            batch = [job for job in batch if not job.future.done()]  # requests that timed out meanwhile
            if not batch:
                free.release()
                continue
            running = loop.run_in_executor(self._executor, self._run, batch, loop)
            running.add_done_callback(lambda _: free.release())

    async def _take(self) -> Job:
        job = await self.queue.get()
        self.expected -= 1
        return job

    async def _gather(self) -> list[Job]:
        first = self._held.popleft() if self._held else await self._take()
        batch, deadline = [first], time.perf_counter() + self.max_wait_s
        for job in list(self._held):  # held jobs waited longest: they join first
            if len(batch) < self.max_batch and job.key == first.key:
                self._held.remove(job)
                batch.append(job)
        while len(batch) < self.max_batch:
            if self.queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self.expected <= 0:  # nobody else could join: go now
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
                continue
            job = await self._take()
            (batch if job.key == first.key else self._held).append(job)
        return batch

    def _run(self, batch: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        """On the inference thread: one forward for the batch, each result to its job's future."""
        start = time.perf_counter()
        try:
            images, detector, slicing = [job.image for job in batch], batch[0].model.detector, batch[0].slicing
            results: list[Detections | DetectError] | BaseException = (
                forward_batch(detector, images, **batch[0].kwargs) if slicing is None
                else detect_sliced(detector, images, slicing, **batch[0].kwargs)
            )
        except Exception as err:  # a bug in a detector must fail its requests, not the dispatcher
            log.exception("inference failed")
            results = err
        seconds = time.perf_counter() - start
        self.metrics.observe_batch(len(batch))
        for i, job in enumerate(batch):
            outcome = results if isinstance(results, BaseException) else Inference(results[i], start - job.enqueued, seconds, len(batch))
            loop.call_soon_threadsafe(_resolve, job.future, outcome)


def set_torch_threads(threads: int | None) -> None:
    """Inference-thread initializer. ``torch.set_num_threads`` sizes the process's intra-op pool, so this is a
    deployment setting (``DETECT_TORCH_THREADS``), never a library default."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def request_workers(configured: int | None) -> int:
    """Threads that decode images and build answers: ``configured``, else one per core, at most 8."""
    return configured or min(8, os.cpu_count() or 1)


def freeze_heap() -> None:
    """Collect once, then move every live object (models, imports) to the collector's permanent generation, so
    later full collections scan only what requests allocate. Measured on the bundled models: a full collection
    paused the whole process for about 240 ms under load (every request in flight waited), and the overload run's
    p99 of fast 503s with it."""
    gc.collect()
    gc.freeze()


def init_inference_thread(threads: int | None, nice: int) -> None:
    """Inference-thread initializer: torch's thread count (:func:`set_torch_threads`) and, on Linux, ``nice``
    added to this thread's niceness, which the intra-op threads it starts inherit (Linux niceness is per
    thread). The event loop keeps its priority, so under load the scheduler runs it first: every answer that
    needs no forward pass (a 503, a 413, a probe) stays fast while forward passes take the remaining CPU."""
    set_torch_threads(threads)
    if nice and sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)


def _resolve(future: asyncio.Future, outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# --- the service -----------------------------------------------------------------------------------------------
@dataclass
class ImageOutcome:
    """One image of a request after decoding: pixels or the error, and the decode time."""

    id: str | None
    image: np.ndarray | None = None
    error: DetectError | None = None
    decode_s: float = 0.0
    factor: int = 1  # the image was decoded ``factor`` times smaller than the original (api/memory.py)
    original_size: tuple[int, int] | None = None  # (H, W) upright


class DetectionService:
    """Loads (or is given) detectors, warms them up, and answers detection requests."""

    def __init__(self, settings: Settings, detectors: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.models: dict[str, LoadedModel] = {}
        self._injected = detectors
        self.ready = False
        self.not_ready_reason = "models are loading"
        self.batcher: Batcher | None = None
        self._startup: asyncio.Task | None = None
        self._workers: ThreadPoolExecutor | None = None
        self.address: str | None = None  # where clients reach the service, for the ready line (set by `detect serve`)
        self.budget = MemoryBudget(settings.decode_budget_bytes, settings.decode_wait_s, settings.retry_after_s)

    # lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the dispatcher, then load and warm up the models in the background (``/readyz`` says when)."""
        s = self.settings
        self.batcher = Batcher(
            s.max_batch, s.max_wait_ms, s.queue_size, self.metrics, s.inference_workers, s.torch_threads, s.inference_nice
        )
        self.batcher.start()
        self._workers = ThreadPoolExecutor(request_workers(s.request_workers), thread_name_prefix="request")
        self._startup = asyncio.get_running_loop().create_task(self._load_and_warm())

    async def stop(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)

    async def _load_and_warm(self) -> None:
        try:
            if self._injected is not None:
                self.models = {name: LoadedModel.wrap(name, d) for name, d in self._injected.items()}
            else:
                self.models = await anyio.to_thread.run_sync(self._load_models)
            if not self.models:
                self.not_ready_reason = "no models configured (set DETECT_MODELS, or register <family>_shapes weights)"
                return
            if self.settings.warmup:
                seconds = await anyio.to_thread.run_sync(ops_warmup)  # the fused kernels' load, never in a request
                log.info("box kernels ready in %s", ", ".join(f"{d} {t:.2f} s" for d, t in seconds.items()))
                blank = np.full((WARMUP_SIZE, WARMUP_SIZE, 3), 127, np.uint8)
                for model in self.models.values():
                    await self._warm_up(model, blank)
        except ModelFailure as failure:
            self.not_ready_reason = failure.public_reason()
            traceback = None if isinstance(failure.cause, DetectError) else failure.cause
            log.error("%s", failure.log_line(), exc_info=traceback)
            return
        if self._injected is None:
            await anyio.to_thread.run_sync(freeze_heap)
        self.ready = True
        log.info("%s", self.ready_line())

    def ready_line(self) -> str:
        """The one log line saying the service answers now (``/readyz`` is 200): its models, device and address."""
        models = ", ".join(f"{m.name} ({len(m.detector.class_names)} classes)" for m in self.models.values())
        where = f" at {self.address} (page {self.address}/, API docs {self.address}/docs)" if self.address else ""
        return f"ready: serving {models} on {self.device}{where}"

    async def _warm_up(self, model: LoadedModel, image: np.ndarray) -> None:
        try:
            (result,) = await self.batcher.run_now(model, [image])
        except Exception as err:  # a bug in the detector: this model cannot serve
            raise ModelFailure(model.name, "its warm-up", err) from err
        if isinstance(result, DetectError):
            raise ModelFailure(model.name, "its warm-up", result)

    def _load_models(self) -> dict[str, LoadedModel]:
        models = {}
        for name, spec in configured_models(self.settings).items():
            try:
                detector = load_model(spec.weights, self.device, spec.family, self.settings.backend)
                models[name] = LoadedModel.wrap(name, detector, registered_weights.version(spec.weights))
            except Exception as err:  # a broken file or a bug: this model stays unserved, the service not ready
                raise ModelFailure(name, "to load", err) from err
        return models

    # queries ---------------------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The models' device: ``settings.device`` with ``auto`` resolved (CUDA when present)."""
        return resolve_device(self.settings.device)

    @property
    def default_model(self) -> str | None:
        return self.settings.default_model or next(iter(self.models), None)

    def model(self, name: str | None) -> LoadedModel:
        if not self.ready:
            raise NotReadyError(f"the service is not ready ({self.not_ready_reason})", retry_after=self.settings.retry_after_s)
        name = name or self.default_model
        if name not in self.models:
            raise UnknownModelError(f"unknown model {name!r}; loaded: {', '.join(self.models) or 'none'}")
        return self.models[name]

    def admit(self) -> None:
        """Refuse a request before its body is read: 503 ``not_ready`` while models load, 503 ``overloaded`` while
        the queue is full (a request whose images fit no more is refused again after decoding, see :meth:`detect`)."""
        if not self.ready:
            raise NotReadyError(f"the service is not ready ({self.not_ready_reason})", retry_after=self.settings.retry_after_s)
        self.batcher.check_room(1, self.settings.retry_after_s)

    def queue_depth(self) -> int:
        return self.batcher.queue.qsize() if self.batcher is not None else 0

    # detection -------------------------------------------------------------------------------------------------
    async def detect(self, params: DetectParams, sources: Sequence[tuple[str | None, bytes | str]]) -> dict:
        """Detect objects in each source (raw bytes, or base64 text from JSON) and build the response body, all
        within ``request_timeout_s`` (:class:`RequestTimeoutError` otherwise)."""
        if len(sources) > self.settings.image_limit:
            raise too_many_images(self.settings.image_limit, len(sources))
        model = self.model(params.model)
        if params.score_threshold is None:  # JSON null means omitted: the default for people
            params = params.model_copy(update={"score_threshold": DEFAULT_SCORE_THRESHOLD})
        refinement = Refinement(
            params.score_threshold,
            params.iou_threshold,
            params.max_detections,
            None if params.classes is None else resolve_classes(params.classes, model.detector.class_names),
        )
        kwargs = model.forward_kwargs(params.proposals)
        try:
            return await asyncio.wait_for(
                self._answer(params, sources, model, refinement, kwargs), self.settings.request_timeout_s
            )
        except TimeoutError:
            raise RequestTimeoutError(f"no answer within {self.settings.request_timeout_s:g} s") from None

    async def _answer(
        self,
        params: DetectParams,
        sources: Sequence[tuple[str | None, bytes | str]],
        model: LoadedModel,
        refinement: Refinement,
        kwargs: dict[str, str],
    ) -> dict:
        """Decode, queue, wait for the forward passes, build the body. Cancelled at the deadline: decodes not
        started are dropped and running ones abandoned to their threads, queued jobs cancelled (the dispatcher skips them), the announcement withdrawn.
        A request that finds the queue full is refused before decoding, so overload costs no decoding work."""
        self.batcher.check_room(len(sources), self.settings.retry_after_s)
        ticket = self.batcher.announce(len(sources))
        held: list[Reservation] = []  # released when the answer is built, or when abandoned decodes end
        try:
            return await self._decoded_answer(params, sources, model, refinement, kwargs, ticket, held)
        finally:
            for reservation in held:
                reservation.release()

    async def _decoded_answer(
        self,
        params: DetectParams,
        sources: Sequence[tuple[str | None, bytes | str]],
        model: LoadedModel,
        refinement: Refinement,
        kwargs: dict[str, str],
        ticket: Ticket,
        held: list[Reservation],
    ) -> dict:
        loop = asyncio.get_running_loop()
        # a sliced request needs the full resolution (its tiles are the point); the budget still counts its pixels
        fit = None if params.slice is not None else decode_fit(model.detector, self.settings.decode_max_side)
        try:
            outcomes = await asyncio.gather(*(self._decode_in_budget(i, s, fit, held) for i, s in sources))
            busy = next((o.error for o in outcomes if isinstance(o.error, ServiceBusyError)), None)
            if busy is not None:  # like a full queue: the request is refused whole
                raise busy
            if len(outcomes) == 1 and outcomes[0].error is not None:
                raise outcomes[0].error
            good = [o for o in outcomes if o.image is not None]
            futures = self.batcher.submit(
                model, [o.image for o in good], kwargs, self.settings.retry_after_s, self._slicing(params)
            )
        finally:
            self.batcher.withdraw(ticket)
        try:
            inferences = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        by_id = dict(zip(map(id, good), inferences))
        items = await loop.run_in_executor(
            self._workers, lambda: [self._item(o, by_id.get(id(o)), model, refinement, params.annotate) for o in outcomes]
        )
        if len(items) == 1 and "error" in items[0]:
            raise items[0].pop("_exception")
        for item in items:
            item.pop("_exception", None)
        return {
            "model": {"name": model.name, "version": model.version},
            "parameters": params.model_copy(update={"model": model.name}).model_dump(),
            "images": items,
        }

    def _slicing(self, params: DetectParams) -> SliceOptions | None:
        """The request's sliced inference (``slice``, ``overlap``), its tiles batched ``max_batch`` at a time."""
        if params.slice is None:  # overlap alone is ignored (the schema cannot tie the two fields together)
            return None
        overlap = 0.2 if params.overlap is None else params.overlap
        return SliceOptions(params.slice, overlap, batch_size=self.settings.max_batch)

    def url_policy(self) -> UrlPolicy:
        """The limits of a JSON ``{"url": ...}`` input: the settings' timeout, allow_private and body cap."""
        s = self.settings
        timeout = s.url_timeout_s
        return UrlPolicy(min(5.0, timeout), min(10.0, timeout), timeout, s.max_body_bytes, allow_private=s.url_allow_private)

    async def _decode_in_budget(
        self, image_id: str | None, source: bytes | str, fit: Fit, held: list[Reservation]
    ) -> ImageOutcome:
        """Read the header, reserve the decoding's memory from the budget (waiting for it if need be), decode
        reduced for ``fit``, keep the decoded array's bytes reserved (see :mod:`api.memory`)."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        planned = await loop.run_in_executor(self._workers, self._plan, source, fit)
        if isinstance(planned, DetectError):
            return ImageOutcome(image_id, error=planned)
        data, peak_bytes = planned
        planning_s = time.perf_counter() - start
        try:
            reservation = await self.budget.acquire(peak_bytes)
        except DetectError as err:
            return ImageOutcome(image_id, error=err)
        held.append(reservation)
        decoding = loop.run_in_executor(self._workers, self._decode, image_id, data, fit)
        reservation.covers(decoding)
        outcome = await decoding
        reservation.resize(0 if outcome.image is None else outcome.image.nbytes)
        outcome.decode_s += planning_s
        return outcome

    def _plan(self, source: bytes | str, fit: Fit) -> tuple[bytes, int] | DetectError:
        """The image's bytes (base64 decoded) and its decoding's estimated peak memory, from the header."""
        try:
            data = _b64decode(source) if isinstance(source, str) else source
            plan = plan_decode(data, fit, self.settings.max_pixels, self.settings.max_side)
        except DetectError as err:
            return err
        return data, plan.peak_bytes

    def _decode(self, image_id: str | None, data: bytes, fit: Fit) -> ImageOutcome:
        start = time.perf_counter()
        try:
            fitted = decode_fitted(data, fit, self.settings.max_pixels, self.settings.max_side)
        except DetectError as err:
            return ImageOutcome(image_id, error=err)
        seconds = time.perf_counter() - start
        self.metrics.observe_stage("decode", seconds)
        return ImageOutcome(image_id, fitted.pixels, decode_s=seconds, factor=fitted.factor, original_size=fitted.original_size)

    def _item(
        self, outcome: ImageOutcome, inference: Inference | None, model: LoadedModel, refinement: Refinement, draw: bool
    ) -> dict:
        """One response item (a thread-pool call: annotation encodes a PNG)."""
        error = outcome.error or (inference.detections if isinstance(inference.detections, DetectError) else None)
        if error is not None:
            return {"id": outcome.id, "error": {"code": error.code, "message": error.message}, "_exception": error}
        start = time.perf_counter()
        detections = refinement.apply(inference.detections.to("cpu"))
        original = to_original(detections, outcome.factor, outcome.original_size or detections.image_size)
        item = {"id": outcome.id, **original.to_json(model.detector.class_names)}
        if draw:  # drawn on the decoded pixels: smaller than the original when it was decoded reduced
            item["annotated_png"] = png_base64(draw_detections(outcome.image, detections, model.detector.class_names))
        post_s = time.perf_counter() - start
        stages = inference.detections.extras.get("timings_ms")
        timings = {"decode": outcome.decode_s * 1e3, "queue": inference.queue_s * 1e3}
        timings.update(stages if isinstance(stages, dict) else {"inference": inference.forward_s * 1e3})
        timings["postprocess"] = post_s * 1e3
        item["timings_ms"] = {k: round(float(v), 3) for k, v in timings.items()}
        item["batch_size"] = inference.batch_size
        for stage, seconds in (("queue", inference.queue_s), ("inference", inference.forward_s), ("postprocess", post_s)):
            self.metrics.observe_stage(stage, seconds)
        return item


class ModelFailure(Exception):
    """A configured model failed to load or to warm up: ``cause`` for the server log, the model's name and the
    error's code for clients (:meth:`public_reason`, which never shows a path)."""

    def __init__(self, name: str, stage: str, cause: BaseException) -> None:
        super().__init__(name, stage, cause)
        self.name, self.stage, self.cause = name, stage, cause

    def public_reason(self) -> str:
        code = self.cause.code if isinstance(self.cause, DetectError) else "internal_error"
        return f"model {self.name!r} failed {self.stage} ({code}; the server log has the details)"

    def log_line(self) -> str:
        message = self.cause.message if isinstance(self.cause, DetectError) else repr(self.cause)
        return f"model {self.name!r} failed {self.stage}: {message}"


def too_many_images(limit: int, count: int | None = None) -> TooManyImagesError:
    """The one refusal of a request with more than ``limit`` images (JSON or multipart, at any count)."""
    told = f"{count} images" if count is not None else f"more than {limit} images"
    return TooManyImagesError(f"{told}; at most {limit} per request")


def _b64decode(text: str) -> bytes:
    """Standard base64 with or without padding; anything else is :class:`BadBase64Error`."""
    text = "".join(text.split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadBase64Error(f"invalid base64 image data: {err}") from err


def check_weights(settings: Settings) -> None:
    """Fail fast (for ``detect serve``) when a configured model's weights are neither a file nor a registered name
    whose file exists. Without ``DETECT_MODELS`` only registered names are served, so nothing can be missing."""
    for name, spec in configured_models(settings).items():
        if Path(spec.weights).is_file():
            continue
        try:
            entry = registered_weights.resolve(spec.weights)
        except WeightsError as err:
            raise WeightsError(
                f"model {name!r}: {spec.weights!r} is neither a weights file nor registered weights ({err.message}); "
                f"`detect weights list` shows the registered names"
            ) from err
        if not entry.path.is_file():
            raise WeightsError(f"model {name!r}: the file of registered weights {spec.weights!r} is missing: {entry.path}")

