"""The training loop: :class:`Trainer` runs one recipe (pretrain stage, optimisation steps, checkpoints, logs,
evaluations, the region detectors' closed-form extras, the saved model and summary)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detect import detectors, weights
from detect.data.config import DataConfig, make_dataset, readable_part
from detect.detectors.region import RegionDetector, RegionFeatures
from detect.errors import ConfigError
from detect.evaluate import ProposalCache, cache_keys, evaluate_detector, plot_pr_curves, write_report
from detect.finetune import InitReport, freeze_backbone, init_detector
from detect.inference import torch_device
from detect.io import atomic_write
from detect.pretrain import find_backbone, pretrain_backbone
from detect.progress import Progress
from detect.training import checkpoints
from detect.training.config import TrainConfig, detector_config
from detect.training.data import TrainBatches, batch_loader, data_splits, describe_validation, model_inputs
from detect.training.logs import MetricsLog, plot_losses, summary_writer, tensorboard_writer
from detect.training.best import BestKeeper, score_of
from detect.training.budget import PRETRAIN_SHARE, Budget, format_seconds
from detect.training.distributed import Distributed
from detect.training.ema import WeightEMA
from detect.training.schedule import base_lr, fitted_schedule, lr_factor
from detect.transform import RCNNTransform

__all__ = ["Trainer", "init_backbone", "short_side", "train"]


def init_backbone(model: nn.Module, source: str | Path) -> int:
    """Copy the backbone body of trained weights ``source`` (a ``detect train`` model file or a registered name)
    into ``model``'s: the region detectors start from the shapes-trained Faster R-CNN's features, as the papers
    start from ImageNet's. Every body tensor of ``model`` must be found with its shape; returns how many."""
    donor = weights.load_detector(source)
    theirs = find_backbone(donor).body.state_dict()
    body = find_backbone(model).body
    own = body.state_dict()
    if bad := [k for k, v in own.items() if k not in theirs or theirs[k].shape != v.shape]:
        raise ConfigError(f"init_backbone {source}: its backbone does not fit ({bad[:3]})")
    body.load_state_dict({k: theirs[k] for k in own})
    return len(own)

def _short_side_field(model: nn.Module) -> str | None:
    """Where a detector keeps its resize target: ``"scales"`` (SPP-Net's config), ``"min_size"`` (a transform's
    config) or ``None`` (R-CNN warps regions, no image resize to steer)."""
    if "scales" in getattr(getattr(model, "config", None), "__dataclass_fields__", {}):
        return "scales"
    if "min_size" in getattr(getattr(getattr(model, "transform", None), "config", None), "__dataclass_fields__", {}):
        return "min_size"
    return None

@contextmanager
def short_side(model: nn.Module, side: int | None) -> Iterator[None]:
    """Make ``side`` the detector's resize target inside the block (multi-scale training), then restore it."""
    where = _short_side_field(model) if side is not None else None
    if where is None:
        yield
        return
    owner = model if where == "scales" else model.transform
    saved = owner.config
    owner.config = dataclasses.replace(saved, **{where: (int(side),)})
    try:
        yield
    finally:
        owner.config = saved

class Trainer:
    """One training run of :class:`TrainConfig` into ``config.out_dir`` (see the module docstring)."""

    def __init__(self, config: TrainConfig, dist: Distributed | None = None, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self.config = config
        self.dist = dist or Distributed()  # data-parallel runs (detect.training.distributed); rank 0 alone writes
        if self.dist.active and config.time_budget:
            raise ConfigError("a time budget (--time) plans one process's steps: with several processes give "
                              "--iterations (or max_iterations) instead")
        self.clock = clock
        # a time budget counts from here (or from ``started`` on ``clock``: the command's start), not from run()
        self.started = clock() if started is None else started
        self.out = Path(config.out_dir)
        self.device = torch_device(config.device)
        self.train_data, self.val_data = data_splits(config)
        self.dataset, self.skipped = self._open(self.train_data, "training")
        self.val_dataset = None
        if self.val_data is not None:
            self.val_dataset, skipped = self._open(self.val_data, "validation")
            self.skipped = list(dict.fromkeys(self.skipped + skipped))  # a hold-out split shares its problems
        self.val_images = describe_validation(self.train_data, self.val_data, self.dataset)
        self.detector_config = detector_config(config)
        torch.manual_seed(config.seed)
        self.model = detectors.build(config.detector, self.dataset.class_names, self.detector_config).to(self.device)
        self.region = isinstance(self.model, RegionDetector)
        if config.init_backbone:
            init_backbone(self.model, config.init_backbone)
        self.init_report: InitReport | None = None
        if config.init:
            self.init_report = init_detector(self.model, config.init)
            print(self.init_report.summary(), file=sys.stderr)
        if config.trainable_backbone_layers is not None:
            freeze_backbone(self.model, config.trainable_backbone_layers)
        if config.augment.short_sides and _short_side_field(self.model) is None:
            raise ConfigError(f"augment.short_sides: {config.detector} does not resize images (R-CNN warps regions)")
        cache_dir = Path(config.proposal_cache) if config.proposal_cache else self.out / "proposals"
        self.cache = ProposalCache(cache_dir, self.detector_config.proposals) if self.region else None
        self.batches = TrainBatches(self.dataset, config, self.cache, config.data)
        self.batches.shard(self.dist.rank, self.dist.world)
        transform = getattr(self.model, "transform", None)
        if not self.region and isinstance(transform, RCNNTransform):  # the loader resizes as the model would
            self.batches.input_size = (tuple(transform.config.min_size), int(transform.config.max_size))
        if config.epochs:  # the run's length in passes over the training images
            steps = max(1, math.ceil(config.epochs * len(self.dataset) / self.batches.global_batch))
            self.config = config = dataclasses.replace(config, max_iterations=steps)
        self.net = self.dist.wrap(self.model, find_unused=self.region)  # what the step runs (DDP when distributed)
        self.ema: WeightEMA | None = None  # the weights' moving average (recipe ``ema``), from the first step on
        if config.tensorboard:
            summary_writer()  # a missing package is a ConfigError now, before any training
        self.writer: Any = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = config.optimizer
        if opt.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.amp = config.mixed_precision and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.augment = self.batches.augment
        self.log = MetricsLog(self.out / f"metrics.{config.log_format}", config.log_format)
        self.evaluations = MetricsLog(self.out / "evaluations.jsonl", "jsonl")
        self.iteration = 0
        self.train_seconds = 0.0  # optimisation time so far, carried across resumes in the checkpoint
        self.pretrain_seconds = 0.0  # the part of it spent in the pretrain stage
        self.pretrain_heldout: dict[str, float] = {}  # the stage's held-out crop accuracy, chance and crop count
        self.identity = checkpoints.run_identity(config, self.train_data, self.dataset)
        # the length, schedule and evaluation cadence in force: the recipe's, or the time budget's plan
        self.max_iterations, self.schedule, self.eval_every = config.max_iterations, config.schedule, config.eval_every
        self.next_eval: int | None = None  # a budgeted run's next evaluation (its plan moves as it measures)
        self.budget: Budget | None = None
        if config.time_budget:
            eval_images = len(self.val_dataset) if self.val_dataset is not None else 0
            self.budget = Budget(config.time_budget, clock, eval_images=eval_images, batch_size=config.batch_size,
                                 cap=config.max_iterations, final_evaluations=2 if self.region else 1)
        # best-model keeping and early stopping decide on rank 0's evaluation: one process only for now (with
        # several, the last model is the model)
        self.best = BestKeeper(self.out, config.patience) if self.val_data is not None and not self.dist.active else None
        self.evaluated_at: int | None = None  # the iteration of the last scheduled evaluation
        self.bar: Progress | None = None

    # -- data --

    @staticmethod
    def _open(data: DataConfig, role: str) -> tuple[Any, list[str]]:
        """The data set of ``data`` with what ``on_error: skip`` dropped (annotations and images that do not
        decode) listed on stderr, every item, as the README promises; a likely typo in the class names is said."""
        from detect.data.check import likely_typos

        dataset, unreadable = readable_part(make_dataset(data), data)
        inner = dataset
        while not hasattr(inner, "problems") and hasattr(inner, "dataset"):  # through hold-out and readable subsets
            inner = inner.dataset
        skipped = [p.message for p in getattr(inner, "problems", ())] + unreadable
        if skipped:
            print(f"{role} data: skipped {len(skipped)} item(s) (on_error: skip):", file=sys.stderr)
            for message in skipped:
                print(f"  {message}", file=sys.stderr)
        for typo in likely_typos(dataset.class_names) if data.source != "shapes" else ():
            print(f"{role} data: warning: {typo['message']}", file=sys.stderr)
        return dataset, skipped

    def proposals_for(self, data: DataConfig) -> Callable[..., list[np.ndarray]]:
        return lambda images, targets: self.cache(images, cache_keys(data, targets))

    def batch(self, iteration: int) -> tuple[list[Tensor], list[dict], list[Tensor] | None]:
        """The augmented images, targets (and proposals) of ``iteration`` on the device: a pure function of the
        seed and it (what the loader yields, built here in the calling process)."""
        return model_inputs(self.batches[iteration], self.device)

    # -- TensorBoard --

    def open_writer(self, resume: bool) -> None:
        """The TensorBoard writer of a ``tensorboard: true`` run (a resumed one drops the events after its
        checkpoint)."""
        if self.config.tensorboard and self.writer is None:
            self.writer = tensorboard_writer(self.out / "tensorboard", purge_step=self.iteration if resume else None)

    def write_scalars(self, group: str, row: Mapping[str, Any]) -> None:
        """``row``'s numbers as ``group/name`` scalars at its ``iteration`` (nothing without a writer)."""
        if self.writer is None:
            return
        for name, value in row.items():
            if name != "iteration" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{group}/{name}", value, int(row["iteration"]))

    # -- checkpoints --

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint (every rank calls this: it gathers each rank's RNG state)."""
        rng_states = self.dist.gather_rng_states()
        if not self.dist.is_main:
            return
        checkpoints.write_checkpoint(self.checkpoint_path, {
            "samples_seen": self.batches.position(self.iteration),  # global: a resume may change the world size
            "world_size": self.dist.world,
            "run": self.identity,
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "pretrain_seconds": self.pretrain_seconds,
            "pretrain_heldout": self.pretrain_heldout,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "torch_rng_ranks": rng_states,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "plan": {"max_iterations": self.max_iterations, "eval_every": self.eval_every, "next_eval": self.next_eval},
            "budget": self.budget.state() if self.budget else None,
            "best": self.best.state() if self.best else None,
            "ema": self.ema.state_dict() if self.ema else None,
        })

    def load_checkpoint(self) -> None:
        state = checkpoints.read_checkpoint(self.checkpoint_path, self.device)
        checkpoints.check_identity(self.checkpoint_path, state.get("run"), self.identity)
        self.model.load_state_dict(state["model"])
        self.ema = None
        if state.get("ema") and self.config.ema:
            self.ema = WeightEMA(self.model, self.config.ema)
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("torch_rng_ranks") or []
        # each rank continues its own generator when the world size is the one that wrote the checkpoint
        own = ranks[self.dist.rank] if len(ranks) == self.dist.world else state["torch_rng"]
        torch.set_rng_state(own.cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.iteration = int(state["iteration"])
        self.batches.origin_iteration = self.iteration
        self.batches.origin_position = int(state.get("samples_seen", self.iteration * self.config.batch_size))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.pretrain_seconds = float(state.get("pretrain_seconds", 0.0))
        self.pretrain_heldout = dict(state.get("pretrain_heldout", {}))
        if self.budget is not None:
            if not state.get("budget"):
                raise ConfigError(f"--resume: {self.checkpoint_path} was written by a run without a time budget")
            self.budget.restore(state["budget"])
            if self.budget.plan is not None:
                self.apply_plan(self.budget.plan.max_iterations, self.budget.plan.eval_every)
                self.next_eval = state["plan"].get("next_eval")
        if self.best is not None:
            self.best.restore(state.get("best"))
        if self.dist.is_main:
            self.log.truncate(self.iteration)
            self.evaluations.truncate(self.iteration)

    # -- steps --

    def step(self, batch: Mapping[str, Any] | None = None) -> dict[str, float]:
        """One optimisation step at ``self.iteration`` on ``batch`` (its :class:`TrainBatches` item, built here
        when not given); returns the losses as floats."""
        cfg = self.config
        batch = batch if batch is not None else self.batches[self.iteration]
        images, targets, proposals = model_inputs(batch, self.device)
        lr = base_lr(cfg.optimizer, self.batches.global_batch) * lr_factor(self.schedule, self.iteration, self.max_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        extra = {"proposals": proposals} if proposals is not None else {}
        with short_side(self.model, batch["short_side"]), torch.autocast(
            self.device.type, dtype=torch.float16, enabled=self.amp
        ):
            _, losses = self.net(images, targets, **extra)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {losses}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optimizer.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optimizer.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if cfg.ema:
            if self.ema is None:
                self.ema = WeightEMA(self.model, cfg.ema)
            self.ema.update(self.model)
        self.iteration += 1
        values = self.dist.mean({"loss": float(loss.detach())} | {k: float(v.detach()) for k, v in losses.items()})
        row = {"iteration": self.iteration, "lr": lr, **values}
        return row | ({"short_side": batch["short_side"]} if batch["short_side"] is not None else {})

    def run(self, resume: bool = False, progress: bool = True) -> dict:
        """Train to ``max_iterations`` or the time budget's plan (from the checkpoint with ``resume``), evaluating
        every ``eval_every`` iterations and keeping the best model, stopping early after ``patience`` evaluations
        without improvement; then :meth:`finish`. Returns the final model's evaluation (empty without val data)."""
        cfg = self.config
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.budget is not None:
            self.budget.start(self.started)
        if resume:
            self.load_checkpoint()
            if self.budget is not None:
                self.budget.start(self.started)
            if main:
                self.open_writer(resume=True)
        elif not main:  # the other ranks take part in the pretrain stage; rank 0 alone cleans and writes
            if cfg.pretrain.iterations:
                self.pretrain(progress=False)
        else:
            # an older run's files in this folder are not this run's: a stale checkpoint must never be resumed
            for stale in (self.log.path, self.evaluations.path, self.out / "pretrain.jsonl", self.checkpoint_path,
                          self.out / "best.safetensors", self.out / "last.safetensors"):
                stale.unlink(missing_ok=True)
            checkpoints.write_run_identity(self.out, self.identity)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            self.open_writer(resume=False)
            if cfg.pretrain.iterations:
                self.pretrain(progress)
        if self.region and self.budget is not None:
            self.warm_proposals()
        bar = None
        if progress and main:
            bar = Progress(self.max_iterations, self.iteration, desc="train", interval=cfg.progress_seconds)
        self.bar = bar
        loader = batch_loader(self.batches, self.iteration, cfg.workers, self.device.type == "cuda")
        began = time.perf_counter()
        # a step's time for the budget runs from the end of the previous step to the end of this one, less any
        # evaluation between them: the wait for the batch (decoding and augmenting it, without loader workers),
        # the logging and the checkpoints are part of what each step costs; timing the step alone planned more
        # steps than fit, and the hard stop then cut the learning-rate schedule before its decay
        mark = self.clock()
        for batch in loader:  # waiting for a batch counts: it is what the loader workers are there to hide
            if self.iteration >= self.max_iterations:
                break
            row = self.step(batch)
            self.train_seconds += time.perf_counter() - began
            stepped = self.clock()
            self.after_step(stepped - mark, bar)
            if self.iteration % cfg.log_every == 0 and main:
                self.log.append(row)
                self.write_scalars("train", row)
            if bar:
                figures = {k.removeprefix("loss_"): v for k, v in row.items() if k.startswith("loss")}
                eta = None
                if self.budget is not None:  # the ETA is the budget's: the run ends when it is spent
                    eta = self.budget.eta()
                    figures["budget left"] = format_seconds(eta)
                bar.update(self.iteration, figures, eta=eta)
            last = self.iteration >= self.max_iterations or (self.budget is not None and self.budget.stop_now())
            evaluation = 0.0
            if self.eval_due() and not last:
                evaluated = self.clock()
                self.scheduled_evaluation()
                evaluation = self.clock() - evaluated
                last = last or (self.best is not None and self.best.exhausted())
                if self.best is not None and self.best.exhausted():
                    print(f"early stop at iteration {self.iteration}: validation mAP@0.5 has not improved for "
                          f"{self.best.patience} evaluations (best {self.best.score[0]:.4f} at iteration "
                          f"{self.best.iteration})", file=sys.stderr)
            if last:
                self.max_iterations = self.iteration
            if self.iteration % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
                self.dist.checkpointed(self.checkpoint_path, row)
            if last:
                break
            mark = stepped + evaluation
            began = time.perf_counter()
        if bar:
            bar.set_total(self.iteration)
            bar.close()
        result = self.finish()
        if not main:
            return {}
        if rows := self.log.rows():
            plot_losses(rows, self.out / "loss.png")
        if self.writer is not None:
            self.writer.close()
        summary = {
            "detector": cfg.detector,
            "iterations": self.iteration,
            "train_seconds": round(self.train_seconds, 1),
            "pretrain_seconds": round(self.pretrain_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "val_data": dataclasses.asdict(self.val_data) if self.val_data else None,
            "val_images": self.val_images,
            "skipped": {"count": len(self.skipped), "items": self.skipped},
            "processes": self.dist.world,
            "global_batch": self.batches.global_batch,
            "mAP": result.get("mAP"),
            "pretrain_heldout": self.pretrain_heldout or None,
            "init": {"source": self.init_report.source, "copied": len(self.init_report.copied),
                     "mapped": self.init_report.mapped} if self.init_report else None,
            "workers": cfg.workers,
            "best_iteration": self.best.iteration if self.best else None,
            "time_budget": cfg.time_budget,
            "wall_seconds": round(self.budget.elapsed(), 1) if self.budget else None,
        }
        atomic_write(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return result

    # -- the budget and the best model (called from run at fixed points) --

    def apply_plan(self, max_iterations: int, eval_every: int, reschedule: bool = True) -> None:
        """Make a budget's plan the run's: its length, the recipe's schedule fitted to it and (``reschedule``, or
        when none is due) its next evaluation."""
        self.max_iterations, self.eval_every = max(max_iterations, self.iteration), eval_every
        if reschedule or self.next_eval is None:
            self.next_eval = self.iteration + eval_every if eval_every else None
        self.schedule = fitted_schedule(self.config.schedule, self.max_iterations, self.config.max_iterations)

    def eval_due(self) -> bool:
        """Whether the model of this iteration is evaluated: every ``eval_every`` iterations, or on a budget's
        plan."""
        if self.budget is not None:
            return self.next_eval is not None and self.iteration >= self.next_eval
        return bool(self.eval_every) and self.iteration % self.eval_every == 0

    def after_step(self, seconds: float, bar: Progress | None) -> None:
        """Time the step; once enough are timed, fit the rest of the run to the budget (after every step: the
        machine's speed may change; the next evaluation moves only when an evaluation is done)."""
        if self.budget is None:
            return
        self.budget.record_step(seconds)
        if self.budget.ready():
            self.refit(bar, reschedule=False)

    def refit(self, bar: Progress | None, reschedule: bool = True) -> None:
        done = len(self.budget.eval_times)
        plan = self.budget.fit(self.iteration, done, evaluate=self.val_data is not None)
        self.apply_plan(plan.max_iterations, plan.eval_every, reschedule)
        if bar:
            bar.set_total(self.max_iterations)

    def warm_proposals(self) -> None:
        """Selective search on every training image before the steps are timed (a budgeted region detector): each
        image's proposals are computed once for the run, and the steps the budget measures are steps, not
        searches. Cached images cost nothing (a resumed run)."""
        proposals = self.proposals_for(self.config.data)
        for start in range(0, len(self.dataset), 8):
            samples = [self.dataset[i] for i in range(start, min(start + 8, len(self.dataset)))]
            proposals([s[0] for s in samples], [s[1] for s in samples])

    def scheduled_evaluation(self) -> dict:
        """An evaluation on the plan: timed for the budget, offered to the best-model keeper."""
        began = self.clock()
        result = self.evaluate(report=False, full=self.best is not None)
        self.evaluated_at = self.iteration
        if self.budget is not None:
            self.budget.record_eval(self.clock() - began)
            self.refit(self.bar)
        self.write_scalars("val", {"iteration": self.iteration, "mAP": result.get("mAP")})
        if self.best is not None and result:
            improved = self.best.offer(self.iteration, result, self.write_model)
            voc, coco = score_of(result)
            print(f"validation at iteration {self.iteration}: mAP@0.5 {voc:.4f}, mAP@[.5:.95] {coco:.4f}"
                  + (" (best so far)" if improved else f" (best {self.best.score[0]:.4f} at {self.best.iteration})"),
                  file=sys.stderr)
        return result

    @property
    def eval_model(self) -> nn.Module:
        """The model evaluations and saved files see: the weights' moving average when the recipe keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def write_model(self, path: Path) -> None:
        if not self.dist.is_main:  # rank 0 alone writes
            return
        model = self.eval_model
        weights.write_detector(model, path, getattr(model, "config", self.detector_config))

    def finish(self) -> dict:
        """The end of the run: the last model; with validation data the best one (the region detectors fit their
        closed-form extras on it first) as ``model.safetensors``, its report and per-class result. With ``ema``
        the average becomes the model here: the last model is the last average."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
            self.ema = None
        self.write_model(self.out / "last.safetensors")
        result: dict | None = None
        if self.best is not None:
            # the last model against the best so far (a region detector evaluated never before has no rival: its one
            # evaluation comes after its closed-form fits below)
            if self.evaluated_at != self.iteration and (not self.region or self.best.iteration is not None):
                self.scheduled_evaluation()
            if self.best.iteration != self.iteration and self.best.path.exists():
                self.model.load_state_dict(weights.load_detector(self.best.path).state_dict())
                print(f"best model: iteration {self.best.iteration} (validation mAP@0.5 {self.best.score[0]:.4f}; "
                      f"last iteration {self.iteration})", file=sys.stderr)
            result = self.best.result  # None when the best came from before a resume: evaluated again below
        if self.region:
            began = time.perf_counter()
            self.fit_region_extras()
            self.train_seconds += time.perf_counter() - began
            result = None
            if self.best is not None:  # the best (or only) model, now with its fits
                self.write_model(self.best.path)
        self.write_model(self.out / "model.safetensors")
        if result is None:
            result = self.evaluate(report=True, full=self.best is not None)
        else:
            self.report(result)
        self.write_scalars("val", {"iteration": self.iteration, "mAP": result.get("mAP")})
        return result

    def pretrain(self, progress: bool) -> None:
        """The recipe's ``pretrain`` stage (:mod:`detect.pretrain`) on the training data, logged to
        ``pretrain.jsonl``; its time counts in ``train_seconds``. A checkpoint follows, so a resume skips it."""
        cfg = self.config
        log = MetricsLog(self.out / "pretrain.jsonl", "jsonl")
        bar = Progress(cfg.pretrain.iterations, desc="pretrain", interval=cfg.progress_seconds) if progress else None

        def on_step(row: dict[str, float]) -> None:
            if row["iteration"] % cfg.log_every == 0 and self.dist.is_main:
                log.append(row)
                self.write_scalars("pretrain", row)
            if bar:
                bar.update(int(row["iteration"]), {"loss": row["loss"], "batch accuracy": row["accuracy"]})

        stop = None
        if self.budget is not None:  # the stage may take PRETRAIN_SHARE of the budget, however many steps that is
            stop = lambda: self.budget.elapsed() >= PRETRAIN_SHARE * self.budget.seconds  # noqa: E731
        result = pretrain_backbone(find_backbone(self.model), self.dataset, cfg.pretrain, cfg.seed, on_step, stop)
        if bar:
            bar.close()
        self.pretrain_heldout = {k: result[k] for k in ("heldout_accuracy", "heldout_chance", "heldout_crops")}
        self.pretrain_seconds = result["seconds"]
        self.train_seconds += result["seconds"]
        self.save_checkpoint()
        if not self.dist.is_main:
            return
        print(
            f"pretrain: held-out crop accuracy {result['heldout_accuracy']:.3f} "
            f"(chance {result['heldout_chance']:.3f}, {result['heldout_crops']} crops of images no step drew)",
            file=sys.stderr,
        )
        self.write_scalars("pretrain", {"iteration": cfg.pretrain.iterations, **self.pretrain_heldout})

    def evaluate(self, report: bool = False, full: bool = False) -> dict:
        """Validation mAP (logged to ``evaluations.jsonl``); ``full`` adds COCO's mAP@[.5:.95] (the best model's
        tie-break); with ``report`` also the JSON report and PR plots."""
        data = self.val_data
        if data is None:
            return {}
        dataset = self.val_dataset
        proposals = self.proposals_for(data) if self.region else None
        if self.dist.active:  # each rank a shard, the detections gathered on rank 0 (detect.training.distributed)
            result = self.dist.evaluate(self.eval_model, dataset, self.config.batch_size, proposals)
            if not self.dist.is_main:
                return {}
        else:
            result = evaluate_detector(self.eval_model, dataset, self.config.batch_size, proposals,
                                       score_threshold=0.5 if full else None)
        row = {"iteration": self.iteration, "mAP": result["mAP"]}
        if full and result.get("coco"):
            row["mAP@[.5:.95]"] = result["coco"].get("AP")
        self.evaluations.append(row)
        if report:
            self.report(result)
        return result

    def report(self, result: dict) -> None:
        write_report(result, self.out / "report.json")
        plot_pr_curves(result, self.out / "pr_curves")

    @torch.no_grad()
    def fit_region_extras(self) -> None:
        """Box regressors (and SVMs) of R-CNN/SPP-Net on the first ``region_fit_images`` training images."""
        cfg = self.config
        count = min(cfg.region_fit_images, len(self.dataset))
        if count == 0 or not (cfg.fit_box_regressor or cfg.fit_svms):
            return
        self.model.eval()
        parts = []
        for start in range(0, count, cfg.batch_size):
            samples = [self.dataset[i] for i in range(start, min(start + cfg.batch_size, count))]
            images, targets = [s[0] for s in samples], [s[1] for s in samples]
            proposals = [torch.from_numpy(p) for p in self.proposals_for(cfg.data)(images, targets)]
            model_targets = [
                {"boxes": torch.as_tensor(t["boxes"]), "labels": torch.as_tensor(t["labels"])} for t in targets
            ]
            parts.append(self.model.collect_regions(images, model_targets, proposals))
        features = RegionFeatures.cat(parts)
        if cfg.fit_box_regressor:
            self.model.fit_box_regressor(features.pooled, features.boxes, features.gt_boxes, features.gt_labels)
        if cfg.fit_svms:
            generator = torch.Generator().manual_seed(cfg.seed)
            self.model.fit_svms(features.fc7, features.labels, features.overlaps, generator=generator)

def train(config: TrainConfig, resume: bool = False, progress: bool = True, started: float | None = None) -> dict:
    """Run :class:`Trainer` on ``config``; returns the final evaluation (empty without ``val_data``). ``started``
    (:func:`time.monotonic`) is when a time budget began, when earlier than now (the command's start)."""
    return Trainer(config, started=started).run(resume=resume, progress=progress)
