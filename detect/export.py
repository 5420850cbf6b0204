"""Export detectors with ``torch.export`` to ONNX, ``.pt2`` and AOTInductor packages, quantise the ONNX graphs to
int8, and run every artefact behind the detector interface.

``detect export`` writes what :func:`export` makes; ``detect predict --backend onnxruntime|pt2|aoti`` and the API
with ``DETECT_BACKEND=...`` load it through :func:`detect.inference.load_model`, which returns an object with the
detector interface (``name``, ``class_names``, ``__call__(images, **kw) -> (detections, losses)``), so no caller
knows which runtime answers.

Decisions:

- **One model.** ``torch.export.export`` captures the detector's own modules and kernels; there is no second copy
  of the model here. For Faster R-CNN the captured entry point is :meth:`FasterRCNN.detect_padded` (backbone,
  :meth:`RegionProposalNetwork.padded_proposals`, :meth:`RoIHeads.padded_detections`, mapping back to original
  pixels), the tensor-only inference of one padded batch, which eager PyTorch runs too (the parity tests check it
  against :meth:`FasterRCNN.forward`). Its shapes are symbolic: ``Dim`` s for the batch and for the padded height
  and width (multiples of ``size_divisible``); the data-dependent sizes (kept candidates, detections) are unbacked
  sizes that the NMS operator's fake kernel and ``nonzero`` introduce. Inputs: ``images (B, 3, H, W)`` float32,
  normalised, resized and zero-padded at the bottom and right; ``image_sizes (B, 2)`` and ``original_sizes (B, 2)``
  int64 ``(h, w)``. Outputs, flat over the batch, image-major and best first: ``boxes (N, 4)`` xyxy original
  pixels, ``scores (N,)``, ``labels (N,)`` int64 1-based, ``image_index (N,)`` int64.
- **What is not captured, and why.** :meth:`FasterRCNN.forward` itself takes a list of images of any sizes and
  returns a Python list of per-image :class:`Detections`. ``torch.export`` fixes the pytree of inputs and outputs
  at export time, so a list whose length is the (dynamic) batch size cannot be a program's input or output, and
  splitting the flat results per image needs ``Tensor.tolist()`` of data-dependent counts, which dynamo cannot
  export (pytorch/pytorch#126685, open; the eager :meth:`forward_batch` does exactly that).
  So the caller's side stays in Python, shared by every runtime: resizing and grouping by padded size
  (:meth:`detect.transform.RCNNTransform.grouped`: the resized size is a float function of the input size that
  exporters trace in float32, and ONNX's Resize and torch's bilinear kernel differ in the last bits) and the split
  of the flat outputs per image. The smallest shim left is :class:`PaddedEntry`, which only makes
  ``detect_padded`` a module's ``forward`` for ``torch.export``.
- **NMS** is one custom operator, ``detect::nms_table`` (:mod:`detect.ops.nms_op`), with ONNX
  ``NonMaxSuppression``'s contract; the model calls it and its registrations are where the runtimes differ: our
  batched NMS eagerly, a fake kernel for tracing, one ``NonMaxSuppression`` node in ONNX, torchvision's ``nms`` in
  ``.pt2`` and AOTInductor artefacts (so that they load where only torch and torchvision are installed). While a
  graph is traced the box kernels take their torch path (:func:`detect.ops.dispatch.choose`); RoI Align and RoI
  Pool become ONNX ``RoiAlign``/``MaxRoiPool`` (onnxscript's torchvision translations).
- **Artefacts** (:data:`FORMATS`): ``onnx`` (``torch.onnx.export(exported_program, dynamo=True)``, the onnxscript
  exporter, opset :data:`OPSET` by default) for ONNX Runtime's CPU and CUDA execution providers; ``pt2``
  (``torch.export.save``: loads with ``torch.export.load`` and runs with torch and torchvision, no class of ours);
  ``aoti`` (``torch._inductor.aoti_compile_and_package``: the graph compiled to a shared library by Inductor, run
  by ``torch._inductor.aoti_load_package``; needs a C++ compiler at export time). TorchScript is gone.
- **Region detectors** (R-CNN, SPP-Net) export their networks only; selective search, region warping or pyramid
  pooling and the post-processing stay in Python. Two programs, exported separately from the model's own modules
  and merged into one ONNX file with two independent parts, run as two sessions: ``features`` (R-CNN: warped
  crops ``(K, 3, S, S)`` -> pooled ``(K, D)``; SPP-Net: images ``(B, 3, H, W)`` -> conv maps) and ``heads``
  (pooled ``(K, D)`` -> ``logits``, ``svm_scores``, ``deltas``). The backend is the PyTorch detector rebuilt from
  the metadata with those two modules replaced by the sessions. ``pt2``/``aoti`` hold one program, so they are
  Faster R-CNN only.
- **Metadata** (ONNX ``metadata_props``; ``detect.json`` in a ``.pt2``; the AOTInductor package's metadata):
  ``detect.detector`` (registry name), ``detect.class_names`` and ``detect.config`` (JSON),
  ``detect.preprocessing`` (JSON), ``detect.source_sha256`` (the weights file's SHA-256), ``detect.source``,
  ``detect.kind`` (``faster_rcnn`` or ``region``), ``detect.format`` and ``detect.format_version`` and, for
  quantised files, ``detect.quantization``. A file of another format version is refused
  (:class:`ExportVersionError`): export it again.
- **Atomic.** Every artefact is written into a scratch folder beside ``out`` and moved into place only when
  complete (int8 quantisation included); a failure leaves nothing at ``out``.
- **int8** (:func:`quantize`): ONNX Runtime's static quantiser, QDQ format, of the convolutions and fully
  connected layers only (never the box arithmetic or NMS): per-channel int8 weights and uint8 asymmetric
  activations (U8S8, the x86 kernels' fast path), calibrated (MinMax) on images of the shapes set. Its mAP change
  is measured by ``benchmarks/runtime.py`` and bounded by :data:`INT8_MAX_MAP_DROP`.
- **Without an exported file**, ``--backend onnxruntime`` exports the weights once into the cache
  (``$XDG_CACHE_HOME/detect/onnx/<detector>-<sha256[:16]>-v<format>.onnx``) and loads that.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from detect import weights as registered_weights
from detect.config import from_dict, to_json
from detect.detectors import DETECTORS, build
from detect.detectors.faster_rcnn import FasterRCNN, sub_batches
from detect.detectors.rcnn import RCNN
from detect.detectors.region import RegionDetector, RegionOutputs
from detect.detectors.sppnet import SPPNet
from detect.errors import ConfigError, ExportError, ExportVersionError, OpsetError, WeightsError
from detect.ops.nms_op import ONNX_TRANSLATION, torchvision_form
from detect.structures import Detections
from detect.transform import ImageBatch, RCNNTransform, as_image_list

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "INT8_MAX_MAP_DROP",
    "ExportedFasterRCNN",
    "OnnxPart",
    "cached_onnx",
    "export",
    "export_program",
    "load_exported",
    "load_onnx",
    "quantize",
    "read_metadata",
]

FORMATS = ("onnx", "pt2", "aoti")
FORMAT_VERSION = 2  # 1: the TorchScript-traced graphs (FasterRCNNGraph); 2: torch.export of the model itself
OPSET = 18
MIN_OPSET = 18  # the onnxscript exporter's translations target opset 18; older ones need a lossy down-conversion
ONNX_MISSING = "the ONNX backend needs onnxruntime, onnx and onnxscript: pip install 'detect[onnx]'"
INT8_MAX_MAP_DROP = 0.01
"""The stated accuracy cost of :func:`quantize`: VOC mAP@0.5 on the held-out shapes split drops by at most this
(``benchmarks/runtime.py`` prints it)."""
_METADATA_FILE = "detect.json"  # the metadata inside a .pt2 file (torch.export.save's extra_files)
_OUTPUTS = ["boxes", "scores", "labels", "image_index"]
_REGION_OUTPUTS = ["logits", "svm_scores", "deltas"]


# --- what torch.export captures ----------------------------------------------------------------------------


class PaddedEntry(nn.Module):
    """:meth:`FasterRCNN.detect_padded` as a module's ``forward``, the one thing ``torch.export`` needs from us
    (see the module docstring). No state of its own."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor, original_sizes: Tensor) -> tuple[Tensor, ...]:
        return self.model.detect_padded(images, image_sizes, original_sizes)


def _example_batch(model: FasterRCNN) -> tuple[Tensor, Tensor, Tensor]:
    """Two images of one padded size, in the graph's input form."""
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(300, 400, 3, generator=generator) * 255).to(torch.uint8).numpy()
    (group,) = model.transform.grouped([image, image])
    return _inputs(group.batch)


def _inputs(batch: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
    return (
        batch.tensors,
        torch.tensor(batch.image_sizes, dtype=torch.int64).reshape(-1, 2),
        torch.tensor(batch.original_sizes, dtype=torch.int64).reshape(-1, 2),
    )


def _faster_rcnn_program(model: FasterRCNN) -> torch.export.ExportedProgram:
    """``torch.export`` of :meth:`FasterRCNN.detect_padded` with a dynamic batch and padded size."""
    step = model.transform.config.size_divisible
    batch = torch.export.Dim("batch", min=1, max=1024)
    height, width = torch.export.Dim("rows", min=1, max=4096), torch.export.Dim("columns", min=1, max=4096)
    shapes = {
        "images": {0: batch, 2: step * height, 3: step * width},
        "image_sizes": {0: batch},
        "original_sizes": {0: batch},
    }
    inputs = _example_batch(model)
    with torch.no_grad():
        model.detect_padded(*inputs)  # a multi-scale RoI pooler learns its scales on its first call
        return torch.export.export(PaddedEntry(model).eval(), inputs, dynamic_shapes=shapes)


def _region_parts(model: RegionDetector) -> dict[str, tuple[nn.Module, Tensor, dict[int, Any]]]:
    """A region detector's two networks, from its own modules: name -> (module, example input, dynamic dims)."""
    regions = torch.export.Dim("regions", min=1, max=1 << 20)
    auto = torch.export.Dim.AUTO
    if isinstance(model, RCNN):
        side = model.config.crop_size
        features = nn.Sequential(model.features, model.pool5, nn.Flatten(1))
        example = torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(0))
        dims = {0: regions}
    elif isinstance(model, SPPNet):
        features = model.backbone
        example = torch.rand(2, 3, 160, 224, generator=torch.Generator().manual_seed(0))
        dims = {0: auto, 2: auto, 3: auto}
    else:
        raise ExportError(f"no export for region detector {type(model).__name__}")
    pooled = torch.zeros(3, model.heads.in_features)
    return {"features": (features.eval(), example, dims), "heads": (model.heads.eval(), pooled, {0: regions})}


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of a Faster R-CNN's inference (see the module docstring), NMS as the custom
    operator; :class:`ExportError` for a model or configuration that does not export."""
    if not isinstance(model, FasterRCNN):
        raise ExportError(f"torch.export programs are for Faster R-CNN; got {type(model).__name__}")
    try:
        return _faster_rcnn_program(model)
    except Exception as err:  # torch.export's own error types (unsupported ops, guards, data-dependent shapes)
        raise ExportError(f"torch.export cannot capture {model.name}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


# --- export ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export` wrote: the file, its format, the detector and the source weights' SHA-256."""

    path: Path
    format: str
    detector: str
    source_sha256: str
    seconds: float


def _source(weights: str | os.PathLike) -> tuple[str, str]:
    """``(name, sha256)`` of the weights: the manifest's for a registered name or listed file, else the file's."""
    try:
        entry = registered_weights.resolve(weights)
        return entry.name, entry.sha256
    except WeightsError:
        if Path(weights).is_file():
            return Path(weights).name, registered_weights.sha256_file(weights)
        raise


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """How the exported graph's inputs are made from RGB images (the ``detect.preprocessing`` metadata)."""
    if isinstance(model, FasterRCNN):
        cfg = model.transform.config
        return {
            "input": "images: float32 (B, 3, H, W), RGB / 255",
            "normalize": {"mean": list(cfg.image_mean), "std": list(cfg.image_std), "order": "before resizing"},
            "resize": {
                "short_side": cfg.min_size[-1],
                "max_long_side": cfg.max_size,
                "rule": "scale = min(short_side / min(h, w), max_long_side / max(h, w)); (int(h * scale), "
                "int(w * scale)) in float64; bilinear, align_corners=False, no antialias",
            },
            "pad": {"size_divisible": cfg.size_divisible, "where": "bottom and right, zeros after normalising"},
            "image_sizes": "int64 (B, 2): resized (h, w)",
            "original_sizes": "int64 (B, 2): (h, w) as given; output boxes are in these pixels",
        }
    cfg = model.config
    return {
        "input": "region networks only: proposals, warping or pyramid pooling, post-processing run in Python",
        "normalize": {"mean": list(cfg.image_mean), "std": list(cfg.image_std)},
    }


def metadata(model: nn.Module, source: str, sha256: str, format: str = "onnx") -> dict[str, str]:
    """The metadata of an export of ``model`` (see the module docstring)."""
    return {
        "detect.format": format,
        "detect.format_version": str(FORMAT_VERSION),
        "detect.kind": "faster_rcnn" if isinstance(model, FasterRCNN) else "region",
        "detect.detector": model.name,
        "detect.class_names": json.dumps(list(model.class_names)),
        "detect.config": to_json(_config_of(model)),
        "detect.preprocessing": json.dumps(preprocessing(model)),
        "detect.source": source,
        "detect.source_sha256": sha256,
    }


def _config_of(model: nn.Module) -> Any:
    """The frozen config a detector was built with (Faster R-CNN keeps its parts' configs on its modules)."""
    if isinstance(model, FasterRCNN):
        from detect.detectors.faster_rcnn import FasterRCNNConfig

        return FasterRCNNConfig(model.transform.config, model.rpn.config, model.roi_heads.config)
    return model.config


def check_opset(opset: int) -> int:
    """``opset`` if the installed onnx package and the exporter can write it, else :class:`OpsetError`."""
    onnx = _require("onnx")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise OpsetError(f"ONNX opset {opset!r} cannot be written here: the exporter writes opsets {MIN_OPSET} to "
                         f"{newest} (the newest the installed onnx {onnx.__version__} knows)")
    return opset


def export(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    format: str = "onnx",
    *,
    model: nn.Module | None = None,
    int8: bool = False,
    calibration_images: int = 16,
    opset: int = OPSET,
) -> ExportInfo:
    """Export the detector of ``weights`` (registered name or file) to ``out`` as ``onnx``, ``pt2`` or ``aoti``
    (see the module docstring); the file appears complete or not at all.

    ``model``: the loaded detector when the caller already has it (it must come from ``weights``). ``int8``
    (ONNX only) quantises the graph after export (:func:`quantize`) with ``calibration_images`` shapes images.
    ``opset``: the ONNX opset (:func:`check_opset`)."""
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {format!r}")
    if int8 and format != "onnx":
        raise ConfigError("--int8 applies to ONNX exports only")
    if format == "onnx":
        check_opset(opset)
        _require("onnxscript")
    start = time.perf_counter()
    source, sha256 = _source(weights)
    model = model if model is not None else registered_weights.load_detector(weights, fold_batchnorm=True)
    model = model.cpu().eval()
    if not isinstance(model, (FasterRCNN, RCNN, SPPNet)):
        raise ExportError(f"no export for {type(model).__name__}")
    if format != "onnx" and not isinstance(model, FasterRCNN):
        raise ExportError(f"{format} exports hold one program and are for Faster R-CNN; export {model.name} as onnx")
    out = Path(out)
    if format != "onnx" and out.suffix != ".pt2":
        raise ConfigError(f"a {format} export is a .pt2 archive (torch's loaders insist): name it *.pt2, "
                          f"not {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    props = metadata(model, source, sha256, format)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; the parity tests are the judge
        target = Path(scratch) / ("model.onnx" if format == "onnx" else "model.pt2")  # AOTInductor wants .pt2
        if format == "onnx":
            _export_onnx(model, target, props, opset)
            if int8:
                quantize(target, target, calibration_images=calibration_images)
        else:
            _export_torch(model, target, props, format)
        os.replace(target, out)
    return ExportInfo(out, format, model.name, sha256, time.perf_counter() - start)


def _export_onnx(model: nn.Module, path: Path, props: Mapping[str, str], opset: int) -> None:
    """The ONNX file of ``model`` at ``path`` with ``props`` as its metadata."""
    onnx = _require("onnx")
    if isinstance(model, FasterRCNN):
        proto = _onnx_of(export_program(model), ["images", "image_sizes", "original_sizes"], _OUTPUTS, opset)
    else:
        parts = []
        for name, (module, example, dims) in _region_parts(model).items():
            names = (["inputs"], ["features"]) if name == "features" else (["pooled"], _REGION_OUTPUTS)
            try:
                with torch.no_grad():
                    program = torch.export.export(module, (example,), dynamic_shapes=({**dims},))
            except Exception as err:
                raise ExportError(f"torch.export cannot capture {model.name}'s {name}: {_first_line(err)}") from err
            part = _onnx_of(program, *names, opset)
            parts.append(onnx.compose.add_prefix(part, f"{name}/", rename_inputs=False, rename_outputs=False))
        proto = onnx.compose.merge_models(parts[0], parts[1], io_map=[])
    _set_metadata(proto, props)
    onnx.save(proto, str(path))


def _onnx_of(program: torch.export.ExportedProgram, inputs: list[str], outputs: list[str], opset: int) -> Any:
    """The onnxscript exporter's ModelProto of ``program``; :class:`ExportError` when it fails."""
    quiet = logging.getLogger("onnx_ir")  # warns about every empty attribute list the translations write
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(
            program, (), input_names=inputs, output_names=outputs, opset_version=opset, dynamo=True,
            custom_translation_table=ONNX_TRANSLATION, optimize=True, verbose=False,
        )
        return onnx_program.model_proto
    except Exception as err:
        raise ExportError(f"the ONNX exporter failed: {_first_line(err)}") from err
    finally:
        quiet.setLevel(level)


def _export_torch(model: FasterRCNN, path: Path, props: Mapping[str, str], format: str) -> None:
    """A ``.pt2`` program or an AOTInductor package of ``model``, NMS as torchvision ops."""
    with torchvision_form():
        program = export_program(model)
    if format == "pt2":
        torch.export.save(program, str(path), extra_files={_METADATA_FILE: json.dumps(dict(props))})
        return
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": dict(props)}
        )
    except Exception as err:  # no C++ compiler, an op Inductor cannot lower
        raise ExportError(f"AOTInductor could not compile {model.name}: {_first_line(err)}") from err


def _set_metadata(proto: Any, props: Mapping[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value


def _check_props(path: str | os.PathLike, props: Mapping[str, str], kind: str) -> dict[str, str]:
    """``props`` when they are this format version's detect metadata, else a clear error."""
    if "detect.detector" not in props:
        raise WeightsError(f"{path}: a{'n' if kind == 'ONNX' else ''} {kind} file without detect metadata; "
                           f"export it with `detect export`")
    if props.get("detect.format_version") != str(FORMAT_VERSION):
        raise ExportVersionError(f"{path}: export format {props.get('detect.format_version')} is not "
                                 f"{FORMAT_VERSION}; export it again with this version of detect")
    if props["detect.detector"] not in DETECTORS:
        raise WeightsError(f"{path}: unknown detector {props['detect.detector']!r}")
    return dict(props)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``detect.*`` metadata of an exported ONNX file; :class:`WeightsError` when it has none,
    :class:`ExportVersionError` when it is from another format version."""
    onnx = _require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # a truncated or foreign file: onnx raises its own DecodeError types
        raise WeightsError(f"{path}: not a readable ONNX file ({_first_line(err)[:200]})") from err
    return _check_props(path, {p.key: p.value for p in proto.metadata_props}, "ONNX")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(ONNX_MISSING) from None


# --- int8 ------------------------------------------------------------------------------------------------


def calibration_batches(path: str | os.PathLike, count: int, seed: int = 1234) -> list[dict[str, np.ndarray]]:
    """Graph inputs for ``count`` images of the shapes set (a seed apart from the training and held-out ones)."""
    from detect.data.shapes import ShapesConfig, ShapesDataset

    props = read_metadata(path)
    if props["detect.kind"] != "faster_rcnn":
        raise ConfigError("int8 quantisation is for Faster R-CNN exports (the region detectors' graphs are parts)")
    config = from_dict(type(DETECTORS[props["detect.detector"]].default_config), json.loads(props["detect.config"]))
    transform = RCNNTransform(config.transform).eval()
    dataset = ShapesDataset(ShapesConfig(num_images=count, image_size=160, image_size_max=320, seed=seed))
    feeds = []
    for index in range(count):
        image = dataset[index][0]
        for group in transform.grouped([np.asarray(image)]):
            feeds.append(_feeds(group.batch))
    return feeds


def quantize(source: str | os.PathLike, out: str | os.PathLike, *, calibration_images: int = 16) -> Path:
    """Static int8 quantisation of an exported Faster R-CNN ONNX file (see the module docstring); the metadata is
    kept, with ``detect.quantization`` added. ``out`` may be ``source``."""
    _require("onnxruntime")
    onnx = _require("onnx")
    from onnxruntime import quantization as q

    props = read_metadata(source)
    feeds = calibration_batches(source, calibration_images)

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        target = Path(scratch) / "int8.onnx"
        q.quantize_static(
            str(source), str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"], activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(target))
        _set_metadata(proto, {**props, "detect.quantization": json.dumps(
            {"method": "static QDQ, uint8 activations, per-channel int8 weights, MinMax", "calibration_images": calibration_images,
             "calibration_set": "shapes seed 1234", "ops": ["Conv", "Gemm", "MatMul"]})})
        onnx.save(proto, str(target))
        os.replace(target, out)
    return out


# --- running exported files with ONNX Runtime ------------------------------------------------------------------


def _session(model: bytes | str, device: str | torch.device) -> Any:
    """An ONNX Runtime session on ``device`` (``cpu``, or ``cuda[:N]`` with the CUDA provider) that uses as many
    intra-op threads as torch does (the service's ``torch_threads`` knob sizes both), full graph optimisation, and
    worker threads that sleep between calls: ORT's default spin-wait keeps its threads busy after each run, which on
    a small machine takes the cores from whatever runs next in the process (torch, decoding, the next request)."""
    ort = _require("onnxruntime")
    device = torch.device(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if device.type == "cpu":
        providers: list[Any] = ["CPUExecutionProvider"]
    elif device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        raise ConfigError(f"onnxruntime cannot use device {str(device)!r} here (providers: "
                          f"{', '.join(ort.get_available_providers())})")
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as err:  # ORT's own exception types: a broken or foreign graph
        raise WeightsError(f"onnxruntime cannot load the model: {str(err).splitlines()[0][:200]}") from err


def _run(session: Any, outputs: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` with ORT's failures as ``RuntimeError`` (what :func:`detect.inference.forward_batch` retries
    image by image, as it does for torch's)."""
    try:
        return session.run(outputs, dict(feeds))
    except Exception as err:
        raise RuntimeError(f"onnxruntime: {str(err).splitlines()[0]}") from err


def _feeds(batch: Any) -> dict[str, np.ndarray]:
    images, image_sizes, original_sizes = _inputs(batch)
    return {"images": images.numpy(), "image_sizes": image_sizes.numpy(), "original_sizes": original_sizes.numpy()}


Runner = Callable[[ImageBatch], Sequence[Any]]
"""One padded batch -> the exported graph's four outputs (tensors or arrays)."""


def onnx_runner(session: Any) -> Runner:
    return lambda batch: _run(session, None, _feeds(batch))


def torch_runner(module: Callable[..., Any], device: torch.device) -> Runner:
    """A ``.pt2`` program's module or an AOTInductor model, fed tensors on ``device``."""

    def run(batch: ImageBatch) -> Sequence[Any]:
        inputs = [t.to(device) for t in _inputs(batch)]
        try:
            with torch.inference_mode():
                return [t.cpu() for t in module(*inputs)]
        except (RuntimeError, ValueError, AssertionError) as err:  # as _run: what forward_batch retries alone
            raise RuntimeError(f"exported program: {_first_line(err)}") from err

    return run


class ExportedFasterRCNN:
    """An exported Faster R-CNN behind the detector interface: preprocessing and grouping by padded size as
    :class:`FasterRCNN` does (:mod:`detect.transform`), one call of the exported graph per group (ONNX Runtime,
    a ``.pt2`` program or an AOTInductor package: ``runner``), the flat outputs split per image.

    On a CPU (``device``), each image is its own call, as eager PyTorch runs it (:mod:`detect.detectors.faster_rcnn`):
    an image's detections then depend on the image alone, and the batch costs what its images cost. As one call
    of 8, the bundled tiny model ran at 0.87x eager PyTorch's images/s while its batch-1 latency was faster than
    eager's (``benchmarks/runtime.py``, a loaded machine); one image a call, batch 8 ran at 1.27x, later 1.39x
    (quiet machine; batch 1 1.21x, later 1.33x)."""

    proposal_methods = ("rpn",)

    def __init__(self, runner: Runner, props: Mapping[str, str], backend: str = "onnxruntime",
                 device: str | torch.device = "cpu") -> None:
        self.runner = runner
        self.backend = backend
        self.device = torch.device(device)
        self.metadata = dict(props)
        self.name = props["detect.detector"]
        self.class_names = tuple(json.loads(props["detect.class_names"]))
        config = from_dict(type(DETECTORS[self.name].default_config), json.loads(props["detect.config"]))
        self.config = config
        self.transform = RCNNTransform(config.transform).eval()
        self.version = props["detect.source_sha256"][:12]

    def __call__(self, images: Any, targets: Any = None, **kwargs: Any) -> tuple[list[Detections], dict[str, Tensor]]:
        if targets is not None:
            raise ConfigError(f"the {self.backend} backend runs inference only (no targets, no losses)")
        if kwargs.get("proposals") is not None:
            raise ValueError("Faster R-CNN proposes its own regions (rpn); it takes no proposals")
        groups = self.transform.grouped(as_image_list(images), device="cpu")
        if self.device.type == "cpu":  # one image a call (see the class docstring)
            groups = [part for group in groups for part in sub_batches(group, 1)]
        results: list[Detections | None] = [None] * sum(len(g.indices) for g in groups)
        for group in groups:
            boxes, scores, labels, image = (torch.as_tensor(np.ascontiguousarray(a)) for a in self.runner(group.batch))
            counts = torch.bincount(image, minlength=len(group.indices)).tolist()
            parts = zip(boxes.split(counts), scores.split(counts), labels.split(counts))
            for index, (b, s, l), size in zip(group.indices, parts, group.batch.original_sizes):
                results[index] = Detections(b, s, l.to(torch.int64), size)
        return results, {}

    forward = __call__
    training = False

    def eval(self) -> "ExportedFasterRCNN":
        """Already inference-only (``nn.Module``'s call, for callers that make sure)."""
        return self

    def train(self, mode: bool = True) -> "ExportedFasterRCNN":
        if mode:
            raise ConfigError(f"a {self.backend} model cannot train; train the PyTorch weights and export again")
        return self


OnnxFasterRCNN = ExportedFasterRCNN  # the name callers knew


class OnnxPart(nn.Module):
    """One part of a region detector's exported graph run by ONNX Runtime, standing in for the PyTorch module.

    ``heads`` parts return :class:`RegionOutputs` and carry ``in_features`` and ``num_classes`` as
    :class:`detect.detectors.region.RegionHeads` does. A region detector reads its device from its parameters, so
    the part holds one empty parameter on the CPU (the only device its outputs live on)."""

    def __init__(self, session: Any, input_name: str, outputs: Sequence[str], **attributes: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = input_name
        self.outputs = list(outputs)
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        for key, value in attributes.items():
            setattr(self, key, value)

    def forward(self, inputs: Tensor) -> Tensor | RegionOutputs:
        feed = {self.input_name: inputs.detach().to("cpu", torch.float32).contiguous().numpy()}
        results = [torch.from_numpy(a) for a in _run(self.session, self.outputs, feed)]
        return results[0] if len(results) == 1 else RegionOutputs(*results)


def _region_detector(proto: Any, props: Mapping[str, str], device: str | torch.device) -> RegionDetector:
    """The PyTorch region detector of ``props`` with its ``features`` and ``heads`` networks run by sessions of the
    two parts of ``proto``."""
    onnx = _require("onnx")
    from onnx.utils import Extractor

    name = props["detect.detector"]
    config = from_dict(type(DETECTORS[name].default_config), json.loads(props["detect.config"]))
    detector = build(name, json.loads(props["detect.class_names"]), config).eval()
    extractor = Extractor(proto)

    def part(inputs: list[str], outputs: list[str]) -> Any:
        sub = extractor.extract_model(inputs, outputs)
        return _session(sub.SerializeToString(), device)

    features = OnnxPart(part(["inputs"], ["features"]), "inputs", ["features"])
    heads = OnnxPart(
        part(["pooled"], ["logits", "svm_scores", "deltas"]), "pooled", ["logits", "svm_scores", "deltas"],
        in_features=detector.heads.in_features, num_classes=detector.heads.num_classes,
    )
    if isinstance(detector, RCNN):
        detector.features, detector.pool5 = features, nn.Identity()
    else:
        detector.backbone = features
    detector.heads = heads
    detector.metadata = dict(props)
    detector.version = props["detect.source_sha256"][:12]
    del onnx
    return detector


def load_onnx(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The detector of an exported ONNX file, run by ONNX Runtime (see the module docstring)."""
    onnx = _require("onnx")
    _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX file not found: {path}")
    props = read_metadata(path)
    if props["detect.kind"] == "faster_rcnn":
        return ExportedFasterRCNN(onnx_runner(_session(str(path), device)), props, device=device)
    return _region_detector(onnx.load(str(path)), props, device)


def read_pt2_metadata(path: str | os.PathLike, backend: str) -> dict[str, str]:
    """The detect metadata of a ``.pt2`` program (``backend`` ``pt2``) or AOTInductor package (``aoti``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{backend} file not found: {path}")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: not a .pt2 archive")
    if backend == "pt2":
        extra = {_METADATA_FILE: ""}
        try:
            program = torch.export.load(str(path), extra_files=extra)
        except Exception as err:  # an AOTInductor package, another torch's serialisation, a damaged archive
            raise WeightsError(f"{path}: not a torch.export program this torch can load ({_first_line(err)})") from err
        try:
            props = json.loads(extra[_METADATA_FILE] or "{}")
        except json.JSONDecodeError:
            props = {}
        return _check_props(path, props, "pt2") | {"_program": program}
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
        props = dict(compiled.get_metadata())
    except Exception as err:
        raise WeightsError(f"{path}: not an AOTInductor package this torch can load ({_first_line(err)})") from err
    return _check_props(path, props, "AOTInductor") | {"_program": compiled}


def load_exported(path: str | os.PathLike, backend: str, device: str | torch.device = "cpu") -> ExportedFasterRCNN:
    """The detector of a ``.pt2`` program (``backend="pt2"``, run by ``ExportedProgram.module()``) or an
    AOTInductor package (``backend="aoti"``), behind the detector interface. Only torch and torchvision run the
    graph (the NMS inside is torchvision's)."""
    props = read_pt2_metadata(path, backend)
    program = props.pop("_program")
    if props.get("detect.format") != backend:
        raise WeightsError(f"{path}: a {props.get('detect.format')} export; load it with that backend")
    device = torch.device(device)
    if backend == "pt2":
        module = program.module().to(device)
    else:
        if device.type != "cpu":
            raise ConfigError(f"this AOTInductor package was compiled for the CPU, not {device}")
        module = program
    return ExportedFasterRCNN(torch_runner(module, device), props, backend, device)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "detect" / "onnx"


def cached_onnx(weights: str | os.PathLike) -> Path:
    """An ONNX export of ``weights`` from the cache, made on first use (keyed by the weights' SHA-256)."""
    _require("onnx")
    detector, sha256 = _builder_and_sha(weights)
    path = cache_dir() / f"{detector}-{sha256[:16]}-v{FORMAT_VERSION}.onnx"
    if not path.is_file():
        export(weights, path, "onnx")
    return path


def _builder_and_sha(weights: str | os.PathLike) -> tuple[str, str]:
    try:
        entry = registered_weights.resolve(weights)
        return entry.architecture["builder"], entry.sha256
    except WeightsError:
        if not Path(weights).is_file():
            raise
        return registered_weights.saved_architecture(weights)[0], registered_weights.sha256_file(weights)
