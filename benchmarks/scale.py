"""Scale benchmark: the Ray engines against the local ones on this machine, in one run (issue 14).

1. Batch: ``detect predict`` on ``--images`` noise JPEGs with the local engine, then with ``--engine ray`` at 1
   and 2 actors, on the same cores: the local engine runs torch on ``--cores`` threads; Ray's one actor gets
   all of them, two actors half each. Printed: end-to-end seconds (the local engine's model load included; Ray's
   actor start-up and model load included, the cluster's start not), and the steady rate, from the first
   result to the last, which is what a long job sees. The Ray overhead ratio is local rate / Ray rate at
   1 actor (goal: within 10 %).
2. Serving: the plain server (``detect serve``, its own process) and the same app on Ray Serve (1 replica, this
   process's local cluster) with the same model and ``--serve-threads`` torch threads (1: see
   ``api/ray_serve.py`` on threads in replicas): sequential requests (p50/p99, the Ray Serve overhead as the
   ratio of p50s) and 8 concurrent clients (throughput). Then where a request's time goes (issue 24), from
   sequential requests alternating between the two servers so that a shared machine's load hits both alike:
   ``transport`` = client time - the app's own time (its ``Server-Timing`` header), split on Ray into the
   ``handle`` call with serialisation (a no-op handle call carrying the same bytes) and the ``proxy`` (the
   rest), beside the ``app`` and ``model`` (the image's ``timings_ms``) times. Behind HAProxy (``--ingress``,
   chosen as ``detect serve --engine ray`` chooses it) no handle call is on the way: all of ``transport`` is
   the proxy's. The summary's Serve ratio is the ratio of those alternating medians. The Ray batch rows are followed by each run's start-up line (connect,
   listing, first result; per actor: worker start-up and imports, model load).

    python benchmarks/scale.py [--images 96] [--size 160] [--cores 2] [--requests 60] [--family F --weights W]
                               [--only batch|serving] [--ingress auto|haproxy|proxy]

Decisions:

* **Same cores, logical CPUs.** The Ray cluster is started here with ``--cores + 1`` logical CPUs: the actors
  reserve ``--cores`` between them and the decoding tasks (0.5 CPU each) need room beside them, or Ray Data
  would wait for CPUs that never free. The machine still has ``--cores`` physical cores for both engines.
* **Steady rate.** For the local engine, from the end of its first forward pass to the end of its last (a
  wrapper around the detector times them); for Ray, from the first result block's arrival at the driver to the
  last (a progress stream timestamps the engine's per-block reports). Neither engine is changed.
* **Model.** As in ``benchmarks/service.py``: ``--weights``, else the bundled ``<family>_shapes``, else a random
  tiny detector; speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.service import choose_weights, free_port, load, percentile, server  # noqa: E402
from detect.engines import ray as ray_engine  # noqa: E402
from detect.engines.local import PredictOptions, run  # noqa: E402
from detect.inference import load_model  # noqa: E402


class TimedDetector:
    """The local engine's detector, with the time each forward pass returned and how many images it had."""

    def __init__(self, detector: torch.nn.Module) -> None:
        self.detector, self.returns = detector, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.detector, name)

    def __call__(self, images: list, **kwargs: object) -> object:
        out = self.detector(images, **kwargs)
        self.returns.append((time.perf_counter(), len(images)))
        return out

    def steady_rate(self) -> float:
        """Images per second from the first forward's end to the last's (the first batch pays the warm-up)."""
        (t0, _), (t1, _) = self.returns[0], self.returns[-1]
        return sum(n for _, n in self.returns[1:]) / (t1 - t0)


class ProgressClock(io.StringIO):
    """A progress stream that remembers when each ``done/total`` report of the Ray engine (one per block)
    arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[float, int]] = []

    def write(self, text: str) -> int:
        for done in re.findall(r"(\d+)/\d+ images", text):
            self.reports.append((time.perf_counter(), int(done)))
        self.startup = next(iter(re.findall(r"ray start-up: (.*)", text)), getattr(self, "startup", ""))
        return len(text)

    def steady_rate(self) -> float:
        (t0, n0), (t1, n1) = self.reports[0], self.reports[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=90)


def local_engine(src: Path, out: Path, args: argparse.Namespace, weights: str) -> tuple[float, float]:
    torch.set_num_threads(args.cores)
    start = time.perf_counter()
    detector = TimedDetector(load_model(weights, "cpu", args.family))
    run(PredictOptions((str(src),), out, batch_size=args.batch_size), detector, progress=None)
    return time.perf_counter() - start, detector.steady_rate()


def ray_engine_run(src: Path, out: Path, args: argparse.Namespace, weights: str, actors: int) -> tuple[float, float]:
    clock, start = ProgressClock(), time.perf_counter()
    options = PredictOptions((str(src),), out, batch_size=args.batch_size)
    ray_options = ray_engine.RayOptions(actors=actors, cpus_per_actor=args.cores / actors)
    ray_engine.run(options, ray_engine.ModelSource(weights, "cpu", args.family), ray_options, progress=clock)
    STARTUPS[actors] = clock.startup
    return time.perf_counter() - start, clock.steady_rate()


STARTUPS: dict[int, str] = {}  # actors -> the Ray engine's start-up line of that run


def batch(args: argparse.Namespace, weights: str, scratch: Path) -> float:
    src = scratch / "images"
    src.mkdir()
    make_images(src, args.images, args.size)
    rows = [("local", *local_engine(src, scratch / "local", args, weights))]
    for actors in (1, 2):
        rows.append((f"ray, {actors} actor{'s' * (actors > 1)}", *ray_engine_run(src, scratch / f"ray{actors}", args, weights, actors)))
    print(f"\nbatch: {args.images} images of {args.size} px, batch size {args.batch_size}, {args.cores} cores")
    print(f"{'engine':>14} {'end-to-end s':>12} {'img/s e2e':>10} {'steady img/s':>12} {'local/this':>10} {'fixed s':>8}")
    local_rate = rows[0][2]
    for name, seconds, rate in rows:
        fixed = seconds - args.images / rate  # start-up: what the steady rate does not explain
        print(f"{name:>14} {seconds:>12.2f} {args.images / seconds:>10.2f} {rate:>12.2f} {local_rate / rate:>10.3f} {fixed:>8.1f}")
    for actors, line in STARTUPS.items():
        print(f"  start-up, {actors} actor{'s' * (actors > 1)}: {line.strip()}")
    return local_rate / rows[1][2]


def latencies(url: str, data: bytes, requests: int) -> tuple[float, float, float]:
    """(p50 s, p99 s, 8-client req/s) after a few warm-up requests."""
    load(url, data, 1, 5)
    _, sequential = load(url, data, 1, requests)
    throughput, _ = load(url, data, 8, requests)
    return percentile(sequential, 50), percentile(sequential, 99), throughput


def stages(urls: dict[str, str], data: bytes, requests: int) -> dict[str, dict[str, float]]:
    """Per server, medians (ms) over sequential requests of where a request's time goes: ``total`` at the client,
    ``app`` (the app's own time to its answer, its ``Server-Timing`` header), ``model`` (the image's
    ``timings_ms``: decode, queue, forward, post-processing) and ``transport`` = total - app (HTTP, and on Ray
    the proxy, the handle call and the serialisation). Requests alternate between the servers, so that the load
    of a shared machine hits them alike."""
    rows = {name: {"total": [], "app": [], "model": [], "transport": []} for name in urls}
    clients = {name: httpx.Client(base_url=url, timeout=300) for name, url in urls.items()}
    try:
        for n in range(requests + 3):  # the first 3 rounds warm up
            for name, client in clients.items():
                start = time.perf_counter()
                r = client.post("/detect", files={"images": ("x.jpg", data, "image/jpeg")})
                total = (time.perf_counter() - start) * 1e3
                r.raise_for_status()
                if n < 3:
                    continue
                app = float(r.headers["server-timing"].split("dur=")[1].split(";")[0])
                row = rows[name]
                row["total"].append(total)
                row["app"].append(app)
                row["transport"].append(total - app)
                row["model"].append(sum(r.json()["images"][0]["timings_ms"].values()))
    finally:
        for client in clients.values():
            client.close()
    return {name: {k: percentile(v, 50) for k, v in row.items()} for name, row in rows.items()}


def handle_round_trip(data: bytes, requests: int) -> float:
    """Median ms of a handle call to the replica that does no work, carrying the request's bytes."""
    from ray import serve

    from api import ray_serve

    handle = serve.get_deployment_handle(ray_serve.DEPLOYMENT, app_name="detect")
    handle.echo_size.remote(data).result()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        handle.echo_size.remote(data).result()
        times.append((time.perf_counter() - start) * 1e3)
    return percentile(times, 50)


def serving(args: argparse.Namespace, weights: str, ray: object) -> float:
    from ray import serve

    from api import ray_serve
    from api.app import create_app
    from api.settings import ModelSpec, Settings

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    settings = Settings(models={"m": ModelSpec(family=args.family, weights=weights)}, torch_threads=args.serve_threads)
    port = free_port()
    ray_url = f"http://127.0.0.1:{port}"
    with server(args.family, weights, torch_threads=args.serve_threads) as (url, _):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            app = ray_serve.application(functools.partial(create_app, settings), settings, ray_serve.Scaling(1))
            serve.run(app, name="detect", route_prefix="/")
            with httpx.Client(base_url=ray_url, timeout=60) as client:
                while client.get("/readyz").status_code != 200:
                    time.sleep(0.1)
            per_stage = stages({"plain": url, "ray serve": ray_url}, data, args.requests)
            plain_stages, ray_stages = per_stage["plain"], per_stage["ray serve"]
            if args.ingress_used == "proxy":  # behind HAProxy no handle call is on a request's way
                ray_stages["handle"] = handle_round_trip(data, args.requests)
            plain = latencies(url, data, args.requests)
            on_ray = latencies(ray_url, data, args.requests)
        finally:
            serve.shutdown()
    print(f"\nserving: {args.size} px JPEG, {args.requests} sequential requests per server (one run each, then 8 "
          "clients)")
    print(f"{'server':>10} {'p50 ms':>8} {'p99 ms':>8} {'8-client req/s':>14}")
    for name, (p50, p99, rps) in (("plain", plain), ("ray serve", on_ray)):
        print(f"{name:>10} {p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f} {rps:>14.2f}")
    print(f"stages, medians of sequential requests alternating between the two servers (ms); Ray Serve's ingress: "
          f"{args.ingress_used}")
    print(f"{'server':>10} {'total':>7} {'transport':>9} {'proxy':>7} {'handle+ser':>10} {'app':>7} {'model':>7}")
    for name, st in (("plain", plain_stages), ("ray serve", ray_stages)):
        handle = st.get("handle")
        proxy = float("nan") if name == "plain" else st["transport"] - (handle or 0.0)
        handle_text = f"{handle:>10.2f}" if handle is not None else f"{'-':>10}"
        print(f"{name:>10} {st['total']:>7.2f} {st['transport']:>9.2f} {proxy:>7.2f} {handle_text} {st['app']:>7.2f} "
              f"{st['model']:>7.2f}")
    print("  transport = total - app (the Server-Timing header); handle+ser = a no-op handle call carrying the same "
          "bytes (Serve's proxy only); proxy = transport - handle+ser (HAProxy: all of transport); model = the "
          "image's timings_ms (decode, queue, forward, post)")
    return ray_stages["total"] / plain_stages["total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--serve-threads", type=int, default=1, help="DETECT_TORCH_THREADS of both servers")
    parser.add_argument("--family", default="faster_rcnn")
    parser.add_argument("--weights")
    parser.add_argument("--only", choices=("batch", "serving"), help="run one of the two parts")
    parser.add_argument("--ingress", choices=("auto", "haproxy", "proxy"), default="auto",
                        help="Ray Serve's ingress, as detect serve --engine ray --ingress (default auto)")
    args = parser.parse_args()
    ray = ray_engine.require_ray()
    from api.ray_serve import ingress_environment

    environment = ingress_environment(args.ingress)  # before the cluster starts: its processes read it
    os.environ.update(environment)
    args.ingress_used = "haproxy" if environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1" else "proxy"
    with tempfile.TemporaryDirectory() as scratch:
        weights, how = choose_weights(args, Path(scratch))
        print(f"model: {args.family}, weights {weights} ({how}); torch {torch.__version__}, ray {ray.__version__}; "
              f"Ray Serve ingress {args.ingress_used}")
        ray.init(num_cpus=args.cores + 1, include_dashboard=False, log_to_driver=False)
        try:
            ratio = batch(args, weights, Path(scratch)) if args.only != "serving" else float("nan")
            serve_ratio = serving(args, weights, ray) if args.only != "batch" else float("nan")
        finally:
            ray.shutdown()
    print(f"\nsummary: local/ray-1-actor steady rate {ratio:.3f} (goal <= 1.10), "
          f"ray serve p50 / plain p50 {serve_ratio:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
