"""Which normalisation layers we fuse, and BN's arithmetic around the fused ops.

A fusable norm is nn.BatchNorm2d (and subclasses that keep its forward),
torchvision's FrozenBatchNorm2d (always running statistics), and SyncBatchNorm
while it uses running statistics (eval mode). Everything else (GroupNorm, a training
SyncBatchNorm, Identity, ...) makes the block run as given.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

try:
    from torchvision.ops import FrozenBatchNorm2d
except ImportError:  # torchvision is a dependency, but keep the core importable
    FrozenBatchNorm2d = ()


def uses_batch_stats(norm: nn.Module) -> bool:
    """True when ``norm`` normalises with batch statistics (nn.BatchNorm2d's rule)."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return norm.training or norm.running_mean is None
    return False


def unfusable_reason(norm: nn.Module) -> Optional[str]:
    """None when ``norm`` can be fused, else why not. A subclass counts when it keeps its batch
    norm's forward: one with a forward of its own (timm's BatchNormAct2d adds an activation)
    computes something else."""
    if isinstance(norm, FrozenBatchNorm2d):
        base = FrozenBatchNorm2d
    elif isinstance(norm, nn.SyncBatchNorm):
        if uses_batch_stats(norm):
            return "SyncBatchNorm with batch statistics needs a cross-process reduction"
        base = nn.SyncBatchNorm
    elif isinstance(norm, nn.BatchNorm2d):
        base = nn.BatchNorm2d
    else:
        return f"norm layer {type(norm).__name__} is not a batch norm"
    if type(norm).forward is not base.forward:
        return f"norm layer {type(norm).__name__} overrides {base.__name__}'s forward"
    return None


def _affine(norm: nn.Module):
    return getattr(norm, "weight", None), getattr(norm, "bias", None)


def running_params(norm: nn.Module, dtype: torch.dtype):
    """(mean, invstd, weight, bias) of ``norm`` with its running statistics, mean/invstd in ``dtype``."""
    weight, bias = _affine(norm)
    invstd = torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
    return norm.running_mean.to(dtype), invstd, weight, bias


def running_scale_shift(norm: nn.Module, dtype: torch.dtype):
    """(scale, shift) with BN(x) = x * scale + shift under running statistics, in ``dtype`` (for folding)."""
    mean, invstd, weight, bias = running_params(norm, dtype)
    scale = invstd if weight is None else weight.to(dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def batch_params(norm: nn.Module, mean: Tensor, var: Tensor, count: int):
    """(mean, invstd, weight, bias) from batch statistics; updates running statistics like nn.BatchNorm2d.

    ``var`` is the biased variance over ``count`` elements per channel.
    """
    if count == 1:  # batch statistics of one value (F.batch_norm's check, train mode or not)
        tracked = norm.num_batches_tracked if norm.training and norm.track_running_stats else None
        if tracked is not None:  # nn.BatchNorm2d counts the batch before F.batch_norm refuses it
            tracked.add_(1)
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} per channel"
        )
    if norm.training and norm.track_running_stats:
        update_running_stats(norm, mean, var, count)
    weight, bias = _affine(norm)
    return mean, torch.rsqrt(var + norm.eps), weight, bias


@torch.no_grad()
def update_running_stats(norm: nn.Module, mean: Tensor, var: Tensor, count: int) -> None:
    """nn.BatchNorm2d's running-statistics update, on the device, without a host sync. Buffers a
    user set to None are skipped as nn.BatchNorm2d skips them (no count, no update)."""
    tracked = norm.num_batches_tracked
    if tracked is not None:
        tracked.add_(1)
    running_mean, running_var = norm.running_mean, norm.running_var
    if count == 0 or running_mean is None or running_var is None:  # an empty batch only counts
        return
    # computed in fp32 at least and rounded once into the buffer, as PyTorch's kernel does: fp16
    # buffers would round 1/n, 1 - 1/n and each product (5-8x torch's error under update_bn's
    # momentum=None), and count past 2048 inexactly
    acc = torch.promote_types(running_mean.dtype, torch.float32)
    if norm.momentum is None:  # cumulative moving average (no average at all without a count)
        if tracked is None:
            return
        factor = tracked.to(acc).reciprocal()
        keep = 1.0 - factor
    else:
        factor, keep = norm.momentum, 1.0 - norm.momentum
    unbiased = var.detach() * (count / (count - 1))
    # one write per buffer, of a value computed from the batch's statistics: under FakeTensorMode
    # with real buffers an in-place op on the buffer alone (mul_) would run for real
    running_mean.copy_(running_mean.to(acc) * keep + mean.detach().to(acc) * factor)
    running_var.copy_(running_var.to(acc) * keep + unbiased.to(acc) * factor)
