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
* **Ingress: HAProxy when the machine has it.** Serve's default path is its Python HTTP proxy actor, which passes
  each request to a replica by a handle call. Ray 2.60 can instead start ``haproxy`` in the proxy's place, load
  balancing straight to an HTTP server that each replica runs itself ("direct ingress"; the variable that turns
  it on is ``RAY_SERVE_ENABLE_HA_PROXY``). On the 2-core machine the bundled Faster R-CNN's median request
  (``benchmarks/scale.py --only serving``) took 1.05x the plain server's through HAProxy (22.5 vs 21.4 ms; 2.4
  ms of transport against 1.6) and 1.31x through the proxy (28.7 vs 21.9 ms: 3.5 ms of proxy and 2.7 ms of
  handle call beside the plain server's HTTP). ``--ingress auto`` (the default) takes HAProxy where the
  ``haproxy`` binary is on ``PATH`` (the Docker image and the CI install it; ``apt-get install haproxy``), else
  the proxy; ``haproxy`` demands it, ``proxy`` keeps Serve's proxy. The choice is made in the environment of
  the Ray cluster that ``detect serve`` starts (:func:`ingress_environment`): the controller and the replicas
  read it when they start, so a cluster that already runs (``--address``, a KubeRay ``RayService``) keeps its
  own; ``deploy/k8s/ray/rayservice.yaml`` sets it on its pods. The replicas' draining period before they stop
  (Ray's default 30 s, for outside load balancers to notice) is 2 s on the cluster started here, where the
  HAProxy that routes to them is Ray's own and is reconfigured by the controller before the replica stops.
  HAProxy also serves its statistics page and Prometheus metrics, on all interfaces (Ray's template); a cluster
  started here puts them on free ports unless ``RAY_SERVE_HAPROXY_STATS_PORT`` / ``_METRICS_PORT`` name
  them, so that two clusters on one machine (or another program on Ray's defaults, 8404 and 9101) do not clash.
* **Latency.** Through Serve's proxy a request pays the proxy and a handle call (with the request's
  serialisation) on top of the plain server's path; through HAProxy, one HTTP hop to the replica's own server.
  ``benchmarks/scale.py`` shows the split: the app's own time comes from its ``Server-Timing`` header, the
  handle's from a no-op call (:meth:`DetectIngress.echo_size`) carrying the same bytes, the proxy's is the rest.
  Before HAProxy, on the quiet machine: 1.40x the plain server's median (6.6 ms of proxy, 4.1 ms of handle, the
  app 31 ms in the replica against 27 ms); ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`` made no difference
  beyond noise, so Serve's other defaults are kept.
* **Settings.** The driver's :class:`api.settings.Settings` travel to the replicas with the app factory, and its
  ``DETECT_*`` variables in the replicas' runtime environment (the weights search path among them), so a
  replica sees what ``detect serve`` would. ``app_builder`` (KubeRay) reads both from the pod's environment.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
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
INGRESSES = ("auto", "haproxy", "proxy")
DRAINING_PERIOD_S = 2.0  # a replica's wait before it stops, on a cluster started here (see the module docstring)


def haproxy_binary() -> str | None:
    """The ``haproxy`` program: ``RAY_SERVE_HAPROXY_BINARY_PATH``, else on ``PATH`` or in ``/usr/sbin`` (where
    Debian puts it, off a non-root user's ``PATH``); ``None`` when there is none."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
    return shutil.which(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or "haproxy", path=search)


def ingress_environment(ingress: str = "auto") -> dict[str, str]:
    """The environment variables that choose Serve's ingress for a Ray cluster started with them (see the module
    docstring): HAProxy for ``haproxy``, and for ``auto`` where ``haproxy`` is on ``PATH``; Serve's proxy for
    ``proxy`` and for ``auto`` without the binary. ``haproxy`` without the binary is a :class:`ConfigError`."""
    if ingress not in INGRESSES:
        raise ConfigError(f"--ingress must be one of {', '.join(INGRESSES)}, got {ingress!r}")
    binary = None if ingress == "proxy" else haproxy_binary()
    if ingress == "haproxy" and binary is None:
        raise ConfigError("--ingress haproxy needs the haproxy program on PATH (Debian/Ubuntu: apt-get install "
                          "haproxy); --ingress proxy uses Serve's own HTTP proxy instead")
    if binary is None:
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    stats, metrics = _free_ports(2)
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{DRAINING_PERIOD_S:g}",
            "RAY_SERVE_HAPROXY_STATS_PORT": os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT") or str(stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT") or str(metrics)}


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on this machine now (held open together while chosen)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


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


def serve_blocking(settings: Settings, scaling: Scaling, *, host: str, port: int, address: str | None = None,
                   ingress: str = "auto") -> None:
    """Run the service on Ray Serve, its ingress (HAProxy or Serve's proxy, see ``ingress``) on ``host:port``,
    until interrupted. ``ingress`` applies to the local cluster started here; a running cluster keeps its own."""
    import ray

    from detect.engines.ray import connected

    environment = ingress_environment(ingress)
    if address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        os.environ.update(environment)  # read by the local cluster's processes when they start
    with connected(address):
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(application(functools.partial(create_app, settings), settings, scaling), name=DEPLOYMENT,
                      route_prefix="/", blocking=True)
        finally:
            serve.shutdown()
