"""Issue 21 item 8, secure defaults: the docs and /metrics behind the API key (with settings to open them), a
refused CORS preflight in the error shape, the 413 quoting our pixel limit, unknown query parameters 422, and
`detect serve`'s warning when it listens beyond loopback without a key (``--insecure`` silences it)."""

from __future__ import annotations

import logging

import httpx
import pytest
import uvicorn

from detect.testing import zero_png
from tests.helpers import png, running

KEY = {"x-api-key": "s3cret"}
DOCS = ("/docs", "/redoc", "/openapi.json")


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


def test_docs_and_metrics_need_the_key_when_one_is_set() -> None:
    with running(api_key="s3cret") as client:
        for path in (*DOCS, "/metrics"):
            assert error_of(client.get(path), 401)["code"] == "unauthorized", path
            assert error_of(client.get(path, headers={"x-api-key": "wrong"}), 401)["code"] == "unauthorized", path
            assert client.get(path, headers=KEY).status_code == 200, path
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_settings_open_the_docs_and_the_metrics() -> None:
    with running(api_key="s3cret", public_docs=True) as client:
        assert all(client.get(path).status_code == 200 for path in DOCS)
        assert client.get("/metrics").status_code == 401
    with running(api_key="s3cret", public_metrics=True) as client:
        assert client.get("/metrics").status_code == 200
        assert all(client.get(path).status_code == 401 for path in DOCS)


def test_without_a_key_everything_stays_open() -> None:
    with running() as client:
        assert all(client.get(path).status_code == 200 for path in (*DOCS, "/metrics"))


def test_a_refused_cors_preflight_answers_in_the_error_shape() -> None:
    with running(cors_origins=["http://a.example"]) as client:
        refused = client.options("/detect", headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
        error = error_of(refused, 400)
        assert error["code"] == "cors_refused" and "origin" in error["message"]
        assert "access-control-allow-origin" not in refused.headers
        allowed = client.options("/detect", headers={"origin": "http://a.example", "access-control-request-method": "POST"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://a.example"


def test_the_413_of_a_huge_header_quotes_our_pixel_limit() -> None:
    with running() as client:  # the default limit, 40 MP; Pillow's own guard (89 MP) fires first on 10^8 pixels
        bomb = zero_png(10_000, 10_000, rows=0)
        error = error_of(client.post("/detect", files={"images": ("b.png", bomb, "image/png")}), 413)
        assert error["code"] == "image_too_large" and "40000000" in error["message"] and "89478485" not in error["message"]


def test_unknown_query_parameters_are_422() -> None:
    with running() as client:
        form = {"images": ("a.png", png(8, 8), "image/png")}
        error = error_of(client.post("/detect?score_treshold=0.9", files=form), 422)
        assert error["code"] == "invalid_request" and "score_treshold" in error["message"]
        error = error_of(client.post("/detect?x=1", json={"images": [{"data": ""}]}), 422)
        assert "query.x" in error["message"]
        assert client.post("/detect", files=form).status_code == 200


# --- detect serve --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, key, warned",
    [
        (["--host", "0.0.0.0"], None, True),
        (["--host", "192.168.1.5"], None, True),
        (["--host", "::"], None, True),
        (["--host", "0.0.0.0", "--insecure"], None, False),
        (["--host", "0.0.0.0"], "s3cret", False),
        ([], None, False),  # the default, 127.0.0.1
        (["--host", "localhost"], None, False),
        (["--host", "::1"], None, False),
    ],
)
def test_serve_warns_beyond_loopback_without_a_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, argv: list[str], key: str | None, warned: bool
) -> None:
    from detect.cli import main

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: ran.append(self.config.host))
    monkeypatch.delenv("DETECT_MODELS", raising=False)
    if key is None:
        monkeypatch.delenv("DETECT_API_KEY", raising=False)
    else:
        monkeypatch.setenv("DETECT_API_KEY", key)
    with caplog.at_level(logging.WARNING, logger="detect.serve"):
        assert main(["serve", *argv]) == 0
    assert len(ran) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "detect.serve"]
    assert bool(messages) is warned
    if warned:
        assert "without an API key" in messages[0] and "--insecure" in messages[0] and "DETECT_API_KEY" in messages[0]
