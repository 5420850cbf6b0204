"""ByteTrack-style linking (detect.tracking) on hand-built detection sequences whose right ids are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detect.errors import ConfigError
from detect.structures import Detections
from detect.tracking import ByteTracker, TrackerConfig


def frame(*items: tuple[float, float, float, float, float, int]) -> Detections:
    """Detections from ``(x1, y1, x2, y2, score, label)`` rows."""
    rows = torch.tensor([list(i[:5]) for i in items], dtype=torch.float32).reshape(-1, 5)
    labels = torch.tensor([i[5] for i in items], dtype=torch.int64)
    return Detections(rows[:, :4], rows[:, 4], labels, (500, 500))


def box(x: float, y: float, size: float = 40.0, score: float = 0.9, label: int = 1):
    return (x, y, x + size, y + size, score, label)


def test_two_objects_crossing_keep_their_ids():
    # A moves right, B moves left along the same row, 8 px a frame: they overlap around frame 12 and swap sides.
    # While they overlap by IoU >= 0.5 one hides the other (one candidate per object): the weaker gets no id
    tracker = ByteTracker()
    for t in range(25):
        a, b = box(100 + 8 * t, 200, score=0.95, label=1), box(300 - 8 * t, 205, label=2)
        ids = tracker.update(frame(a, b)).tolist()
        overlapping = abs((100 + 8 * t) - (300 - 8 * t)) < 14  # IoU >= 0.5 for 40 px boxes 5 px apart vertically
        assert ids == ([1, -1] if overlapping else [1, 2]), t


def test_same_class_crossing_is_resolved_by_the_velocity_prediction():
    # same class: only the constant-velocity prediction tells them apart while they overlap
    tracker = ByteTracker()
    history = []
    for t in range(25):
        a, b = box(100 + 8 * t, 200), box(300 - 8 * t, 210)
        detections = frame(a, b)
        if 11 <= t <= 13:  # the one behind is hidden: a single detection, in front
            detections = frame(a)
        history.append(tracker.update(detections).tolist())
    assert history[0] == [1, 2]
    assert history[-1] == [1, 2]  # A (first row) is still track 1 after the crossing


def test_a_low_score_detection_continues_a_track_but_never_starts_one():
    tracker = ByteTracker(TrackerConfig(high_threshold=0.5, low_threshold=0.1))
    assert tracker.update(frame(box(100, 100))).tolist() == [1]
    assert tracker.update(frame(box(104, 100, score=0.3))).tolist() == [1]  # second pass: kept alive
    assert tracker.update(frame(box(400, 400, score=0.3))).tolist() == [-1]  # no track starts from a weak one


def test_a_lost_track_comes_back_where_its_velocity_takes_it():
    tracker = ByteTracker(TrackerConfig(max_lost=10))
    for t in range(5):
        assert tracker.update(frame(box(50 + 10 * t, 100))).tolist() == [1]
    for t in range(5, 9):  # hidden for 4 frames
        tracker.update(frame())
    # 10 px a frame: at frame 9 it is 40 px beyond its last box, no overlap with where it was last seen
    assert tracker.update(frame(box(50 + 10 * 9, 100))).tolist() == [1]


def test_a_track_lost_too_long_is_dropped_and_ids_are_not_reused():
    tracker = ByteTracker(TrackerConfig(max_lost=2))
    tracker.update(frame(box(100, 100)))
    tracker.update(frame(box(100, 100)))
    for _ in range(3):
        tracker.update(frame())
    assert tracker.update(frame(box(100, 100))).tolist() == [2]


def test_assignment_is_optimal_not_greedy():
    # Track 1 at x=100, track 2 at x=130 (both 40 wide). New detections at x=118 and x=150: greedy by best IoU
    # would give track 2 to x=118 (IoU 0.54) and leave track 1 with no match (IoU 0 with x=150); the Hungarian
    # method pairs 1 -> 118 (0.38) and 2 -> 150 (0.33)
    tracker = ByteTracker(TrackerConfig(match_iou=0.1, velocity_smoothing=1.0))
    assert tracker.update(frame(box(100, 100, score=0.95), box(130, 100))).tolist() == [1, 2]
    assert tracker.update(frame(box(100, 100, score=0.95), box(130, 100))).tolist() == [1, 2]
    ids = tracker.update(frame(box(118, 100, score=0.95), box(150, 100))).tolist()
    assert ids == [1, 2]


def test_a_second_guess_at_the_class_of_a_tracked_object_gets_no_track():
    tracker = ByteTracker()
    ids = tracker.update(frame(box(100, 100, score=0.95, label=1), box(102, 101, score=0.8, label=2)))
    assert ids.tolist() == [1, -1]


def test_empty_frames_and_bad_config():
    assert ByteTracker().update(frame()).shape == (0,)
    with pytest.raises(ConfigError):
        TrackerConfig(low_threshold=0.6, high_threshold=0.5)


def test_ids_are_the_same_on_every_run():
    rng = np.random.default_rng(0)
    frames = [frame(*[box(*rng.uniform(0, 400, 2), score=float(rng.uniform(0.05, 1))) for _ in range(6)]) for _ in range(10)]
    first = [ByteTracker().update(f).tolist() for f in frames[:1]]
    runs = []
    for _ in range(2):
        tracker = ByteTracker()
        runs.append([tracker.update(f).tolist() for f in frames])
    assert runs[0] == runs[1] and runs[0][:1] == first
