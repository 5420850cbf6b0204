"""Issue 12, the connection level, through the server ``detect serve`` runs (:func:`api.server.server_config`) and
raw sockets: protocol errors in the JSON shape, stalled headers and bodies timed out, idle keep-alive closed, an
oversized chunked upload cut off after its 413 (item 9), and a client that leaves mid-upload counted as 499 with
one log line (item 2)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.server import server_config
from api.settings import Settings
from tests.helpers import StubDetector, free_port, png, wait_ready


@contextmanager
def guarded(**overrides: object) -> Iterator[int]:
    """The stub app behind :func:`api.server.server_config` on a free loopback port; yields the port. Logging is
    left to pytest (``log_config=None``), so ``caplog`` sees every record."""
    settings = Settings(**{"max_wait_ms": 2.0, **overrides})
    port = free_port()
    config = server_config(create_app(settings, {"stub": StubDetector()}), settings, "127.0.0.1", port, log_config=None, log_level="info")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        wait_ready(client)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(20)


def exchange(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection and read until the server closes it (or ``wait`` s pass): what came
    back, and when the connection ended (``inf`` when it did not)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(wait)
        start = time.monotonic()
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close before it has read everything: what it answered is still readable
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except TimeoutError:
            return received, float("inf")
        except ConnectionResetError:
            pass
        return received, time.monotonic() - start


def json_error(raw: bytes, status: int) -> dict:
    """The error of a raw HTTP/1.1 response: status ``status``, JSON body of the app's error shape, and the
    connection announced as closing."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), raw[:300]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"].startswith("application/json") and headers.get("connection") == "close", headers
    error = json.loads(body)
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}
    return error["error"]


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


# --- item 9 --------------------------------------------------------------------------------------------------
def test_protocol_errors_answer_the_json_shape() -> None:
    with guarded() as port:
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
        assert json_error(exchange(port, big)[0], 431)["code"] == "headers_too_large"
        whole_but_large = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"  # one read
        assert json_error(exchange(port, whole_but_large)[0], 431)["code"] == "headers_too_large"
        assert json_error(exchange(port, b"GARBAGE\r\n\r\n")[0], 400)["code"] == "bad_request"
        negative = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"
        assert json_error(exchange(port, negative)[0], 400)["code"] == "bad_request"
        bad_chunk = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        assert json_error(exchange(port, bad_chunk)[0], 400)["code"] == "bad_request"
        ok, _ = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b'{"status":"ok"}')  # the server is fine


def test_stalled_headers_and_bodies_time_out() -> None:
    with guarded(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.5) as port:
        raw, seconds = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        assert json_error(raw, 408)["code"] == "header_timeout" and seconds < 3
        raw, seconds = exchange(port, b"")  # a connection that never says anything
        assert raw == b"" and seconds < 3
        stalled_body = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        raw, seconds = exchange(port, stalled_body)
        assert json_error(raw, 408)["code"] == "body_timeout" and seconds < 3
        raw, seconds = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, then left idle
        assert raw.startswith(b"HTTP/1.1 200 ") and seconds < 3


def test_after_a_413_on_a_chunked_upload_the_connection_is_closed() -> None:
    """The client would send for ever; the server answers 413 once the limit is passed and closes the connection
    instead of reading the rest."""
    with guarded(max_body_bytes=100_000) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        part = b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n\r\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"%x\r\n%s\r\n" % (10_000, b"\0" * 10_000)
        s.settimeout(0.05)
        received, sent, closed = b"", 0, False
        deadline = time.monotonic() + 10
        while not closed and time.monotonic() < deadline:
            try:
                s.sendall(chunk)
                sent += 10_000
                data = s.recv(65536)
                received += data
                closed = data == b""
            except TimeoutError:
                continue
            except OSError:  # reset: the server closed while we were sending
                closed = True
        assert closed and sent < 2_000_000, sent  # far less than 10 s of loopback sending
        assert json_error(received, 413)["code"] == "payload_too_large"


def test_an_early_413_reaches_a_client_that_sends_its_whole_body_first() -> None:
    """A client that reads only after sending everything (as most HTTP clients do) gets the 413, not a reset:
    the server shuts down its side after answering and discards the rest for a bounded time instead of closing
    on unread data (a plain close reset 20 connections out of 20 here)."""
    body = b"\0" * 8_000_000
    head = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    with guarded(max_body_bytes=100_000) as port:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head + body)
                received = b""
                while chunk := s.recv(65536):
                    received += chunk
            assert json_error(received, 413)["code"] == "payload_too_large"


# --- item 2 --------------------------------------------------------------------------------------------------
def test_a_client_leaving_mid_upload_is_499_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with guarded() as port:
        for body_type in ("multipart", "json"):
            with socket.create_connection(("127.0.0.1", port)) as s:
                if body_type == "multipart":
                    s.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                              b"Content-Length: 90000\r\n\r\n--xyz\r\nContent-Disposition: form-data; name=\"images\"; "
                              b"filename=\"a.png\"\r\n\r\n" + png(50, 50)[:200])
                else:
                    s.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 90000\r\n\r\n{\"images\": [")
                time.sleep(0.2)  # the server is reading the body
            deadline = time.monotonic() + 10
            while metrics(port).get('detect_requests_total{path="/detect",status="499"}', 0) < (1 if body_type == "multipart" else 2):
                assert time.monotonic() < deadline, "the disconnect was never counted"
                time.sleep(0.02)
        counted = metrics(port)
    assert not any(key.startswith("detect_requests_total") and 'status="500"' in key for key in counted)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], "a traceback or an error was logged"
    disconnects = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(disconnects) == 2 and all(r.name == "detect.api" for r in disconnects)  # one line per request
