"""What R-CNN and SPP-Net share: region heads, region sampling, post-processing, SVM and regressor fitting.

Both detectors classify proposals (selective search by default) from a fixed-length pooled feature per region;
they differ only in how that feature is computed (R-CNN warps each region and runs the CNN on it, SPP-Net pools
windows of one conv map). :class:`RegionDetector` is the base class that holds everything else, and
:class:`RegionHeads` the paper's three heads on the pooled features:

- a softmax classifier over the classes and background (fine-tuning's classifier; the default scorer here),
- optional per-class linear SVMs on fc7 trained with hard-negative mining (:meth:`RegionDetector.fit_svms`),
- class-specific ridge-regression box regressors on the pooled features
  (:meth:`RegionDetector.fit_box_regressor`).

The closed-form solvers behind the last two live in :mod:`detect.detectors.solvers`.

Decisions:

- Fine-tuning loss (``forward`` with targets): regions are drawn as :class:`SamplingConfig` says; R-CNN's
  defaults are mini-batches of 128 regions over the whole batch of images, at most 32 (25 %) foreground —
  ground-truth boxes and proposals with IoU >= 0.5 to a ground-truth box, labelled with that box's class — and
  the rest background (IoU < 0.5). When fewer foreground regions exist the batch is filled with background, as
  torchvision's sampler does (the paper fixed 96 background windows). Loss: cross-entropy.
- SVMs (R-CNN's section 2.3 and its code): positives are the ground-truth boxes of the class, negatives the
  regions with IoU < 0.3 to every ground-truth box of the class; the rest is ignored. fc7 features are scaled so
  that their mean L2 norm is 20, the objective is liblinear's L2-regularised hinge loss with ``C = 0.001``,
  positive cost weight 2 and a bias feature of 10, solved in the dual by coordinate descent
  (:func:`detect.detectors.solvers.train_linear_svms`), all classes at once, until the KKT conditions hold within
  liblinear's default tolerance 0.1. Hard negatives (score > -1.0001) are mined over every candidate negative in
  rounds, easy ones (score < -1.2) evicted from the cache, until a round finds no new hard negative. The initial
  cache holds the positives and up to 2,000 random negatives per class (mining from an all-zero SVM would call
  every negative hard).
- Box regression (R-CNN's appendix C): per class, ridge regression with ``lambda = 1000`` from the pooled
  features (scaled to mean norm 20, as the paper's code did) to the targets ``BoxCoder().encode(gt, proposal)``
  of the proposals whose IoU with their best ground-truth box exceeds 0.6; the intercept is not regularised.
  Closed-form solve in float64 (:func:`detect.detectors.solvers.fit_ridge`). Until fitted, the regressors output
  zero deltas (the proposal itself).
- Post-processing: scores (softmax probabilities or SVM margins) and class-specific decoding of every proposal,
  then the Fast R-CNN head's :func:`detect.roi_heads.postprocess_detections` (clipping, minimum size, ONE
  :func:`detect.ops.nms.multiclass_nms` call for the batch) with per-class NMS at IoU 0.3 (R-CNN's) and at most
  100 detections per image. Regression is applied to every proposal before NMS.
- Inference classifies each image's regions alone, ``chunk_size`` at a time (:meth:`RegionDetector.classify`,
  :func:`chunk_boxes`), and the heads' matrix products run on one thread on the CPU
  (:mod:`detect.ops.threads`): a region's outputs are bitwise the same in any batch and on any thread count
  (issue 21; chunks that crossed images made them depend on the batch mates).
- ``forward(images, targets=None, proposals=None)`` returns ``(detections, losses)``. In training the detections
  come from the sampled regions (cheap, for monitoring); otherwise from all proposals, computed without autograd.
- Truncated SVD (Fast R-CNN, section 3.1): :meth:`RegionDetector.compress` replaces fc6/fc7 by
  :class:`detect.roi_heads.LowRankLinear` factors of a chosen rank, cutting the heads' multiply-adds from
  ``in x out`` to ``t (in + out)`` per region; the error of each layer is at most its largest discarded singular
  value times the input's norm. The factors themselves are stored, with the ranks in the config
  (``fc6_rank``/``fc7_rank``), rather than recomputed at load time: the file is smaller, loading needs no SVD
  (a minute for AlexNet's fc6 on two cores) and the model is exactly the one whose mAP was measured. Configs
  without ranks (every bundled file) build the dense layers as before.
- Weights files are read and written by :mod:`detect.weights` only (name, class names and JSON config in the
  metadata; the architecture is rebuilt through the registry, :mod:`detect.detectors`).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detect.detectors.faster_rcnn import check_targets
from detect.detectors.solvers import fit_ridge, train_linear_svms
from detect.errors import ConfigError
from detect.ops.boxes import batched_box_iou, clip_boxes_list, pairwise_box_iou
from detect.ops.coder import BoxCoder
from detect.ops.sampling import pad_boxes, sample_balanced
from detect.ops.threads import one_thread
from detect.roi_heads import PostprocessConfig, TwoMLPHead, factorise_fc67, postprocess_detections
from detect.structures import Detections
from detect.transform import ImageInput, as_image_list, as_image_tensor
from proposals.selective_search import SelectiveSearch

__all__ = [
    "SCORINGS",
    "SamplingConfig",
    "SVMConfig",
    "BoxRegressionConfig",
    "RegionPostprocessConfig",
    "RegionMatch",
    "RegionSample",
    "RegionFeatures",
    "RegionOutputs",
    "MiningReport",
    "match_regions",
    "sample_regions",
    "chunk_boxes",
    "RegionHeads",
    "RegionDetector",
]

SCORINGS = ("softmax", "svm")


# --- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """Which regions train the softmax classifier. A region whose best IoU with a ground-truth box is
    ``>= fg_iou_thresh`` takes that box's class; one in ``[bg_iou_low, fg_iou_thresh)`` is background; the rest is
    ignored. ``batch_size`` regions are drawn per mini-batch (per image when ``per_image``, else over the whole batch
    of images), at most ``positive_fraction`` of them foreground. Defaults: R-CNN's (128 over the batch, 32
    foreground, background below 0.5)."""

    batch_size: int = 128
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_low: float = 0.0
    per_image: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not 0 < self.positive_fraction <= 1 or not 0 <= self.bg_iou_low <= self.fg_iou_thresh:
            raise ConfigError(f"invalid {self}")


@dataclass(frozen=True)
class SVMConfig:
    """Per-class linear SVMs with hard-negative mining; defaults are the R-CNN code's (liblinear ``-s 3``)."""

    C: float = 1e-3
    positive_weight: float = 2.0
    bias_multiplier: float = 10.0
    neg_iou_thresh: float = 0.3
    feature_norm: float = 20.0  # fc7 features are scaled to this mean L2 norm
    initial_negatives: int = 2000  # random negatives per class in the first round's cache
    hard_thresh: float = -1.0001  # a negative scoring above this joins the cache
    evict_thresh: float = -1.2  # a cached negative scoring below this leaves it
    mining_rounds: int = 10
    max_epochs: int = 1000  # dual coordinate-descent epochs per round at most
    tol: float = 0.1  # stop when no dual variable's projected gradient exceeds this (liblinear's default)

    def __post_init__(self) -> None:
        if self.C <= 0 or self.positive_weight <= 0 or self.bias_multiplier <= 0 or self.mining_rounds < 1:
            raise ConfigError(f"invalid {self}")


@dataclass(frozen=True)
class BoxRegressionConfig:
    """Class-specific ridge regression (paper's appendix C): ``lam`` is the paper's lambda, training regions need an
    IoU above ``min_iou`` with their best ground-truth box, features are scaled to mean L2 norm ``feature_norm``."""

    lam: float = 1000.0
    min_iou: float = 0.6
    feature_norm: float = 20.0


@dataclass(frozen=True)
class RegionPostprocessConfig(PostprocessConfig):
    """Detections as the Fast R-CNN head makes them (:class:`detect.roi_heads.PostprocessConfig`), with per-class
    NMS at R-CNN's ``nms_thresh`` 0.3, and ``svm_score_thresh`` in place of ``score_thresh`` when the SVMs score
    (their margins are not probabilities)."""

    nms_thresh: float = 0.3
    svm_score_thresh: float = -1.0


# --- matching and sampling regions -----------------------------------------------------------------------------


@dataclass
class RegionMatch:
    """Every region of every image (flat, image-major) against its image's ground truth."""

    iou: Tensor  # (N,) best IoU with any ground-truth box (0 when the image has none)
    gt_boxes: Tensor  # (N, 4) that best ground-truth box (zeros when none)
    gt_labels: Tensor  # (N,) its 1-based class (0 when none)
    overlaps: Tensor  # (N, K) the best IoU with the ground truth of each class


def match_regions(boxes: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], num_classes: int) -> RegionMatch:
    """Match per-image regions ``(N_i, 4)`` to per-image targets (``"boxes" (G_i, 4)``, ``"labels" (G_i,)``), all
    images in one padded IoU call."""
    like = boxes[0]
    regions, valid = pad_boxes(list(boxes), like)  # (B, P, 4), (B, P)
    gt, gt_valid = pad_boxes([t["boxes"].to(like) for t in targets], like)  # (B, G, 4), (B, G)
    gt_labels = torch.zeros(gt_valid.shape, dtype=torch.int64, device=like.device)  # (B, G)
    for i, target in enumerate(targets):  # B small copies
        gt_labels[i, : len(target["labels"])] = target["labels"]
    iou = batched_box_iou(gt, regions).masked_fill(~gt_valid[:, :, None], 0.0)  # (B, G, P)
    best_iou, best_gt = iou.max(dim=1)  # (B, P)
    matched = gt.gather(1, best_gt[:, :, None].expand(*best_gt.shape, 4))  # (B, P, 4)
    labels = gt_labels.gather(1, best_gt).masked_fill(best_iou <= 0, 0)  # (B, P)
    of_class = F.one_hot(gt_labels, num_classes + 1)[:, :, None, 1:].bool() & gt_valid[:, :, None, None]  # (B,G,1,K)
    overlaps = torch.where(of_class, iou[:, :, :, None], 0.0).amax(dim=1)  # (B, G, P, K) -> (B, P, K)
    return RegionMatch(best_iou[valid], matched[valid], labels[valid], overlaps[valid])


@dataclass
class RegionSample:
    """Regions drawn for one training step: per-image boxes and their class labels ``(S,)`` (0 background),
    image-major."""

    boxes: list[Tensor]
    labels: Tensor


def sample_regions(
    boxes: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], config: SamplingConfig, num_classes: int
) -> RegionSample:
    """Append each image's ground-truth boxes to its regions, label them (see :class:`SamplingConfig`) and draw a
    mini-batch with :func:`detect.ops.sampling.sample_balanced` (per image, or over the batch as one row)."""
    with_gt = [torch.cat([b, t["boxes"].to(b)]) for b, t in zip(boxes, targets)]  # (N_i + G_i, 4)
    match = match_regions(with_gt, targets, num_classes)
    foreground = match.iou >= config.fg_iou_thresh  # (N,)
    background = ~foreground & (match.iou >= config.bg_iou_low)
    ternary = torch.where(foreground, 1, torch.where(background, 0, -1))  # (N,) sampler's 1 / 0 / -1
    if config.per_image:
        _, valid = pad_boxes(with_gt, with_gt[0])  # (B, P)
        rows = torch.full(valid.shape, -1, dtype=ternary.dtype, device=ternary.device)  # (B, P)
        rows[valid] = ternary
        positive, negative = sample_balanced(rows, config.batch_size, config.positive_fraction)
        drawn = (positive | negative)[valid]  # (B, P) -> (N,)
    else:
        positive, negative = sample_balanced(ternary[None], config.batch_size, config.positive_fraction)
        drawn = (positive | negative)[0]  # (1, N) -> (N,)
    sizes = torch.tensor([len(b) for b in with_gt], device=drawn.device)  # (B,)
    image = torch.arange(len(with_gt), device=drawn.device).repeat_interleave(sizes, output_size=len(drawn))  # (N,)
    counts = torch.bincount(image[drawn], minlength=len(with_gt)).tolist()  # one host read
    labels = torch.where(foreground, match.gt_labels, 0)[drawn]  # (S,)
    return RegionSample(list(torch.cat(with_gt)[drawn].split(counts)), labels)


@dataclass
class RegionFeatures:
    """Features of regions for fitting the SVMs and box regressors (:meth:`RegionDetector.collect_regions`),
    flat over images. ``labels`` is the class of ground-truth rows and 0 for proposals (the SVMs' positives);
    ``gt_boxes``/``gt_labels``/``iou``/``overlaps`` come from :func:`match_regions`."""

    pooled: Tensor  # (N, D) pool5 (R-CNN) or SPP (SPP-Net) features
    fc7: Tensor  # (N, F)
    boxes: Tensor  # (N, 4)
    labels: Tensor  # (N,)
    gt_boxes: Tensor  # (N, 4)
    gt_labels: Tensor  # (N,)
    iou: Tensor  # (N,)
    overlaps: Tensor  # (N, K)

    @classmethod
    def cat(cls, parts: Sequence["RegionFeatures"]) -> "RegionFeatures":
        """Concatenate the features of several batches."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def chunk_boxes(boxes: Sequence[Tensor], size: int) -> Iterator[list[Tensor]]:
    """Walk each image's ``boxes`` ``size`` rows at a time, image after image: each step is again one slice per
    image (empty for every image but one), so it can go wherever the whole list can. A chunk never mixes images,
    so what a region is computed with depends on its own image only (see :meth:`RegionDetector.classify`)."""
    for index, image_boxes in enumerate(boxes):
        for lo in range(0, len(image_boxes), size):
            yield [b[lo : lo + size] if i == index else b[:0] for i, b in enumerate(boxes)]


# --- the heads shared by R-CNN and SPP-Net ---------------------------------------------------------------------


class RegionOutputs(NamedTuple):
    """What the heads say about K regions."""

    logits: Tensor  # (K, C+1) softmax classifier, column 0 background
    svm_scores: Tensor  # (K, C) SVM margins
    deltas: Tensor  # (K, C*4) class-specific box regression

    def detach(self) -> "RegionOutputs":
        return RegionOutputs(*(t.detach() for t in self))


class RegionHeads(nn.Module):
    """Pooled region features -> fc6, fc7 (``box_head``, with ReLU and dropout) -> softmax classifier
    (``cls_score``), per-class SVMs on fc7 (``svm``) and per-class box regressors on the pooled features
    (``bbox_pred``). The SVMs and regressors are fitted in closed form, never by gradients (their parameters do
    not require grad), and start at zero: SVM scores 0, deltas 0. ``svm_scale`` and ``bbox_scale`` are the feature
    scalings fixed when fitting them (R-CNN's mean-norm-20 rule). ``fc6_rank``/``fc7_rank`` build those layers as
    :class:`detect.roi_heads.LowRankLinear` factors of that rank (a truncated-SVD head, see
    :meth:`RegionDetector.compress`)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        representation_size: int = 4096,
        dropout: float = 0.5,
        fc6_rank: int | None = None,
        fc7_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.box_head = TwoMLPHead(in_features, representation_size, dropout)
        factorise_fc67(self.box_head, fc6_rank, fc7_rank, compute=False)  # shapes of a compressed weights file
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.svm = nn.Linear(representation_size, num_classes).requires_grad_(False)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4).requires_grad_(False)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        for linear in (self.cls_score, self.svm, self.bbox_pred):
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.svm.weight)
        nn.init.zeros_(self.bbox_pred.weight)
        self.register_buffer("svm_scale", torch.ones(()))
        self.register_buffer("bbox_scale", torch.ones(()))

    def forward(self, pooled: Tensor) -> RegionOutputs:
        with one_thread(pooled, not self.training):  # thread-count-free products (detect.ops.threads)
            fc7 = self.box_head(pooled)  # (K, D) -> (K, F)
            deltas = self.bbox_pred(pooled * self.bbox_scale)  # (K, C*4)
            return RegionOutputs(self.cls_score(fc7), self.svm(fc7 * self.svm_scale), deltas)


# --- the detector shared by R-CNN and SPP-Net ------------------------------------------------------------------


@dataclass
class MiningReport:
    """How SVM training went: rounds run, new hard negatives found per round (summed over classes), final cache
    size (positives and negatives, summed over classes) and the last solve's dual epochs and KKT violation."""

    rounds: int
    hard_negatives: list[int]
    cache_size: int
    epochs: int
    violation: float


class RegionDetector(nn.Module, metaclass=abc.ABCMeta):
    """A detector that classifies proposals from pooled per-region features: R-CNN and SPP-Net.

    Subclasses say how features are computed: :meth:`prepare` does the per-image work once (normalisation for
    R-CNN, the conv pass for SPP-Net) and :meth:`pool` turns per-image boxes into pooled features ``(K, D)``.
    Everything else is here: proposals, sampling and loss, heads, post-processing, SVM and regressor fitting.
    ``proposer`` is a plain callable attribute (selective search by default): replace it freely.
    """

    def __init__(self, class_names: Sequence[str], config: Any, heads: RegionHeads, name: str) -> None:
        super().__init__()
        if len(class_names) != heads.num_classes:
            raise ValueError(f"{len(class_names)} class names for {heads.num_classes} classes")
        self.class_names = tuple(class_names)
        self.config = config
        self.heads = heads
        self.name = name
        self.box_coder = BoxCoder()
        self.proposer = SelectiveSearch(config.proposals)

    @abc.abstractmethod
    def prepare(self, images: list[Tensor], with_grad: bool) -> Any:
        """Per-batch work shared by every region of ``images`` (float ``(3, H_i, W_i)`` in [0, 1] on the model's
        device); ``with_grad`` says whether a loss will be backpropagated through it."""

    @abc.abstractmethod
    def pool(self, prepared: Any, boxes: Sequence[Tensor]) -> Tensor:
        """Pooled features ``(sum N_i, D)``, image-major, of per-image ``(N_i, 4)`` boxes in original pixels."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        images: Sequence[ImageInput] | ImageInput,
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        proposals: Sequence[Tensor] | None = None,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """Detect objects in ``images`` (RGB ``uint8`` ``HxWx3`` arrays or float ``(3, H, W)`` tensors in [0, 1])
        among ``proposals`` (per image ``(N_i, 4)`` xyxy original pixels; ``self.proposer``'s when ``None``). With
        ``targets`` (per image ``"boxes" (G_i, 4)`` and int64 1-based ``"labels" (G_i,)``) also return
        ``{"loss_classifier"}``."""
        inputs = as_image_list(images)
        tensors = [as_image_tensor(image, self.device) for image in inputs]
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        boxes = self.region_proposals(inputs, proposals, sizes)
        targets = self._checked_targets(targets)
        prepared = self.prepare(tensors, with_grad=targets is not None)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            sample = sample_regions(boxes, targets, self.config.sampling, self.heads.num_classes)
            outputs = self.heads(self.pool(prepared, sample.boxes))
            losses["loss_classifier"] = F.cross_entropy(outputs.logits, sample.labels, reduction="sum") / max(
                len(sample.labels), 1
            )
            if self.training:
                return self.detections(outputs.detach(), sample.boxes, sizes), losses
        with torch.no_grad():
            outputs = self.classify(prepared, boxes)
        return self.detections(outputs, boxes, sizes), losses

    def classify(self, prepared: Any, boxes: Sequence[Tensor]) -> RegionOutputs:
        """The heads' outputs for the per-image ``boxes`` at inference: each image's regions alone,
        ``config.chunk_size`` at a time (:func:`chunk_boxes`), pooled and classified chunk by chunk. Memory holds
        one chunk's features, and every matrix product a region takes part in has a composition fixed by its own
        image (its chunk's rows), never by the other images of the batch: kernels choose their blocking (hence
        the order of their sums) by the number of rows, so a region's last bits would otherwise follow its batch
        mates (issue 21)."""
        parts = [self.heads(self.pool(prepared, chunk)) for chunk in chunk_boxes(boxes, self.config.chunk_size)]
        if not parts:  # no region in the whole batch: empty outputs of the right widths
            return self.heads(self.pool(prepared, boxes))
        return RegionOutputs(*(torch.cat(part) for part in zip(*parts)))

    def region_proposals(
        self, inputs: Sequence[ImageInput], proposals: Sequence[Tensor] | None, sizes: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """The caller's proposals or ``self.proposer``'s, float32 on the model's device, clipped to each image."""
        if proposals is None:
            proposals = self.proposer(list(inputs))
        if len(proposals) != len(inputs):
            raise ValueError(f"got proposals for {len(proposals)} images, expected {len(inputs)}")
        boxes = [torch.as_tensor(p).to(self.device, torch.float32).reshape(-1, 4) for p in proposals]
        return clip_boxes_list(boxes, sizes)

    def _checked_targets(self, targets: Sequence[Mapping[str, Tensor]] | None) -> list[dict[str, Tensor]] | None:
        """``"boxes"`` and ``"labels"`` of each target (tensors or arrays) on the model's device, checked."""
        if targets is None:
            return None
        moved = [{k: torch.as_tensor(t[k]).to(self.device) for k in ("boxes", "labels") if k in t} for t in targets]
        check_targets(moved)
        return moved

    def class_scores(self, outputs: RegionOutputs) -> tuple[Tensor, float]:
        """Per-class scores ``(K, C)`` of the active scorer and the threshold that goes with them."""
        post = self.config.postprocess
        if self.config.scoring == "svm":
            return outputs.svm_scores, post.svm_score_thresh
        return F.softmax(outputs.logits, dim=-1)[:, 1:], post.score_thresh

    def detections(
        self, outputs: RegionOutputs, boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[Detections]:
        """Decode, clip, score and suppress: per-image detections in the boxes' (original) pixels, one NMS call."""
        decoded = self.box_coder.decode_per_class(outputs.deltas, torch.cat(list(boxes)))  # (K, C, 4)
        scores, threshold = self.class_scores(outputs)  # (K, C)
        counts = [len(b) for b in boxes]
        return postprocess_detections(decoded, scores, counts, image_sizes, self.config.postprocess, threshold)

    # --- fitting the SVMs and box regressors ---------------------------------------------------------------

    @torch.no_grad()
    def collect_regions(
        self,
        images: Sequence[ImageInput] | ImageInput,
        targets: Sequence[Mapping[str, Tensor]],
        proposals: Sequence[Tensor] | None = None,
    ) -> RegionFeatures:
        """Pooled and fc7 features of every ground-truth box and proposal of ``images``, with their matches: what
        :meth:`fit_svms` and :meth:`fit_box_regressor` take (gather over a data set with :meth:`RegionFeatures.cat`).
        Call it in eval mode so that fc7 has no dropout."""
        inputs = as_image_list(images)
        tensors = [as_image_tensor(image, self.device) for image in inputs]
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        proposed = self.region_proposals(inputs, proposals, sizes)
        targets = self._checked_targets(targets)
        regions = [torch.cat([t["boxes"].float(), p]) for p, t in zip(proposed, targets)]  # (G_i + N_i, 4)
        labels = torch.cat([torch.cat([t["labels"], t["labels"].new_zeros(len(p))]) for p, t in zip(proposed, targets)])
        match = match_regions(regions, targets, self.heads.num_classes)
        pooled = self.pool(self.prepare(tensors, with_grad=False), regions)  # (N, D)
        fc7 = self.heads.box_head(pooled)  # (N, F)
        return RegionFeatures(
            pooled, fc7, torch.cat(regions), labels, match.gt_boxes, match.gt_labels, match.iou, match.overlaps
        )

    @torch.no_grad()
    def fit_box_regressor(self, features: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
        """Fit the class-specific ridge regressors (see the module docstring) from pooled ``features (N, D)`` of
        regions ``boxes (N, 4)`` matched to ``gt_boxes (N, 4)`` of class ``gt_labels (N,)`` (1-based, 0 none).
        Classes without a training region keep zero deltas. Returns the regions used per class ``(C,)``."""
        cfg = self.config.box_regression
        num_classes = self.heads.num_classes
        use = (gt_labels > 0) & (pairwise_box_iou(boxes, gt_boxes) > cfg.min_iou)  # (N,)
        counts = torch.bincount(gt_labels[use], minlength=num_classes + 1)[1:]  # (C,)
        if not bool(use.any()):
            return counts
        x = features[use].double()  # (M, D)
        scale = cfg.feature_norm / x.norm(dim=1).mean().clamp(min=torch.finfo(x.dtype).tiny)
        targets = self.box_coder.encode(gt_boxes[use].double(), boxes[use].double())  # (M, 4)
        labels = gt_labels[use]
        weight = self.heads.bbox_pred.weight.view(num_classes, 4, -1)  # (C*4, D) -> (C, 4, D)
        bias = self.heads.bbox_pred.bias.view(num_classes, 4)
        for c in torch.nonzero(counts).squeeze(1).tolist():  # one closed-form solve per class
            rows = labels == c + 1
            weight[c], bias[c] = fit_ridge(x[rows] * scale, targets[rows], cfg.lam)
        self.heads.bbox_scale.fill_(float(scale))
        return counts

    @torch.no_grad()
    def fit_svms(
        self,
        features: Tensor,
        labels: Tensor,
        overlaps: Tensor,
        *,
        use: bool = True,
        generator: torch.Generator | None = None,
    ) -> MiningReport:
        """Train the per-class SVMs with hard-negative mining (see the module docstring).

        ``features (N, F)``: fc7 features of regions; ``labels (N,)``: the class of ground-truth rows (the
        positives), 0 for the others; ``overlaps (N, C)``: each region's best IoU with the ground truth of each
        class. Negatives of class ``c`` are non-positives with ``overlaps[:, c-1] < neg_iou_thresh``. Each round
        solves the SVMs on the cache (:func:`train_linear_svms`, float64, warm-started), scores every
        candidate negative, adds the hard ones and evicts the easy ones. ``use`` switches the detector's scoring
        to the SVMs.
        """
        cfg = self.config.svm
        num_classes = self.heads.num_classes
        scale = cfg.feature_norm / features.norm(dim=1).mean().clamp(min=torch.finfo(features.dtype).tiny)
        positives = F.one_hot(labels, num_classes + 1)[:, 1:].bool()  # (N, C)
        negatives = ~positives & (overlaps < cfg.neg_iou_thresh)  # (N, C)
        signs = torch.where(positives, 1.0, -1.0).double()
        costs = torch.where(positives, cfg.C * cfg.positive_weight, cfg.C).double()
        cache = positives | _random_subset(negatives, cfg.initial_negatives, generator)  # (N, C)
        alpha = costs.new_zeros(costs.shape)
        hard_counts: list[int] = []
        for _ in range(cfg.mining_rounds):
            rows = torch.nonzero(cache.any(dim=1)).squeeze(1)
            solution = train_linear_svms(
                features[rows].double() * scale,
                signs[rows],
                costs[rows] * cache[rows],
                bias_multiplier=cfg.bias_multiplier,
                tol=cfg.tol,
                max_epochs=cfg.max_epochs,
                alpha=alpha[rows],
                generator=generator,
            )
            alpha[rows] = solution.alpha
            scores = (features @ solution.weight.T.to(features)) * scale + solution.bias.to(features)  # (N, C)
            hard = negatives & ~cache & (scores > cfg.hard_thresh)
            easy = negatives & cache & (scores < cfg.evict_thresh)
            cache = (cache | hard) & ~easy
            alpha[easy] = 0.0
            hard_counts.append(int(hard.sum()))
            if hard_counts[-1] == 0:
                break
        self.heads.svm.weight.copy_(solution.weight)
        self.heads.svm.bias.copy_(solution.bias)
        self.heads.svm_scale.fill_(float(scale))
        if use:
            self.config = dataclasses.replace(self.config, scoring="svm")
        return MiningReport(len(hard_counts), hard_counts, int(cache.sum()), solution.epochs, solution.violation)

    # --- truncated-SVD compression -------------------------------------------------------------------------

    @torch.no_grad()
    def compress(self, fc6_rank: int | None = None, fc7_rank: int | None = None) -> None:
        """Replace fc6 and/or fc7 (``None``: leave it) by their truncated SVDs of the given ranks, in place (Fast
        R-CNN's compression; see the module docstring), and record the ranks in :attr:`config`, so that a weights
        file written afterwards (:func:`detect.weights.save_detector`) rebuilds the factorised layers. The config
        must have ``fc6_rank`` and ``fc7_rank`` fields (:class:`~detect.detectors.sppnet.SPPNetConfig` has them)."""
        names = {f.name for f in dataclasses.fields(self.config)}
        if not {"fc6_rank", "fc7_rank"} <= names:
            raise ConfigError(f"{type(self.config).__name__} has no fc6_rank/fc7_rank: cannot record a compressed head")
        factorise_fc67(self.heads.box_head, fc6_rank, fc7_rank)
        self.config = dataclasses.replace(
            self.config,
            fc6_rank=self.config.fc6_rank if fc6_rank is None else fc6_rank,
            fc7_rank=self.config.fc7_rank if fc7_rank is None else fc7_rank,
        )




def _random_subset(mask: Tensor, per_column: int, generator: torch.Generator | None) -> Tensor:
    """At most ``per_column`` True entries of each column of ``mask (N, C)``, drawn uniformly."""
    keys = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(~mask, 2.0)  # (N, C)
    chosen = keys.argsort(dim=0)[: min(per_column, mask.shape[0])]  # (n, C) rows of the smallest keys
    return torch.zeros_like(mask).scatter_(0, chosen, True) & mask

