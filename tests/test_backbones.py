"""detect.backbones: torchvision-compatible names and outputs, shapes, strides, receptive fields, freezing,
ImageNet weight loading and frozen-BN folding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from detect import backbones
from detect.errors import WeightsError


def randomise_frozen_bn(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.weight.numel()
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def test_resnet50_fpn_is_torchvisions(generator: torch.Generator) -> None:
    ours = backbones.resnet(50, fpn=True, trainable_layers=3).eval()
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in theirs.named_parameters() if p.requires_grad]
    randomise_frozen_bn(theirs, generator)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(1, 3, 96, 128, generator=generator)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert list(a) == list(b) == ["0", "1", "2", "3", "pool"]
    for level, stride in zip(a, ours.strides):
        assert torch.equal(a[level], b[level])
        assert a[level].shape[-2:] == (-(-96 // stride), -(-128 // stride))


def test_mobilenet_fpn_names_are_torchvisions() -> None:
    ours = backbones.mobilenet_v3_large(fpn=True, trainable_layers=3)
    theirs = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert ours.strides == (32, 32, 64)


# Hand-computed: (stride, theoretical receptive field, centre of cell 0 in pixel-edge coordinates, channels).
# VGG16 conv5_3: 13 3x3/pad-1 convs and 4 2x2 pools; each pool shifts the centre by half its input stride:
# 0.5 * (1 + 2 + 4 + 8) = 7.5, plus 0.5 for pixel edges. AlexNet conv5: conv1 11x11/4 pad 2 shifts by 5 - 2 = 3,
# pools 3x3/2 by 1 * 4 and 1 * 8: 15, plus 0.5. Centred convs (ResNet, MobileNet) leave the centre at 0.5.
SINGLE_LEVEL = {
    "vgg16": (backbones.vgg16, {}, 16, 196, 8.0, 512),
    "alexnet": (backbones.alexnet, {}, 16, 163, 15.5, 256),
    "resnet18-c4": (backbones.BACKBONES["resnet18"], {"fpn": False}, 16, 211, 0.5, 256),
    "resnet50-c4": (backbones.BACKBONES["resnet50"], {"fpn": False}, 16, 267, 0.5, 1024),
    "resnet50-c5": (backbones.BACKBONES["resnet50"], {"fpn": False, "single_level_stage": 4}, 32, 427, 0.5, 2048),
    "mobilenet": (backbones.mobilenet_v3_large, {}, 32, 595, 0.5, 960),
}


@pytest.mark.parametrize("name", SINGLE_LEVEL)
def test_single_level_geometry(name: str) -> None:
    build, kwargs, stride, size, offset, channels = SINGLE_LEVEL[name]
    backbone = build(**kwargs).eval()
    assert backbone.stride == stride and backbone.out_channels == channels
    assert backbone.receptive_field == backbones.ReceptiveField(stride, size, offset)
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 160, 224))
    assert out.shape[:2] == (1, channels)
    assert abs(out.shape[2] - 160 / stride) <= 1 and abs(out.shape[3] - 224 / stride) <= 1


def test_receptive_field_centre_is_where_the_response_is() -> None:
    """An impulse at one pixel changes exactly the cells whose receptive field covers it, centred on it."""
    conv = nn.Sequential(nn.Conv2d(1, 1, 5, stride=2, padding=1), nn.MaxPool2d(3, 2), nn.Conv2d(1, 1, 3, padding=0))
    for module in conv:
        if isinstance(module, nn.Conv2d):
            nn.init.constant_(module.weight, 1.0)
            nn.init.zeros_(module.bias)
    field = backbones.receptive_field(conv)
    assert (field.stride, field.size) == (4, 5 + 2 * 2 + 2 * 4)
    x = torch.zeros(1, 1, 1, 64)
    x = x.expand(1, 1, 64, 64).clone()
    with torch.no_grad():
        base = conv(x)
        x[..., 30] = 1.0  # a vertical line at column 30
        hit = (conv(x) != base)[0, 0, 0].nonzero().squeeze(1).double()  # affected cells along x
    centres = field.stride * hit + field.offset - 0.5  # pixel-index centres of those cells
    assert centres.min() >= 30 - field.size / 2 and centres.max() <= 30 + field.size / 2
    assert abs(float(centres.mean()) - 30) <= field.stride / 2


def test_trainable_layers_freeze_from_the_bottom() -> None:
    vgg = backbones.vgg16(trainable_layers=3)
    frozen = {n.split(".")[1] for n, p in vgg.named_parameters() if not p.requires_grad}
    assert frozen == {"0", "2", "5", "7"}  # conv1_x and conv2_x
    resnet = backbones.resnet(18, fpn=False, trainable_layers=1)
    assert {n.split(".")[1] for n, p in resnet.named_parameters() if p.requires_grad} == {"layer3"}
    assert not any(p.requires_grad for p in backbones.alexnet(trainable_layers=0).parameters())
    with pytest.raises(ValueError):
        backbones.alexnet(trainable_layers=6)


def test_batchnorm_when_not_frozen() -> None:
    backbone = backbones.resnet(18, frozen_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def imagenet_style_checkpoint(backbone: backbones.Backbone, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under a torchvision classifier's key names (``features.*``) plus a classifier layer."""
    state = {f"features.{k}": torch.randn(v.shape, generator=generator) for k, v in backbone.body.state_dict().items()}
    return {**state, "classifier.6.weight": torch.zeros(10, 4)}


def test_imagenet_weights_load_from_a_local_file(tmp_path: Path, generator: torch.Generator) -> None:
    checkpoint = imagenet_style_checkpoint(backbones.alexnet(), generator)
    torch.save({"model": checkpoint}, tmp_path / "alexnet.pth")
    loaded = backbones.alexnet(weights=tmp_path / "alexnet.pth")
    for key, value in loaded.body.state_dict().items():
        assert torch.equal(value, checkpoint[f"features.{key}"])
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    randomise_frozen_bn(resnet, generator)
    save_file(resnet.state_dict(), str(tmp_path / "resnet18.safetensors"))
    loaded = backbones.resnet(18, weights=tmp_path / "resnet18.safetensors")
    assert torch.equal(loaded.body.layer4[1].bn2.running_var, resnet.layer4[1].bn2.running_var)
    assert torch.equal(loaded.body.conv1.weight, resnet.conv1.weight)


def test_bad_weights_raise_weights_error(tmp_path: Path, generator: torch.Generator) -> None:
    with pytest.raises(WeightsError, match="not found"):
        backbones.alexnet(weights=tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        backbones.alexnet(weights=tmp_path / "garbage.pth")
    checkpoint = imagenet_style_checkpoint(backbones.alexnet(), generator)
    checkpoint["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(checkpoint, tmp_path / "wrong_shape.pth")
    with pytest.raises(WeightsError, match=r"wrong shapes \[\('3\.weight'"):
        backbones.alexnet(weights=tmp_path / "wrong_shape.pth")
    del checkpoint["features.10.bias"]
    torch.save(checkpoint, tmp_path / "missing_key.pth")
    with pytest.raises(WeightsError, match="10.bias"):
        backbones.alexnet(weights=tmp_path / "missing_key.pth")


def test_folding_frozen_bn_is_exact(generator: torch.Generator) -> None:
    backbone = backbones.resnet(18, fpn=True).eval()
    randomise_frozen_bn(backbone, generator)
    reference = copy.deepcopy(backbone)
    folded = backbones.fold_frozen_batchnorm(backbone)
    assert folded == sum(isinstance(m, FrozenBatchNorm2d) for m in reference.modules()) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    x = torch.rand(2, 3, 64, 96, generator=generator)
    with torch.no_grad():
        expected, actual = reference(x), backbone(x)
    for level in expected:
        torch.testing.assert_close(actual[level], expected[level], rtol=1e-4, atol=1e-4)
