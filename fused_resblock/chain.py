"""A chain of conv + BN pairs ending in a shortcut add and ReLU, run through the fused ops.

Every fused module (the torchvision blocks, the CIFAR block, the stem) is such a
chain: ``layers`` are (conv, norm) pairs with a ReLU between them, the last
pair's output gets the shortcut and, if ``final_relu``, a ReLU.

Eval (no norm needs batch statistics): BN folded into each conv, one
``conv_bias_act`` per conv; a 1x1 projection shortcut is merged into the last
conv's GEMM. Train: ``conv_stats`` per conv (the previous BN + ReLU applied in
its prologue), then one ``bn_add_act`` for last BN + shortcut + add + ReLU.

Eval with gradients for a BN weight (fine-tuning under running statistics)
takes the train structure with running statistics instead of folding: a
weight's gradient through a fold is a difference of two large sums, which
cancellation ruins when |mean| >> std.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import norms, ops
from .folding import FoldCache, member


@dataclass(frozen=True)
class Shortcut:
    """How the block input reaches the residual add.

    kind: "none" (plain net), "identity", "mapped" (CIFAR option A: read at
    ``stride`` with zero channels before ``offset``), "projection" (conv + norm,
    fused), "module" (a user's downsample, run as given).
    """

    kind: str
    stride: int = 1
    offset: int = 0
    conv: Optional[nn.Conv2d] = None
    norm: Optional[nn.Module] = None
    module: Optional[nn.Module] = None


NONE = Shortcut("none")
IDENTITY = Shortcut("identity")


def conv_unfusable_reason(conv: nn.Module) -> Optional[str]:
    """None when ``conv`` is a Conv2d our ops run, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"conv padding {conv.padding!r} / mode {conv.padding_mode!r} is not explicit zero padding"
    return None


HOOK_KINDS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
              "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}


def hooks_reason(module: nn.Module) -> Optional[str]:
    """None when ``module`` runs as its class says, else why its block must call it: a hook
    (pruning's, FSDP's, a feature extractor's) or a ``forward`` replaced on the instance takes
    effect only inside the module's own call."""
    attributes = module.__dict__
    for attr, kind in HOOK_KINDS.items():
        if attributes.get(attr):
            return f"its {type(module).__name__} has {kind} (they fire only when the module runs itself)"
    if "forward" in attributes:
        return f"its {type(module).__name__} has a forward of its own, set on the instance"
    return None


def own_forward_reason(module: nn.Module, base: type) -> Optional[str]:
    """None when ``module`` computes what ``base`` does, else why not: a subclass with a forward of
    its own (a scaled downsample) is not the container it derives from."""
    if type(module).forward is not base.forward:
        return f"its {type(module).__name__} overrides {base.__name__}.forward"
    return None


def pair_unfusable_reason(conv: nn.Module, norm: nn.Module) -> Optional[str]:
    """None when a (conv, norm) pair can run as one fused step, else why not."""
    return (conv_unfusable_reason(conv) or norms.unfusable_reason(norm)
            or hooks_reason(conv) or hooks_reason(norm))


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _mergeable(conv: nn.Conv2d) -> bool:
    """A 1x1, unpadded, ungrouped projection can share the last conv's GEMM."""
    return conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) \
        and conv.groups == 1 and conv.stride[0] == conv.stride[1]


def _count(y: Tensor) -> int:
    return y.shape[0] * y.shape[2] * y.shape[3]


def run_chain(x: Tensor, layers, shortcut: Shortcut, final_relu: bool, cache: FoldCache,
              backend: Optional[str]) -> Tensor:
    """Run the chain on ``x``; see the module docstring."""
    norms_used = [norm for _, norm in layers]
    if shortcut.kind == "projection":
        norms_used.append(shortcut.norm)
    if any(norms.uses_batch_stats(n) for n in norms_used) or _norm_weight_needs_grad(norms_used):
        return _run_train(x, layers, shortcut, final_relu, backend)
    return _run_eval(x, layers, shortcut, final_relu, cache, backend)


def _norm_weight_needs_grad(norm_modules) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(getattr(n, "weight", None) is not None and n.weight.requires_grad for n in norm_modules)


def _check_weight_dtype(conv: nn.Conv2d, h: Tensor) -> None:
    """A fold is cast to the input's dtype, so the ops never see a mismatch: name it here, as
    torchvision's conv would (outside autocast, which casts both)."""
    if not isinstance(h, Tensor):  # a TypeError naming it, as torchvision's, not an AttributeError
        ops.check_activation("input", h)
    weight = member(conv, "weight")  # a plain tensor too (DataParallel's replicas hold those)
    if weight.dtype != h.dtype and ops.autocast_dtype(h.device.type) is None:
        ops.check_same("weight", weight, h)


def _run_eval(x, layers, shortcut, final_relu, cache, backend):
    h = x
    for conv, norm in layers[:-1]:
        _check_weight_dtype(conv, h)
        weight, bias = cache.fold(conv, norm, h.dtype)
        h = ops.conv_bias_act(h, weight, bias, **_conv_args(conv), relu=True, backend=backend)
    conv, norm = layers[-1]
    _check_weight_dtype(conv, h)
    if shortcut.kind == "projection":
        _check_weight_dtype(shortcut.conv, x)
    extra = {}
    if shortcut.kind == "projection" and _mergeable(shortcut.conv):
        weight, s_weight, bias = cache.fold_projection(conv, norm, shortcut.conv, shortcut.norm, h.dtype)
        extra = dict(shortcut_x=x, shortcut_weight=s_weight, shortcut_stride=shortcut.conv.stride[0])
    else:
        weight, bias = cache.fold(conv, norm, h.dtype)
    if shortcut.kind in ("identity", "mapped"):
        extra = dict(residual=x, residual_stride=shortcut.stride, residual_offset=shortcut.offset)
    elif shortcut.kind == "projection" and not extra:
        s_weight, s_bias = cache.fold(shortcut.conv, shortcut.norm, x.dtype)
        extra = dict(residual=ops.conv_bias_act(x, s_weight, s_bias, **_conv_args(shortcut.conv), backend=backend))
    elif shortcut.kind == "module":
        extra = dict(residual=shortcut.module(x))
    return ops.conv_bias_act(h, weight, bias, **_conv_args(conv), relu=final_relu, backend=backend, **extra)


def _norm_params(norm, y, mean, var):
    if norms.uses_batch_stats(norm):
        return norms.batch_params(norm, mean, var, _count(y))
    return norms.running_params(norm, mean.dtype)


def _conv_norm_train(h, conv, norm, in_norm, backend):
    """conv_stats of relu(BN_in(h)) (plain h when ``in_norm`` is None), then this norm's parameters."""
    y, mean, var = ops.conv_stats(
        h, conv.weight, conv.bias, **_conv_args(conv), in_norm=in_norm, in_relu=in_norm is not None,
        compute_stats=norms.uses_batch_stats(norm), backend=backend,
    )
    return y, _norm_params(norm, y, mean, var)


def _run_train(x, layers, shortcut, final_relu, backend):
    h, norm = x, None
    for conv, norm_module in layers:
        h, norm = _conv_norm_train(h, conv, norm_module, norm, backend)
    extra = {}
    if shortcut.kind in ("identity", "mapped"):
        extra = dict(residual=x, residual_stride=shortcut.stride, residual_offset=shortcut.offset)
    elif shortcut.kind == "projection":
        y_s, s_norm = _conv_norm_train(x, shortcut.conv, shortcut.norm, None, backend)
        extra = dict(residual=y_s, residual_norm=s_norm)
    elif shortcut.kind == "module":
        extra = dict(residual=shortcut.module(x))
    return ops.bn_add_act(h, norm, relu=final_relu, backend=backend, **extra)
