"""The same FastAPI app (:func:`api.app.create_app`) as a Ray Serve deployment: ``detect serve --engine ray``,
and ``import_path: api.ray_serve:app_builder`` for a KubeRay ``RayService``.

Decisions:

* **The same app, whole.** Each replica builds the app with :func:`api.app.create_app` (a late-bound
  ``@serve.ingress``: the app is built in the replica, never pickled), so routes, error shapes, limits and
  ``/metrics`` are the plain server's, and each replica runs its own micro-batcher
  (:class:`api.service.Batcher`). ``/metrics`` answers from whichever replica the proxy picks (its own
  counters); cluster-wide figures come from Ray's Prometheus metrics (``ray_serve_*``).
* **A replica takes traffic once its models are loaded.** Serve routes to a replica when its ASGI lifespan
  startup has returned; the app's startup only starts loading, so the replica's startup also waits until
  ``/readyz`` would say ready (at most ``startup_timeout_s``; past it the replica fails and Serve starts
  another). New replicas from autoscaling never answer ``503 not_ready``.
* **Scaling.** ``--replicas N`` fixes the count; ``--autoscale MIN:MAX`` scales on ongoing requests with a
  target of ``DETECT_MAX_BATCH`` per replica (a replica with a full batch in flight is busy; more waiting means
  another replica helps). ``max_ongoing_requests`` is ``DETECT_QUEUE_SIZE``: Serve's own back-pressure starts
  where the replica's queue would refuse anyway (Serve's default of 5 would starve the micro-batcher).
* **Resources.** A replica reserves ``DETECT_TORCH_THREADS`` CPUs (1 when unset, and Ray then sets the
  replica's ``OMP_NUM_THREADS`` to 1), and 1 GPU when ``DETECT_DEVICE`` is CUDA (Ray pins it, so the replica's
  ``cuda`` is its own GPU). Threads beyond the reservation hurt: on the 2-core development machine (shared,
  busy) a replica running the bundled Faster R-CNN at 2 torch threads took 184-334 ms a forward against 42 ms
  at 1 thread (``benchmarks/scale.py``'s serving part; the plain server's inference thread did not show it).
* **Latency.** A request on Serve pays the HTTP proxy and a handle call (with the request's serialisation) on
  top of the plain server's path. ``benchmarks/scale.py`` shows the split: the app's own time comes from its
  ``Server-Timing`` header, the handle's from a no-op call (:meth:`DetectIngress.echo_size`) carrying the same
  bytes, the proxy's is the rest. On the shared 2-core machine (load about 8) that was 5.2 ms of proxy and
  4.1 ms of handle and serialisation against 2.2 ms of plain HTTP, and a forward a few ms slower in the replica
  beside Ray's own processes: 1.23x the plain server's median (1.40x later on the quiet machine: 6.6 ms of
  proxy, 4.1 ms of handle, the app 31 ms in the replica against 27 ms). ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``
  made no difference beyond noise there, so Serve's defaults are kept.
* **Settings.** The driver's :class:`api.settings.Settings` travel to the replicas with the app factory, and its
  ``DETECT_*`` variables in the replicas' runtime environment (the weights search path among them), so a
  replica sees what ``detect serve`` would. ``app_builder`` (KubeRay) reads both from the pod's environment.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve

from api.app import create_app
from api.settings import Settings
from detect.errors import ConfigError
from detect.inference import resolve_device

DEPLOYMENT = "detect"
STARTUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Scaling:
    """A fixed number of replicas, or autoscaling between ``min_replicas`` and ``max_replicas``."""

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None

    @classmethod
    def parse(cls, replicas: int | None, autoscale: str | None) -> "Scaling":
        """From ``--replicas N`` or ``--autoscale MIN:MAX`` (one replica when neither is given)."""
        if autoscale is None:
            return cls(replicas=replicas or 1)
        low, _, high = autoscale.partition(":")
        if not (low.isdigit() and high.isdigit() and 0 <= int(low) <= int(high) and int(high) >= 1):
            raise ConfigError(f"--autoscale wants MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {autoscale!r}")
        return cls(replicas=None, min_replicas=int(low), max_replicas=int(high))

    def options(self, settings: Settings) -> dict[str, Any]:
        if self.replicas is not None:
            return {"num_replicas": self.replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": settings.max_batch,
            }
        }


def deployment_options(settings: Settings, scaling: Scaling) -> dict[str, Any]:
    """Serve deployment options: scaling, back-pressure and each replica's resources and environment."""
    env = {k: v for k, v in os.environ.items() if k.startswith("DETECT_")}
    gpu = resolve_device(settings.device).startswith("cuda")  # "auto": a GPU per replica when the driver sees CUDA
    actor: dict[str, Any] = {"num_cpus": settings.torch_threads or 1, "num_gpus": 1 if gpu else 0}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    return {"name": DEPLOYMENT, "max_ongoing_requests": settings.queue_size, "ray_actor_options": actor, **scaling.options(settings)}


# --- the deployment ------------------------------------------------------------------------------------------
@serve.ingress()
class DetectIngress:
    """One replica: builds the app with ``factory`` (a picklable zero-argument callable) in the replica."""

    def __init__(self, factory: Callable[[], FastAPI], startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self._factory, self._startup_timeout_s = factory, startup_timeout_s

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ready_on_startup(self._factory(), self._startup_timeout_s)

    async def echo_size(self, payload: bytes) -> int:
        """A handle call that does no work: its round trip with a request's bytes is what the handle and the
        serialisation cost a request (``benchmarks/scale.py`` subtracts it from the proxy's share)."""
        return len(payload)


def ready_on_startup(app: FastAPI, timeout_s: float) -> FastAPI:
    """``app`` whose lifespan startup returns only once its service is ready (see the module docstring)."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI):
        async with inner(application) as state:
            service = application.state.service
            deadline = time.monotonic() + timeout_s
            while not service.ready:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"models not ready after {timeout_s:g} s: {service.not_ready_reason}")
                await asyncio.sleep(0.05)
            yield state

    app.router.lifespan_context = lifespan
    return app


def application(factory: Callable[[], FastAPI], settings: Settings, scaling: Scaling) -> Any:
    """The Serve application (``serve.run`` it) of the app that ``factory`` builds in each replica."""
    return serve.deployment(DetectIngress).options(**deployment_options(settings, scaling)).bind(factory)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder for config files (KubeRay's ``serveConfigV2``): ``args`` may hold
    ``replicas`` or ``autoscale: "MIN:MAX"``; settings come from the ``DETECT_*`` environment."""
    settings = Settings()
    replicas = args.get("replicas")
    scaling = Scaling.parse(None if replicas is None else int(replicas), args.get("autoscale"))
    return application(functools.partial(create_app, settings), settings, scaling)


def serve_blocking(settings: Settings, scaling: Scaling, *, host: str, port: int, address: str | None = None) -> None:
    """Run the service on Ray Serve with its HTTP proxy on ``host:port`` until interrupted."""
    from detect.engines.ray import connected

    with connected(address):
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(functools.partial(create_app, settings), settings, scaling), name=DEPLOYMENT,
                      route_prefix="/", blocking=True)
        finally:
            serve.shutdown()
