"""The shapes the benchmarks run: ResNet-50's convolutions, a few real blocks, the models.

Pure data. ``RESNET50_LAYERS`` lists every distinct convolution of
torchvision's ResNet-50 (v1.5, 224x224 input) as our fused eval path runs it:
one conv with BN folded, ReLU, and the block's shortcut fused into the last
conv of each block (an identity residual read, or the 1x1 downsample merged
into the same GEMM). ``count`` says how often the shape occurs in the network;
``tests/test_bench_harness.py`` checks the table against torchvision's model.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvLayer:
    """One fused conv: act(conv(x) + bias [+ residual | + conv1x1(shortcut input)])."""

    name: str
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    residual: str = "none"        # "none", "identity" (read the block input) or "projection"
    shortcut_in_channels: int = 0  # projection: the block input's channels ...
    shortcut_height: int = 0       # ... and spatial size; the 1x1 conv has stride shortcut_stride
    shortcut_width: int = 0
    shortcut_stride: int = 1
    relu: bool = True
    count: int = 1

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel) // self.stride + 1


def _bottleneck_layers(stage: int, blocks: int, inplanes: int, planes: int, size: int, stride: int) -> list:
    """The distinct fused convs of one ResNet-50 stage: block 0 (maybe strided, projection) and the rest."""
    out_size = size // stride
    width, expansion = planes, planes * 4
    rest = f"layer{stage}.1-{blocks - 1}"
    first = f"layer{stage}.0"
    return [
        ConvLayer(f"{first}.conv1", inplanes, size, size, width, 1),
        ConvLayer(f"{first}.conv2", width, size, size, width, 3, stride=stride, padding=1),
        ConvLayer(f"{first}.conv3+downsample", width, out_size, out_size, expansion, 1,
                  residual="projection", shortcut_in_channels=inplanes,
                  shortcut_height=size, shortcut_width=size, shortcut_stride=stride),
        ConvLayer(f"{rest}.conv1", expansion, out_size, out_size, width, 1, count=blocks - 1),
        ConvLayer(f"{rest}.conv2", width, out_size, out_size, width, 3, padding=1, count=blocks - 1),
        ConvLayer(f"{rest}.conv3", width, out_size, out_size, expansion, 1, residual="identity",
                  count=blocks - 1),
    ]


RESNET50_LAYERS: tuple = tuple(
    [ConvLayer("conv1", 3, 224, 224, 64, 7, stride=2, padding=3)]
    + _bottleneck_layers(1, 3, 64, 64, 56, 1)
    + _bottleneck_layers(2, 4, 256, 128, 56, 2)
    + _bottleneck_layers(3, 6, 512, 256, 28, 2)
    + _bottleneck_layers(4, 3, 1024, 512, 14, 2)
)
RESNET50_FC = (2048, 1000)  # in, out features of the classifier
RESNET50_GMAC = 4.09  # torchvision's published cost per 224x224 image (its "GFLOPS" are MACs)


def _lookup(specs, name: str, what: str):
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no {what} named {name!r}; known: {', '.join(s.name for s in specs)}")


def layer(name: str) -> ConvLayer:
    return _lookup(RESNET50_LAYERS, name, "ResNet-50 layer")


@dataclass(frozen=True)
class BlockSpec:
    """One residual block at its real place in a network."""

    name: str
    block: str       # "bottleneck", "basic" (torchvision) or "cifar" (He et al., option A)
    inplanes: int
    planes: int
    size: int        # input height = width
    stride: int = 1
    projection: bool = False  # torchvision downsample Sequential(conv1x1, BN)


BLOCKS: tuple = (
    BlockSpec("resnet50.layer1.0", "bottleneck", 64, 64, 56, projection=True),
    BlockSpec("resnet50.layer2.0", "bottleneck", 256, 128, 56, stride=2, projection=True),
    BlockSpec("resnet50.layer3.1", "bottleneck", 1024, 256, 14),
    BlockSpec("resnet50.layer4.0", "bottleneck", 1024, 512, 14, stride=2, projection=True),
    BlockSpec("resnet18.layer1.0", "basic", 64, 64, 56),
    BlockSpec("resnet18.layer2.0", "basic", 64, 128, 56, stride=2, projection=True),
    BlockSpec("cifar.layer2.0", "cifar", 16, 32, 32, stride=2),
    BlockSpec("cifar.layer3.1", "cifar", 64, 64, 8),
)


def block(name: str) -> BlockSpec:
    return _lookup(BLOCKS, name, "block")


@dataclass(frozen=True)
class ModelSpec:
    """A whole network: a builder in ``fused_resblock.models`` and its input size."""

    name: str
    builder: str
    image_size: int
    num_classes: int

    def with_size(self, image_size: int) -> "ModelSpec":
        return ModelSpec(self.name, self.builder, image_size, self.num_classes)


MODELS: tuple = (
    ModelSpec("resnet50", "resnet50", 224, 1000),
    ModelSpec("resnet18", "resnet18", 224, 1000),
    ModelSpec("resnet101", "resnet101", 224, 1000),
    ModelSpec("resnext50_32x4d", "resnext50_32x4d", 224, 1000),
    ModelSpec("cifar_resnet56", "cifar_resnet56", 32, 10),
)
TINY_MODEL = ModelSpec("cifar_resnet20@16", "cifar_resnet20", 16, 10)


def model(name: str) -> ModelSpec:
    return _lookup(MODELS + (TINY_MODEL,), name, "model")


def target_spec(kind: str, target: str):
    """The spec a case's (kind, target) names: a ModelSpec, BlockSpec or ConvLayer."""
    lookup = {"model": model, "block": block, "layer": layer}.get(kind)
    if lookup is None:
        raise ValueError(f"unknown case kind {kind!r}; expected model, block or layer")
    return lookup(target)


def input_size(spec) -> tuple:
    """(C, H, W) of a spec's main input."""
    if isinstance(spec, ModelSpec):
        return (3, spec.image_size, spec.image_size)
    if isinstance(spec, BlockSpec):
        return (spec.inplanes, spec.size, spec.size)
    return (spec.in_channels, spec.height, spec.width)
