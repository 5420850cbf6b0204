"""Detector fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Every region-detector workload is tiny: with several intra-op threads on a busy 2-core machine, OpenMP's
    spinning makes it 10-40x slower than one thread. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``, so the Faster R-CNN tests keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
