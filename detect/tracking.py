"""Linking detections across video frames into tracks (ByteTrack-style association).

:class:`ByteTracker` takes one frame's :class:`~detect.structures.Detections` at a time and answers a track id
per detection (``-1`` for one that belongs to no track). The idea is ByteTrack's (Zhang et al., 2022): use the
low-scoring detections too, but only to continue tracks that exist, never to start one.

Per frame:

0. **One candidate per object.** The detector's NMS is per class, so an object can come with a second, weaker
   guess at its class. Class-agnostic NMS at ``duplicate_iou`` (:func:`detect.ops.nms.nms`) picks the
   candidates; the others get no track.
1. **Predict.** Each track moves its last box by its velocity times the frames since it was last seen
   (constant velocity, per box coordinate; the velocity is an exponential average of the observed per-frame
   displacement, ``velocity_smoothing`` on the new observation).
2. **First pass**: tracks (confirmed, new and lost alike) against detections scoring at least
   ``high_threshold``: cost ``1 - IoU`` between the predicted boxes and the detections
   (:func:`detect.ops.boxes.box_iou`, the project's IoU kernel) plus ``class_penalty`` when the classes differ
   (a partly hidden shape's class flickers; a track should survive that, but prefer its own class), pairs below
   ``match_iou`` forbidden, solved optimally by the Hungarian method (:func:`scipy.optimize.linear_sum_assignment`).
3. **Second pass**: the tracks seen in the previous frame that are still unmatched against the detections scoring
   between ``low_threshold`` and ``high_threshold``, at the stricter ``low_match_iou`` (a weak detection must sit
   where the track is expected).
4. **Bookkeeping.** Matched tracks take the detection's box, score and class. Unmatched tracks are lost; a track
   lost for more than ``max_lost`` frames is dropped, and a track that was never confirmed (``min_hits`` matches)
   is dropped as soon as it is lost. Unmatched candidates scoring at least ``new_track_threshold`` start tracks.
   Ids start at 1 and are never reused.

A new track's detection is reported with its id at once (so a track's first frame is not lost to the output);
deterministic: ties in the assignment are broken by SciPy's algorithm on a fixed matrix, and detections are
visited in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from detect.errors import ConfigError
from detect.ops.boxes import box_iou
from detect.ops.nms import nms
from detect.structures import Detections

__all__ = ["TrackerConfig", "ByteTracker"]

_FORBIDDEN = 1e6


@dataclass(frozen=True)
class TrackerConfig:
    high_threshold: float = 0.5
    low_threshold: float = 0.1
    new_track_threshold: float = 0.6
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    max_lost: int = 30
    min_hits: int = 2
    velocity_smoothing: float = 0.5
    class_penalty: float = 0.5
    duplicate_iou: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_threshold <= self.high_threshold <= 1.0:
            raise ConfigError("tracker thresholds need 0 <= low_threshold <= high_threshold <= 1")
        if not (0.0 < self.match_iou <= 1.0 and 0.0 < self.low_match_iou <= 1.0):
            raise ConfigError("tracker match IoUs must be above 0 and at most 1")
        if self.max_lost < 0 or self.min_hits < 1 or not 0.0 < self.velocity_smoothing <= 1.0:
            raise ConfigError("tracker needs max_lost >= 0, min_hits >= 1 and 0 < velocity_smoothing <= 1")


@dataclass
class _Track:
    id: int
    box: np.ndarray  # (4,) float64, last observed
    label: int
    score: float
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    hits: int = 1
    lost: int = 0  # frames since last matched

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.lost + 1)


class ByteTracker:
    """Tracks across the frames given to :meth:`update`, in order."""

    def __init__(self, config: TrackerConfig = TrackerConfig(), first_id: int = 1) -> None:
        self.config = config
        self.tracks: list[_Track] = []
        self._next_id = first_id

    def update(self, detections: Detections) -> np.ndarray:
        """One frame's detections -> ``(N,)`` int64 track ids aligned with them (``-1``: no track)."""
        cfg = self.config
        boxes = detections.boxes.detach().to("cpu", torch.float64).numpy().reshape(-1, 4)
        scores = detections.scores.detach().to("cpu", torch.float64).numpy().reshape(-1)
        labels = detections.labels.detach().to("cpu").numpy().reshape(-1)
        ids = np.full(len(boxes), -1, dtype=np.int64)
        usable = np.zeros(len(boxes), dtype=bool)  # class-agnostic NMS: one object, one candidate
        if len(boxes):
            usable[nms(torch.from_numpy(boxes), torch.from_numpy(scores), cfg.duplicate_iou).numpy()] = True
        high = np.flatnonzero(usable & (scores >= cfg.high_threshold))
        high = high[np.argsort(-scores[high], kind="stable")]
        low = np.flatnonzero(usable & (scores >= cfg.low_threshold) & (scores < cfg.high_threshold))

        unmatched_tracks = list(range(len(self.tracks)))
        pairs, unmatched_tracks, unmatched_high = self._associate(unmatched_tracks, high, boxes, labels, cfg.match_iou)
        recent = [t for t in unmatched_tracks if self.tracks[t].lost == 0]
        low_pairs, _, _ = self._associate(recent, low, boxes, labels, cfg.low_match_iou)
        matched = set()
        for t, d in pairs + low_pairs:
            self._observe(self.tracks[t], boxes[d], labels[d], scores[d])
            ids[d] = self.tracks[t].id
            matched.add(t)

        survivors = []
        for t, track in enumerate(self.tracks):
            if t not in matched:
                track.lost += 1
                if track.lost > cfg.max_lost or track.hits < cfg.min_hits:
                    continue
            survivors.append(track)
        self.tracks = survivors
        for d in unmatched_high:
            if scores[d] >= cfg.new_track_threshold:
                self.tracks.append(_Track(self._next_id, boxes[d].copy(), int(labels[d]), float(scores[d])))
                ids[d] = self._next_id
                self._next_id += 1
        return ids

    def _associate(
        self, track_rows: list[int], detection_rows: np.ndarray, boxes: np.ndarray, labels: np.ndarray, min_iou: float
    ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """Hungarian matching of tracks to detections on ``1 - IoU``; returns (pairs, unmatched tracks,
        unmatched detections), all as indices into ``self.tracks`` / the frame's detections."""
        from scipy.optimize import linear_sum_assignment

        if not track_rows or not len(detection_rows):
            return [], list(track_rows), list(detection_rows)
        predicted = np.stack([self.tracks[t].predicted() for t in track_rows])  # (T, 4)
        iou = box_iou(torch.from_numpy(predicted), torch.from_numpy(boxes[detection_rows])).numpy()  # (T, D)
        track_labels = np.array([self.tracks[t].label for t in track_rows])
        other_class = track_labels[:, None] != labels[detection_rows][None, :]
        allowed = iou >= min_iou
        cost = np.where(allowed, 1.0 - iou + self.config.class_penalty * other_class, _FORBIDDEN)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(track_rows[r], int(detection_rows[c])) for r, c in zip(rows, cols) if allowed[r, c]]
        paired_tracks = {t for t, _ in pairs}
        paired_dets = {d for _, d in pairs}
        return (
            pairs,
            [t for t in track_rows if t not in paired_tracks],
            [int(d) for d in detection_rows if int(d) not in paired_dets],
        )

    def _observe(self, track: _Track, box: np.ndarray, label: int, score: float) -> None:
        step = (box - track.box) / (track.lost + 1)  # per-frame displacement since the last observation
        alpha = self.config.velocity_smoothing
        track.velocity = step if track.hits == 1 else alpha * step + (1 - alpha) * track.velocity
        track.box, track.label, track.score = box.copy(), int(label), float(score)
        track.hits += 1
        track.lost = 0
