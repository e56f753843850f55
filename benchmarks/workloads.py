"""The module and the inputs one case runs, built the same way for every implementation.

Every implementation starts from a freshly built *plain* module with eager
PyTorch semantics: torchvision's ResNet and blocks, our CIFAR ResNet, or for a
single layer conv -> BN -> (+ shortcut) -> ReLU (``ConvLayerModule``). Weights
come from one seed, BN's affine parameters are random and its running
statistics are those of a random batch (not 0/1; see ``calibrate_norms``), so
every member of a case group computes the same function. ``fuse`` turns a
plain module into ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import fused_resblock as frb
from fused_resblock import ops
from fused_resblock.folding import FoldCache
from fused_resblock.testing import WELL_SCALED_SPREAD, randomize_norms

from .cases import Case
from .shapes import BlockSpec, ConvLayer, ModelSpec, input_size

SEED = 0


# --------------------------------------------------------------------------- one conv layer
class ConvLayerModule(nn.Module):
    """One ResNet conv as eager PyTorch runs it: relu(bn1(conv1(x)) [+ shortcut])."""

    def __init__(self, spec: ConvLayer) -> None:
        super().__init__()
        self.spec = spec
        self.conv1 = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                               groups=spec.groups, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.out_channels)
        self.downsample = None
        if spec.residual == "projection":
            self.downsample = nn.Sequential(
                conv1x1(spec.shortcut_in_channels, spec.out_channels, spec.shortcut_stride),
                nn.BatchNorm2d(spec.out_channels))

    def forward(self, x: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
        y = self.bn1(self.conv1(x))
        if self.spec.residual == "identity":
            y = y + shortcut
        elif self.spec.residual == "projection":
            y = y + self.downsample(shortcut)
        return F.relu(y) if self.spec.relu else y


class FusedConvLayer(nn.Module):
    """The same layer through our op: one ``conv_bias_act`` (BN folded, projection merged)."""

    def __init__(self, plain: ConvLayerModule, backend: str) -> None:
        super().__init__()
        self.plain, self.backend = plain, backend
        self.fold_cache = FoldCache()

    def forward(self, x: Tensor, shortcut: Optional[Tensor] = None) -> Tensor:
        if self.training:
            raise NotImplementedError("single-layer cases run in eval mode (inference, fine-tuning) only")
        spec, conv = self.plain.spec, self.plain.conv1
        extra = {}
        if spec.residual == "projection":  # the blocks' cached merge: no bias sum per call
            s_conv, s_norm = self.plain.downsample
            weight, s_weight, bias = self.fold_cache.fold_projection(conv, self.plain.bn1, s_conv, s_norm, x.dtype)
            extra = dict(shortcut_x=shortcut, shortcut_weight=s_weight, shortcut_stride=spec.shortcut_stride)
        else:
            weight, bias = self.fold_cache.fold(conv, self.plain.bn1, x.dtype)
            if spec.residual == "identity":
                extra = dict(residual=shortcut)
        return ops.conv_bias_act(x, weight, bias, stride=conv.stride, padding=conv.padding, groups=conv.groups,
                                 relu=spec.relu, backend=self.backend, **extra)


# --------------------------------------------------------------------------- plain modules
def _plain_block(spec: BlockSpec) -> nn.Module:
    if spec.block == "cifar":
        return frb.CifarBasicBlock(spec.inplanes, spec.planes, spec.stride, shortcut="A")
    cls = {"bottleneck": Bottleneck, "basic": BasicBlock}[spec.block]
    downsample = None
    if spec.projection:
        out = spec.planes * cls.expansion
        downsample = nn.Sequential(conv1x1(spec.inplanes, out, spec.stride), nn.BatchNorm2d(out))
    return cls(spec.inplanes, spec.planes, spec.stride, downsample)


def build_plain(spec, device) -> nn.Module:
    """A fresh plain module for ``spec``, built directly on ``device`` ("meta" for counting)."""
    torch.manual_seed(SEED)
    with torch.device(device):
        if isinstance(spec, ModelSpec):
            module = frb.revert(getattr(frb.models, spec.builder)(num_classes=spec.num_classes))
        elif isinstance(spec, BlockSpec):
            module = _plain_block(spec)
        else:
            module = ConvLayerModule(spec)
    if torch.device(device).type != "meta":
        randomize_norms(module, WELL_SCALED_SPREAD)
        calibrate_norms(module, spec, device)
    return module


CALIBRATION_BATCH = 4


def calibrate_norms(module: nn.Module, spec, device) -> None:
    """Running statistics as a trained network has them: each BN's from one training-mode pass over
    a random batch. With fixed statistics a deep random ResNet's activations grow ~2x per residual
    block: ResNet-101's reach 2e5, past fp16's range (inf in every fp16 case); a trained network's
    BNs keep them near 1. In place; momentum and num_batches_tracked as they were."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None  # the cumulative average of one batch: that batch's statistics
    training = module.training
    module.train()
    try:
        # cudnn's benchmark mode would time every conv at this throwaway batch size
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=False):
            module(*module_args(spec, CALIBRATION_BATCH, torch.float32, device))
    finally:
        module.train(training)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()


def fuse(plain: nn.Module, backend: str) -> nn.Module:
    """Ours, from a plain module (converted in place; the parameters stay the same objects)."""
    if isinstance(plain, ConvLayerModule):
        return FusedConvLayer(plain, backend).train(plain.training)
    return frb.convert(plain, backend=backend)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Precision:
    """How an implementation runs a case's dtype: module and input dtypes, and autocast."""

    module_dtype: torch.dtype
    input_dtype: torch.dtype
    autocast: Optional[torch.dtype] = None


def prepare(module: nn.Module, case: Case, precision: Precision) -> nn.Module:
    """The plain module at the precision's dtype and the case's memory format, in training mode for
    ``train``; in eval mode with every BN frozen (no gradient) for ``finetune``."""
    module = module.to(dtype=precision.module_dtype, memory_format=case.torch_format)
    if case.mode == "finetune":
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    return module.train(case.mode == "train")


def module_args(spec, batch: int, dtype: torch.dtype, device,
                memory_format: torch.memory_format = torch.contiguous_format) -> list:
    """Random arguments of the module for ``spec``: its input, and a single layer's shortcut input."""
    def activation(*shape):
        return torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    args = [activation(batch, *input_size(spec))]
    if isinstance(spec, ConvLayer) and spec.residual == "identity":
        args.append(activation(batch, spec.out_channels, spec.out_height, spec.out_width))
    elif isinstance(spec, ConvLayer) and spec.residual == "projection":
        args.append(activation(batch, spec.shortcut_in_channels, spec.shortcut_height, spec.shortcut_width))
    return args


def make_input(spec, case: Case, dtype: torch.dtype, device) -> tuple:
    """One input tuple: the module's arguments, then (training or fine-tuning a model) the labels."""
    args = module_args(spec, case.batch, dtype, device, case.torch_format)
    if case.has_backward and isinstance(spec, ConvLayer):
        args[0].requires_grad_()  # a single conv's step includes its input's gradient (dgrad), as inside a net
    if case.has_backward and isinstance(spec, ModelSpec):
        args.append(torch.randint(0, spec.num_classes, (case.batch,), device=device))
    return tuple(args)


def input_bytes(inputs: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in inputs)


def split_input(spec, case: Case, inputs: tuple):
    """(module arguments, loss arguments) of one input tuple."""
    if case.has_backward and isinstance(spec, ModelSpec):
        return inputs[:-1], inputs[-1:]
    return inputs, ()


def loss(spec, output: Tensor, loss_args: tuple) -> Tensor:
    """Cross-entropy for a model; a plain mean for a block (its backward is one uniform gradient)."""
    if isinstance(spec, ModelSpec):
        return F.cross_entropy(output.float(), loss_args[0])
    return output.float().mean()
