"""The service's memory budget for decoded images, and the size it decodes them at.

A 116 KB all-zero PNG can declare 40 MP; decoded at full size and turned into float tensors it once cost the
server ~2.1 GB, and four in one request 9.1 GB, in a pod limited to 2 GiB. Two defences, both here:

* **Decode for the model, not for the file** (:func:`decode_fit`): the detector scales every image to its input
  size (Faster R-CNN: short side 800, long side at most 1333), so an image at least twice that size is reduced
  while it is decoded (:func:`detect.io.decode_fitted`: JPEG by DCT scaling, never decoded at full size; other
  formats box-reduced right after decoding). Boxes are scaled back to the original's pixels
  (:func:`to_original`). Models that declare no input size (R-CNN warps its regions from the image itself) are
  decoded with their long side at least ``decode_max_side``.
* **A budget across all requests** (:class:`MemoryBudget`): before an image is decoded, its decoding's peak
  memory, estimated from the header (:func:`detect.io.plan_decode`), is reserved from ``decode_budget_bytes``;
  after decoding the reservation shrinks to the decoded array, which stays reserved until its request has
  answered. A request whose image does not fit waits, first come first served, at most ``decode_wait_s``, then
  answers 503 ``overloaded`` (with ``Retry-After``); an image whose estimate alone exceeds the whole budget is
  413 ``image_too_large``. Nothing is decoded beyond the budget, so many large uploads at once queue up instead
  of exhausting memory. The forward passes' own tensors are not counted here: they are bounded by ``max_batch``
  images at the model's input size (the model's memory, see ``tests/api/test_memory_budget.py``'s check of the
  Kubernetes manifests).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from detect.errors import ImageTooLargeError, ServiceBusyError
from detect.io import Fit
from detect.structures import Detections

MIB = 1024 * 1024


def decode_fit(detector: Any, max_side: int) -> Fit:
    """The input size images are decoded for: the detector's ``transform.config`` (``min_size``, the largest when
    it runs several scales, and ``max_size``) when it has one, else ``max_side`` for both sides."""
    config = getattr(getattr(detector, "transform", None), "config", None)
    short_sides, long_side = getattr(config, "min_size", None), getattr(config, "max_size", None)
    if short_sides and isinstance(long_side, int):
        return (max(short_sides), long_side)
    return (max_side, max_side)


def to_original(detections: Detections, factor: int, original_size: tuple[int, int]) -> Detections:
    """Boxes of an image decoded ``factor`` times smaller, in the original's pixels: output pixel ``i`` covered
    original pixels ``factor*i .. factor*(i+1)``, so coordinates scale by ``factor`` exactly (then clipped, as the
    last row and column may have covered fewer pixels)."""
    if factor == 1:
        return detections
    height, width = original_size
    boxes = detections.boxes * factor  # (N, 4) xyxy
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return Detections(boxes, detections.scores, detections.labels, original_size, dict(detections.extras))


class Reservation:
    """Bytes held from a :class:`MemoryBudget`. ``resize`` after decoding, ``release`` when done (idempotent;
    while the decoding thread it :meth:`covers` still runs, the release waits for that thread to end)."""

    def __init__(self, budget: "MemoryBudget", nbytes: int) -> None:
        self.budget, self.nbytes = budget, nbytes
        self._work: asyncio.Future | None = None

    def covers(self, work: asyncio.Future) -> None:
        """The decoding this reservation pays for: a cancelled request cannot free its memory before it ends."""
        self._work = work

    def resize(self, nbytes: int) -> None:
        self.budget._adjust(nbytes - self.nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        if self._work is not None and not self._work.done():
            self._work.add_done_callback(lambda _: self.release())
            return
        self.resize(0)


class MemoryBudget:
    """At most ``capacity`` bytes of decoded images in flight across every request (see the module docstring).

    First come, first served: while a request waits, later ones queue behind it even if they would fit, so a large
    image is never starved by a stream of small ones. Only the event loop's thread touches it.
    """

    def __init__(self, capacity: int, wait_s: float, retry_after: int = 1) -> None:
        self.capacity, self.wait_s, self.retry_after = capacity, wait_s, retry_after
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, nbytes: int) -> Reservation:
        """Reserve ``nbytes``: at once when they fit and nobody waits, else after the earlier waiters, within
        ``wait_s`` (:class:`ServiceBusyError` otherwise); more than ``capacity`` is :class:`ImageTooLargeError`."""
        if nbytes > self.capacity:
            raise ImageTooLargeError(
                f"decoding this image needs about {nbytes / MIB:.0f} MiB, more than the service's decoding budget of "
                f"{self.capacity / MIB:.0f} MiB", needed_bytes=nbytes, budget_bytes=self.capacity,
            )
        if not self._waiters and self.used + nbytes <= self.capacity:
            self.used += nbytes
            return Reservation(self, nbytes)
        entry = (nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(entry[1], self.wait_s)
        except BaseException as exc:
            if entry[1].done() and not entry[1].cancelled():  # granted just as we gave up: give it back
                self._adjust(-nbytes)
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()  # the head leaving may let the next one in
            if isinstance(exc, TimeoutError):
                raise ServiceBusyError(
                    f"the server is decoding other large images (memory budget {self.capacity / MIB:.0f} MiB in use); "
                    f"retry later", retry_after=self.retry_after,
                ) from None
            raise
        return Reservation(self, nbytes)

    def _adjust(self, delta: int) -> None:
        self.used += delta
        if delta < 0:
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            nbytes, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += nbytes
                waiter.set_result(None)
