"""What a run records: metric rows (``metrics.jsonl``/``.csv``, ``evaluations.jsonl``), the loss plot and the
optional TensorBoard events."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detect.errors import ConfigError

__all__ = ["MetricsLog", "plot_losses", "summary_writer", "tensorboard_writer"]


class MetricsLog:
    """Rows of scalars appended to ``metrics.jsonl`` or ``metrics.csv`` (columns fixed by the first row)."""

    def __init__(self, path: Path, log_format: str) -> None:
        self.path = path
        self.format = log_format

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            if self.format == "jsonl":
                return [json.loads(line) for line in handle if line.strip()]
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]

    def truncate(self, iteration: int) -> None:
        """Keep the rows up to ``iteration`` (a resumed run rewrites what followed its checkpoint)."""
        kept = [row for row in self.rows() if row["iteration"] <= iteration]
        self.path.unlink(missing_ok=True)
        for row in kept:
            self.append(row)

    def append(self, row: Mapping[str, float]) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            if self.format == "jsonl":
                handle.write(json.dumps(row) + "\n")
                return
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

def plot_losses(rows: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Each loss column against the iteration, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    its = [row["iteration"] for row in rows]
    for key in [k for k in rows[0] if k.startswith("loss")]:
        axes.plot(its, [row[key] for row in rows], label=key, linewidth=1)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

def summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`ConfigError` when the optional ``tensorboard`` package
    is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "tensorboard: true needs the tensorboard package: pip install 'detect[tensorboard]' (or tensorboard)"
        ) from err
    return SummaryWriter

def tensorboard_writer(directory: Path, purge_step: int | None = None) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``directory``; a resumed run passes its iteration as ``purge_step``
    so the events the killed run wrote after its checkpoint are dropped."""
    return summary_writer()(str(directory), purge_step=purge_step)
