"""The HTTP server around the app: uvicorn on its h11 protocol, with the connection-level defences the app cannot
apply itself. ``detect serve`` runs :func:`server_config`; the tests and benchmarks use it too.

Decisions:

* **h11, always.** uvicorn picks httptools when it is installed (``uvicorn[standard]``) and h11 otherwise; the
  Docker image has no httptools. The two differ exactly where a hostile client pushes: httptools accepts request
  headers of any size, h11 bounds them. One protocol, pure Python and always installed with uvicorn, means one
  behaviour everywhere; its parsing cost is small next to a forward pass.
* **Protocol errors in the JSON shape.** A request h11 cannot parse (a malformed request line, ``Content-Length:
  -5``, a broken chunked body) answers 400, request line and headers above ``max_header_bytes`` answer 431,
  each as ``{"error": {"code", "message"}}`` with ``Connection: close`` (uvicorn answers text/plain). The size
  is checked twice: by h11 while the headers are incomplete, and on the parsed request, since a whole oversized
  head can arrive in one read.
* **Header deadline.** From the moment a connection may send a request (it was accepted, or the previous
  response finished) its request line and headers must arrive within ``header_timeout_s``: past it a
  connection that sent part of a request gets 408 and is closed, a silent one is closed. Without this a
  client that stops half-way through its headers holds a connection for ever (uvicorn's keep-alive timer stops
  at the first byte). An idle keep-alive connection is closed after ``keep_alive_s`` (uvicorn's
  ``timeout_keep_alive``).
* **Body deadline and early answers** live in the app (:class:`api.app.BodyGuard`): it reads the body, so it
  knows when the body stalls, and it adds ``Connection: close`` to any answer given before the body was read
  to the end, so uvicorn closes the connection instead of reading (and discarding) the rest of an upload.
* **Lingering close.** Closing a socket whose client is still sending makes the kernel answer with a reset,
  which can destroy the answer the client has not read yet: in the soak run 13 of 987 clients sending an
  oversized body got a reset instead of their 413. So when the server ends a connection in the middle of a
  request it sends its answer, shuts down its side (the client reads the answer, then end of stream) and
  discards what still arrives for at most ``LINGER_S`` before closing (what nginx and Apache do). The rest of
  a large upload is never read: the client stops at the end of stream, or is cut off at ``LINGER_S``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from api.settings import Settings

_HEAD_OVERHEAD = 16  # request-line spaces, "HTTP/1.1", CRLFs: what the parsed head no longer shows
LINGER_S = 2.0  # how long a connection closed mid-request discards what its client still sends


def error_bytes(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying the app's error shape, ending the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {STATUS_PHRASES.get(status, b'').decode()}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON protocol errors, a strict head size and a header deadline (see the module
    docstring). :func:`protocol_class` sets the limits."""

    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._protocol_error: h11.RemoteProtocolError | None = None
        self._header_timer: Any = None
        self._lingering: Any = None  # the timer that ends a lingering close
        super().connection_made(_LingeringTransport(transport, self))
        self.conn.next_event = self._next_event  # type: ignore[method-assign]  # sees every parsed event
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is None:
            super().data_received(data)  # else: the rest of a request nobody will read, discarded

    def closing_mid_request(self) -> bool:
        """Whether the client may still be sending: its request (line, headers or body) is unfinished."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY, h11.ERROR) and (
            self.conn.their_state is not h11.IDLE or bool(self.conn.trailing_data[0])
        )

    def linger(self, transport: asyncio.Transport) -> None:
        """End the connection without a reset: our side shut down, the client's input discarded until it closes
        or ``LINGER_S`` have passed (see the module docstring)."""
        self._disarm_header_timer()
        transport.resume_reading()
        transport.write_eof()
        self._lingering = self.loop.call_later(LINGER_S, transport.close)

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # the next request's headers are due from now (disarmed if already parsed)
        super().on_response_complete()

    def _next_event(self) -> Any:
        try:
            event = h11.Connection.next_event(self.conn)
            if isinstance(event, h11.Request):
                self._disarm_header_timer()
                size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size + _HEAD_OVERHEAD > self.max_header_bytes:
                    raise h11.RemoteProtocolError("request headers too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as err:
            self._protocol_error = err
            raise

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for every request h11 refuses: answer in the JSON shape instead of text/plain."""
        err = self._protocol_error
        if err is not None and err.error_status_hint == 431:
            status, code, message = 431, "headers_too_large", f"the request line and headers exceed {self.max_header_bytes} bytes"
        else:
            detail = str(err)[:200] if err is not None else "unparsable"
            status, code, message = 400, "bad_request", f"malformed HTTP request ({detail})"
        self._end_with(status, code, message)

    def _end_with(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` and close; a request whose answer has started can only be cut off. A request being
        served learns of it as a client disconnect."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.transport.is_closing():
            if cycle is None or not cycle.response_started:
                self.transport.write(error_bytes(status, code, message))
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # closing already, or a request is being served
        if self.conn.trailing_data[0]:
            self.logger.info("request headers incomplete after %g s: closing the connection", self.header_timeout_s)
            self._end_with(408, "header_timeout", f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self.transport.close()


class _LingeringTransport:
    """The connection's transport as the protocol and uvicorn see it: ``close()`` in the middle of a request
    becomes :meth:`GuardedH11Protocol.linger`; everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol, self._closing = transport, protocol, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        self._closing = True
        if self._protocol.closing_mid_request() and self._transport.can_write_eof():
            self._protocol.linger(self._transport)
        else:
            self._transport.close()


def protocol_class(settings: Settings) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` with the limits of ``settings`` (uvicorn builds one instance per connection)."""
    limits = {"max_header_bytes": settings.max_header_bytes, "header_timeout_s": settings.header_timeout_s}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), limits)


def server_config(app: Any, settings: Settings, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration that serves ``app`` with the connection limits of ``settings``; ``options`` go to
    :class:`uvicorn.Config` (e.g. ``log_level``). The service's own log lines (logger ``detect``) go to uvicorn's
    console handler at uvicorn's level, unless ``log_config`` is given."""
    options.setdefault("log_config", log_config(options.get("log_level") or "info"))
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(settings),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # call_later takes a float
        **options,
    )


def log_config(level: str | int) -> dict[str, Any]:
    """uvicorn's logging configuration plus the ``detect`` logger on its console handler at ``level``."""
    config = copy.deepcopy(LOGGING_CONFIG)
    name = level.upper() if isinstance(level, str) else logging.getLevelName(level)
    config["loggers"]["detect"] = {"handlers": ["default"], "level": name, "propagate": False}
    return config
