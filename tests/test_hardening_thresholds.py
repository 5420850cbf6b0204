"""Issue 12, item 6: ``detect predict`` and ``POST /detect`` accept and refuse the same thresholds, written out
here by hand: ``0 <= score <= 1``, ``0 < iou <= 1``, NaN and infinities refused. The CLI refuses before loading
a model (exit 2, one line); the API answers 422 for JSON and form fields alike."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest

from detect import cli
from detect.cli import predict
from tests.helpers import StubDetector, png, running

NAN, INF = math.nan, math.inf
SCORES = {0.0: True, 0.5: True, 1.0: True, -0.0: True, NAN: False, INF: False, -INF: False, 5.0: False, -1e-9: False, 1.0000001: False}
IOUS = {1e-6: True, 0.5: True, 1.0: True, 0.0: False, -1.0: False, NAN: False, INF: False, 1.5: False}
CASES = [("score_threshold", v, ok) for v, ok in SCORES.items()] + [("iou_threshold", v, ok) for v, ok in IOUS.items()]


def cli_accepts(name: str, value: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bool:
    image = tmp_path / "a.png"
    image.write_bytes(png(16, 16))
    monkeypatch.setattr(predict, "load_model", lambda *a: StubDetector())
    option = f"--{name.replace('_', '-')}={value!r}"  # repr: nan, inf, -inf, 1.0000001 as typed by a user
    code = cli.main(["predict", str(image), "--out", str(tmp_path / "out"), "--weights", "unused", option])
    assert code in (0, 2)
    return code == 0


@pytest.mark.parametrize(("name", "value", "valid"), CASES)
def test_the_cli_follows_the_table(
    name: str, value: float, valid: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert cli_accepts(name, value, tmp_path, monkeypatch) is valid
    err = capsys.readouterr().err
    if not valid:
        assert err.startswith("error[config_error]: ") and err.count("\n") == 1 and "Traceback" not in err


def test_the_api_follows_the_table() -> None:
    data = base64.b64encode(png(16, 16)).decode()
    with running() as client:
        for name, value, valid in CASES:
            body = json.dumps({"images": [{"data": data}], name: value})  # NaN and Infinity as JavaScript writes them
            as_json = client.post("/detect", content=body, headers={"content-type": "application/json"})
            as_form = client.post("/detect", files={"images": ("a.png", png(16, 16), "image/png")}, data={name: repr(value)})
            for response in (as_json, as_form):
                assert response.status_code == (200 if valid else 422), (name, value, response.text)
                if not valid:
                    assert response.json()["error"]["code"] == "invalid_request"
