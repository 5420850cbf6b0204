"""Training: one loop for R-CNN, SPP-Net and Faster R-CNN, driven by a recipe file (``detect train``), and
evaluation of a trained model (``detect eval``).

Decisions:

- A recipe is YAML mapping onto :class:`TrainConfig` (frozen dataclasses with defaults); a recipe only overrides
  fields, and an unknown key anywhere raises :class:`ConfigError` naming its dotted path. ``detector_config``
  overrides the chosen detector's own config dataclass (``RCNNConfig``, ``SPPNetConfig`` or ``FasterRCNNConfig``)
  starting from the detector's registry default (:data:`detect.detectors.DETECTORS`, read from its builder's
  signature, so it is written in one place).
- Detectors by name are the registry's. Besides the paper architectures (ImageNet-sized: AlexNet, VGG16,
  ResNet-50-FPN) there is a ``*_tiny`` variant of each on :func:`detect.backbones.tiny` (seven 3x3 convs with
  GroupNorm, stride 8, trained from scratch) so that the bundled ``shapes`` models train within an hour on two
  CPU cores.
- ``init_backbone`` starts a detector's backbone from trained weights (a ``detect train`` file or a registered
  name): the bundled region detectors start from the bundled Faster R-CNN's, where the papers start from ImageNet.
- ``init`` (``detect train --init``) starts the whole detector from another (a registered name, a ``detect train``
  file or a torchvision checkpoint): every tensor that fits is copied, the class layers are rebuilt for the new
  classes, keeping the rows of classes the source has (:mod:`detect.finetune`); the report is printed.
  ``trainable_backbone_layers`` (torchvision's meaning) then freezes the lower backbone stages.
- ``pretrain`` (off unless ``pretrain.iterations`` > 0) first trains the backbone to classify crops of the
  training set's ground-truth boxes (:mod:`detect.pretrain`), the stand-in for ImageNet pre-training when nothing
  can be downloaded; its time counts in ``train_seconds`` and a checkpoint follows it, so a resume skips it.
- One step: ``losses = model(images, targets[, proposals])[1]``; the loss is their sum. SGD with momentum and
  weight decay or AdamW; gradient-norm clipping; linear warm-up then step or cosine decay. The learning rate is a
  pure function of the iteration (:func:`lr_factor`), so the iteration *is* the scheduler's state.
- Determinism and exact resume: the images of iteration ``i`` are a pure function of ``(seed, i)`` (one
  permutation per epoch from ``default_rng([seed, epoch])``, augmentation from ``default_rng([seed, i, slot])``,
  the multi-scale short side from ``default_rng([seed, i, SHORT_SIDE_SLOT])``), and the checkpoint holds the
  model, optimizer, grad scaler, torch RNG states and iteration. So a run killed and resumed from its last
  checkpoint computes the same losses as an uninterrupted run (same device and threads).
- Data loading: :class:`TrainBatches` is a ``torch.utils.data.Dataset`` indexed by the iteration, read by a
  ``DataLoader`` (``batch_size=None``) whose sampler is ``range(first iteration, max_iterations)``: with
  ``workers`` > 0, worker processes decode and augment ahead of the step, and the batch of iteration ``i`` stays
  the same whichever worker builds it. The loader draws its base seed from a generator of its own, so starting it
  leaves torch's global generator (the model's samplers) alone. Images travel as ``uint8`` ``HxWx3`` tensors
  (pinned on CUDA, copied without blocking) and become the model's float form on the device, the very arithmetic
  of :func:`detect.transform.as_image_tensor`.
- Multi-scale training: the batch's short side (``augment.short_sides``) becomes the detector's resize target for
  that step (Faster R-CNN's ``transform.config.min_size``, SPP-Net's ``config.scales``), restored afterwards, so
  evaluation and the saved model keep their own.
- Checkpoints (``checkpoint.pt``, every ``checkpoint_every`` iterations and at the end) are written atomically
  (temporary file + rename): a kill never leaves a half-written file. Read back with ``weights_only=True``.
- Proposals for R-CNN/SPP-Net: selective search runs once per original image and is cached as ``.npy`` under
  ``<cache>/<hash of the search config>/<hash of the data config>-<image id>.npy`` (default cache: the out dir's
  ``proposals/``), reused across iterations, epochs and runs; augmentation then transforms the cached boxes with
  the image (:mod:`detect.data.augment`).
- After fine-tuning, R-CNN/SPP-Net fit their box regressors (and optionally SVMs) in closed form on features of
  ``region_fit_images`` training images (:meth:`RegionDetector.collect_regions`), as in the papers.
- Mixed precision (fp16 autocast + grad scaler) only when the device is CUDA; it is ignored on CPU.
- Outputs in ``out_dir``: ``checkpoint.pt``, ``model.safetensors`` (weights + detector name, class names and
  config in the metadata, see :func:`detect.weights.write_detector`), ``metrics.jsonl`` or ``metrics.csv`` (one row per
  ``log_every`` iterations), ``evaluations.jsonl`` (one row per evaluation), ``loss.png``, and with validation data
  ``report.json`` and per-class precision-recall plots, and ``summary.json`` (iterations, optimisation seconds
  carried across resumes, thread count, final mAP and the data it was measured on), which
  :func:`bundle_run` (``detect weights add``) copies into a weights manifest. Progress goes to stderr
  (:mod:`detect.progress`: a tqdm bar on a terminal, a plain line every ``progress_seconds`` otherwise). With
  ``tensorboard: true`` the same rows (and validation mAP, pre-training figures) also go to a TensorBoard event
  file in ``tensorboard/`` (the optional ``tensorboard`` package: ``pip install 'detect[tensorboard]'``).

Where each part lives: :mod:`.config` (the recipe and its dataclasses), :mod:`.data` (splits, the batch of each
iteration, the loader), :mod:`.schedule` (the learning rate), :mod:`.checkpoints` (checkpoints, run identity and
resume), :mod:`.logs` (metric rows, plots, TensorBoard), :mod:`.loop` (:class:`Trainer`), :mod:`.bundle` (a run
registered as weights), :mod:`.auto` (the recipe derived from the data: ``detect train --data DIR``),
:mod:`.budget` (the time budget and the schedule fitted to it), :mod:`.best` (the best model and early stopping),
:mod:`.distributed` (data-parallel training: the process group, each rank's share of the global batch, sharded
evaluation) and :mod:`.launch` (``--nproc``, ``torchrun``, Ray Train). Evaluation of a model on data is :mod:`detect.evaluate`'s (``evaluate_detector``,
``evaluate_weights``, the proposal cache); training calls it.
"""

from __future__ import annotations

from detect.data.config import DataConfig, data_config, make_dataset
from detect.training.bundle import bundle_run
from detect.training.config import OptimizerConfig, ScheduleConfig, TrainConfig, detector_config, load_recipe
from detect.training.data import TrainBatches, data_splits, evaluation_data
from detect.training.loop import Trainer, init_backbone, train
from detect.training.schedule import lr_factor

__all__ = [
    "DataConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainBatches",
    "TrainConfig",
    "Trainer",
    "bundle_run",
    "data_config",
    "data_splits",
    "detector_config",
    "evaluation_data",
    "init_backbone",
    "load_recipe",
    "lr_factor",
    "make_dataset",
    "train",
]
