"""What a user points at, turned into images or frames with one error model.

``detect predict`` and the Python API accept files, folders and globs (walked by :mod:`detect.engines.local`) and,
here: ``https://`` (and ``http://``) image URLs, ``.txt`` lists of URLs or paths, ``-`` for one image on stdin,
video files, ``rtsp://``/``rtmp://``/``http(s)://`` video streams and camera indices. Every failure is a
:class:`~detect.errors.DetectError` with a stable code that names the URL or the frame; one input failing never
stops the others.

Decisions:

* **Which kind.** :func:`kind_of` decides from the text alone: ``-`` is stdin; ``rtsp``/``rtsps``/``rtmp`` URLs
  are streams; an ``http(s)`` URL whose path ends in a video extension (``.mp4``, ``.m3u8``, ``.mjpg``, ...) is a
  stream, any other ``http(s)`` URL an image; a path ending in ``.txt`` is a list; a path ending in a video
  extension, or a file whose first bytes are an MP4/QuickTime, AVI, Matroska/WebM, MPEG or FLV container, is a
  video. Everything else is an image path (its format is sniffed from content by :mod:`detect.io`).
* **URL guards** (:class:`UrlPolicy`, :func:`fetch_url`). Only ``http`` and ``https``. The host is resolved first
  and every address it resolves to must be public: loopback, private (RFC 1918, ULA), link-local (cloud metadata at
  169.254.169.254 included), multicast, reserved and unspecified addresses are refused with ``url_refused`` unless
  ``allow_private`` (``--allow-private-urls``). The connection goes to the address that was checked (the Host header
  and TLS SNI carry the name), so a second DNS answer cannot swap in an internal address. Redirects are followed by
  hand, at most ``max_redirects`` (5), each target checked the same way. Limits: ``connect_timeout_s``, a
  ``read_timeout_s`` per read, a ``total_timeout_s`` for the whole fetch (a server that drips a byte a second
  never ends otherwise), ``max_bytes`` on the body (a larger ``Content-Length`` is refused before reading; an
  endless body is cut at the cap). A ``Content-Type`` that is not ``image/*`` or ``application/octet-stream`` is
  ``unsupported_format`` before the body is read; the bytes are still sniffed by :func:`detect.io.decode_image`.
* **stdin** (:func:`read_stdin`) is read once, up to ``max_bytes``.
* **Video** (:func:`iter_video`): OpenCV's ``VideoCapture`` (any container and codec its FFmpeg reads). Frames
  come in order, every ``stride``-th one (the others are grabbed, not decoded into arrays), as RGB ``uint8``
  with their index in the source and a timestamp in seconds (``index / fps`` for files; the capture's own clock
  for streams and cameras). A file's frame count comes from its header; a read that fails before that count is a
  ``corrupt_frame`` error naming the frame, a stream whose read fails is ``stream_dropped`` naming the frame, and a
  source that cannot be opened is ``unreadable_video``. The error is yielded as the last item: frames before it
  are kept.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import numpy as np

from detect.errors import (
    FrameDecodeError,
    InputTooLargeError,
    StreamDroppedError,
    UnreadableFileError,
    UnreadableVideoError,
    UnsupportedFormatError,
    UrlFetchError,
    UrlRefusedError,
    UrlTimeoutError,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "Frame",
    "UrlPolicy",
    "VideoInfo",
    "allow_pixels",
    "expand_lists",
    "fetch_url",
    "is_url",
    "iter_video",
    "kind_of",
    "open_video",
    "read_stdin",
    "url_name",
]

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".m3u8", ".mjpg", ".mjpeg"}
)
STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp"})
URL_SCHEMES = frozenset({"http", "https"})
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


def is_url(source: str) -> bool:
    return urlsplit(source).scheme.lower() in URL_SCHEMES | STREAM_SCHEMES


def kind_of(source: str) -> str:
    """``"stdin"``, ``"url"`` (an image), ``"stream"``, ``"video"`` (a file), ``"list"`` (a ``.txt`` of sources)
    or ``"path"`` (an image file, folder or glob); see the module docstring."""
    if source == "-":
        return "stdin"
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in STREAM_SCHEMES:
        return "stream"
    if scheme in URL_SCHEMES:
        return "stream" if os.path.splitext(parts.path)[1].lower() in VIDEO_EXTENSIONS else "url"
    extension = os.path.splitext(source)[1].lower()
    if extension == ".txt":
        return "list"
    if extension in VIDEO_EXTENSIONS or _video_signature(source):
        return "video"
    return "path"


def _video_signature(path: str) -> bool:
    """The file starts like a video container (MP4/QuickTime ``ftyp`` with a video brand, AVI, Matroska/WebM,
    MPEG-PS, FLV). HEIF/AVIF still images share ``ftyp`` and are left to the image decoder."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head[4:8] == b"ftyp":
        return head[8:12] not in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis")
    return (
        (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:4] == b"\x1a\x45\xdf\xa3"
        or head[:4] == b"\x00\x00\x01\xba"
        or head[:3] == b"FLV"
    )


def expand_lists(sources: Sequence[str]) -> list[str]:
    """``sources`` with every ``.txt`` list replaced by its lines (blank lines and ``#`` comments skipped; lists do
    not nest). An unreadable list is an :class:`UnreadableFileError`."""
    expanded: list[str] = []
    for source in sources:
        if kind_of(source) != "list":
            expanded.append(source)
            continue
        try:
            with open(source, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UnreadableFileError(f"cannot read the source list {source!r}: {err}", path=source) from None
        expanded.extend(line for line in lines if line and not line.startswith("#") and kind_of(line) != "list")
    return expanded


def url_name(url: str) -> str:
    """A relative output path for a URL: ``<host>/<path>`` with the query folded in, every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_``, so nothing escapes the output folder."""
    parts = urlsplit(url)
    pieces = [parts.hostname or "host"] + [p for p in parts.path.split("/") if p and p not in (".", "..")]
    if parts.query:
        pieces[-1] += "_" + parts.query
    safe = ["".join(c if c.isalnum() or c in "._-" else "_" for c in p)[:100].lstrip(".") or "_" for p in pieces]
    return "/".join(["urls", *safe])


# --- URLs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UrlPolicy:
    """Limits of one URL fetch (see the module docstring)."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = 5
    allow_private: bool = False


def _shown(url: str) -> str:
    """The URL for a message: no user name or password, at most 200 characters."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl()[:200]


def _check_address(address: str, url: str, policy: UrlPolicy) -> None:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if policy.allow_private or (ip.is_global and not ip.is_multicast):
        return
    kind = "loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private or reserved"
    raise UrlRefusedError(
        f"{_shown(url)}: resolves to the {kind} address {ip}; pass --allow-private-urls to fetch it", url=_shown(url)
    )


def _resolve(url: str, policy: UrlPolicy, deadline: float) -> tuple[str, str, int, str]:
    """``(scheme, host, port, address)`` of a URL whose every resolved address passed the guard."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise UrlRefusedError(f"{_shown(url)}: only http and https URLs are fetched", url=_shown(url))
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise UrlFetchError(f"{_shown(url)}: invalid port", url=_shown(url)) from None
    if not host:
        raise UrlFetchError(f"{_shown(url)}: no host in the URL", url=_shown(url))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise UrlFetchError(f"{_shown(url)}: cannot resolve {host!r}: {err}", url=_shown(url)) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        _check_address(address, url, policy)
    if time.monotonic() > deadline:
        raise UrlTimeoutError(f"{_shown(url)}: no answer within {policy.total_timeout_s:g} s", url=_shown(url))
    return scheme, host, port, addresses[0]


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address resolved and checked beforehand; ``Host`` and SNI carry the name."""

    def __init__(self, scheme: str, host: str, port: int, address: str, policy: UrlPolicy) -> None:
        super().__init__(host, port, timeout=policy.connect_timeout_s)
        self._scheme, self._address, self._policy = scheme, address, policy

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self._policy.connect_timeout_s)
        if self._scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(self._policy.read_timeout_s)
        self.sock = self.pinned_sock = sock  # http.client drops ``sock`` once a response will close the connection


def fetch_url(url: str, policy: UrlPolicy = UrlPolicy()) -> bytes:
    """The body of an image URL, within ``policy``'s limits (see the module docstring). Raises
    :class:`UrlRefusedError`, :class:`UrlFetchError`, :class:`UrlTimeoutError`, :class:`InputTooLargeError` or
    :class:`UnsupportedFormatError`, each naming the URL."""
    deadline = time.monotonic() + policy.total_timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, address = _resolve(current, policy, deadline)
        connection = _PinnedConnection(scheme, host, port, address, policy)
        try:
            parts = urlsplit(current)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": "detect", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise UrlFetchError(f"{_shown(current)}: HTTP {response.status} without a Location", url=_shown(url))
                current = urljoin(current, location)
                continue
            return _read_body(response, connection, current, policy, deadline)
        except (socket.timeout, TimeoutError):
            raise UrlTimeoutError(
                f"{_shown(current)}: timed out (connect {policy.connect_timeout_s:g} s, read {policy.read_timeout_s:g} s, "
                f"total {policy.total_timeout_s:g} s)", url=_shown(current)
            ) from None
        except (OSError, http.client.HTTPException) as err:
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise UrlFetchError(f"{_shown(current)}: {reason}", url=_shown(current)) from None
        finally:
            connection.close()
            if getattr(connection, "pinned_sock", None) is not None:
                connection.pinned_sock.close()
    raise UrlFetchError(f"{_shown(url)}: more than {policy.max_redirects} redirects", url=_shown(url))


def _read_body(
    response: http.client.HTTPResponse, connection: _PinnedConnection, url: str, policy: UrlPolicy, deadline: float
) -> bytes:
    if response.status != 200:
        raise UrlFetchError(f"{_shown(url)}: HTTP {response.status} {response.reason}", url=_shown(url), status=response.status)
    media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if media and not (media.startswith("image/") or media in ("application/octet-stream", "binary/octet-stream")):
        raise UnsupportedFormatError(f"{_shown(url)}: the server sent {media}, not an image", url=_shown(url))
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise InputTooLargeError(
            f"{_shown(url)}: {int(length)} bytes, above the limit of {policy.max_bytes}", url=_shown(url)
        )
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.pinned_sock.settimeout(min(policy.read_timeout_s, remaining))
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise InputTooLargeError(f"{_shown(url)}: more than {policy.max_bytes} bytes", url=_shown(url))
        chunks.append(chunk)


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's process-wide decompression-bomb ceiling (``Image.MAX_IMAGE_PIXELS``, 89 MP) to ``max_pixels``
    when it is lower, so that a deliberate ``--max-pixels`` above it takes effect (:mod:`detect.io` reads the
    ceiling, never writes it). For the CLI's process; the service keeps its own limit."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def read_stdin(max_bytes: int = DEFAULT_MAX_BYTES, stream: BinaryIO | None = None) -> bytes:
    """All of stdin (or ``stream``), at most ``max_bytes`` (:class:`InputTooLargeError` beyond)."""
    stream = stream if stream is not None else sys.stdin.buffer
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputTooLargeError(f"stdin: more than {max_bytes} bytes")
    return data


# --- video -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """What the capture says: ``fps`` (0 when unknown), frame size, ``frames`` (``None`` for streams and cameras)."""

    fps: float
    width: int
    height: int
    frames: int | None
    live: bool  # a stream or a camera: no end, no seeking


@dataclass
class Frame:
    """One frame: its ``index`` in the source (0-based, before the stride), ``timestamp_s`` and RGB ``image``."""

    index: int
    timestamp_s: float
    image: np.ndarray


def _source_name(source: str | int) -> str:
    return f"camera {source}" if isinstance(source, int) else _shown(source) if is_url(source) else repr(source)


def open_video(source: str | int, *, open_timeout_s: float = 10.0) -> tuple[object, VideoInfo]:
    """An opened ``cv2.VideoCapture`` and its :class:`VideoInfo`; :class:`UnreadableVideoError` when it cannot be
    opened or its first frame cannot be read."""
    import cv2

    is_file = not isinstance(source, int) and kind_of(source) != "stream"
    if is_file and not os.path.isfile(source):
        raise UnreadableVideoError(f"no such video file: {source!r}", source=str(source))
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(open_timeout_s * 1000)]
    capture = cv2.VideoCapture(source, cv2.CAP_ANY, params) if not isinstance(source, int) else cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        raise UnreadableVideoError(f"cannot open the video {_source_name(source)}", source=str(source))
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    fps = fps if np.isfinite(fps) and 0 < fps < 1000 else 0.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    live = not is_file and (isinstance(source, int) or count <= 0)  # an http(s) file with a length is not live
    return capture, VideoInfo(fps, width, height, None if live or count <= 0 else count, live)


def iter_video(
    source: str | int, stride: int = 1, start: int = 0, *, info_out: list | None = None
) -> Iterator[Frame | FrameDecodeError | StreamDroppedError]:
    """Frames ``start, start + stride, ...`` of a video file, stream or camera (see the module docstring). An error
    after some frames is yielded (not raised) as the last item; one that prevents opening is raised.
    ``info_out``, when given, receives the :class:`VideoInfo` before the first frame."""
    import cv2

    if stride < 1 or start < 0:
        raise ValueError("stride must be at least 1 and start at least 0")
    capture, info = open_video(source)
    if info_out is not None:
        info_out.append(info)
    name = _source_name(source)
    began = time.monotonic()
    try:
        index = 0
        while True:
            wanted = index >= start and (index - start) % stride == 0
            ok = capture.grab()
            if ok and wanted:
                ok, bgr = capture.retrieve()
                ok = ok and bgr is not None and bgr.ndim == 3 and bgr.size > 0
            if not ok:
                if info.frames is not None and index < info.frames:
                    yield FrameDecodeError(
                        f"{name}: frame {index} cannot be decoded (the file says it has {info.frames} frames)",
                        frame=index, source=str(source),
                    )
                elif info.live:
                    yield StreamDroppedError(f"{name}: no frame {index} (the stream ended or dropped)", frame=index,
                                             source=str(source))
                return
            if wanted:
                if info.fps > 0 and not info.live:
                    timestamp = index / info.fps
                else:
                    msec = capture.get(cv2.CAP_PROP_POS_MSEC)
                    timestamp = msec / 1000 if msec and msec > 0 else time.monotonic() - began
                yield Frame(index, round(timestamp, 6), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
