"""Videos, streams and cameras through a detector: per-frame results, an annotated video, a summary.

:func:`iter_video_results` is the Python generator (frames in, :class:`FrameResult` out); :func:`predict_video`
is what ``detect predict clip.mp4`` runs with it. Decisions:

* **Frames in batches.** Frames (every ``stride``-th, :func:`detect.sources.iter_video`) are gathered
  ``batch_size`` at a time and run in one forward pass (:func:`detect.inference.forward_batch`), or tile by tile
  with ``slicing`` (:func:`detect.slicing.detect_sliced`); a frame's detections do not depend on its batch mates.
  The request's thresholds (:class:`~detect.inference.Refinement`) apply per frame.
* **Tracking** (``track=True``): :class:`detect.tracking.ByteTracker` sees every frame's detections down to its
  ``low_threshold`` (before the score threshold, as ByteTrack needs the weak ones), in frame order; the reported
  detections carry the ``track_id`` of the track they continue (``null`` when none).
* **Outputs** for a source named ``<name>`` (a file's path relative to its folder, a stream's
  ``urls/<host>/<path>``, ``camera<N>``): ``<name>.jsonl``, one line per processed frame ``{"frame", "timestamp_s",
  "width", "height", "detections": [...]}``, appended and flushed frame by frame; ``<name>.annotated.mp4``
  (``save_video``): boxes, class, score and track id drawn, the source's frame size, the source's fps divided by
  ``stride`` (so it lasts as long as the source), written under a temporary name and renamed when it is complete;
  ``<name>.summary.json`` (written atomically): frames, detections per class, frames/s, and the error, if any.
* **Errors stop the source, not the run.** A frame that cannot be decoded, a dropped stream, a frame the model
  fails on: the error (with the frame number) goes to the summary and the run goes on with the next source.
  What was written stays valid: every JSONL line is complete JSON and the annotated video is finalised with
  the frames before the error.
* **Resume** (``resume=True``, files only): the JSONL is kept up to its last complete line (a line torn by a kill
  is dropped), and detection continues at the next frame of the stride; a source whose summary says it finished
  is skipped. New track ids continue after the highest recorded one (tracks themselves restart). The annotated
  video is rebuilt: the frames already done are decoded again and drawn from the recorded JSONL (no model
  call), so a video left unfinished by a kill is not needed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from detect.errors import DetectError
from detect.inference import Refinement, forward_batch
from detect.io import atomic_write
from detect.slicing import SliceOptions, detect_sliced
from detect.sources import Frame, VideoInfo, is_url, iter_video, url_name
from detect.structures import Detections
from detect.tracking import ByteTracker, TrackerConfig

__all__ = ["FrameResult", "VideoOptions", "VideoSummary", "iter_video_results", "output_name", "predict_video"]


@dataclass
class FrameResult:
    """One processed frame: ``detections`` after the thresholds, ``track_ids`` aligned with them (``-1``: none;
    ``None`` without tracking), the RGB ``image`` when asked for; or ``error`` (the last item of a source)."""

    frame: int
    timestamp_s: float = 0.0
    detections: Detections | None = None
    track_ids: np.ndarray | None = None
    image: np.ndarray | None = None
    error: DetectError | None = None

    def to_json(self, class_names: Sequence[str]) -> dict:
        body = self.detections.to_json(class_names) if self.detections is not None else {"detections": []}
        if self.track_ids is not None:
            for item, track in zip(body["detections"], self.track_ids.tolist()):
                item["track_id"] = int(track) if track >= 0 else None
        return {"frame": self.frame, "timestamp_s": self.timestamp_s, **body}


def iter_video_results(
    detector: Callable,
    source: str | int,
    *,
    stride: int = 1,
    start: int = 0,
    batch_size: int = 4,
    refinement: Refinement = Refinement(),
    track: bool = False,
    tracker: TrackerConfig | ByteTracker = TrackerConfig(),
    slicing: SliceOptions | None = None,
    keep_images: bool = False,
    info_out: list | None = None,
) -> Iterator[FrameResult]:
    """Detect (and track) objects frame by frame in a video file, stream or camera; see the module docstring.
    A source that cannot be opened raises :class:`~detect.errors.UnreadableVideoError`; a later failure is
    yielded as a last :class:`FrameResult` with ``error`` set."""
    tracking = (tracker if isinstance(tracker, ByteTracker) else ByteTracker(tracker)) if track else None
    frames = iter_video(source, stride, start, info_out=info_out)
    batch: list[Frame] = []
    for item in frames:
        if isinstance(item, DetectError):
            yield from _run_batch(detector, batch, refinement, tracking, slicing, keep_images)
            yield FrameResult(item.details.get("frame", -1), error=item)
            return
        batch.append(item)
        if len(batch) == batch_size:
            results = list(_run_batch(detector, batch, refinement, tracking, slicing, keep_images))
            batch = []
            yield from results
            if results and results[-1].error is not None:
                return
    yield from _run_batch(detector, batch, refinement, tracking, slicing, keep_images)


def _run_batch(
    detector: Callable,
    batch: list[Frame],
    refinement: Refinement,
    tracking: ByteTracker | None,
    slicing: SliceOptions | None,
    keep_images: bool,
) -> Iterator[FrameResult]:
    if not batch:
        return
    images = [frame.image for frame in batch]
    results = detect_sliced(detector, images, slicing) if slicing is not None else forward_batch(detector, images)
    for frame, result in zip(batch, results):
        if isinstance(result, DetectError):
            result.message = f"frame {frame.index}: {result.message}"
            result.details["frame"] = frame.index
            yield FrameResult(frame.index, frame.timestamp_s, error=result)
            return
        result = result.to("cpu")
        ids = None
        if tracking is not None:
            all_ids = tracking.update(result)
            known = {_key(result, i): int(t) for i, t in enumerate(all_ids.tolist())}
            result = refinement.apply(result)
            ids = np.array([known.get(_key(result, i), -1) for i in range(len(result))], dtype=np.int64)
        else:
            result = refinement.apply(result)
        yield FrameResult(frame.index, frame.timestamp_s, result, ids, frame.image if keep_images else None)


def _key(detections: Detections, i: int) -> tuple:
    """A detection's identity across :meth:`Refinement.apply`, which only selects and reorders rows."""
    return (*detections.boxes[i].tolist(), float(detections.scores[i]), int(detections.labels[i]))


# --- the CLI's run -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoOptions:
    out_dir: Path
    stride: int = 1
    batch_size: int = 4
    refinement: Refinement = Refinement()
    save_video: bool = False
    resume: bool = False
    track: bool = False
    tracker: TrackerConfig = TrackerConfig()
    slicing: SliceOptions | None = None


@dataclass
class VideoSummary:
    source: str
    name: str
    frames: int = 0
    resumed_frames: int = 0
    detections: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    finished: bool = False
    skipped: bool = False
    error: DetectError | None = None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        body: dict[str, Any] = {
            "source": self.source, "frames": self.frames + self.resumed_frames, "frames_this_run": self.frames,
            "detections": dict(sorted(self.detections.items())), "seconds": round(self.seconds, 3),
            "frames_per_second": round(self.frames_per_second, 3), "finished": self.finished,
        }
        if self.error is not None:
            body["error"] = {"code": self.error.code, "message": self.error.message, "frame": self.error.details.get("frame")}
        return body

    def line(self) -> str:
        if self.skipped:
            return f"{self.source}: already finished (skipped)"
        per_class = ", ".join(f"{name} {count}" for name, count in sorted(self.detections.items())) or "none"
        resumed = f" (+{self.resumed_frames} from the previous run)" if self.resumed_frames else ""
        return (f"{self.source}: {self.frames} frames{resumed}, {sum(self.detections.values())} detections "
                f"({per_class}), {self.frames_per_second:.2f} frames/s")


def output_name(source: str | int) -> str:
    """The output name of a source: ``camera<N>``, a URL's ``urls/<host>/<path>``, a file's base name."""
    if isinstance(source, int):
        return f"camera{source}"
    return url_name(source) if is_url(source) else os.path.basename(os.path.normpath(source))


def predict_video(
    source: str | int, detector: Callable, options: VideoOptions, progress: TextIO | None = sys.stderr
) -> VideoSummary:
    """Run one video source and write its outputs under ``options.out_dir`` (see the module docstring)."""
    name = output_name(source)
    out = Path(options.out_dir)
    jsonl, summary_path = out / f"{name}.jsonl", out / f"{name}.summary.json"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for stale in jsonl.parent.glob(f".{Path(name).name}.*.tmp.mp4"):
        stale.unlink(missing_ok=True)
    summary = VideoSummary(str(source), name)
    resumable = options.resume and not isinstance(source, int) and not is_url(source)
    done: list[dict] = _read_jsonl(jsonl) if resumable else []
    if resumable and done and _finished(summary_path):
        summary.skipped = summary.finished = True
        return summary
    start = done[-1]["frame"] + options.stride if done else 0
    first_id = 1 + max((d["track_id"] or 0 for line in done for d in line["detections"] if "track_id" in d), default=0)
    summary.resumed_frames = len(done)
    summary.detections = dict(Counter(d["class_name"] for line in done for d in line["detections"]))
    _rewrite_jsonl(jsonl, done)
    writer: _VideoWriter | None = None
    began = time.perf_counter()
    info: list[VideoInfo] = []
    try:
        results = iter_video_results(
            detector, source, stride=options.stride, start=start, batch_size=options.batch_size,
            refinement=options.refinement, track=options.track, tracker=ByteTracker(options.tracker, first_id),
            slicing=options.slicing, keep_images=options.save_video, info_out=info,
        )
        with open(jsonl, "a", encoding="utf-8") as lines:
            for result in results:
                if result.error is not None:
                    summary.error = result.error
                    break
                if options.save_video and writer is None:
                    writer = _VideoWriter(out / f"{name}.annotated.mp4", info[0], options.stride, result.image.shape)
                    if done:
                        writer.replay(source, done, detector.class_names, options.stride)
                body = result.to_json(detector.class_names)
                lines.write(json.dumps(body) + "\n")
                lines.flush()
                if writer is not None:
                    writer.write(_draw(result.image, body["detections"]))
                summary.frames += 1
                for d in body["detections"]:
                    summary.detections[d["class_name"]] = summary.detections.get(d["class_name"], 0) + 1
                if progress is not None and summary.frames % 100 == 0:
                    progress.write(f"{name}: {summary.frames} frames\n")
            else:
                summary.finished = True
    except DetectError as err:  # the source could not be opened
        summary.error = err
    finally:
        if writer is not None:
            writer.finish()
        summary.seconds = time.perf_counter() - began
        atomic_write(summary_path, json.dumps(summary.to_json()).encode())
    return summary


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a previous run's JSONL, up to the first torn or invalid one."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            line = json.loads(text)
        except ValueError:
            break
        if not (text.endswith("\n") and isinstance(line, dict) and isinstance(line.get("frame"), int)):
            break
        lines.append(line)
    return lines


def _rewrite_jsonl(path: Path, lines: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(line) + "\n" for line in lines).encode())


def _finished(summary_path: Path) -> bool:
    try:
        return bool(json.loads(summary_path.read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


_COLOURS = [(255, 56, 56), (50, 205, 50), (30, 144, 255), (255, 178, 29), (207, 210, 49), (72, 249, 10), (146, 204, 23),
            (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (0, 194, 255), (52, 69, 147), (100, 115, 255)]


def _draw(image: np.ndarray, detections: Sequence[dict]) -> np.ndarray:
    """A BGR copy of the RGB ``image`` with boxes and ``#id class score`` labels (colour by track, else class)."""
    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    for d in detections:
        track = d.get("track_id")
        r, g, b = _COLOURS[(track if track is not None else d["class_id"]) % len(_COLOURS)]
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (b, g, r), 2)
        label = (f"#{track} " if track is not None else "") + f"{d['class_name']} {d['score']:.2f}"
        cv2.putText(canvas, label, (x1 + 2, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (b, g, r), 1, cv2.LINE_AA)
    return canvas


class _VideoWriter:
    """An MP4 (``mp4v``) written under a temporary name beside ``path`` and renamed over it by :meth:`finish`."""

    def __init__(self, path: Path, info: VideoInfo, stride: int, shape: tuple[int, ...]) -> None:
        self.path = path
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.mp4")
        os.close(fd)
        self.tmp = Path(tmp)
        fps = (info.fps or 25.0) / stride
        height, width = shape[:2]
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        self.writer.write(bgr)
        self.frames += 1

    def replay(self, source: str, done: list[dict], class_names: Sequence[str], stride: int) -> None:
        """Draw the frames a previous run finished from their recorded detections (the model is not called)."""
        by_frame = {line["frame"]: line["detections"] for line in done}
        last = max(by_frame)
        for frame in iter_video(source, stride, 0):
            if isinstance(frame, DetectError) or frame.index > last:
                break
            if frame.index in by_frame:
                self.write(_draw(frame.image, by_frame[frame.index]))

    def finish(self) -> None:
        self.writer.release()
        if self.frames:
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
