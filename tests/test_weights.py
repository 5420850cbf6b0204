"""Weights files and manifests: save/load round trips, checksums, the search path, torchvision imports, downloads."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from detect import weights
from detect.cli import weights as weights_cli
from detect.detectors.faster_rcnn import COCO_CLASS_NAMES, fasterrcnn_resnet50_fpn
from detect.detectors.rcnn import RCNN, RCNNConfig, rcnn_alexnet
from detect.errors import ConfigError, WeightsError
from detect.weights import (
    ChecksumError,
    NoNetworkError,
    OfficialCheckpoint,
    import_torchvision_checkpoint,
    list_weights,
    load_detector,
    load_manifest,
    pull,
    resolve,
    save_detector,
    verify,
)
from tests.helpers import free_port

CONFIG = RCNNConfig(representation_size=16)  # a 2.7 M-parameter R-CNN: quick to build and save


@pytest.fixture(autouse=True)
def _isolated_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's or another test's weights (the bundled folder is replaced too)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path / "bundled")


def _small_rcnn() -> RCNN:
    return rcnn_alexnet(("circle", "square"), config=CONFIG)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = _small_rcnn()
    entry = save_detector(
        model, tmp_path / "w" / "tiny.safetensors", name="tiny", recipe={"lr": 0.01}, metrics={"voc_map50": 0.5},
        training_time_s=12.5,
    )
    data = (tmp_path / "w" / "tiny.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    stored = manifest["models"]["tiny"]
    assert manifest["format"] == 1
    assert stored["sha256"] == hashlib.sha256(data).hexdigest() and stored["size_bytes"] == len(data)
    assert stored["architecture"]["builder"] == "rcnn_alexnet"
    assert stored["architecture"]["config"]["representation_size"] == 16
    assert stored["class_names"] == ["circle", "square"] and stored["recipe"] == {"lr": 0.01}
    assert stored["metrics"] == {"voc_map50": 0.5} and stored["training_time_s"] == 12.5
    assert entry == load_manifest(tmp_path / "w")["tiny"]

    for reference in ("tiny", tmp_path / "w" / "tiny.safetensors"):
        loaded = load_detector(reference, dirs=[tmp_path / "w"])
        assert isinstance(loaded, RCNN) and not loaded.training
        assert loaded.class_names == model.class_names and loaded.config == model.config
        expected = model.state_dict()
        assert loaded.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    # the file also stands alone: away from its manifest it loads from its own metadata
    shutil.copy(tmp_path / "w" / "tiny.safetensors", tmp_path / "alone.safetensors")
    assert load_detector(tmp_path / "alone.safetensors").config == model.config


def test_load_on_device(tmp_path: Path, device: torch.device) -> None:
    save_detector(_small_rcnn(), tmp_path / "t.safetensors", name="t")
    loaded = load_detector("t", device=device, dirs=[tmp_path])
    assert {p.device.type for p in loaded.parameters()} == {device.type}
    with pytest.raises(ConfigError, match="cannot use device 'nonsense'"):
        load_detector("t", device="nonsense", dirs=[tmp_path])


def test_manifest_keeps_other_entries_and_replaces_same_name(tmp_path: Path) -> None:
    save_detector(_small_rcnn(), tmp_path / "a.safetensors", name="a")
    save_detector(_small_rcnn(), tmp_path / "b.safetensors", name="b", metrics={"m": 1})
    save_detector(_small_rcnn(), tmp_path / "b2.safetensors", name="b", metrics={"m": 2})
    entries = load_manifest(tmp_path)
    assert sorted(entries) == ["a", "b"] and entries["b"].file == "b2.safetensors" and entries["b"].metrics == {"m": 2}
    assert not list(tmp_path.glob(".*.tmp"))


def test_checksum_mismatch(tmp_path: Path) -> None:
    entry = save_detector(_small_rcnn(), tmp_path / "t.safetensors", name="t")
    verify(entry)
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="differs from the manifest") as error:
        load_detector("t", dirs=[tmp_path])
    assert error.value.code == "weights_checksum" and isinstance(error.value, WeightsError)
    entry.path.unlink()
    with pytest.raises(WeightsError, match="not found"):
        verify(entry)


def test_search_path_and_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    save_detector(_small_rcnn(), first / "shared.safetensors", name="shared", metrics={"from": "first"})
    save_detector(_small_rcnn(), second / "shared.safetensors", name="shared", metrics={"from": "second"})
    save_detector(_small_rcnn(), second / "only.safetensors", name="only")
    assert list_weights() == []
    monkeypatch.setenv(weights.ENV_VAR, f"{first}:{second}")
    found = {entry.name: entry for entry in list_weights()}
    assert sorted(found) == ["only", "shared"] and found["shared"].metrics == {"from": "first"}
    assert resolve("only").path == second / "only.safetensors"
    with pytest.raises(WeightsError, match=r"no weights named 'nope'.*available: only, shared"):
        resolve("nope")
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(b"x")
    with pytest.raises(WeightsError, match="is not listed in"):
        resolve(stray)


def _manifest(**changes: object) -> str:
    """A one-entry manifest with ``changes`` applied to a valid entry named "a"."""
    entry = {"name": "a", "file": "a.safetensors", "architecture": {"builder": "rcnn_alexnet"}, "class_names": [],
             "sha256": "", "size_bytes": 0, **changes}
    return json.dumps({"format": 1, "models": {"a": entry}})


@pytest.mark.parametrize(
    "manifest",
    [
        "{broken",
        json.dumps({"models": {}}),
        json.dumps({"format": 1, "models": {"a": {"name": "a"}}}),
        _manifest(name="b"),
        _manifest(architecture=[]),
        _manifest(file="../a.safetensors"),
        _manifest(extra_field=1),
    ],
)
def test_malformed_manifest(tmp_path: Path, manifest: str) -> None:
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(WeightsError, match="manifest.json"):
        load_manifest(tmp_path)


def test_unknown_builder_and_missing_config(tmp_path: Path) -> None:
    entry = save_detector(_small_rcnn(), tmp_path / "t.safetensors", name="t")
    document = json.loads((tmp_path / "manifest.json").read_text())
    document["models"]["t"]["architecture"]["builder"] = "yolo_v99"
    (tmp_path / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(WeightsError, match="unknown or inconsistent builder 'yolo_v99'"):
        load_detector("t", dirs=[tmp_path])
    model = fasterrcnn_resnet50_fpn(3, class_names=("a", "b"))
    with pytest.raises(ConfigError, match="pass config="):
        save_detector(model, tmp_path / "f.safetensors", name="f")
    assert entry.path.is_file()


def _legacy_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The flat key names of torchvision's original checkpoints (before the FPN/RPN blocks became Sequentials)."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("rpn.head.conv.0.0."):
            key = f"rpn.head.conv.{parts[-1]}"
        elif key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            key = ".".join(parts[:4] + parts[5:])  # backbone.fpn.inner_blocks.0.0.weight -> ...inner_blocks.0.weight
        renamed[key] = value
    return renamed


def test_import_torchvision_checkpoint(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = reference.state_dict()
    legacy = _legacy_checkpoint(state)
    assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.0.weight" in legacy
    torch.save({"model": legacy}, tmp_path / "fasterrcnn_resnet50_fpn_coco-00000000.pth")
    entry = import_torchvision_checkpoint(tmp_path / "fasterrcnn_resnet50_fpn_coco-00000000.pth", "coco",
                                          directory=tmp_path / "w")
    assert entry.class_names == COCO_CLASS_NAMES and entry.architecture["builder"] == "fasterrcnn_resnet50_fpn"
    assert entry.architecture["frozen_bn_eps"] == 0.0
    loaded = load_detector("coco", dirs=[tmp_path / "w"])
    ours = loaded.state_dict()
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], v) for k, v in expected.items())
    folded = load_detector("coco", dirs=[tmp_path / "w"], fold_batchnorm=True)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    image = (torch.rand(3, 96, 128) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    with torch.no_grad():
        unfolded_maps = loaded.backbone(loaded.transform([image])[0].tensors)
        folded_maps = folded.backbone(folded.transform([image])[0].tensors)
    assert unfolded_maps["0"].abs().max() > 0
    for key, value in unfolded_maps.items():  # torchvision's random init: BN with eps 0 is a plain affine map
        torch.testing.assert_close(folded_maps[key], value, rtol=1e-4, atol=1e-4)
    shutil.copy(entry.path, tmp_path / "alone.safetensors")
    alone = load_detector(tmp_path / "alone.safetensors")  # the safetensors file also loads without the manifest
    assert alone.class_names == COCO_CLASS_NAMES and torch.equal(alone.state_dict()["rpn.head.conv.0.0.weight"],
                                                                  state["rpn.head.conv.0.0.weight"])

    del legacy["roi_heads.box_head.fc7.bias"]
    legacy["rpn.head.cls_logits.weight"] = torch.zeros(5, 256, 1, 1)
    torch.save(legacy, tmp_path / "damaged.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): roi_heads.box_head.fc7.bias; wrong shapes \(1\)"):
        import_torchvision_checkpoint(tmp_path / "damaged.pth", "damaged", directory=tmp_path / "w")
    assert sorted(load_manifest(tmp_path / "w")) == ["coco"]


def test_import_refuses_other_checkpoints(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(WeightsError, match="has no 2-D roi_heads.box_predictor.cls_score.weight"):
        import_torchvision_checkpoint(wrong, "wrong", directory=tmp_path / "w")
    assert not (tmp_path / "w" / "manifest.json").exists()


class _Payload:
    """Unpickling this would create ``marker``: ``weights_only=True`` must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_import_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read weights"):
        import_torchvision_checkpoint(tmp_path / "evil.pth", "evil", directory=tmp_path / "w")
    assert not marker.exists()


def test_pull_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    monkeypatch.setitem(weights.OFFICIAL_CHECKPOINTS, "coco", OfficialCheckpoint(url))
    with pytest.raises(NoNetworkError, match=r"cannot download .*detect weights import") as error:
        pull("coco", directory=tmp_path, timeout=2)
    assert error.value.message.startswith("no network: ")
    assert error.value.code == "no_network" and error.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []  # the partial download is gone
    with pytest.raises(WeightsError, match="no official checkpoint 'nope'"):
        pull("nope", directory=tmp_path)


@pytest.fixture
def http_server():
    """A local HTTP server answering every GET with ``b"not a checkpoint"``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = b"not a checkpoint"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pull_checks_the_published_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_server: str) -> None:
    monkeypatch.setitem(weights.OFFICIAL_CHECKPOINTS, "coco", OfficialCheckpoint(f"{http_server}/m-258fb6c6.pth"))
    digest = hashlib.sha256(b"not a checkpoint").hexdigest()
    with pytest.raises(ChecksumError, match=f"sha256 {digest} does not start with 258fb6c6"):
        pull("coco", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # right hash, wrong content: refused by the checkpoint check, after the download
    monkeypatch.setitem(weights.OFFICIAL_CHECKPOINTS, "coco", OfficialCheckpoint(f"{http_server}/m-{digest[:8]}.pth"))
    with pytest.raises(WeightsError, match="cannot read weights"):
        pull("coco", directory=tmp_path)


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    weights_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    save_detector(_small_rcnn(), tmp_path / "w" / "tiny.safetensors", name="tiny", metrics={"voc_map50": 0.8125})
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "w"))
    args = parser.parse_args(["weights", "list"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("tiny\trcnn_alexnet\t2 classes") and "voc_map50=0.812" in line
    args = parser.parse_args(["weights", "list", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "tiny"
    args = parser.parse_args(["weights", "pull", "nope"])
    with pytest.raises(WeightsError) as error:
        args.func(args)
    assert error.value.exit_code == 2
