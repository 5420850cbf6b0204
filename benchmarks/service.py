"""Service benchmark: throughput and p50/p99 latency against a uvicorn server on loopback.

Runs 1, 8 and 32 concurrent clients with micro-batching on (``max_batch``) and off (``max_batch=1``), measures
the API's overhead over calling the detector directly, and the process's resident memory before and after.
Targets (issue 6): overhead <= 5 % of single-request latency; with 8+ clients >= 1.5x the throughput of
sequential requests; p99 <= 3x p50; memory flat over a long run (``--seconds 300``).

    python benchmarks/service.py [--requests 40] [--size 320] [--seconds 0]

The detector is a randomly initialised ``fasterrcnn_resnet50_fpn`` resized to ``--size`` (speed does not depend
on the weights' values), or ``--family F --weights PATH``.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from api.app import create_app
from api.settings import Settings
from detect.detectors import DETECTORS
from detect.detectors.faster_rcnn import FasterRCNNConfig
from detect.predict import load_detector
from detect.transform import TransformConfig


def build_detector(args: argparse.Namespace) -> torch.nn.Module:
    if args.weights:
        return load_detector(args.family, args.weights)
    config = FasterRCNNConfig(transform=TransformConfig(min_size=(args.size,), max_size=args.size))
    return DETECTORS["fasterrcnn_resnet50_fpn"](91, config=config).eval()


def image_bytes(size: int) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), pixels


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class Server:
    def __init__(self, detector: torch.nn.Module, max_batch: int, port: int) -> None:
        settings = Settings(max_batch=max_batch, max_wait_ms=5.0, queue_size=256, request_timeout_s=300)
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings, {"m": detector}), port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> "Server":
        self.thread.start()
        with httpx.Client(base_url=self.url) as client:
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def load(url: str, data: bytes, clients: int, requests: int) -> tuple[float, list[float]]:
    """``requests`` POSTs from ``clients`` threads: (throughput req/s, latencies s)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            for _ in range(n):
                start = time.perf_counter()
                r = client.post("/detect", files={"images": ("x.jpg", data, "image/jpeg")})
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, shares))
    return requests / (time.perf_counter() - start), latencies


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--family", default="faster_rcnn")
    parser.add_argument("--weights")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=0, help="also run 8 clients this long and report memory")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    detector = build_detector(args)
    data, pixels = image_bytes(args.size)
    with torch.inference_mode():
        detector([pixels])
        direct = []
        for _ in range(max(5, args.requests // 4)):
            start = time.perf_counter()
            detector([pixels])
            direct.append(time.perf_counter() - start)
    direct_p50 = statistics.median(direct)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.size}px JPEG")
    print(f"direct detector call: p50 {direct_p50 * 1e3:.1f} ms")

    rows = []
    for max_batch in (args.max_batch, 1):
        with Server(detector, max_batch, args.port) as server:
            load(server.url, data, 1, 3)  # warm the HTTP path
            for clients in (1, 8, 32):
                throughput, lat = load(server.url, data, clients, max(args.requests, clients))
                rows.append((max_batch, clients, throughput, percentile(lat, 50), percentile(lat, 99)))
            if args.seconds and max_batch > 1:
                before, end, n = rss_mib(), time.perf_counter() + args.seconds, 0
                while time.perf_counter() < end:
                    load(server.url, data, 8, 32)
                    n += 32
                print(f"memory over {args.seconds:.0f} s ({n} requests, 8 clients): {before:.0f} -> {rss_mib():.0f} MiB RSS")

    print(f"\n{'batching':>9} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7}")
    for max_batch, clients, throughput, p50, p99 in rows:
        label = f"max {max_batch}" if max_batch > 1 else "off"
        print(f"{label:>9} {clients:>7} {throughput:>8.2f} {p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f} {p99 / p50:>7.2f}")
    sequential = next(r for r in rows if r[0] > 1 and r[1] == 1)
    overhead = (sequential[3] - direct_p50) / direct_p50
    print(f"\nAPI overhead over the direct call (1 client, p50): {overhead * 100:+.1f} % (target <= 5 %)")
    for _, clients, throughput, _, _ in (r for r in rows if r[0] > 1 and r[1] >= 8):
        print(f"{clients} clients vs sequential throughput: {throughput / sequential[2]:.2f}x (target >= 1.5x)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
