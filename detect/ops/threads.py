"""Thread-count-free CPU inference: the one place that pins a block of torch ops to one intra-op thread.

Some CPU kernels split their work between threads in a way that changes the order of their sums, so their last
bits follow ``torch.get_num_threads()`` (measured on PyTorch 2.14 with MKL and oneDNN, issue 21):

- MKL's SGEMM (every ``nn.Linear``) splits the reduction between threads: a row of fc6 differs between 1 and 2
  threads even for the same matrix;
- ATen's bilinear ``interpolate`` cuts the output between threads, and the elements at a cut take the scalar
  tail of the vectorised loop: a resized image differs between 1 and 2 threads;
- PyTorch chooses a 1x1 convolution's kernel by the thread count (on one thread, batch below 16: oneDNN's
  ``jit_1x1``; on more: another path): the RPN's objectness and box-delta convolutions differ between 1 and 2.

The convolutions (oneDNN) split their outputs, never their sums, between threads and keep the caller's threads
(bitwise the same on 1 and 2 threads, which ``tests/test_batch_invariance.py`` checks for every detector). The
detectors wrap the blocks above in :func:`one_thread`, so that what an image gets does not depend on the thread
count of the process that runs it (the local engine, a Ray actor, the API's inference workers).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["one_thread"]


@contextmanager
def one_thread(like: Tensor, enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread when ``like`` is on the CPU (and ``enabled``: modules pass ``not
    self.training``, so training keeps its threads), restoring the caller's count on exit.
    ``torch.set_num_threads`` acts on the calling thread (OpenMP's and MKL's counts are per thread), so other
    threads running torch at the same time keep theirs. A no-op on other devices and while torch.export or
    torch.compile traces (``torch.compiler.is_compiling()``: a thread count is no part of a graph)."""
    if not enabled or like.device.type != "cpu" or torch.compiler.is_compiling():
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
