"""Starting data-parallel runs (see :mod:`detect.training.distributed` for what a run does with its ranks):
``--nproc N`` on this machine (:func:`launch`), one rank under ``torchrun`` (:func:`run_rank`) and Ray Train's
``TorchTrainer`` (:func:`run_ray`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from detect.errors import ConfigError, DetectError
from detect.training.distributed import (
    TIMEOUT_ENV,
    Distributed,
    _seconds,
    check_master,
    init_group,
    torchrun_env,
)
from detect.training.loop import Trainer

__all__ = ["check_processes", "launch", "run_rank", "run_ray", "torchrun_env", "train_distributed"]


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
                          cuda, launcher=dist_env.get("launcher", False))
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
        with tempfile.TemporaryDirectory() as folder:  # Ray copies the folder into its storage, then it goes
            shutil.copy2(path, Path(folder) / path.name)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    dist = Distributed(context.get_world_rank(), context.get_world_size(), context.get_local_rank(), report)
    if config.device != "cpu" and torch.cuda.is_available():
        import ray.train.torch

        config = dataclasses.replace(config, device=str(ray.train.torch.get_device()))
        torch.cuda.set_device(torch.device(config.device))
        Trainer(config, dist).run(resume=loop_config["resume"], progress=dist.is_main)
        return
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    train_distributed(dataclasses.replace(config, device="cpu"), dist, loop_config["resume"])

