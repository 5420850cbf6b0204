"""The API contract on both engines: the plain uvicorn server and the same app as Ray Serve replicas
(``api/ray_serve.py``, behind HAProxy where it is installed, else Serve's HTTP proxy). A representative subset of tests/api/test_app.py: probes,
models, a good and a corrupt image, the error shapes, the body limit and ``/metrics``.

The Ray variant deploys with ``--autoscale 1:2``, so Serve validates the autoscaling options for real; it shares
the session's one local Ray cluster with tests/engines (whichever starts first)."""

from __future__ import annotations

import base64
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import StubDetector, free_port, png, running, wait_ready

LIMITS = {"max_body_bytes": 200_000, "max_pixels": 250_000, "max_images_per_request": 4, "max_wait_ms": 2.0}
CT_PNG = "image/png"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")  # as tests/conftest.py reads it



@pytest.fixture(scope="module", params=["local", "ray"])
def client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    if request.param == "local":
        with running(StubDetector(), **LIMITS) as c:
            yield c
        return
    request.getfixturevalue("ray_cluster")
    from ray import serve

    from api import ray_serve
    from api.app import create_app
    from api.settings import Settings

    settings = Settings(**LIMITS)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    factory = functools.partial(create_app, settings, {"stub": StubDetector()})
    serve.run(ray_serve.application(factory, settings, ray_serve.Scaling.parse(None, "1:2")), name="detect", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            wait_ready(c)
            yield c
    finally:
        serve.shutdown()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": {"code": code, "message": response.json()["error"]["message"]}}
    assert "Traceback" not in response.text


def test_probes_and_models(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    models = client.get("/models").json()
    assert models["default"] == "stub"
    assert [(m["name"], m["class_names"], m["device"]) for m in models["models"]] == [("stub", ["cat", "dog", "bird"], "cpu")]


def test_good_image(client: httpx.Client) -> None:
    r = client.post("/detect", files={"images": ("a.png", png(40, 20), CT_PNG)})
    assert r.status_code == 200, r.text
    (item,) = r.json()["images"]
    assert (item["id"], item["width"], item["height"], item["error"]) == ("a.png", 40, 20, None)
    assert item["detections"] == [  # the stub's boxes for a 40 x 20 image, by hand (tests/helpers.py)
        {"box": [0, 0, 20, 10], "score": 0.9, "class_id": 1, "class_name": "cat"},
        {"box": [0, 0, 20, 8], "score": 0.6, "class_id": 1, "class_name": "cat"},
        {"box": [20, 10, 40, 20], "score": 0.3, "class_id": 2, "class_name": "dog"},
    ]


def test_corrupt_image_alone_and_in_a_batch(client: httpx.Client) -> None:
    assert_error(client.post("/detect", files={"images": ("c.png", png(20, 20)[:60], CT_PNG)}), 422, "corrupt_image")
    images = [{"data": base64.b64encode(png(8, 8)).decode(), "id": "ok"},
              {"data": base64.b64encode(png(20, 20)[:60]).decode(), "id": "bad"}]
    r = client.post("/detect", json={"images": images})
    assert r.status_code == 200, r.text
    items = {i["id"]: i for i in r.json()["images"]}
    assert items["ok"]["error"] is None and items["bad"]["error"]["code"] == "corrupt_image"


def test_error_shapes(client: httpx.Client) -> None:
    one = {"images": [{"data": base64.b64encode(png(8, 8)).decode()}]}
    assert_error(client.post("/detect", json={**one, "model": "nope"}), 404, "unknown_model")
    assert_error(client.post("/detect", json={**one, "score_threshold": 2}), 422, "invalid_request")
    assert_error(client.post("/detect", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    assert_error(client.post("/detect", json={"images": one["images"] * 5}), 413, "too_many_images")
    assert_error(client.post("/detect", files={"images": ("big", png(600, 600), CT_PNG)}), 413, "image_too_large")
    assert_error(client.post("/detect", content=b"\0" * 300_000, headers={"content-type": "application/json"}), 413, "payload_too_large")
    assert_error(client.get("/detect"), 405, "method_not_allowed")
    assert_error(client.get("/nowhere"), 404, "not_found")


def test_metrics(client: httpx.Client) -> None:
    client.post("/detect", files={"images": ("a.png", png(8, 8), CT_PNG)})
    lines = [line for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")]
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert values['detect_requests_total{path="/detect",status="200"}'] >= 1
    assert values["detect_batch_size_count"] >= 1
    assert "detect_queue_depth" in values


def _listener(port: int) -> str | None:
    """The name of the process that listens on TCP ``port`` of this machine (Linux's /proc), else None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # a process that ended, or one not ours
            continue
    return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_what_listens_on_the_port(client: httpx.Client, request: pytest.FixtureRequest) -> None:
    """The plain server's port is this process's; Ray Serve's is HAProxy's where haproxy is installed (the
    ingress `detect serve --engine ray` chooses, api/ray_serve.py), else Serve's proxy actor's. CI installs
    haproxy, so under CI=true the Ray variant must answer through it."""
    from api.ray_serve import haproxy_binary

    owner = _listener(client.base_url.port)
    if request.node.callspec.params["client"] == "local":
        assert owner == Path("/proc/self/comm").read_text().strip()
    elif haproxy_binary() is not None:
        assert owner == "haproxy"
    else:
        assert not IN_CI, "CI installs haproxy (.ci/run): Ray Serve should answer through it"
        assert owner is not None and owner != "haproxy"


def test_ingress_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from api import ray_serve
    from detect.errors import ConfigError

    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "19101")
    expected = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": str(fake),
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2", "RAY_SERVE_HAPROXY_STATS_PORT": "18404",
                "RAY_SERVE_HAPROXY_METRICS_PORT": "19101"}
    assert ray_serve.ingress_environment("auto") == ray_serve.ingress_environment("haproxy") == expected
    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT")
    ports = ray_serve.ingress_environment("haproxy")  # free ports of this machine, not Ray's fixed defaults
    stats, metrics = int(ports["RAY_SERVE_HAPROXY_STATS_PORT"]), int(ports["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert stats != metrics and all(_listener(p) is None for p in (stats, metrics))
    assert ray_serve.ingress_environment("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    assert ray_serve.ingress_environment("auto") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    with pytest.raises(ConfigError, match="apt-get install haproxy"):
        ray_serve.ingress_environment("haproxy")
    with pytest.raises(ConfigError, match="--ingress must be one of"):
        ray_serve.ingress_environment("nginx")


def test_scaling_flags() -> None:
    pytest.importorskip("ray")
    from api import ray_serve
    from api.settings import Settings
    from detect.errors import ConfigError

    settings = Settings(max_batch=6, queue_size=40)
    assert ray_serve.Scaling.parse(3, None).options(settings) == {"num_replicas": 3}
    assert ray_serve.Scaling.parse(None, None).options(settings) == {"num_replicas": 1}
    auto = ray_serve.Scaling.parse(None, "0:4").options(settings)
    assert auto == {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 6}}
    options = ray_serve.deployment_options(Settings(device="cuda", queue_size=40), ray_serve.Scaling.parse(2, None))
    assert (options["max_ongoing_requests"], options["ray_actor_options"]["num_gpus"]) == (40, 1)
    for bad in ("4:1", "x:2", "3", "0:0"):
        with pytest.raises(ConfigError):
            ray_serve.Scaling.parse(None, bad)
