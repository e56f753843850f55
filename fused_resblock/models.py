"""Builders with torchvision's names and signatures, returning fused models.

ImageNet: ``resnet18 ... resnet152``, ``resnext*``, ``wide_resnet*`` (torchvision's
weights enums accepted, loaded strictly), and the plain nets ``plain18/34``.
CIFAR (He et al. 2015, §4.2): ``cifar_resnet20 ... 1202`` (option A by default)
and ``cifar_plain20 ... 110``. Every builder takes ``backend=`` (default: the
environment or auto) besides torchvision's keyword arguments.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv
from torchvision.models._utils import _ovewrite_named_param, handle_legacy_interface
from torchvision.models.resnet import (  # re-exported: frb.models.ResNet50_Weights reads as torchvision's
    ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, ResNet101_Weights, ResNet152_Weights,
    ResNeXt50_32X4D_Weights, ResNeXt101_32X8D_Weights, ResNeXt101_64X4D_Weights,
    Wide_ResNet50_2_Weights, Wide_ResNet101_2_Weights,
)

from .blocks import (
    FusedBasicBlock, FusedBottleneck, FusedCifarBasicBlock, FusedPlainBasicBlock, FusedStem,
    CifarBasicBlock,
)


class FusedResNet(FusedStem, tv.ResNet):
    """torchvision's ResNet whose stem (conv1 + bn1 + relu) runs as one fused conv."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    if backend is not None:
        from .convert import set_backend
        set_backend(model, backend)
    return model


def _resnet(block, layers, weights, progress: bool, backend: Optional[str], **kwargs: Any) -> FusedResNet:
    if weights is not None:  # torchvision's check: another num_classes with weights is an error
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = FusedResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True), strict=True)
    return _set_backend(model, backend)


def _imagenet_builder(name: str, block, layers, weights_enum, doc: str, **fixed: Any):
    def builder(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs: Any):
        weights = weights_enum.verify(weights)
        for key, value in fixed.items():
            _ovewrite_named_param(kwargs, key, value)  # torchvision's error for another value
        return _resnet(block, layers, weights, progress, backend, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{doc}, fused. Same arguments as ``torchvision.models.{name}`` plus ``backend``."
    # torchvision's legacy calls still work, with its deprecation warning: pretrained=True/False,
    # weights and progress passed positionally
    return handle_legacy_interface(weights=("pretrained", weights_enum.IMAGENET1K_V1))(builder)


resnet18 = _imagenet_builder("resnet18", FusedBasicBlock, [2, 2, 2, 2], tv.ResNet18_Weights, "ResNet-18")
resnet34 = _imagenet_builder("resnet34", FusedBasicBlock, [3, 4, 6, 3], tv.ResNet34_Weights, "ResNet-34")
resnet50 = _imagenet_builder("resnet50", FusedBottleneck, [3, 4, 6, 3], tv.ResNet50_Weights, "ResNet-50")
resnet101 = _imagenet_builder("resnet101", FusedBottleneck, [3, 4, 23, 3], tv.ResNet101_Weights, "ResNet-101")
resnet152 = _imagenet_builder("resnet152", FusedBottleneck, [3, 8, 36, 3], tv.ResNet152_Weights, "ResNet-152")
resnext50_32x4d = _imagenet_builder("resnext50_32x4d", FusedBottleneck, [3, 4, 6, 3],
                                    tv.ResNeXt50_32X4D_Weights, "ResNeXt-50 32x4d", groups=32, width_per_group=4)
resnext101_32x8d = _imagenet_builder("resnext101_32x8d", FusedBottleneck, [3, 4, 23, 3],
                                     tv.ResNeXt101_32X8D_Weights, "ResNeXt-101 32x8d", groups=32, width_per_group=8)
resnext101_64x4d = _imagenet_builder("resnext101_64x4d", FusedBottleneck, [3, 4, 23, 3],
                                     tv.ResNeXt101_64X4D_Weights, "ResNeXt-101 64x4d", groups=64, width_per_group=4)
wide_resnet50_2 = _imagenet_builder("wide_resnet50_2", FusedBottleneck, [3, 4, 6, 3],
                                    tv.Wide_ResNet50_2_Weights, "Wide ResNet-50-2", width_per_group=128)
wide_resnet101_2 = _imagenet_builder("wide_resnet101_2", FusedBottleneck, [3, 4, 23, 3],
                                     tv.Wide_ResNet101_2_Weights, "Wide ResNet-101-2", width_per_group=128)


def _no_pretrained(name: str, weights) -> None:
    if weights is not None:
        raise ValueError(f"{name}: no pretrained weights exist for the plain nets (weights must be None)")


def plain18(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs: Any) -> FusedResNet:
    """The 18-layer plain net of He et al. (ResNet-18 without shortcuts), fused; the ImageNet
    builders' arguments (``weights`` only None: no checkpoint exists)."""
    _no_pretrained("plain18", weights)
    return _set_backend(FusedResNet(FusedPlainBasicBlock, [2, 2, 2, 2], **kwargs), backend)


def plain34(*, weights=None, progress: bool = True, backend: Optional[str] = None, **kwargs: Any) -> FusedResNet:
    """The 34-layer plain net of He et al. (ResNet-34 without shortcuts), fused (``weights`` only None)."""
    _no_pretrained("plain34", weights)
    return _set_backend(FusedResNet(FusedPlainBasicBlock, [3, 4, 6, 3], **kwargs), backend)


# --------------------------------------------------------------------------- CIFAR
class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: 3x3 stem of 16 filters, three stages of ``n`` blocks with
    16/32/64 filters on 32/16/8 maps, global average pool, a ``num_classes``-way FC (``linear``,
    as in the widely used public checkpoints). Depth 6n + 2.
    """

    def __init__(self, n: int, num_classes: int = 10, shortcut: Optional[str] = "A",
                 block: type = CifarBasicBlock) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self._stem(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class FusedCifarResNet(FusedStem, CifarResNet):
    """CifarResNet with fused blocks and stem."""

    def __init__(self, n: int, num_classes: int = 10, shortcut: Optional[str] = "A",
                 block: type = FusedCifarBasicBlock) -> None:
        super().__init__(n, num_classes, shortcut, block)



CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _cifar_builder(depth: int, shortcut_default: Optional[str]):
    plain = shortcut_default is None
    name = f"cifar_{'plain' if plain else 'resnet'}{depth}"

    def builder(*, num_classes: int = 10, backend: Optional[str] = None, **kwargs: Any) -> FusedCifarResNet:
        shortcut = None if plain else kwargs.pop("shortcut", shortcut_default)
        if kwargs:
            raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")
        return _set_backend(FusedCifarResNet((depth - 2) // 6, num_classes, shortcut), backend)

    builder.__name__ = builder.__qualname__ = name
    kind = "plain net (no shortcuts)" if plain else 'ResNet (shortcut "A" by default; "B" or "C")'
    builder.__doc__ = f"He et al.'s {depth}-layer CIFAR {kind}, fused."
    return builder


cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56, cifar_resnet110, cifar_resnet1202 = (
    _cifar_builder(d, "A") for d in CIFAR_DEPTHS)
cifar_plain20, cifar_plain32, cifar_plain44, cifar_plain56, cifar_plain110 = (
    _cifar_builder(d, None) for d in CIFAR_DEPTHS[:5])

IMAGENET_BUILDERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
PLAIN_BUILDERS = ("plain18", "plain34")
CIFAR_BUILDERS = tuple(f"cifar_resnet{d}" for d in CIFAR_DEPTHS) + tuple(f"cifar_plain{d}" for d in CIFAR_DEPTHS[:5])

BUILDERS = IMAGENET_BUILDERS + PLAIN_BUILDERS + CIFAR_BUILDERS

WEIGHTS = (ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, ResNet101_Weights, ResNet152_Weights,
           ResNeXt50_32X4D_Weights, ResNeXt101_32X8D_Weights, ResNeXt101_64X4D_Weights,
           Wide_ResNet50_2_Weights, Wide_ResNet101_2_Weights)
__all__ = ["FusedResNet", "CifarResNet", "FusedCifarResNet", *BUILDERS, *(w.__name__ for w in WEIGHTS)]
