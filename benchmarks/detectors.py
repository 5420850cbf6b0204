"""Detector benchmark: SPP-Net vs R-CNN, and our Faster R-CNN vs torchvision's, measured in the same run.

    python benchmarks/detectors.py [--backbone alexnet|vgg16] [--proposals 2000] [--rcnn-proposals 256]
                                   [--svd-ranks 1024,256 ...] [--min-size 480] [--batches 1,8] [--repeats 3] [--runs 3]
                                   [--quick] [--only region|faster|svd-map]

Every model has seeded random weights (nothing is downloaded): timings do not depend on the weights' values, and
random weights make the Faster R-CNN comparison an exact one (torchvision's model is built from its public pieces
and its state dict is loaded into ours with ``strict=True``). All times are medians of interleaved runs
(:func:`benchmarks._timing.median_seconds`) in eval mode under ``torch.inference_mode()``, on the CPU with
torch's default thread count. Ratios above 1 mean the first-named model is faster. Targets (issues 4 and 15):

1. SPP-Net vs R-CNN, same backbone, same image (a synthetic shapes image of PASCAL-like size) and the same N
   proposals (random boxes of realistic sizes, fixed seed): at least 24x faster per image. R-CNN's cost is linear in
   the number of regions (the CNN runs once per warped crop, ``chunk_size`` crops at a time), so it is timed at two
   region counts ``K/2`` and ``K`` (``--rcnn-proposals``; the per-region times show the linearity) and extrapolated
   to N along the line through the two points. SPP-Net is timed at N directly, dense and with fc6/fc7 compressed
   by truncated SVD (``--svd-ranks``: Fast R-CNN's 1024/256, and 512/256, by default). SPP-Net's conv pass and its
   pooling of the N windows are also timed alone (the fused CPU loop, and the torch reference it replaced).
2. Faster R-CNN R50-FPN, ours (defaults, and a second row with :func:`detect.backbones.fold_frozen_batchnorm`, the
   model as ``detect.inference.load_model`` loads it) vs torchvision's ``fasterrcnn_resnet50_fpn``, same weights
   and images, at each batch size: latency ratio torchvision / ours in ``--runs`` independent runs (each a median of
   ``--repeats`` interleaved calls), the worst run counting; no slower at batch 1, at least 1.2x faster at batch 8.
   The detections are compared (labels equal, boxes and scores within 1e-4). Also printed: seconds per image at the
   largest batch over the smallest, and the cost of grouping images by padded size (same-size images: one group).
3. The time split per stage of every detector, from one extra instrumented call: forward hooks on the stage
   modules and wrappers around the stage methods (:class:`detect.compare.StageTimer`; the detectors record no
   timings of their own). R-CNN and SPP-Net get the proposals from the caller; their proposal stage is selective
   search on the same image, timed once apart. Faster R-CNN's split is per image at each batch size.
4. The VOC mAP@0.5 change of truncated SVD: the bundled ``sppnet_shapes`` weights on their held-out shapes split
   (the manifest's ``eval_data``), dense and at several fc6/fc7 ranks, with the same selective-search proposals
   for every variant (computed once).

``--quick`` (a smoke run of a few minutes) replaces every size with a small one: N=200, K=32, a ~190-pixel image
at SPP scale 320, Faster R-CNN at min_size 160 with batches 1 and 4, the SVD mAP on 24 held-out images. The last
line sums up the ratios (and the mAP changes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._timing import median_seconds  # noqa: E402
from detect.backbones import fold_frozen_batchnorm  # noqa: E402
from detect.compare import StageTimer  # noqa: E402  (the stage timer `detect compare` uses)
from detect.data.shapes import ShapesConfig, ShapesDataset  # noqa: E402
from detect.detectors import DETECTORS  # noqa: E402
from detect.detectors.faster_rcnn import (  # noqa: E402
    FasterRCNN,
    FasterRCNNConfig,
    fasterrcnn_resnet50_fpn,
)
from detect.detectors.region import RegionDetector  # noqa: E402
from detect.detectors.sppnet import SPPNetConfig  # noqa: E402
from detect.ops import dispatch  # noqa: E402
from detect.testing import CLS_SCALE, randomise_frozen_bn  # noqa: E402  (the parity test's recipe)
from detect.transform import TransformConfig, as_image_tensor  # noqa: E402
from proposals.selective_search import SelectiveSearch, SelectiveSearchConfig  # noqa: E402

BACKBONES = ("alexnet", "vgg16", "tiny")  # region detectors exist for each: DETECTORS["rcnn_<backbone>"]

VOC_CLASSES = 20
PARITY_ATOL = 1e-4


@dataclass(frozen=True)
class Settings:
    backbone: str
    proposals: int
    rcnn_proposals: int
    spp_scale: int
    image_size: tuple[int, int]  # shapes image (min, max) side
    min_size: int
    batches: tuple[int, ...]
    repeats: int
    svd_ranks: tuple[tuple[int, int], ...] = ((1024, 256), (512, 256))
    runs: int = 3
    quick: bool = False


# --- stage timing ------------------------------------------------------------------------------------------------


Stages = list[tuple[str, tuple[str, ...], tuple[str, ...]]]  # (stage, parts added, parts subtracted)


def stage_split(
    model: nn.Module, instrument: Callable[[StageTimer, nn.Module], None], stages: Stages, call: Callable[[], object]
) -> dict[str, float]:
    """Seconds per stage of one ``call``, plus ``other`` (the rest of the wall time) and ``total``."""
    timer = StageTimer()
    instrument(timer, model)
    start = time.perf_counter()
    try:
        call()
    finally:
        total = time.perf_counter() - start
        timer.remove()
    return timer.split(stages, total)


def format_split(name: str, split: dict[str, float], scale: float = 1.0) -> str:
    parts = [f"{stage} {seconds * scale * 1e3:.0f} ms ({100 * seconds / split['total']:.0f}%)"
             for stage, seconds in split.items() if stage != "total"]
    return f"  {name:<34} total {split['total'] * scale * 1e3:.0f} ms: " + ", ".join(parts)


# --- SPP-Net vs R-CNN --------------------------------------------------------------------------------------------


def shapes_image(sides: tuple[int, int]) -> np.ndarray:
    """One synthetic shapes image (RGB uint8), height and width drawn from ``sides``, seed 0."""
    image, _ = ShapesDataset(ShapesConfig(num_images=1, image_size=sides[0], image_size_max=sides[1], seed=0))[0]
    return image


def random_proposals(count: int, height: int, width: int, seed: int = 0) -> Tensor:
    """``(count, 4)`` xyxy boxes of realistic sizes: sides log-uniform from 16 pixels to the image's side, aspect
    log-uniform in [1/3, 3], centres uniform, clipped to the image."""
    generator = torch.Generator().manual_seed(seed)
    short = min(height, width)
    side = torch.exp(torch.empty(count).uniform_(math.log(16), math.log(short), generator=generator))  # (N,)
    aspect = torch.exp(torch.empty(count).uniform_(-math.log(3), math.log(3), generator=generator))  # (N,) w / h
    wh = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], dim=1)  # (N, 2)
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])  # (N, 2)
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)  # (N, 4)
    return boxes.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=torch.float32))


def instrument_rcnn(timer: StageTimer, model: nn.Module) -> None:
    for part in ("prepare", "pool", "detections"):
        timer.method(part, model, part)
    for part in ("features", "pool5", "heads"):
        timer.module(part, getattr(model, part))


def instrument_sppnet(timer: StageTimer, model: nn.Module) -> None:
    for part in ("prepare", "pool", "detections"):
        timer.method(part, model, part)
    for part in ("backbone", "heads"):
        timer.module(part, getattr(model, part))


RCNN_STAGES: Stages = [
    ("normalise", ("prepare",), ()),
    ("warp crops", ("pool",), ("features", "pool5")),
    ("backbone on crops", ("features", "pool5"), ()),
    ("heads", ("heads",), ()),
    ("post-processing", ("detections",), ()),
]
SPPNET_STAGES: Stages = [
    ("resize+normalise", ("prepare",), ("backbone",)),
    ("backbone", ("backbone",), ()),
    ("SPP pooling", ("pool",), ()),
    ("heads", ("heads",), ()),
    ("post-processing", ("detections",), ()),
]


def region_detectors(settings: Settings) -> tuple[RegionDetector, RegionDetector, dict[str, RegionDetector]]:
    """R-CNN, SPP-Net, and SPP-Net with a truncated-SVD head for each pair of ``settings.svd_ranks``, by label (the
    factors built from the config with random values, as a compressed weights file is rebuilt: timings do not
    depend on the values)."""
    torch.manual_seed(0)
    names = [f"class_{k}" for k in range(1, VOC_CLASSES + 1)]
    rcnn = DETECTORS[f"rcnn_{settings.backbone}"](names)
    config = SPPNetConfig(settings.backbone, (settings.spp_scale,))
    sppnet = DETECTORS[f"sppnet_{settings.backbone}"](names, config=config)
    compressed = {
        f"SPP-Net+SVD {fc6_rank}/{fc7_rank}": DETECTORS[f"sppnet_{settings.backbone}"](
            names, config=dataclasses.replace(config, fc6_rank=fc6_rank, fc7_rank=fc7_rank)
        ).eval()
        for fc6_rank, fc7_rank in settings.svd_ranks
    }
    return rcnn.eval(), sppnet.eval(), compressed


def pooling_alone(sppnet: RegionDetector, image: np.ndarray, boxes: Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of SPP-Net's conv pass (``prepare``: resize, normalise, backbone) and of its pooling of the
    boxes alone (``pool``: projection and SPP) with the fused loop and with the torch reference, interleaved."""
    tensor = as_image_tensor(image, torch.device("cpu"))
    prepared = sppnet.prepare([tensor], with_grad=False)

    def reference() -> object:
        with dispatch.use_backend("torch"):
            return sppnet.pool(prepared, [boxes])

    cases = {
        "conv pass": lambda: sppnet.prepare([tensor], with_grad=False),
        "SPP pooling": lambda: sppnet.pool(prepared, [boxes]),
        "SPP pooling (torch reference)": reference,
    }
    return median_seconds(cases, repeats)


def run_region(settings: Settings) -> list[dict]:
    image = shapes_image(settings.image_size)
    height, width = image.shape[:2]
    boxes = random_proposals(settings.proposals, height, width)
    rcnn, sppnet, compressed = region_detectors(settings)
    high = settings.rcnn_proposals
    low = max(high // 2, 1)
    print(f"\n== SPP-Net vs R-CNN ({settings.backbone}, random weights): one {height}x{width} shapes image, "
          f"N={settings.proposals} random proposals; SPP-Net at scale {settings.spp_scale}; 'SPP-Net+SVD r6/r7' has "
          f"fc6/fc7 compressed to ranks r6/r7")

    def detect(model: RegionDetector, count: int) -> Callable[[], object]:
        return lambda: model(image, proposals=[boxes[:count]])

    with torch.inference_mode():
        cases = {"SPP-Net": detect(sppnet, settings.proposals)}
        cases |= {label: detect(model, settings.proposals) for label, model in compressed.items()}
        cases |= {"rcnn_low": detect(rcnn, low), "rcnn_high": detect(rcnn, high)}
        times = median_seconds(cases, settings.repeats)
        slope = (times["rcnn_high"] - times["rcnn_low"]) / (high - low)
        rcnn_at_n = times["rcnn_high"] + slope * (settings.proposals - high)
        for count, case in ((low, "rcnn_low"), (high, "rcnn_high")):
            print(f"  R-CNN at K={count:<5} {times[case]:8.3f} s  ({times[case] / count * 1e3:.2f} ms per region)")
        print(f"  R-CNN at N={settings.proposals:<5} {rcnn_at_n:8.3f} s  (extrapolated: linear in the number of "
              f"regions, line through K={low} and K={high}; intercept {times['rcnn_low'] - slope * low:.3f} s)")
        rows = []
        for label in ["SPP-Net", *compressed]:
            ratio = rcnn_at_n / times[label]
            print(f"  {label + ' at N=' + str(settings.proposals):<31} {times[label]:7.3f} s  (measured): "
                  f"{ratio:.1f}x R-CNN per image (target >= 24x)")
            rows.append({"case": f"{label} vs R-CNN {settings.backbone} N={settings.proposals}", "ratio": ratio})

        alone = pooling_alone(sppnet, image, boxes, settings.repeats)
        conv = alone["conv pass"]
        print(f"  pooling alone (median of {settings.repeats}): conv pass {conv * 1e3:.0f} ms; SPP pooling of "
              f"{settings.proposals} windows {alone['SPP pooling'] * 1e3:.0f} ms = "
              f"{alone['SPP pooling'] / conv:.2f}x the conv pass (torch reference "
              f"{alone['SPP pooling (torch reference)'] * 1e3:.0f} ms = "
              f"{alone['SPP pooling (torch reference)'] / conv:.2f}x)")

        print("  stage split (one instrumented call each):")
        search = SelectiveSearch(SelectiveSearchConfig(max_boxes=settings.proposals))
        search(shapes_image((64, 64)))  # numba JIT / cache load, not timed
        start = time.perf_counter()
        found = search(image)[0]
        print(f"  {'proposals (both)':<34} selective search {(time.perf_counter() - start) * 1e3:.0f} ms "
              f"({len(found)} boxes; not part of the timings above, which take the fixed boxes)")
        spp_split = stage_split(sppnet, instrument_sppnet, SPPNET_STAGES, detect(sppnet, settings.proposals))
        print(format_split(f"SPP-Net, N={settings.proposals}", spp_split))
        for label, model in compressed.items():
            svd_split = stage_split(model, instrument_sppnet, SPPNET_STAGES, detect(model, settings.proposals))
            print(format_split(f"{label}, N={settings.proposals}", svd_split))
        rcnn_split = stage_split(rcnn, instrument_rcnn, RCNN_STAGES, detect(rcnn, high))
        print(format_split(f"R-CNN, K={high} (x{settings.proposals / high:.1f} for N)", rcnn_split))
        spp_features = sum(spp_split[s] for s in ("resize+normalise", "backbone", "SPP pooling"))
        rcnn_features = sum(rcnn_split[s] for s in ("normalise", "warp crops", "backbone on crops"))
        print(f"  region features only (conv + pooling, the paper's 'conv time'): R-CNN "
              f"{rcnn_features * settings.proposals / high:.3f} s (scaled to N) vs SPP-Net {spp_features:.3f} s: "
              f"{rcnn_features * settings.proposals / high / spp_features:.1f}x")
    return rows


# --- truncated SVD: the mAP change on shapes ------------------------------------------------------------------

SVD_MAP_RANKS = ((128, None), (64, 64), (64, 16), (32, 16), (16, 16), (8, 8))
"""fc6/fc7 ranks of the 256-wide shapes model; (64, 16), (32, 16), (16, 16) keep the fractions of the width that
1024/256, 512/256 and 256/256 keep of AlexNet's 4096 (Fast R-CNN's choice, and half and a quarter of its fc6)."""


def run_svd_map(settings: Settings) -> list[dict]:
    """mAP of the bundled ``sppnet_shapes`` dense and compressed at :data:`SVD_MAP_RANKS` on its held-out split."""
    from detect import weights
    from detect.evaluate import evaluate_detector

    entry = weights.load_manifest(weights.BUNDLED_DIR)["sppnet_shapes"]
    shapes = entry.metrics["eval_data"]["shapes"]
    dataset = ShapesDataset(ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in shapes.items()}))
    if settings.quick:
        dataset = torch.utils.data.Subset(dataset, range(24))
        dataset.class_names = dataset.dataset.class_names
    model = weights.load_detector("sppnet_shapes")
    fc6, fc7 = model.heads.box_head.fc6, model.heads.box_head.fc7
    cache: dict[object, np.ndarray] = {}

    def proposals(images: list[np.ndarray], targets: list[dict]) -> list[np.ndarray]:
        for image, target in zip(images, targets):
            if target["image_id"] not in cache:
                cache[target["image_id"]] = np.asarray(model.proposer([image])[0], dtype=np.float32)
        return [cache[t["image_id"]] for t in targets]

    print(f"\n== truncated SVD on shapes: bundled sppnet_shapes (fc6 {fc6.in_features}x{fc6.out_features}, fc7 "
          f"{fc7.in_features}x{fc7.out_features}), VOC mAP@0.5 on its held-out split ({len(dataset)} images, the "
          f"manifest's {entry.metrics['voc_map50']:.4f} measured the same way), same proposals for every row")
    with torch.inference_mode():
        dense = evaluate_detector(model, dataset, 4, proposals)["mAP"]
    print(f"  dense             mAP {dense:.4f}")
    rows = []
    for fc6_rank, fc7_rank in SVD_MAP_RANKS:
        compressed = copy.deepcopy(model)
        compressed.compress(fc6_rank, fc7_rank)
        cost = sum(layer.in_features * layer.out_features if rank is None else rank * (layer.in_features +
                   layer.out_features) for layer, rank in ((fc6, fc6_rank), (fc7, fc7_rank)))
        dense_cost = fc6.in_features * fc6.out_features + fc7.in_features * fc7.out_features
        with torch.inference_mode():
            value = evaluate_detector(compressed, dataset, 4, proposals)["mAP"]
        label = "/".join("dense" if rank is None else str(rank) for rank in (fc6_rank, fc7_rank))
        print(f"  ranks {label:<11} mAP {value:.4f}  change {value - dense:+.4f}  "
              f"fc6+fc7 multiply-adds {cost / dense_cost:.2f}x dense")
        rows.append({"case": f"SVD {label} mAP change", "ratio": value - dense, "unit": "+"})
    return rows


# --- Faster R-CNN: ours vs torchvision ---------------------------------------------------------------------------


@torch.no_grad()
def faster_rcnn_pair(min_size: int, max_size: int) -> tuple[TVFasterRCNN, FasterRCNN]:
    """torchvision's Faster R-CNN R50-FPN from its public pieces with seeded random weights (its defaults apart from
    the input size), and ours with its defaults and the same input size, loaded from its state dict."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    reference = TVFasterRCNN(_resnet_fpn_extractor(resnet, 3), num_classes=91, min_size=min_size, max_size=max_size)
    randomise_frozen_bn(reference, torch.Generator().manual_seed(1))
    reference.roi_heads.box_predictor.cls_score.weight.mul_(CLS_SCALE)
    ours = fasterrcnn_resnet50_fpn(config=FasterRCNNConfig(transform=TransformConfig((min_size,), max_size)))
    ours.load_state_dict(reference.state_dict(), strict=True)
    for module in ours.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = 0.0
    return reference.eval(), ours.eval()


def instrument_faster(timer: StageTimer, model: nn.Module) -> None:
    """The same parts in both models (torchvision's post-processing method is ``postprocess_detections``)."""
    heads = model.roi_heads
    for part in ("transform", "backbone", "rpn"):
        timer.module(part, getattr(model, part))
    for part in ("box_roi_pool", "box_head", "box_predictor"):
        timer.module(part, getattr(heads, part))
    timer.method("roi_post", heads, "postprocess" if isinstance(model, FasterRCNN) else "postprocess_detections")
    timer.method("transform_post", model.transform, "postprocess")


FASTER_STAGES: Stages = [
    ("transform", ("transform",), ()),
    ("backbone", ("backbone",), ()),
    ("proposals (RPN)", ("rpn",), ()),
    ("heads", ("box_roi_pool", "box_head", "box_predictor"), ()),
    ("post-processing", ("roi_post", "transform_post"), ()),
]


def parity(theirs: Sequence[dict], ours: Sequence) -> str:
    """Whether the detections agree: same counts and labels in the same order, boxes and scores within
    ``PARITY_ATOL``; failing that, whether they agree as sets (float rounding may swap near-tied scores)."""
    box_diff = score_diff = set_diff = 0.0
    for expected, actual in zip(theirs, ours):
        if len(actual) != len(expected["labels"]):
            return f"DIFFERENT ({len(actual)} vs {len(expected['labels'])} detections)"
        if not len(actual):
            continue
        same_label = actual.labels[:, None] == expected["labels"][None, :]  # (N, N)
        pairwise = (actual.boxes[:, None] - expected["boxes"][None]).abs().amax(dim=2)  # (N, N)
        set_diff = max(set_diff, float(pairwise.masked_fill(~same_label, math.inf).amin(dim=1).max()))
        if torch.equal(actual.labels, expected["labels"]):
            box_diff = max(box_diff, float((actual.boxes - expected["boxes"]).abs().max()))
            score_diff = max(score_diff, float((actual.scores - expected["scores"]).abs().max()))
        else:
            box_diff = math.inf
    count = sum(len(d) for d in ours)
    if max(box_diff, score_diff) <= PARITY_ATOL:
        return f"equal ({count} detections; max |box diff| {box_diff:.1e}, max |score diff| {score_diff:.1e})"
    if set_diff <= PARITY_ATOL:
        return f"equal as sets, order differs among near-tied scores ({count}; max |box diff| {set_diff:.1e})"
    return f"DIFFERENT ({count} detections; max |box diff| in order {box_diff:.1e}, as sets {set_diff:.1e})"


def worst_of_runs(
    fns: dict[str, Callable[[], object]], peer: str, runs: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``runs`` independent medians of ``repeats`` interleaved calls each (:func:`median_seconds`, which warms
    up every function first); returns each function's per-run medians and its worst ratio ``peer / it`` over the
    runs (the run in which it compared worst)."""
    medians: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, seconds in median_seconds(fns, repeats).items():
            medians[name].append(seconds)
    worst = {name: min(p / t for p, t in zip(medians[peer], medians[name])) for name in fns}
    return medians, worst


def grouping_cost(model: FasterRCNN, images: Sequence[Tensor], repeats: int) -> tuple[float, float]:
    """Median seconds of the batch's preprocessing with the grouping by padded size (what ``forward`` runs) and
    with torchvision's padding of the whole batch to its largest image."""
    times = median_seconds(
        {"grouped": lambda: model.transform.grouped(list(images)), "padded": lambda: model.transform(list(images))},
        repeats,
    )
    return times["grouped"], times["padded"]


def run_faster(settings: Settings) -> list[dict]:
    min_size = settings.min_size
    max_size = round(min_size * 4 / 3)
    reference, ours = faster_rcnn_pair(min_size, max_size)
    folded = copy.deepcopy(ours)
    count = fold_frozen_batchnorm(folded)
    models = {"torchvision": reference, "ours": ours, "ours+fold": folded}
    generator = torch.Generator().manual_seed(2)
    pool = [torch.rand(3, min_size, max_size, generator=generator) for _ in range(max(settings.batches))]
    print(f"\n== Faster R-CNN R50-FPN, ours vs torchvision (random weights, same state dict): {min_size}x{max_size} "
          f"random images, min_size {min_size}, max_size {max_size}; 'ours+fold' has {count} frozen BNs folded "
          f"(the model as detect.inference.load_model loads it); {settings.runs} runs of {settings.repeats} "
          f"interleaved calls each, the worst run's ratio counts")
    rows = []
    per_image: dict[str, dict[int, float]] = defaultdict(dict)
    with torch.inference_mode():
        for batch in settings.batches:
            images = pool[:batch]
            outputs: dict[str, object] = {}

            def call(name: str) -> Callable[[], object]:
                return lambda: outputs.__setitem__(name, models[name](images))

            medians, worst = worst_of_runs({name: call(name) for name in models}, "torchvision", settings.runs,
                                           settings.repeats)
            runs = lambda name: ", ".join(f"{t:.3f}" for t in medians[name])  # noqa: E731
            print(f"  batch {batch}: torchvision {runs('torchvision')} s")
            for name in models:
                per_image[name][batch] = max(medians[name]) / batch
            for name in ("ours", "ours+fold"):
                detections = outputs[name][0]
                print(f"  batch {batch}: {name:<11} {runs(name)} s  worst ratio {worst[name]:5.2f}x  "
                      f"detections vs torchvision: {parity(outputs['torchvision'], detections)}")
                rows.append({"case": f"Faster R-CNN {name} b{batch} (worst of {settings.runs})", "ratio": worst[name]})
        if len(settings.batches) > 1:
            first, last = settings.batches[0], settings.batches[-1]
            print(f"  seconds per image, batch {last} / batch {first} (slowest runs): " + ", ".join(
                f"{name} {per_image[name][last] / per_image[name][first]:.2f}" for name in models))
            grouped, padded = grouping_cost(folded, pool[:last], settings.repeats)
            print(f"  grouping by padded size at batch {last}, same-size images: transform.grouped {grouped * 1e3:.1f} "
                  f"ms vs padding to the largest {padded * 1e3:.1f} ms (one group: the same tensors)")
        for batch in settings.batches:
            print(f"  stage split per image (one instrumented call each, batch {batch}):")
            images = pool[:batch]
            for name, model in models.items():
                split = stage_split(model, instrument_faster, FASTER_STAGES, lambda: model(images))
                print(format_split(name, split, scale=1 / batch))
    return rows


# --- command line ------------------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    ranks = tuple(tuple(int(r) for r in pair.split(",")) for pair in args.svd_ranks)
    if args.quick:  # ignores the size flags
        return Settings(args.backbone, 200, 32, 320, (160, 200), 160, (1, 4), args.repeats, ranks, args.runs, True)
    batches = tuple(int(b) for b in args.batches.split(","))
    return Settings(
        args.backbone, args.proposals, args.rcnn_proposals, args.spp_scale, (375, 500), args.min_size, batches,
        args.repeats, ranks, args.runs,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=BACKBONES, default="alexnet", help="R-CNN/SPP-Net backbone")
    parser.add_argument("--proposals", type=int, default=2000, help="N proposals per image for SPP-Net and R-CNN")
    parser.add_argument("--rcnn-proposals", type=int, default=256, help="K: R-CNN is timed at K/2 and K regions")
    parser.add_argument("--spp-scale", type=int, default=688, help="SPP-Net's single scale (short side)")
    parser.add_argument("--min-size", type=int, default=480, help="Faster R-CNN images: min_size x 4/3 min_size")
    parser.add_argument("--batches", default="1,8", help="Faster R-CNN batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (median reported)")
    parser.add_argument("--runs", type=int, default=3, help="Faster R-CNN: independent runs, the worst counts")
    parser.add_argument("--svd-ranks", nargs="+", default=["1024,256", "512,256"], metavar="R6,R7",
                        help="SPP-Net+SVD's fc6,fc7 ranks, one model per pair (default: Fast R-CNN's; half its fc6)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--only", choices=("region", "faster", "svd-map"), help="run one of the three parts")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"device cpu; random weights (timings do not depend on them){'; QUICK sizes' if args.quick else ''}")
    rows = []
    if args.only in (None, "region"):
        rows += run_region(settings)
    if args.only in (None, "faster"):
        rows += run_faster(settings)
    if args.only in (None, "svd-map"):
        rows += run_svd_map(settings)
    print("SUMMARY " + "; ".join(
        f"{row['case']} {row['ratio']:+.4f}" if row.get("unit") == "+" else f"{row['case']} {row['ratio']:.2f}x"
        for row in rows
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
