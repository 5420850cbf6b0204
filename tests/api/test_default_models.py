"""Models served without ``DETECT_MODELS`` (the registered ``<family>_shapes`` weights), registered names in
``DETECT_MODELS``, versions, and ``check_weights`` for ``detect serve``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import httpx
import pytest

from api.app import create_app
from api.service import check_weights, configured_models
from api.settings import ModelSpec, Settings
from detect import cli
from detect.errors import WeightsError
from tests.helpers import SHAPES_CLASSES, png, serve, wait_ready


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_unset_models_serve_registered_shapes_weights(isolated_weights: Callable, tiny_weights_source: Path) -> None:
    isolated_weights(tiny_weights_source)
    models = configured_models(Settings())
    assert list(models) == ["faster_rcnn", "rcnn"]  # no sppnet_shapes registered; faster_rcnn first (the default)
    assert models["rcnn"] == ModelSpec(family="rcnn", weights="rcnn_shapes")


def test_empty_models_variable_counts_as_unset(
    isolated_weights: Callable, tiny_weights_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_weights(tiny_weights_source)
    monkeypatch.setenv("DETECT_MODELS", "")
    assert list(configured_models(Settings())) == ["faster_rcnn", "rcnn"]
    monkeypatch.setenv("DETECT_MODELS", '{"only": {"family": "rcnn", "weights": "rcnn_shapes"}}')
    assert list(configured_models(Settings())) == ["only"]


def test_nothing_registered_serves_nothing(isolated_weights: Callable) -> None:
    isolated_weights(None)
    assert configured_models(Settings()) == {}
    check_weights(Settings())  # nothing configured: nothing can be missing


def test_server_loads_bundled_names_with_manifest_versions(isolated_weights: Callable, tiny_weights_source: Path) -> None:
    folder = isolated_weights(tiny_weights_source)
    app = create_app(Settings(max_wait_ms=1.0))
    with serve(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_ready(client, timeout=60)
        listed = client.get("/models").json()
        assert listed["default"] == "faster_rcnn"
        by_name = {m["name"]: m for m in listed["models"]}
        assert set(by_name) == {"faster_rcnn", "rcnn"}
        assert by_name["faster_rcnn"]["version"] == sha12(folder / "frcnn.safetensors")
        assert by_name["rcnn"]["version"] == sha12(folder / "rcnn.safetensors")
        assert by_name["rcnn"]["class_names"] == list(SHAPES_CLASSES)
        r = client.post("/detect", files={"images": ("a.png", png(40, 30), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == {"name": "faster_rcnn", "version": sha12(folder / "frcnn.safetensors")}
        assert (r.json()["images"][0]["width"], r.json()["images"][0]["height"]) == (40, 30)


def test_check_weights_accepts_names_and_files(isolated_weights: Callable, tiny_weights_source: Path) -> None:
    folder = isolated_weights(tiny_weights_source)
    check_weights(Settings(models={"a": ModelSpec(family="faster_rcnn", weights="faster_rcnn_shapes")}))
    check_weights(Settings(models={"b": ModelSpec(family="rcnn", weights=str(folder / "rcnn.safetensors"))}))
    with pytest.raises(WeightsError, match=r"model 'c'.*'sppnet_shapes'.*detect weights list"):
        check_weights(Settings(models={"c": ModelSpec(family="sppnet", weights="sppnet_shapes")}))
    with pytest.raises(WeightsError, match="model 'd'"):
        check_weights(Settings(models={"d": ModelSpec(family="rcnn", weights=str(folder / "missing.safetensors"))}))
    (folder / "rcnn.safetensors").unlink()  # registered, but its file is gone
    with pytest.raises(WeightsError, match="missing"):
        check_weights(Settings(models={"e": ModelSpec(family="rcnn", weights="rcnn_shapes")}))


def test_serve_refuses_unknown_weights_with_exit_2(
    isolated_weights: Callable, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    isolated_weights(None)
    monkeypatch.setenv("DETECT_MODELS", '{"m": {"family": "faster_rcnn", "weights": "nope"}}')
    assert cli.main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "error[weights_error]" in err and "detect weights list" in err
