"""What every batch engine writes, and how: the output folder, per-image files, ``manifest.jsonl`` and the
aggregates. :mod:`detect.engines.local` and :mod:`detect.engines.ray` both write through this module, in the
process that runs the job (the driver, for Ray), so their outputs are the same bytes and ``--resume`` works
across engines.

Decisions:

* **One writer per run.** Workers (threads, Ray actors) compute results; only the process holding the
  :class:`Manifest` writes files. A result that arrives twice (a Ray task retried after its actor died) is
  written once: the engine checks :meth:`Manifest.has_result` first.
* **Per-image files are the truth.** ``<rel>.json`` is written last, after ``<rel>.txt`` (YOLO) and
  ``<rel>.annotated.<ext>``, and its manifest record after it, so ``done`` implies complete outputs. Aggregates are
  rebuilt from the per-image JSON at the end of every run (a resumed run included), sorted by relative path, so
  they do not depend on the order results arrived in.
* **Parquet** (``--format parquet``, ``predictions.parquet``) has one row per image: ``file``, ``width``,
  ``height`` and ``detections``, a list of ``{box: float64[4], score, class_id, class_name}``. One row per image
  keeps the images without detections, and is what ``ray.data.read_parquet``/``pandas`` users expect. It needs
  ``pyarrow`` (in the ``[ray]`` extra); :func:`check_formats` says so before any work starts. File names that
  are not UTF-8 (surrogate escapes) are stored with backslash escapes, as Arrow strings must be UTF-8.
* **A resumed run is the same run.** The first line of ``manifest.jsonl`` records the settings that shape the
  results (:func:`result_settings`: the model, thresholds, class filter, formats, annotated copies, decode
  limits); ``--resume`` with other settings is a :class:`ConfigError` naming each setting that differs (exit 2),
  never a folder of mixed results. (A manifest from before this record resumes as before.)
* **COCO image ids are unique in a run** (:func:`coco_image_ids`): a file whose stem is a plain number
  (``000000397133.jpg``) keeps that number, COCO's convention, when no other file of the run has the same one;
  every other file (``b.jpg``, or both of ``2.jpg`` and ``sub/2.jpg``) gets a number above all of those, in sorted
  order. ``coco_images.json`` beside ``coco_results.json`` records the mapping (COCO's ``images`` section: id,
  file name, width, height), so results join with a ground truth by name as well as by id.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from detect.drawing import annotated_suffix
from detect.errors import ConfigError, DetectError, OutputError
from detect.io import atomic_write

FORMATS = ("jsonl", "coco", "yolo", "csv", "parquet")
MANIFEST = "manifest.jsonl"
COCO_IMAGES = "coco_images.json"
AGGREGATE_FILES = {
    "jsonl": "predictions.jsonl",
    "coco": "coco_results.json",
    "csv": "detections.csv",
    "parquet": "predictions.parquet",
}
CSV_COLUMNS = ("file", "width", "height", "x1", "y1", "x2", "y2", "score", "class_id", "class_name")


@dataclass(frozen=True)
class Input:
    """One image to process: its absolute path or URL (links not resolved) and its path relative to the output
    root."""

    path: str
    rel: str


@dataclass
class Summary:
    images: int = 0
    skipped: int = 0
    detections: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def format_summary(summary: Summary) -> str:
    lines = [
        f"{summary.images} images, {summary.detections} detections, {summary.failed} failed, "
        f"{summary.skipped} skipped (already done), {summary.images_per_second:.2f} images/s"
    ]
    lines += [f"failed: {path}: {reason}" for path, reason in summary.failures]
    return "\n".join(lines)


def check_formats(formats: Sequence[str]) -> None:
    """Refuse unknown formats, and ``parquet`` without ``pyarrow`` (:class:`ConfigError`, exit 2)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown output format {unknown[0]!r}; known: {', '.join(FORMATS)}")
    if "parquet" in formats and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("--format parquet needs pyarrow: pip install 'detect[ray]' (or pyarrow)")


# --- the output folder ---------------------------------------------------------------------------------------
def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """The absolute output folder, created if needed and proved writable by writing a probe file in it; an
    existing file, a read-only folder or mount, or a missing permission is an :class:`OutputError` (exit 2)
    before any input is read."""
    path = Path(out_dir).resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {str(out_dir)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to --out {str(out_dir)!r}: {err.strerror or err}") from None
    return path


DEFAULT_RUN_DIR = Path("runs") / "predict"


def next_run_dir(base: str | os.PathLike = DEFAULT_RUN_DIR) -> Path:
    """The output folder of a run given no ``--out``: ``base`` when it does not exist yet, else the first of
    ``base2``, ``base3``, ... that does not, so a run never mixes its outputs with an earlier run's."""
    base = Path(base)
    if not base.exists():
        return base
    number = 2
    while (candidate := base.with_name(f"{base.name}{number}")).exists():
        number += 1
    return candidate


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete the temporary files (``.<name>.<random>.tmp``) that :func:`atomic_write` leaves when a run is killed."""
    for path in out_dir.rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a folder the run cannot write: its inputs fail one by one, with the reason
                pass


# --- per-image files -----------------------------------------------------------------------------------------
def yolo_lines(result: dict) -> str:
    """YOLO text: ``class cx cy w h score`` per detection, centre and size normalised by the image size,
    ``class`` the 0-based index into the model's class list (``class_id - 1``)."""
    w, h = result["width"], result["height"]
    lines = []
    for d in result["detections"]:
        x1, y1, x2, y2 = d["box"]
        lines.append(
            f"{d['class_id'] - 1} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
            f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f} {d['score']:.5f}"
        )
    return "".join(line + "\n" for line in lines)


def write_image_outputs(
    out_dir: Path, rel: str, result: dict, formats: Sequence[str], annotated: bytes | None = None
) -> None:
    """The files of one input: ``<rel>.txt`` (YOLO), ``<rel>.annotated.<ext>`` when given (encoded in the input's
    format by :func:`detect.drawing.encode_like`, so ``<ext>`` is :func:`detect.drawing.annotated_suffix`'s), then
    ``<rel>.json`` (``result`` as ``json.dumps`` writes it), last, as it marks the input complete. A folder that
    cannot be written (permissions, a file in the way, a full disk) is an :class:`OutputError` for this input alone."""
    try:
        if "yolo" in formats:
            atomic_write(out_dir / f"{rel}.txt", yolo_lines(result).encode())
        if annotated is not None:
            atomic_write(out_dir / f"{rel}.annotated{annotated_suffix(rel)}", annotated)
        atomic_write(out_dir / f"{rel}.json", json.dumps(result).encode())
    except OSError as err:
        raise OutputError(f"cannot write the outputs of {rel}: {err.strerror or err}") from None


# --- aggregates ----------------------------------------------------------------------------------------------
def finish_run(
    out_dir: Path, manifest: Any, formats: Sequence[str], summary: Summary, start: float, progress: TextIO | None
) -> Summary:
    """The end of every engine's run: the aggregates rebuilt from every input done so far, the elapsed time, and
    the summary lines on ``progress``."""
    write_aggregates(out_dir, list(manifest.done.values()), formats)
    summary.seconds = time.perf_counter() - start
    if progress is not None:
        progress.write("\n" + format_summary(summary) + "\n")
    return summary


def _numbered(rel: str) -> int | None:
    """The number a COCO-style name carries (``000000397133.jpg`` -> 397133): ASCII digits only, at most 15."""
    stem = Path(rel).stem
    return int(stem) if 0 < len(stem) <= 15 and stem.isascii() and stem.isdigit() else None


def coco_image_ids(rels: Sequence[str]) -> dict[str, int]:
    """Unique COCO ``image_id`` per relative path (see the module docstring): numbered names keep their number
    when it is theirs alone, every other name gets the next number above all kept ones, in sorted order."""
    numbers = {rel: _numbered(rel) for rel in rels}
    counts: dict[int, int] = {}
    for number in numbers.values():
        if number is not None:
            counts[number] = counts.get(number, 0) + 1
    ids = {rel: n for rel, n in numbers.items() if n is not None and counts[n] == 1}
    following = max(ids.values(), default=0) + 1
    for rel in sorted(rels):
        if rel not in ids:
            ids[rel] = following
            following += 1
    return ids


def write_aggregates(out_dir: Path, done: Sequence[str], formats: Sequence[str]) -> None:
    """Rebuild the aggregate files from the per-image JSON of the ``done`` relative paths (sorted)."""
    wanted = [f for f in formats if f in AGGREGATE_FILES]
    if not wanted:
        return
    results = [(rel, json.loads((out_dir / f"{rel}.json").read_text())) for rel in sorted(done)]
    writers = {"jsonl": _jsonl, "coco": _coco, "csv": _csv, "parquet": _parquet}
    for name in wanted:
        atomic_write(out_dir / AGGREGATE_FILES[name], writers[name](results))
    if "coco" in wanted:
        atomic_write(out_dir / COCO_IMAGES, _coco_images(results))


def _jsonl(results: list[tuple[str, dict]]) -> bytes:
    return "".join(json.dumps({"file": rel, **r}) + "\n" for rel, r in results).encode()


def _coco_images(results: list[tuple[str, dict]]) -> bytes:
    ids = coco_image_ids([rel for rel, _ in results])
    images = [{"id": ids[rel], "file_name": rel, "width": r["width"], "height": r["height"]} for rel, r in results]
    return json.dumps(images).encode("utf-8", "surrogateescape")


def _coco(results: list[tuple[str, dict]]) -> bytes:
    ids = coco_image_ids([rel for rel, _ in results])
    coco = [
        {
            "image_id": ids[rel],
            "file_name": rel,
            "category_id": d["class_id"],
            "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]],
            "score": d["score"],
        }
        for rel, r in results
        for d in r["detections"]
    ]
    return json.dumps(coco).encode()


def _csv(results: list[tuple[str, dict]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rel, r in results:
        for d in r["detections"]:
            writer.writerow([rel, r["width"], r["height"], *d["box"], d["score"], d["class_id"], d["class_name"]])
    # file names are str with surrogate escapes for bytes that are not UTF-8: written back as those bytes
    return buffer.getvalue().encode("utf-8", "surrogateescape")


def parquet_schema() -> Any:
    import pyarrow as pa

    detection = pa.struct(
        [("box", pa.list_(pa.float64(), 4)), ("score", pa.float64()), ("class_id", pa.int64()), ("class_name", pa.string())]
    )
    return pa.schema([("file", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("detections", pa.list_(detection))])


def _parquet(results: list[tuple[str, dict]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "file": rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
            "width": r["width"],
            "height": r["height"],
            "detections": [{k: d[k] for k in ("box", "score", "class_id", "class_name")} for d in r["detections"]],
        }
        for rel, r in results
    ]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), buffer)
    return buffer.getvalue()


# --- the manifest --------------------------------------------------------------------------------------------
def result_settings(options: Any) -> dict[str, Any]:
    """The settings of a batch run that shape its outputs (recorded in the manifest, compared on ``--resume``)."""
    refinement = options.refinement
    return {
        "model": getattr(options, "model", ""),
        "score_threshold": refinement.score_threshold,
        "iou_threshold": refinement.iou_threshold,
        "max_detections": refinement.max_detections,
        "classes": list(refinement.class_ids) if refinement.class_ids is not None else None,
        "formats": sorted(options.formats),
        "save_images": bool(options.save_images),
        "max_pixels": options.max_pixels,
        "max_side": options.max_side,
    }


def check_settings(path: Path, theirs: dict[str, Any] | None, ours: dict[str, Any]) -> None:
    """:class:`ConfigError` naming every setting in which a resumed run differs from the run that wrote ``path``."""
    if theirs is None:
        return
    keys = set(theirs) | set(ours)
    if not (theirs.get("model") and ours.get("model")):
        keys.discard("model")  # a library caller that does not describe its model: the other settings still count
    differ = [f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in sorted(keys) if theirs.get(k) != ours.get(k)]
    if differ:
        raise ConfigError(f"--resume: {path.parent} was written with other settings ({'; '.join(differ)}); "
                          "resume with the same settings, or write to a new --out")


class Manifest:
    """``DIR/manifest.jsonl``: one ``{"input", "output", "status", "code"?, "reason"?}`` record per input."""

    def __init__(self, out_dir: Path, resume: bool, settings: dict[str, Any] | None = None) -> None:
        self.path = out_dir / MANIFEST
        self.done: dict[str, str] = {}  # input path -> rel, last status done
        self.recorded: set[str] = set()  # inputs given a record by this run
        fresh = not (resume and self.path.is_file())
        if not fresh and settings is not None:
            check_settings(self.path, self._settings(), settings)
        if resume and self.path.is_file():
            for record in self._records():
                if record.get("status") == "done":
                    self.done[record["input"]] = record["output"].removesuffix(".json")
                else:
                    self.done.pop(record.get("input", ""), None)
        elif self.path.exists():
            self.path.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())
        if fresh and settings is not None:
            self._file.write(json.dumps({"settings": settings}) + "\n")

    def _settings(self) -> dict[str, Any] | None:
        """The settings line a run wrote first (``None`` for a manifest of an older version)."""
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            try:
                first = json.loads(handle.readline())
            except ValueError:
                return None
        return first.get("settings") if isinstance(first, dict) else None

    def _records(self) -> Iterator[dict]:
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill
                continue
            if isinstance(record, dict) and "input" in record and "output" in record:
                yield record

    def has_result(self, item: Input) -> bool:
        """Whether this run already recorded ``item`` (a duplicate result, e.g. from a retried Ray task)."""
        return item.path in self.recorded

    def record(self, item: Input, error: DetectError | None = None) -> None:
        if error is None:
            self._write(item, None, None)
        else:
            self._write(item, error.code, error.message)

    def record_failure(self, item: Input, code: str, reason: str) -> None:
        """A failure known by its machine code and message (as it comes back from another process)."""
        self._write(item, code, reason)

    def _write(self, item: Input, code: str | None, reason: str | None) -> None:
        entry: dict[str, Any] = {"input": item.path, "output": f"{item.rel}.json", "status": "done"}
        if code is None:
            self.done[item.path] = item.rel
        else:
            entry.update(status="failed", code=code, reason=reason)
        self.recorded.add(item.path)
        self._file.write(json.dumps(entry) + "\n")

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
