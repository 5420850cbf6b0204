"""Weights files and their manifest: list, resolve, verify, load, save, import and download detectors.

A weights folder holds ``*.safetensors`` files and ONE ``manifest.json``::

    {"format": 1, "models": {"<name>": {"name", "file", "architecture": {"builder", "config", ...},
                                       "class_names", "sha256", "size_bytes", "recipe", "training_time_s",
                                       "metrics", "source"}}}

Decisions:
- **Search path.** A name is looked up in the folders of ``DETECT_WEIGHTS_DIR`` (``os.pathsep``-separated), then
  the user folder (``$XDG_DATA_HOME/detect/weights``, default ``~/.local/share/detect/weights``; where ``import``
  and ``pull`` write unless told otherwise), then the bundled ``weights/`` of a source checkout. The first folder
  that has a name wins. A path to a ``.safetensors`` file is resolved through the manifest beside it.
- **Rebuild from the manifest alone.** ``architecture["builder"]`` is a detector name of the registry
  (:data:`detect.detectors.DETECTORS`) and ``architecture["config"]`` its frozen config dataclass as a dict; the
  state dict is then loaded strictly (every key and shape). Frozen BN ``eps`` travels as ``architecture["frozen_bn_eps"]``. The safetensors metadata repeats
  name, class names, config and eps, so a file still loads with :func:`load_detector` away from its manifest.
- **Integrity.** Loading always verifies the SHA-256 (streamed, 1 MiB at a time) first: a mismatch is a
  :class:`ChecksumError`. The weights file and then the manifest are each written to a temporary file and renamed
  into place; manifest updates hold an exclusive ``flock`` on ``manifest.json.lock`` so concurrent saves into one
  folder do not lose entries.
- **Untrusted checkpoints.** A ``.pth`` is only ever read with ``torch.load(weights_only=True)``
  (:func:`detect.backbones.read_state_dict`); it must be a Faster R-CNN ResNet-50-FPN state dict (old flat key names
  are renamed), checked key by key against the builder. It is converted once to safetensors; nothing is unpickled
  afterwards.
- **Downloads.** :data:`OFFICIAL_CHECKPOINTS` lists torchvision's published files. Their names carry the first hex
  digits of the file's SHA-256 (``...-258fb6c6.pth``), which is checked after a download with a timeout into a
  temporary file. A machine without network gets a :class:`NoNetworkError` saying what to do instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detect import bundled
from detect import detectors
from detect.backbones import fold_frozen_batchnorm, read_state_dict
from detect.config import from_dict, to_json
from detect.detectors.faster_rcnn import FasterRCNNConfig
from detect.errors import ChecksumError, ConfigError, NoNetworkError, WeightsError
from detect.io import atomic_write

__all__ = [
    "ChecksumError",
    "NoNetworkError",
    "WeightsEntry",
    "OfficialCheckpoint",
    "OFFICIAL_CHECKPOINTS",
    "ENV_VAR",
    "MANIFEST",
    "BUNDLED_DIR",
    "weights_dirs",
    "user_weights_dir",
    "load_manifest",
    "list_weights",
    "resolve",
    "verify",
    "sha256_file",
    "load_detector",
    "save_detector",
    "saved_architecture",
    "version",
    "write_detector",
    "import_torchvision_checkpoint",
    "pull",
]

ENV_VAR = "DETECT_WEIGHTS_DIR"
MANIFEST = "manifest.json"
BUNDLED_DIR = bundled.weights_dir()  # the checkout's weights/, or the wheel's copy (detect.bundled)
_FORMAT = 1
_CHUNK = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
FROZEN_BN_EPS_KEY = "frozen_bn_eps"  # safetensors metadata: the frozen-BN eps the weights were trained with



@dataclass(frozen=True)
class WeightsEntry:
    """One manifest entry; ``directory`` is the folder of the manifest (not stored in it)."""

    name: str
    file: str
    architecture: dict[str, Any]
    class_names: tuple[str, ...]
    sha256: str
    size_bytes: int
    recipe: dict[str, Any] = field(default_factory=dict)
    training_time_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    directory: Path = Path(".")

    @property
    def path(self) -> Path:
        return self.directory / self.file

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["directory"]
        data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_json(cls, data: Any, directory: Path) -> "WeightsEntry":
        manifest = directory / MANIFEST
        names = {f.name for f in dataclasses.fields(cls)} - {"directory"}
        required = {"name", "file", "architecture", "class_names", "sha256", "size_bytes"}
        if not isinstance(data, dict) or not required <= set(data) or not set(data) <= names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise WeightsError(f"{manifest}: an entry needs the fields {sorted(required)} (and only {sorted(names)}), "
                               f"got {got}")
        entry = cls(**{**data, "class_names": tuple(data["class_names"]), "directory": directory})
        architecture = entry.architecture if isinstance(entry.architecture, dict) else {}
        if Path(entry.file).name != entry.file or not isinstance(architecture.get("builder"), str):
            raise WeightsError(f"{manifest}: entry {entry.name!r} needs a plain file name and an architecture builder")
        return entry


# --- finding weights ---------------------------------------------------------------------------------------
def user_weights_dir() -> Path:
    """Where ``import`` and ``pull`` write by default: ``$XDG_DATA_HOME/detect/weights``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "detect" / "weights"


def weights_dirs() -> list[Path]:
    """The search path: ``DETECT_WEIGHTS_DIR`` folders, the user folder, the bundled folder."""
    extra = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*extra, user_weights_dir(), BUNDLED_DIR]


def load_manifest(directory: str | os.PathLike) -> dict[str, WeightsEntry]:
    """Name -> entry of ``directory/manifest.json``; empty when the folder has no manifest."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: unreadable manifest ({err})") from err
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, dict) or document.get("format") != _FORMAT:
        raise WeightsError(f"{path}: expected {{'format': {_FORMAT}, 'models': {{...}}}}")
    entries = {name: WeightsEntry.from_json(data, directory) for name, data in models.items()}
    mismatched = [name for name, entry in entries.items() if entry.name != name]
    if mismatched:
        raise WeightsError(f"{path}: entries {mismatched} are filed under another name than their own")
    return entries


def list_weights(dirs: Sequence[str | os.PathLike] | None = None) -> list[WeightsEntry]:
    """Every entry on the search path (default :func:`weights_dirs`), the first folder winning a name."""
    found: dict[str, WeightsEntry] = {}
    for directory in weights_dirs() if dirs is None else dirs:
        for name, entry in load_manifest(directory).items():
            found.setdefault(name, entry)
    return list(found.values())


def resolve(name_or_path: str | os.PathLike, dirs: Sequence[str | os.PathLike] | None = None) -> WeightsEntry:
    """The entry of a registered name, or of a ``.safetensors`` path listed in the manifest beside it."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        for entry in load_manifest(path.parent).values():
            if entry.file == path.name:
                return entry
        raise WeightsError(f"{path} is not listed in {path.parent / MANIFEST}; save it with save_detector or "
                           f"register a checkpoint with `detect weights import`")
    entries = {entry.name: entry for entry in list_weights(dirs)}
    if str(name_or_path) not in entries:
        where = ", ".join(str(d) for d in (weights_dirs() if dirs is None else dirs))
        known = ", ".join(sorted(entries)) or "none"
        raise WeightsError(f"no weights named {str(name_or_path)!r} in {where} (available: {known})")
    return entries[str(name_or_path)]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def version(name_or_path: str | os.PathLike) -> str:
    """A model's version: the first 12 hex digits of its weights' SHA-256 (the manifest's for a registered name
    or a listed file, else the file's own)."""
    path = Path(name_or_path)
    if path.is_file() and not any(e.file == path.name for e in load_manifest(path.parent).values()):
        return sha256_file(path)[:12]
    return resolve(name_or_path).sha256[:12]


def verify(entry: WeightsEntry) -> None:
    """Raise :class:`WeightsError` when the file is missing, :class:`ChecksumError` when its hash differs."""
    if not entry.path.is_file():
        raise WeightsError(f"weights file of {entry.name!r} not found: {entry.path}")
    actual = sha256_file(entry.path)
    if actual != entry.sha256:
        raise ChecksumError(
            f"{entry.path}: sha256 {actual} differs from the manifest's {entry.sha256} (corrupt or replaced file; "
            f"download or train it again)",
            name=entry.name,
        )


# --- loading and saving ------------------------------------------------------------------------------------
def load_detector(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dirs: Sequence[str | os.PathLike] | None = None,
    *,
    fold_batchnorm: bool = False,
    class_names: Sequence[str] | None = None,
    architecture: str | None = None,
    config: Any = None,
    frozen_bn_eps: float | None = None,
) -> nn.Module:
    """A detector in eval mode on ``device``: the one way to load a detector from a file or a registered name.

    ``name_or_path`` is, in the order tried:

    1. a registered name, or a ``.safetensors`` file listed in the ``manifest.json`` beside it: rebuilt from the
       manifest entry's architecture after its sha256 is verified;
    2. a ``.safetensors`` file whose metadata names its detector (what :func:`write_detector` writes, e.g. a
       ``detect train`` run's ``model.safetensors``): rebuilt from that metadata;
    3. a torchvision Faster R-CNN checkpoint (``.pth`` read with ``weights_only=True``, or a bare ``.safetensors``
       state dict): ``architecture`` (a Faster R-CNN name of :data:`detect.detectors.DETECTORS`) is inferred from
       the keys when omitted, the class count from the classifier's shape, ``class_names`` default COCO's for 91
       classes, else ``class_k``; ``config`` and ``frozen_bn_eps`` (default 0.0, as in torchvision's COCO
       checkpoints) may be given.

    Every key and shape is checked, and tensors that are not finite (NaN or infinite) are refused: both are
    :class:`WeightsError`. ``fold_batchnorm`` folds frozen BatchNorm into the convolutions
    (:func:`detect.backbones.fold_frozen_batchnorm`), for inference only: faster, equal up to float rounding, but
    the state dict loses the BN keys. A device torch cannot use is a :class:`ConfigError`.
    """
    path = Path(name_or_path)
    listed = path.is_file() and any(e.file == path.name for e in load_manifest(path.parent).values())
    if listed or not path.is_file():
        entry = resolve(name_or_path, dirs)
        verify(entry)
        model = _load_state(_build(entry), entry.path, entry.architecture.get("frozen_bn_eps"))
    elif (metadata := _metadata(path)).get("detector"):
        name, names, stored = saved_architecture(path)
        model = _load_state(detectors.build(name, names, stored), path, _stored_eps(metadata, path))
    else:
        model = _torchvision_checkpoint(path, architecture, class_names, config, frozen_bn_eps)
    if fold_batchnorm:
        fold_frozen_batchnorm(model)
    try:
        return model.to(torch.device(device)).eval()
    except (RuntimeError, AssertionError) as err:  # e.g. "cuda" on a machine without CUDA
        raise ConfigError(f"cannot use device {device!r}: {str(err).splitlines()[0]}") from err


def _load_state(model: nn.Module, path: Path, eps: float | None) -> nn.Module:
    """``model`` with the tensors of ``path`` (every key and shape checked, all finite) and frozen-BN ``eps``."""
    state = upgrade_legacy_keys(read_state_dict(path))
    check_state_dict(model, state, path)
    if bad := [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]:
        raise WeightsError(f"{path}: tensors with NaN or infinite values ({', '.join(bad[:3])}): a broken file")
    model.load_state_dict(state, strict=True)
    if eps is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = float(eps)
    return model


def _build(entry: WeightsEntry) -> nn.Module:
    """A randomly initialised detector of a manifest entry's architecture."""
    builder = entry.architecture["builder"]
    if builder not in detectors.DETECTORS:
        raise WeightsError(f"{entry.directory / MANIFEST}: {entry.name!r}: unknown or inconsistent builder {builder!r}")
    try:
        detector = detectors.entry(builder)
        config = from_dict(type(detector.default_config), entry.architecture.get("config", {}))
        return detector.build(entry.class_names, config)
    except (ConfigError, TypeError, ValueError) as err:
        raise WeightsError(f"{entry.directory / MANIFEST}: {entry.name!r}: bad architecture {builder!r} ({err})") from err


def _torchvision_checkpoint(
    path: Path, architecture: str | None, class_names: Sequence[str] | None, config: Any, eps: float | None
) -> nn.Module:
    """A Faster R-CNN from a torchvision checkpoint (see :func:`load_detector`, case 3)."""
    state = upgrade_legacy_keys(read_state_dict(path))
    architecture = architecture or infer_architecture(state, path)
    known = [e.name for e in detectors.DETECTORS.values() if e.family == "faster_rcnn"]
    if architecture not in known:
        raise WeightsError(f"unknown Faster R-CNN architecture {architecture!r}; known: {sorted(known)}")
    classifier = state.get("roi_heads.box_predictor.cls_score.weight")
    if classifier is None or classifier.ndim != 2:
        raise WeightsError(f"{path} has no 2-D roi_heads.box_predictor.cls_score.weight")
    extra = {} if config is None else {"config": config}
    model = detectors.DETECTORS[architecture](int(classifier.shape[0]), class_names=class_names, **extra)
    if eps is None:  # a safetensors file may say which eps it was trained with; torchvision's COCO files use 0
        eps = _stored_eps(_metadata(path), path)
    return _load_state(model, path, eps if eps is not None else 0.0)


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of ``path`` (empty for other files)."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError) as err:
        raise WeightsError(f"cannot read weights from {path}: {err}") from err


def _stored_eps(metadata: Mapping[str, str], path: Path) -> float | None:
    value = metadata.get(FROZEN_BN_EPS_KEY)
    try:
        return None if value is None else float(value)
    except ValueError as err:
        raise WeightsError(f"{path}: metadata {FROZEN_BN_EPS_KEY}={value!r} is not a number") from err


def saved_architecture(path: str | os.PathLike) -> tuple[str, list[str], Any]:
    """``(detector name, class names, config)`` from the metadata of a :func:`write_detector` file."""
    metadata = _metadata(Path(path))
    try:
        name = metadata["detector"]
        config = from_dict(type(detectors.entry(name).default_config), json.loads(metadata["config"]))
        return name, list(json.loads(metadata["class_names"])), config
    except (KeyError, ValueError, TypeError, ConfigError) as err:
        raise WeightsError(f"{path} lacks a valid detector name, class list or config in its metadata: {err}") from err


def upgrade_legacy_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the flat keys of old torchvision checkpoints to today's names, as torchvision's own load hooks do:
    the RPN head's single conv (``rpn.head.conv.weight`` -> ``rpn.head.conv.0.0.weight``) and the FPN's blocks
    (``backbone.fpn.inner_blocks.0.weight`` -> ``backbone.fpn.inner_blocks.0.0.weight``, ``layer_blocks`` too);
    frozen BN's ``num_batches_tracked`` counters (meaningless when frozen) are dropped."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if key.startswith("rpn.head.conv.") and len(parts) == 4:
            key = f"rpn.head.conv.0.0.{parts[-1]}"
        elif key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")) and len(parts) == 5:
            key = ".".join(parts[:4] + ["0", parts[4]])
        renamed[key] = value
    return renamed


def infer_architecture(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """The Faster R-CNN detector name whose model has ``state``'s telltale keys."""
    if "backbone.fpn.inner_blocks.0.0.weight" in state and "backbone.body.layer1.0.conv3.weight" in state:
        return "fasterrcnn_resnet50_fpn"
    if "backbone.body.28.weight" in state and "roi_heads.box_head.fc6.weight" in state:
        return "fasterrcnn_vgg16"
    raise WeightsError(
        f"cannot tell which Faster R-CNN {path} holds; pass architecture= fasterrcnn_resnet50_fpn or fasterrcnn_vgg16"
    )


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Raise :class:`WeightsError` listing missing and unexpected keys and wrong shapes, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if items
    ]
    if problems:
        raise WeightsError(f"{path} does not fit {getattr(model, 'name', 'the model')}: " + "; ".join(problems))


def _frozen_bn_eps(model: nn.Module) -> float | None:
    return next((float(m.eps) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)), None)


def _detector_file(detector: nn.Module, config: Any) -> tuple[bytes, dict[str, Any]]:
    """The safetensors bytes of ``detector`` (metadata: detector name, class names, config, frozen-BN eps) and
    its manifest architecture."""
    config = config if config is not None else getattr(detector, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"{type(detector).__name__} keeps no config: pass config= (the one it was built with)")
    architecture: dict[str, Any] = {"builder": detector.name, "config": json.loads(to_json(config))}
    metadata = {"detector": detector.name, "class_names": json.dumps(list(detector.class_names)), "config": to_json(config)}
    if (eps := _frozen_bn_eps(detector)) is not None:
        architecture["frozen_bn_eps"] = eps
        metadata[FROZEN_BN_EPS_KEY] = repr(eps)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in detector.state_dict().items()}
    return safetensors_bytes(tensors, metadata=metadata), architecture


def write_detector(detector: nn.Module, path: str | os.PathLike, config: Any = None) -> str:
    """Write ``detector``'s state dict to ``path`` (``.safetensors``, atomically) with the metadata that
    :func:`load_detector` rebuilds it from; no manifest entry (see :func:`save_detector`). ``config``: the frozen
    config dataclass it was built with (default ``detector.config``). Returns the file's sha256."""
    data, _ = _detector_file(detector, config)
    atomic_write(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def save_detector(
    detector: nn.Module,
    path: str | os.PathLike,
    *,
    name: str,
    config: Any = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_time_s: float | None = None,
    source: str = "trained with detect",
) -> WeightsEntry:
    """Write ``detector`` to ``path`` (see :func:`write_detector`) and its entry into the manifest beside it,
    replacing an entry of the same name. Returns the new entry."""
    path = Path(path)
    if path.suffix != ".safetensors" or not _NAME.match(name):
        raise ConfigError(f"save to a .safetensors path under a plain name, got {path} and {name!r}")
    data, architecture = _detector_file(detector, config)
    atomic_write(path, data)
    entry = WeightsEntry(
        name=name,
        file=path.name,
        architecture=architecture,
        class_names=tuple(detector.class_names),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        recipe=dict(recipe or {}),
        training_time_s=training_time_s,
        metrics=dict(metrics or {}),
        source=source,
        directory=path.parent,
    )
    with _manifest_lock(path.parent):
        entries = load_manifest(path.parent)
        entries[name] = entry
        document = {"format": _FORMAT, "models": {k: entries[k].to_json() for k in sorted(entries)}}
        atomic_write(path.parent / MANIFEST, (json.dumps(document, indent=2) + "\n").encode())
    return entry


@contextlib.contextmanager
def _manifest_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{MANIFEST}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- torchvision checkpoints -------------------------------------------------------------------------------
def import_torchvision_checkpoint(
    path: str | os.PathLike,
    name: str,
    *,
    directory: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    source: str | None = None,
) -> WeightsEntry:
    """Register a torchvision Faster R-CNN ResNet-50-FPN checkpoint as ``<directory>/<name>.safetensors``.

    The file is read with ``weights_only=True`` and checked key by key and shape by shape against
    :func:`~detect.detectors.faster_rcnn.fasterrcnn_resnet50_fpn` (old flat keys renamed) before anything is
    written. Class names: ``class_names``, else COCO's for a 91-class checkpoint, else ``class_k``. ``directory``
    defaults to the first ``DETECT_WEIGHTS_DIR`` folder, else the user folder.
    """
    path = Path(path)
    model = _torchvision_checkpoint(path, "fasterrcnn_resnet50_fpn", class_names, None, None)
    target = Path(directory) if directory is not None else weights_dirs()[0]
    return save_detector(
        model,
        target / f"{name}.safetensors",
        name=name,
        config=FasterRCNNConfig(),
        recipe={"imported_from": path.name},
        source=source or f"torchvision checkpoint {path.name}",
    )


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A torchvision checkpoint URL whose file name ends in ``-<first hex digits of its sha256>.pth``."""

    url: str

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        match = re.search(r"-([0-9a-f]{8,64})\.pth$", self.file_name)
        if match is None:
            raise ConfigError(f"{self.url}: the file name carries no sha256 prefix")
        return match.group(1)


OFFICIAL_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "fasterrcnn_resnet50_fpn_coco": OfficialCheckpoint(
        "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    ),
}
"""Checkpoints ``pull`` knows, by the name they are registered under (architectures our builders rebuild)."""


def pull(name: str, *, directory: str | os.PathLike | None = None, timeout: float = 30.0) -> WeightsEntry:
    """Download an official checkpoint, check its sha256 prefix and register it (:func:`import_torchvision_checkpoint`).

    ``timeout`` bounds each network wait (connect and every read), not the whole download.
    """
    if name not in OFFICIAL_CHECKPOINTS:
        raise WeightsError(f"no official checkpoint {name!r}; known: {', '.join(sorted(OFFICIAL_CHECKPOINTS))}")
    checkpoint = OFFICIAL_CHECKPOINTS[name]
    target = Path(directory) if directory is not None else weights_dirs()[0]
    target.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{checkpoint.file_name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(checkpoint.url, out, timeout)
        if not digest.startswith(checkpoint.sha256_prefix):
            raise ChecksumError(
                f"{checkpoint.url}: downloaded sha256 {digest} does not start with {checkpoint.sha256_prefix} "
                f"(corrupt download or a changed file)"
            )
        return import_torchvision_checkpoint(tmp, name, directory=target, source=checkpoint.url)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _download(url: str, out: Any, timeout: float) -> str:
    """Stream ``url`` into ``out``; returns the hex sha256 of what was written."""
    digest = hashlib.sha256()
    hint = "download it on a connected machine and run `detect weights import FILE`"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URLs, or a test's)
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as err:
        raise WeightsError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise NoNetworkError(f"no network: cannot download {url} ({reason}); {hint}") from err
    return digest.hexdigest()
