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
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from detect.errors import ConfigError, DetectError
from detect.evaluate import DetectionEvaluator, detect_images

__all__ = ["Distributed", "check_master", "launch", "run_ray", "torchrun_env", "train_distributed"]

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


def init_group(rank: int, world: int, local_rank: int, addr: str, port: int, cuda: bool) -> Distributed:
    """Join the process group (NCCL on CUDA, gloo on CPU) after :func:`check_master`."""
    check_master(addr, port, rank)
    timeout = datetime.timedelta(seconds=_seconds(TIMEOUT_ENV, 1800))
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        tdist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
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
    return env


def _device_for(config: Any, local_rank: int) -> str:
    """The device of local rank ``local_rank``: ``cuda:<local rank>`` for a CUDA run, else ``cpu``."""
    wanted = config.device
    cuda = wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available())
    return f"cuda:{local_rank}" if cuda else "cpu"


def check_processes(config: Any, nproc: int) -> None:
    """Usage errors of ``--nproc`` on this machine: at least 1; a CUDA run needs a device per process; a CPU run
    with more processes than cores is allowed, with a warning."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if _device_for(config, 0).startswith("cuda"):
        have = torch.cuda.device_count()
        if config.device not in ("auto", "cuda") or nproc > have:
            if nproc > have:
                raise ConfigError(f"--nproc {nproc}: only {have} CUDA device(s) visible, one process per device")
            raise ConfigError(f"--nproc uses one device per process: give --device cuda (or auto), not {config.device}")
    elif nproc > (os.cpu_count() or 1):
        warnings.warn(
            f"--nproc {nproc} on {os.cpu_count()} CPU cores: ranks share cores (slower than fewer ranks)", stacklevel=2
        )


# -- running one rank --


def train_distributed(config: Any, dist: Distributed, resume: bool) -> dict:
    """Train ``config`` as rank ``dist.rank``: its device, its share of the CPU threads, then :class:`Trainer`."""
    from detect.training.loop import Trainer  # loop imports this module for its hooks

    device = _device_for(config, dist.local_rank)
    if device == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    config = dataclasses.replace(config, device=device)
    return Trainer(config, dist).run(resume=resume, progress=dist.is_main)


def run_rank(config: Any, dist_env: dict[str, Any], resume: bool) -> int:
    """One rank start to end with the CLI's exit codes (0 done, 1 diverged or crashed, 2 set-up error); errors are
    one line naming the rank. Rank 0 prints the result table."""
    from detect.evaluate import format_table

    rank = dist_env["rank"]
    try:
        cuda = _device_for(config, dist_env["local_rank"]).startswith("cuda")
        dist = init_group(rank, dist_env["world_size"], dist_env["local_rank"], dist_env["addr"], dist_env["port"],
                          cuda)
        try:
            result = train_distributed(config, dist, resume)
        finally:
            if tdist.is_initialized():
                tdist.destroy_process_group()
    except DetectError as err:
        print(f"detect train: rank {rank}: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"detect train: rank {rank}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a peer's death surfaces here as a collective error: name this rank
        print(f"detect train: rank {rank} stopped: {type(err).__name__}: {str(err).strip()[:500]}", file=sys.stderr)
        if os.environ.get("DETECT_DEBUG"):
            traceback.print_exc()
        return 1
    if rank == 0:
        if result:
            print(format_table(result))
        print(f"wrote {Path(config.out_dir) / 'model.safetensors'}")
    return 0


def _spawned(local_rank: int, config: Any, env: dict[str, Any], resume: bool) -> None:
    code = run_rank(config, {**env, "rank": local_rank, "local_rank": local_rank}, resume)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # exit at once: no atexit hooks of half-torn-down collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Any, nproc: int, resume: bool) -> int:
    """``--nproc N``: start N ranks on this machine (``MASTER_ADDR``/``MASTER_PORT`` when set, else 127.0.0.1 and
    a free port) and wait; when one fails, stop the others and return its exit code (1 for a signal)."""
    check_processes(config, nproc)
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    check_master(addr, port, 0)
    env = {"world_size": nproc, "addr": addr, "port": port}
    os.environ["LOCAL_WORLD_SIZE"] = str(nproc)
    context = torch.multiprocessing.start_processes(
        _spawned, args=(config, env, resume), nprocs=nproc, join=False, start_method="spawn"
    )
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as err:
        if err.exit_code is not None and err.exit_code > 0:
            how, code = f"exited with code {err.exit_code}", (2 if err.exit_code == 2 else 1)
        else:
            how, code = f"was killed by signal {err.signal_name or -(err.exit_code or 0)}", 1
        print(f"detect train: rank {err.error_index} {how}; stopped the other {nproc - 1} rank(s)", file=sys.stderr)
        return code
    return 0


# -- Ray Train --


def run_ray(config: Any, workers: int, gpus_per_worker: float, resume: bool) -> int:
    """``--engine ray --workers N``: the same training function as ``--nproc`` under Ray Train's ``TorchTrainer``
    (which starts the workers and the process group) on the cluster ``ray.init()`` finds (``RAY_ADDRESS``) or a
    local one. Rank 0 reports each checkpoint to Ray; the model and every output go to ``config.out_dir``."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    try:
        import ray
        from ray.train import CheckpointConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as err:
        raise ConfigError(f"--engine ray needs Ray Train: pip install 'detect[ray]' ({err})") from None
    use_gpu = gpus_per_worker > 0
    if not ray.is_initialized():
        ray.init()
    config = dataclasses.replace(config, out_dir=str(Path(config.out_dir).resolve()))
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": config, "resume": resume},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                 timeout_s=int(_seconds(TIMEOUT_ENV, 1800))),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})}),
        run_config=RunConfig(name="detect-train", storage_path=str(Path(config.out_dir) / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps the failing worker's error: one line, not its traceback
        print(f"detect train: Ray Train run failed: {str(err).strip().splitlines()[-1][:500]}", file=sys.stderr)
        return 1
    if result.error is not None:
        print(f"detect train: Ray Train run failed: {result.error}", file=sys.stderr)
        return 1
    print(f"wrote {Path(config.out_dir) / 'model.safetensors'}")
    return 0


def _ray_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    context = ray.train.get_context()
    config = loop_config["config"]

    def report(path: Path | None, metrics: dict) -> None:
        if path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            os.link(path, Path(folder) / path.name) if _same_fs(path, folder) else _copy(path, folder)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    dist = Distributed(context.get_world_rank(), context.get_world_size(), context.get_local_rank(), report)
    if config.device != "cpu" and torch.cuda.is_available():
        import ray.train.torch

        config = dataclasses.replace(config, device=str(ray.train.torch.get_device()))
        torch.cuda.set_device(torch.device(config.device))
        from detect.training.loop import Trainer

        Trainer(config, dist).run(resume=loop_config["resume"], progress=dist.is_main)
        return
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    train_distributed(dataclasses.replace(config, device="cpu"), dist, loop_config["resume"])


def _same_fs(path: Path, folder: str) -> bool:
    return os.stat(path).st_dev == os.stat(folder).st_dev


def _copy(path: Path, folder: str) -> None:
    import shutil

    shutil.copy2(path, Path(folder) / path.name)
