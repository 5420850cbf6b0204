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
- **Rebuild from the manifest alone.** ``architecture["builder"]`` is a detector name (``fasterrcnn_resnet50_fpn``,
  ``fasterrcnn_vgg16``, ``rcnn_alexnet``, ``rcnn_vgg16``, ``sppnet_alexnet``, ``sppnet_vgg16``) and
  ``architecture["config"]`` its frozen config dataclass as a dict; the state dict is then loaded strictly (every
  key and shape). Frozen BN ``eps`` travels as ``architecture["frozen_bn_eps"]``. The safetensors metadata repeats
  name, class names, config and eps, so a file still loads with ``<Detector>.from_weights`` on its own.
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

import argparse
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
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detect.backbones import fold_frozen_batchnorm, read_state_dict
from detect.detectors import faster_rcnn
from detect.detectors.faster_rcnn import FROZEN_BN_EPS_KEY, FasterRCNN, FasterRCNNConfig, check_state_dict
from detect.detectors.rcnn import RCNN
from detect.detectors.region import config_from_dict, config_to_json
from detect.detectors.sppnet import SPPNet
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
    "import_torchvision_checkpoint",
    "pull",
    "add_cli",
]

ENV_VAR = "DETECT_WEIGHTS_DIR"
MANIFEST = "manifest.json"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"
_FORMAT = 1
_CHUNK = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_REGION_DETECTORS: dict[str, type] = {"rcnn": RCNN, "sppnet": SPPNet}



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
) -> nn.Module:
    """A verified detector in eval mode on ``device``, rebuilt from its manifest entry (see the module docstring).

    ``fold_batchnorm``: fold frozen BatchNorm into the convolutions before it (:func:`fold_frozen_batchnorm`), for
    inference only: faster, equal up to float rounding, but the state dict loses the BN keys. The CLI and the
    service load this way.
    """
    entry = resolve(name_or_path, dirs)
    verify(entry)
    model = _build(entry)
    state = read_state_dict(entry.path)
    check_state_dict(model, state, entry.path)
    model.load_state_dict(state, strict=True)
    _set_frozen_bn_eps(model, entry.architecture.get("frozen_bn_eps"))
    if fold_batchnorm:
        fold_frozen_batchnorm(model)
    try:
        return model.to(torch.device(device)).eval()
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"cannot use device {device!r}: {str(err).splitlines()[0]}") from err


def _build(entry: WeightsEntry) -> nn.Module:
    """A randomly initialised detector of the entry's architecture."""
    builder, config = entry.architecture["builder"], entry.architecture.get("config", {})
    family = builder.split("_")[0]
    try:
        if builder in faster_rcnn.BUILDERS:
            config = config_from_dict(FasterRCNNConfig, config)
            num_classes = len(entry.class_names) + 1
            return faster_rcnn.BUILDERS[builder](num_classes, class_names=entry.class_names, config=config)
        if family in _REGION_DETECTORS:
            detector_class = _REGION_DETECTORS[family]
            model = detector_class.build(entry.class_names, config_from_dict(detector_class.config_class, config))
            if model.name == builder:
                return model
    except (ConfigError, TypeError, ValueError) as err:
        raise WeightsError(f"{entry.directory / MANIFEST}: {entry.name!r}: bad architecture config ({err})") from err
    raise WeightsError(f"{entry.directory / MANIFEST}: {entry.name!r}: unknown or inconsistent builder {builder!r}")


def _frozen_bn_eps(model: nn.Module) -> float | None:
    return next((float(m.eps) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)), None)


def _set_frozen_bn_eps(model: nn.Module, eps: float | None) -> None:
    if eps is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = float(eps)


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
    """Write ``detector``'s state dict to ``path`` (``.safetensors``) and its entry into the manifest beside it.

    ``config``: the detector's frozen config dataclass (default ``detector.config``; a :class:`FasterRCNN` keeps
    none, so pass the one it was built with). An entry of the same name is replaced. Returns the new entry.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not _NAME.match(name):
        raise ConfigError(f"save to a .safetensors path under a plain name, got {path} and {name!r}")
    config = config if config is not None else getattr(detector, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"{type(detector).__name__} keeps no config: pass config= (the one it was built with)")
    architecture: dict[str, Any] = {"builder": detector.name, "config": json.loads(config_to_json(config))}
    eps = _frozen_bn_eps(detector)
    metadata = {
        "detector": detector.name,
        "class_names": json.dumps(list(detector.class_names)),
        "config": config_to_json(config),
    }
    if eps is not None:
        architecture["frozen_bn_eps"] = eps
        metadata[FROZEN_BN_EPS_KEY] = repr(eps)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in detector.state_dict().items()}
    data = safetensors_bytes(tensors, metadata=metadata)
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
    model = FasterRCNN.from_weights(path, architecture="fasterrcnn_resnet50_fpn", class_names=class_names)
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


# --- command line ------------------------------------------------------------------------------------------
def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``detect weights list|import|pull`` (handlers return exit codes, raise :class:`WeightsError`)."""
    weights = subparsers.add_parser("weights", help="list, import and download detector weights")
    sub = weights.add_subparsers(dest="weights_command", required=True)
    p = sub.add_parser("list", help="weights on the search path (DETECT_WEIGHTS_DIR, user folder, bundled)")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("import", help="register a torchvision Faster R-CNN ResNet-50-FPN checkpoint (.pth)")
    p.add_argument("path", help="checkpoint file")
    p.add_argument("--name", help="name to register (default: the file name without its hash suffix)")
    p.add_argument("--dir", help="weights folder to write (default: first DETECT_WEIGHTS_DIR, else user folder)")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser("add", help="register a finished `detect train` run (e.g. into the bundled weights/ folder)")
    p.add_argument("run", help="the run's folder (or its model.safetensors)")
    p.add_argument("--name", required=True, help="name to register")
    p.add_argument("--dir", help="weights folder to write (default: first DETECT_WEIGHTS_DIR, else user folder)")
    p.add_argument("--recipe", help="the recipe the run was trained with, stored in the manifest entry")
    p.set_defaults(func=_cmd_add)
    p = sub.add_parser("pull", help="download an official checkpoint (needs internet) and register it")
    p.add_argument("name", help=f"one of: {', '.join(sorted(OFFICIAL_CHECKPOINTS))}")
    p.add_argument("--dir", help="weights folder to write (default: first DETECT_WEIGHTS_DIR, else user folder)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the network")
    p.set_defaults(func=_cmd_pull)


def _cmd_list(args: argparse.Namespace) -> int:
    entries = list_weights()
    if args.json:
        print(json.dumps([{**e.to_json(), "path": str(e.path)} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no weights found in {', '.join(str(d) for d in weights_dirs())}")
    for entry in entries:
        metrics = ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in entry.metrics.items()
            if isinstance(v, (int, float, str))  # the rest (e.g. the evaluation data) is in --json
        )
        print(f"{entry.name}\t{entry.architecture['builder']}\t{len(entry.class_names)} classes\t"
              f"{entry.size_bytes / 1e6:.1f} MB\t{metrics or '-'}\t{entry.path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    name = args.name or re.sub(r"-[0-9a-f]{8,64}$", "", Path(args.path).stem)
    entry = import_torchvision_checkpoint(args.path, name, directory=args.dir)
    print(f"registered {entry.name} -> {entry.path}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from detect.train import bundle_run  # training pulls in the data sets and recipes: only when asked

    directory = Path(args.dir) if args.dir else weights_dirs()[0]
    entry = bundle_run(args.run, args.name, directory, args.recipe)
    print(f"registered {entry.name} -> {entry.path} (mAP {entry.metrics.get('voc_map50')})")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    entry = pull(args.name, directory=args.dir, timeout=args.timeout)
    print(f"registered {entry.name} -> {entry.path}")
    return 0
