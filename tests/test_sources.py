"""Inputs that are not image files (detect.sources): URLs against a local HTTP server that misbehaves on purpose,
stdin, lists, and video files with their frames, strides and failures."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from detect import sources
from detect.errors import (
    FrameDecodeError,
    InputTooLargeError,
    UnreadableVideoError,
    UnsupportedFormatError,
    UrlFetchError,
    UrlRefusedError,
    UrlTimeoutError,
)
from detect.io import decode_image
from detect.sources import UrlPolicy, fetch_url, iter_video, kind_of, read_stdin, url_name
from tests.helpers import URL_PNG as PNG
from tests.helpers import capture_failing_after, image_server

OPEN = UrlPolicy(allow_private=True, connect_timeout_s=2, read_timeout_s=2, total_timeout_s=3, max_bytes=100_000)


@pytest.fixture(scope="module")
def server():
    with image_server() as url:
        yield url


def test_an_image_url_is_fetched_and_decodes(server):
    assert fetch_url(f"{server}/image.png", OPEN) == PNG
    assert fetch_url(f"{server}/octet", OPEN) == PNG
    assert decode_image(fetch_url(f"{server}/image.png", OPEN)).shape == (24, 32, 3)


def test_loopback_is_refused_without_the_permission(server):
    with pytest.raises(UrlRefusedError, match="loopback") as caught:
        fetch_url(f"{server}/image.png", UrlPolicy())
    assert caught.value.code == "url_refused" and "127.0.0.1" in caught.value.message


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.1", "172.16.5.4", "169.254.169.254", "::1", "fe80::1",
                                     "fc00::1", "0.0.0.0", "::ffff:127.0.0.1", "224.0.0.1"])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(UrlRefusedError):
        sources._check_address(address, "http://x/", UrlPolicy())
    sources._check_address(address, "http://x/", UrlPolicy(allow_private=True))


def test_public_addresses_pass_the_guard():
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        sources._check_address(address, "http://x/", UrlPolicy())


def test_every_redirect_is_checked_and_five_are_allowed(server, monkeypatch):
    checked = []
    original = sources._check_address
    monkeypatch.setattr(sources, "_check_address", lambda a, u, p: (checked.append(u), original(a, u, p)))
    assert fetch_url(f"{server}/hop/4", OPEN) == PNG  # 5 redirects: /hop/4 .. /hop/0 -> /image.png
    assert len(checked) == 6 and checked[-1].endswith("/image.png")
    with pytest.raises(UrlFetchError, match="more than 5 redirects"):
        fetch_url(f"{server}/hop/5", OPEN)


def test_a_redirect_to_a_refused_address_is_refused(server, monkeypatch):
    # the first hop is allowed (as if public); the redirect target, loopback, is checked again and refused
    calls = []

    def guard(address, url, policy):
        calls.append(url)
        if len(calls) > 1:
            sources._check_address.__wrapped__(address, url, UrlPolicy())

    guard.__wrapped__ = sources._check_address
    monkeypatch.setattr(sources, "_check_address", guard)
    with pytest.raises(UrlRefusedError):
        fetch_url(f"{server}/hop/0", OPEN)
    assert len(calls) == 2


@pytest.mark.parametrize(("path", "error", "code"), [
    ("/loop", UrlFetchError, "url_unreachable"),
    ("/missing", UrlFetchError, "url_unreachable"),
    ("/page", UnsupportedFormatError, "unsupported_format"),
    ("/huge-declared", InputTooLargeError, "input_too_large"),
    ("/endless", InputTooLargeError, "input_too_large"),
])
def test_hostile_urls_fail_with_their_code_and_name_the_url(server, path, error, code):
    with pytest.raises(error) as caught:
        fetch_url(f"{server}{path}", OPEN)
    assert caught.value.code == code and path in caught.value.message


def test_a_slow_drip_is_cut_at_the_total_timeout(server):
    start = time.monotonic()
    with pytest.raises(UrlTimeoutError) as caught:
        fetch_url(f"{server}/drip", UrlPolicy(allow_private=True, read_timeout_s=2, total_timeout_s=1.5))
    assert time.monotonic() - start < 4
    assert caught.value.code == "url_timeout" and "/drip" in caught.value.message


def test_unreachable_hosts_and_bad_schemes():
    with pytest.raises(UrlRefusedError):
        fetch_url("ftp://example.com/a.png")
    with pytest.raises(UrlFetchError):
        fetch_url("http://host.invalid/a.png", OPEN)  # .invalid never resolves (RFC 2606)


def test_stdin_is_read_once_with_a_cap():
    assert read_stdin(100, io.BytesIO(b"abc")) == b"abc"
    with pytest.raises(InputTooLargeError):
        read_stdin(2, io.BytesIO(b"abc"))


def test_kinds_lists_and_url_names(tmp_path):
    assert kind_of("-") == "stdin"
    assert kind_of("https://x.org/a.jpg") == "url" and kind_of("https://x.org/live.m3u8") == "stream"
    assert kind_of("rtsp://cam/1") == "stream" and kind_of("clip.MP4") == "video" and kind_of("a.png") == "path"
    fake = tmp_path / "noext"
    fake.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 32)
    assert kind_of(str(fake)) == "video"
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nhttps://x.org/a.png\n\n  b.jpg  \n")
    assert sources.expand_lists(["c.png", str(listing)]) == ["c.png", "https://x.org/a.png", "b.jpg"]
    name = url_name("https://user:pw@x.org/../../etc/pass wd?x=1&y=/2")
    assert name.startswith("urls/x.org/") and ".." not in name.split("/") and " " not in name


def _write_video(path: Path, frames: int = 6, size: tuple[int, int] = (64, 48), fps: float = 10.0) -> list[np.ndarray]:
    from detect.data.shapes_video import write_video

    images = [np.full((size[1], size[0], 3), 20 * i, np.uint8) for i in range(frames)]
    write_video(path, images, fps)
    return images


def test_video_frames_stride_start_and_timestamps(tmp_path):
    path = tmp_path / "clip.mp4"
    images = _write_video(path, frames=7)
    frames = list(iter_video(str(path)))
    assert [f.index for f in frames] == list(range(7))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / 10 for i in range(7)])
    for frame, image in zip(frames, images):  # mp4v is lossy: flat frames come back within a few levels
        assert frame.image.shape == (48, 64, 3) and abs(float(frame.image.mean()) - float(image.mean())) < 6
    assert [f.index for f in iter_video(str(path), stride=3)] == [0, 3, 6]
    assert [f.index for f in iter_video(str(path), stride=2, start=3)] == [3, 5]


def test_unreadable_and_truncated_videos(tmp_path):
    with pytest.raises(UnreadableVideoError) as caught:
        list(iter_video(str(tmp_path / "none.mp4")))
    assert caught.value.code == "unreadable_video"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(UnreadableVideoError):
        list(iter_video(str(junk)))
    with pytest.raises(UnreadableVideoError):
        list(iter_video("rtsp://127.0.0.1:9/none"))


def test_a_frame_that_fails_to_decode_is_reported_with_its_number(tmp_path, monkeypatch):
    import cv2

    path = tmp_path / "clip.mp4"
    _write_video(path, frames=6)
    # the capture of a file whose frame 4 is corrupt: grab() fails there, the header says 6
    monkeypatch.setattr(cv2, "VideoCapture", capture_failing_after(4))
    items = list(iter_video(str(path)))
    assert [f.index for f in items[:-1]] == [0, 1, 2, 3]
    assert isinstance(items[-1], FrameDecodeError) and items[-1].details["frame"] == 4
    assert items[-1].code == "corrupt_frame" and "frame 4" in items[-1].message


def test_a_stream_that_drops_is_reported_with_the_frame_number(monkeypatch):
    import cv2

    class Stream:  # an rtsp capture that delivers three frames, then the connection drops
        def __init__(self, *args):
            self.reads = 0

        def isOpened(self):  # noqa: N802 - OpenCV's name
            return True

        def get(self, prop):
            return {cv2.CAP_PROP_FPS: 25.0, cv2.CAP_PROP_FRAME_COUNT: -1, cv2.CAP_PROP_FRAME_WIDTH: 16,
                    cv2.CAP_PROP_FRAME_HEIGHT: 8, cv2.CAP_PROP_POS_MSEC: 40.0 * self.reads}.get(prop, 0)

        def grab(self):
            self.reads += 1
            return self.reads <= 3

        def retrieve(self):
            return True, np.zeros((8, 16, 3), np.uint8)

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoCapture", Stream)
    items = list(iter_video("rtsp://camera.example/live", stride=1))
    assert [f.index for f in items[:-1]] == [0, 1, 2]
    assert [f.timestamp_s for f in items[:-1]] == pytest.approx([0.04, 0.08, 0.12])  # the stream's own clock
    assert items[-1].code == "stream_dropped" and items[-1].details["frame"] == 3 and "frame 3" in items[-1].message
