"""convert() / revert(): swap torchvision blocks for fused ones inside any module tree.

The swap changes each module's class in place (the fused classes subclass the
originals and add no parameters), so every Parameter and buffer stays the very
same object: an optimizer built before keeps working and the state_dict is
unchanged, key for key. Only exact classes are swapped: a user's own subclass
of BasicBlock may have its own forward, and is left alone.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from . import backends
from .blocks import (
    CifarBasicBlock, FusedBasicBlock, FusedBottleneck, FusedCifarBasicBlock, FusedModule,
    FusedPlainBasicBlock, PlainBasicBlock,
)
from .models import CifarResNet, FusedCifarResNet, FusedResNet

TO_FUSED = {
    BasicBlock: FusedBasicBlock,
    Bottleneck: FusedBottleneck,
    PlainBasicBlock: FusedPlainBasicBlock,
    CifarBasicBlock: FusedCifarBasicBlock,
    ResNet: FusedResNet,
    CifarResNet: FusedCifarResNet,
}
TO_PLAIN = {fused: plain for plain, fused in TO_FUSED.items()}


def convert(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Fuse every torchvision BasicBlock/Bottleneck (and ResNet stem) in ``model``, in place.

    Returns ``model``. Idempotent. ``backend`` ("auto", "reference", "triton",
    "cuda"; default: ``FUSED_RESBLOCK_BACKEND`` or auto) is set on every fused
    module, also those already fused.
    """
    if backend is not None:
        backends.resolve_name(backend)  # reject an unknown name now, not at the first forward
    for module in model.modules():
        fused = TO_FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return set_backend(model, backend) if backend is not None else model


def revert(model: nn.Module) -> nn.Module:
    """Turn every fused module in ``model`` back into its torchvision (or plain CIFAR) class, in place."""
    for module in model.modules():
        plain = TO_PLAIN.get(type(module))
        if plain is not None:
            module.__dict__.pop("_fold_cache", None)
            module.__dict__.pop("backend", None)
            module.__class__ = plain
    return model


def refold(model: nn.Module, force: bool = False) -> int:
    """Refold the eval-mode BN of every fused module whose weights or statistics changed in place
    since their last forward; the number of folds redone. A CUDA graph captured from the model
    reads its folded weights, not the parameters: after an optimizer step, ``load_state_dict`` or
    an EMA update, call this before replaying it (any eager forward refolds too). Refolds write into
    the captured tensors, so the graph stays valid. ``force``: refold every fold, also those whose
    tensors look unchanged (writes through ``.data``, ``p.data.mul_(d)``, bump no version counter)."""
    return sum(module.__dict__["_fold_cache"].refresh(force) for module in model.modules()
               if "_fold_cache" in module.__dict__)


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set the backend of every fused module in ``model`` (None: environment or auto)."""
    if backend is not None:
        backend = backends.resolve_name(backend)
    for module in model.modules():
        if isinstance(module, FusedModule):
            module.backend = backend
    return model
