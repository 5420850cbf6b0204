"""Where each box kernel runs: fused numba loops on the CPU, fused Triton kernels on CUDA, torch ops as reference.

Every public kernel of :mod:`detect.ops` (``box_iou``/``batched_box_iou``, the suppression inside
``grouped_nms``/``multiclass_nms``, ``BoxCoder.encode``/``decode``, ``clip_boxes``) asks :func:`choose` once per call
which implementation to run, and gets one of

- ``"numba"``: the fused loops of :mod:`detect.ops._cpu` (CPU tensors, float32/float64 arithmetic);
- ``"triton"``: the fused kernels of :mod:`detect.ops._gpu` (CUDA tensors computed in float32, Triton
  importable; float64 on CUDA stays on the reference);
- ``"torch"``: the composed torch-op implementation, which every fast path is tested against and which runs
  everywhere else (other devices, other dtypes, autograd).

All three give the same results: bitwise on the CPU; on CUDA see :mod:`detect.ops._gpu` for the ulp-level
exceptions. fp16/bf16 inputs are upcast to float32 before the choice, as the reference does.

Decisions:

- The choice depends on the device, the compute dtype and whether autograd needs a graph; never on the values,
  so an image's detections cannot depend on its batch. On the CPU the serial loop runs below
  ``PARALLEL_WORK`` elements of work (waking threads costs more than it saves there) and the parallel one
  above; the torch path is never the cheapest on the CPU, even for a handful of boxes (a dozen op launches
  against one loop).
- Large inputs are split over ``torch.get_num_threads()`` threads (at most the CPU count), so the one knob the
  service already turns (``set_torch_threads``) sizes both; the worker threads are created again in a forked
  child. See :mod:`detect.ops._cpu` for why not numba's own ``parallel=True``.
- The first call of a loop loads it from numba's on-disk cache, or compiles it (seconds) on a cold cache. A
  service calls :func:`detect.ops.warmup` at start-up so that no request pays this; :func:`detect.ops.warmup` returns the seconds it
  took per backend, reported apart from any timing.
- While torch.export or torch.compile traces (``torch.compiler.is_compiling()``) every kernel takes the torch
  path: the numba and Triton launches cannot be traced, and an exported program must run where neither exists.
- :func:`use_backend` (or ``DETECT_OPS_BACKEND=torch|numba|triton`` in the environment) forces one
  implementation, for tests and benchmarks; a forced backend that cannot run an input falls back to ``"torch"``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from types import ModuleType
from typing import Callable, Iterator

import torch

__all__ = ["BACKENDS", "PARALLEL_WORK", "choose", "cpu", "gpu", "run_cpu", "use_backend"]

BACKENDS = ("auto", "torch", "numba", "triton")
PARALLEL_WORK = 1 << 15
"""Elements of work (IoU pairs, candidate boxes x kept boxes, boxes) from which the parallel loop runs."""

_FORCED: ContextVar[str] = ContextVar("detect_ops_backend", default=os.environ.get("DETECT_OPS_BACKEND", "auto"))
_FAST_DTYPES = (torch.float32, torch.float64)
_lock = threading.Lock()
_pool: dict[str, object] = {}
_modules: dict[str, ModuleType | None] = {}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (one of :data:`BACKENDS`) for the kernels called inside the block (this thread/context)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def cpu() -> ModuleType:
    """The numba loops (imported, and numba with them, on first use)."""
    module = _modules.get("cpu")
    if module is None:
        from detect.ops import _cpu

        module = _modules["cpu"] = _cpu
    return module


def gpu() -> ModuleType | None:
    """The Triton kernels, or None where Triton cannot be imported."""
    if "gpu" not in _modules:
        try:
            from detect.ops import _gpu
        except ImportError:  # a CPU-only torch without triton
            _gpu = None
        _modules["gpu"] = _gpu
    return _modules["gpu"]


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def choose(kernel: str, device: torch.device, dtype: torch.dtype, *, needs_grad: bool = False) -> str:
    """``"numba"``, ``"triton"`` or ``"torch"`` for ``kernel`` on inputs of ``device`` computed in ``dtype``.

    ``kernel`` names the caller (for error messages and future per-kernel rules); ``needs_grad`` is True when
    autograd must see the computation, which only the torch path provides.
    """
    forced = _FORCED.get()
    if forced == "torch" or needs_grad or dtype not in _FAST_DTYPES or torch.compiler.is_compiling():
        return "torch"
    if device.type == "cpu":
        if forced == "triton" and dtype == torch.float32 and _triton_interpreted() and gpu() is not None:
            return "triton"  # the Triton interpreter runs on CPU tensors: correctness tests only
        return "numba"
    if device.type == "cuda" and dtype == torch.float32 and forced in ("auto", "triton") and gpu() is not None:
        return "triton"
    return "torch"


def _executor() -> ThreadPoolExecutor:
    """The worker threads of :func:`run_cpu`, created on first use (and again in a forked child)."""
    with _lock:
        if _pool.get("pid") != os.getpid():
            _pool["executor"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="detect-ops")
            _pool["pid"] = os.getpid()
        return _pool["executor"]


def run_cpu(kernel: Callable, tasks: int, work: int, *args) -> None:
    """Run the numba loop ``kernel(start, stop, *args)`` over its ``tasks`` independent tasks.

    Below ``PARALLEL_WORK`` elements of ``work``, or with one torch thread, the whole range runs in the calling
    thread; above, it is cut into ``torch.get_num_threads()`` equal ranges, one run here and the others on
    worker threads (the loops release the GIL). A loop listed in ``detect.ops._cpu.TEAM`` runs its ranges on
    torch's own OpenMP team instead, where that team can take it. See :mod:`detect.ops._cpu` for why not numba's
    ``prange``, and for the team.
    """
    threads = min(torch.get_num_threads(), tasks)
    if work < PARALLEL_WORK or threads <= 1:
        kernel(0, tasks, *args)
        return
    team = getattr(_modules.get("cpu"), "TEAM", {}).get(kernel)
    if team is not None and team(tasks, threads, *args):
        return
    bounds = [tasks * part // threads for part in range(threads + 1)]
    executor = _executor()
    futures = [executor.submit(kernel, bounds[p], bounds[p + 1], *args) for p in range(1, threads)]
    kernel(bounds[0], bounds[1], *args)
    for future in futures:
        future.result()
