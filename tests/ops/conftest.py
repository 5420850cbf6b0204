"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch

from detect.ops import dispatch


@pytest.fixture(params=["serial", "split"])
def split(request, monkeypatch) -> str:
    """Run the numba loops as one range ("serial") or split over worker threads even for tiny inputs."""
    if request.param == "split":
        monkeypatch.setattr(dispatch, "PARALLEL_WORK", 0)
        if torch.get_num_threads() < 2:
            monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    return request.param
