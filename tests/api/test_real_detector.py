"""The service around a real (randomly initialised, small-input) Faster R-CNN, through uvicorn."""

from __future__ import annotations

import torch

from detect.detectors import DETECTORS
from detect.detectors.faster_rcnn import FasterRCNNConfig
from detect.transform import TransformConfig
from tests.helpers import png, running


def test_faster_rcnn_behind_the_api() -> None:
    config = FasterRCNNConfig(transform=TransformConfig(min_size=(64,), max_size=96))
    detector = DETECTORS["fasterrcnn_resnet50_fpn"](3, class_names=("a", "b"), config=config).eval()
    with torch.no_grad():  # a large bias on class "a" makes the random head confident, so detections exist
        detector.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 8.0, 0.0]))
    with running(detector, max_batch=4) as client:
        models = client.get("/models").json()["models"][0]
        assert (models["detector"], models["proposals"]) == ("fasterrcnn_resnet50_fpn", ["rpn"])
        r = client.post("/detect", files=[("images", ("x.png", png(48, 32, v), "image/png")) for v in (30, 200)])
        assert r.status_code == 200, r.text
        for item in r.json()["images"]:
            assert (item["width"], item["height"]) == (48, 32)
            assert item["detections"], "the biased head should detect class a"
            for d in item["detections"]:
                x1, y1, x2, y2 = d["box"]
                assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 32 and d["class_name"] == "a"
        assert client.post("/detect", json={"images": [{"data": ""}], "proposals": "rpn"}).json()["error"]["code"] == "empty_input"
