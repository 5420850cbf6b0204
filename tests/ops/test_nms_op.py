"""``detect::nms_table``: the eager kernel against a plain loop of torchvision's NMS per (batch, class) pair, the
torchvision form, the fake kernel under torch.export, and the ONNX translation run by ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
import torchvision

from detect.ops.nms_op import ONNX_TRANSLATION, nms_table, torchvision_form


def reference(boxes: torch.Tensor, scores: torch.Tensor, max_out: int, iou: float, score: float) -> torch.Tensor:
    """ONNX NonMaxSuppression's contract written as a loop over (b, c) pairs with torchvision.ops.nms."""
    rows = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            candidates = torch.nonzero(scores[b, c] > score).squeeze(1)
            keep = candidates[torchvision.ops.nms(boxes[b, candidates], scores[b, c, candidates], iou)][:max_out]
            rows += [[b, c, int(n)] for n in keep]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def random_table(seed: int, batch: int = 3, classes: int = 4, count: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, count, 2, generator=generator) * 100
    boxes = torch.cat([corner, corner + 5 + torch.rand(batch, count, 2, generator=generator) * 40], dim=2)
    scores = torch.rand(batch, classes, count, generator=generator)
    scores[0, 1] = -1.0  # a pair without candidates
    return boxes, scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_out", [1, 7, 1000])
def test_eager_kernel_and_torchvision_form_match_the_loop(seed: int, max_out: int) -> None:
    boxes, scores = random_table(seed)
    expected = reference(boxes, scores, max_out, 0.5, 0.2)
    assert len(expected) > 10
    assert torch.equal(nms_table(boxes, scores, max_out, 0.5, 0.2), expected)
    with torchvision_form():
        assert torch.equal(nms_table(boxes, scores, max_out, 0.5, 0.2), expected)


def test_no_candidates() -> None:
    boxes, scores = random_table(0)
    assert nms_table(boxes, scores, 10, 0.5, 2.0).shape == (0, 3)
    with torchvision_form():
        assert nms_table(boxes, scores, 10, 0.5, 2.0).shape == (0, 3)


class Suppress(torch.nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return nms_table(boxes, scores, 5, 0.5, 0.2)


def test_fake_kernel_exports_with_dynamic_sizes_and_onnx_runtime_agrees(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    batch, count = torch.export.Dim("batch"), torch.export.Dim("count")
    boxes, scores = random_table(5)
    program = torch.export.export(
        Suppress(), (boxes, scores), dynamic_shapes=({0: batch, 1: count}, {0: batch, 2: count})
    )
    assert "detect.nms_table" in str(program.graph)
    other_boxes, other_scores = random_table(6, batch=2, count=90)  # other sizes than the traced ones
    expected = reference(other_boxes, other_scores, 5, 0.5, 0.2)
    assert torch.equal(program.module()(other_boxes, other_scores), expected)
    onnx_program = torch.onnx.export(program, (), dynamo=True, custom_translation_table=ONNX_TRANSLATION)
    path = tmp_path / "nms.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, [other_boxes.numpy(), other_scores.numpy()])))
    assert torch.equal(torch.from_numpy(got), expected)
