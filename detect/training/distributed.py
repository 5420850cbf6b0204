"""Data-parallel training: ``detect train --nproc N``, the same under ``torchrun``, and under Ray Train.

Decisions:

- One process per device (CUDA: NCCL, device ``cuda:<local rank>``; CPU: gloo, ``cpu count // processes`` torch
  threads each). The model is wrapped in ``DistributedDataParallel``: gradients are averaged over the processes.
- The global batch is ``batch_size`` x processes. Rank ``r`` builds slots ``r*b .. (r+1)*b - 1`` of each
  iteration's global batch (:meth:`TrainBatches.shard`), read from the same seeded per-epoch permutation as one
  process, so every epoch draws the same images for any number of processes, and augmentation keeps drawing from
  ``(seed, iteration, global slot)``. Checkpoints record the global sample position, so a run checkpointed with N
  processes resumes with M: the new global batch continues where the old one stopped.
- ``optimizer.scale_lr: linear`` with ``base_batch_size`` scales the learning rate with the global batch.
- Only rank 0 writes (logs, checkpoints, evaluations, plots, model, summary); every rank reads a checkpoint on
  ``--resume``, so ``--out`` must be on storage every rank sees. The losses logged are the means over processes.
- Evaluation is sharded: each rank detects a contiguous part of the validation images, the detections are
  gathered on rank 0 and scored in image order there, so the mAP is the one-process evaluation's. The pretrain
  stage splits each step's crops over the processes (:mod:`detect.pretrain`).
- Failure: ``--nproc`` launches its ranks itself and watches them; when one dies (an error, a signal) the others
  are stopped at once and the command exits non-zero naming the rank. Every collective has a timeout
  (``DETECT_DIST_TIMEOUT`` seconds, default 1800), so a lost peer under another launcher never hangs a rank for
  ever. The master address is checked before the rendezvous (resolvable; on rank 0 an address of this machine; on
  the others reachable within ``DETECT_DIST_CONNECT_TIMEOUT`` seconds, default 60): a set-up error, not a hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from detect.errors import ConfigError
from detect.evaluate import DetectionEvaluator, detect_images

__all__ = ["Distributed", "check_master", "init_group", "torchrun_env"]

TIMEOUT_ENV, CONNECT_TIMEOUT_ENV = "DETECT_DIST_TIMEOUT", "DETECT_DIST_CONNECT_TIMEOUT"


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {os.environ[name]!r}") from None


@dataclasses.dataclass
class Distributed:
    """This process's place in a data-parallel run (``world`` 1: a plain one-process run, every method a no-op).
    ``on_checkpoint`` is called on every rank after each checkpoint (rank 0 passes the file; Ray Train reports it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    on_checkpoint: Callable[[Path | None, dict], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module, find_unused: bool) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (gradients averaged over the processes), or itself alone."""
        if not self.active:
            return model
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the processes (the logged losses)."""
        if not self.active:
            return values
        flat = torch.tensor(list(values.values()), dtype=torch.float64)
        if tdist.get_backend() == "nccl":
            flat = flat.cuda()
        tdist.all_reduce(flat)
        return dict(zip(values, (flat / self.world).tolist()))

    def evaluate(self, model: nn.Module, dataset: Any, batch_size: int, proposals: Any) -> dict:
        """VOC mAP of ``model`` on ``dataset``, each rank detecting a contiguous shard; rank 0 scores the gathered
        detections in image order (the one-process result) and returns it, the other ranks return ``{}``."""
        n = len(dataset)
        shard = range(self.rank * n // self.world, (self.rank + 1) * n // self.world)
        found = [(t, d.to("cpu")) for t, d in detect_images(model, dataset, shard, batch_size, proposals)]
        parts: list[Any] = [None] * self.world if self.is_main else []
        if self.active:
            tdist.gather_object(found, parts if self.is_main else None, dst=0)
        else:
            parts = [found]
        if not self.is_main:
            return {}
        evaluator = DetectionEvaluator(dataset.class_names)
        for target, detections in (pair for part in parts for pair in part):
            evaluator.add(target["image_id"], detections, target)
        return evaluator.compute()

    def gather_rng_states(self) -> list[torch.Tensor]:
        """Every rank's torch RNG state, on rank 0 (a checkpoint keeps them; other ranks get ``[]``)."""
        if not self.active:
            return [torch.get_rng_state()]
        states: list[Any] = [None] * self.world if self.is_main else []
        tdist.gather_object(torch.get_rng_state(), states if self.is_main else None, dst=0)
        return states

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def checkpointed(self, path: Path | None, metrics: dict) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(path if self.is_main else None, metrics)


# -- set-up --


def check_master(addr: str, port: int, rank: int) -> None:
    """:class:`ConfigError` unless the rendezvous at ``addr:port`` can work: the name resolves; rank 0 can listen
    on it (an address of this machine); another rank reaches it within the connect timeout."""
    try:
        socket.getaddrinfo(addr, port)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"master address {addr!r} does not resolve ({err})") from None
    if rank == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as probe:
                probe.bind((addr, 0))
        except OSError as err:
            raise ConfigError(
                f"master address {addr} is not an address of this machine ({err.strerror}); rank 0 hosts the "
                "rendezvous, so MASTER_ADDR must be its own address"
            ) from None
        return
    limit = _seconds(CONNECT_TIMEOUT_ENV, 60)
    deadline = time.monotonic() + limit
    while True:
        try:
            socket.create_connection((addr, port), timeout=min(5.0, limit)).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"rank {rank}: master {addr}:{port} unreachable after {limit:g} s ({err}); is rank 0 running "
                    f"and MASTER_ADDR/MASTER_PORT right? ({CONNECT_TIMEOUT_ENV} sets the wait)"
                ) from None
            time.sleep(0.5)


def init_group(
    rank: int, world: int, local_rank: int, addr: str, port: int, cuda: bool, launcher: bool = False
) -> Distributed:
    """Join the process group (NCCL on CUDA, gloo on CPU) after :func:`check_master`; under a ``launcher``
    (torchrun) through its environment, whose agent may already host the store at ``addr:port``."""
    check_master(addr, port, rank)
    timeout = datetime.timedelta(seconds=_seconds(TIMEOUT_ENV, 1800))
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        tdist.init_process_group(
            "nccl" if cuda else "gloo", init_method="env://" if launcher else f"tcp://{addr}:{port}", rank=rank,
            world_size=world,
            timeout=timeout,
        )
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"rank {rank}: cannot join the process group at {addr}:{port}: {first}") from None
    return Distributed(rank, world, local_rank)


def torchrun_env() -> dict[str, Any] | None:
    """The rendezvous ``torchrun`` (or any launcher setting its variables) gives this process, else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        env = {k: int(os.environ[k.upper()]) for k in ("rank", "world_size")}
        env["local_rank"] = int(os.environ.get("LOCAL_RANK", env["rank"]))
        env["local_world_size"] = int(os.environ.get("LOCAL_WORLD_SIZE", env["world_size"]))
        env["port"] = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError as err:
        raise ConfigError(f"bad torchrun environment: {err}") from None
    env["addr"] = os.environ.get("MASTER_ADDR", "127.0.0.1")
    env["launcher"] = True
    return env
