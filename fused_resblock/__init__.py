"""fused_resblock: ResNet residual blocks with conv + BN + ReLU + residual add fused.

    import torchvision, fused_resblock as frb
    model = frb.convert(torchvision.models.resnet50())   # same parameters, fused blocks
    model = frb.models.resnet50()                        # or build fused
"""
from . import models, ops, testing
from ._warnings import FusedResblockFallbackWarning
from .backends import BackendUnsupportedError, FirstCallInCaptureError
from .blocks import (
    CifarBasicBlock, FusedBasicBlock, FusedBottleneck, FusedCifarBasicBlock, FusedPlainBasicBlock,
    PlainBasicBlock, ZeroPadShortcut,
)
from .convert import convert, refold, revert, set_backend
from .models import CifarResNet, FusedCifarResNet, FusedResNet

__version__ = "0.1.0"

__all__ = [
    "convert", "revert", "refold", "set_backend", "models", "ops", "testing",
    "FusedBasicBlock", "FusedBottleneck", "FusedPlainBasicBlock", "FusedCifarBasicBlock",
    "PlainBasicBlock", "CifarBasicBlock", "ZeroPadShortcut",
    "FusedResNet", "CifarResNet", "FusedCifarResNet",
    "BackendUnsupportedError", "FirstCallInCaptureError", "FusedResblockFallbackWarning",
]
