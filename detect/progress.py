"""Progress of long loops (training, pre-training, batch prediction) on stderr, as users expect it.

Decisions:

- On a terminal: a live ``tqdm`` bar (count, rate, ETA and the loop's own figures as its postfix), redrawn at most
  every half second.
- Anywhere else (a log file, a pipe, a CI job): one plain line per ``interval`` seconds and one at the end, never a
  carriage return, so a log holds a readable history instead of one line of many kilobytes.
- Whether the stream is a terminal is asked once, of the stream itself (``isatty``), so ``2> log`` gives plain
  lines even when stdout is a terminal.
- No state outside the :class:`Progress` object; the standard library, ``tqdm`` and nothing of the project.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

from tqdm import tqdm

__all__ = ["DEFAULT_INTERVAL", "Progress", "is_terminal"]

DEFAULT_INTERVAL = 30.0  # seconds between plain lines when the stream is not a terminal


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (``False`` for files, pipes and streams without ``isatty``)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _figure(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Progress of ``total`` steps starting at ``initial``: ``update(done, figures)`` after each step, ``close()``
    at the end. ``desc`` names the loop, ``unit`` its steps; see the module docstring for the two forms."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        desc: str = "",
        unit: str = "it",
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.initial, self.desc, self.unit, self.interval = total, initial, desc, unit, interval
        self.done = initial
        self.began = self.last = time.perf_counter()
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc or None, unit=unit, file=self.stream, mininterval=0.5,
                 dynamic_ncols=True)
            if is_terminal(self.stream)
            else None
        )

    def update(
        self, done: int, figures: Mapping[str, float | int | str] | None = None, elapsed: float | None = None,
        eta: float | None = None,
    ) -> None:
        """``done`` steps of ``total`` are finished; ``figures`` (losses, accuracy) go on the line; ``elapsed``
        (seconds since the loop began) when the loop began before this object; ``eta`` (seconds) when the loop
        knows its end better than its rate does (a time budget)."""
        step, self.done = done - self.done, done
        if self.bar is not None:
            if figures:
                self.bar.set_postfix({k: _figure(v) for k, v in figures.items()}, refresh=False)
            self.bar.update(step)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval or done >= self.total:
            self.last = now
            seconds = elapsed if elapsed is not None else now - self.began
            self.stream.write(self.line(done, figures or {}, seconds, eta) + "\n")
            self.stream.flush()

    def line(self, done: int, figures: Mapping[str, float | int | str], elapsed: float | None = None,
             eta: float | None = None) -> str:
        """The plain line: ``desc done/total (pct%) figures | rate, elapsed, ETA`` (``eta`` given, or from the
        rate)."""
        elapsed = time.perf_counter() - self.began if elapsed is None else elapsed
        per_step = elapsed / max(done - self.initial, 1)
        if eta is None:
            eta = per_step * max(self.total - done, 0)
        percent = 100.0 * done / self.total if self.total else 100.0
        parts = " ".join(f"{k} {_figure(v)}" for k, v in figures.items())
        head = f"{self.desc} " if self.desc else ""
        rate = f"{per_step:.3g} s/{self.unit}" if per_step >= 1 or not per_step else f"{1 / per_step:.3g} {self.unit}/s"
        return (
            f"{head}{done}/{self.total} ({percent:.0f}%) {parts}{' | ' if parts else '| '}"
            f"{rate}, elapsed {_clock(elapsed)}, ETA {_clock(eta)}"
        )

    def set_total(self, total: int) -> None:
        """A new ``total`` (a time-budgeted run's plan, refitted as it learns its speed)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        """End the bar on a terminal (the plain form writes its last line when ``done`` reaches ``total``)."""
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
