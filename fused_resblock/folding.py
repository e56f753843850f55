"""Eval-mode BN folding, cached.

conv(x, w) + b followed by BN with running statistics equals
conv(x, w * s) + (b - mean) * s + beta, with s = gamma / sqrt(var + eps).
The fold is cached per (conv, norm) pair and recomputed only when a parameter
or buffer changed: the key holds each tensor's identity, storage, version
counter, dtype and device, so an optimizer step, ``load_state_dict`` or
``.to()`` invalidates it and nothing else does. When autograd needs gradients
through the fold (fine-tuning with frozen BN) it is recomputed, differentiably.
"""
from __future__ import annotations

import torch
from torch import nn

from . import norms
from .backends.reference import stat_dtype


def _tensors(conv: nn.Conv2d, norm: nn.Module):
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return (conv.weight, conv.bias, weight, bias, norm.running_mean, norm.running_var)


def _key(tensors, dtype: torch.dtype, eps):
    parts = [dtype, eps]
    for t in tensors:
        if t is None:
            parts.append(None)
        else:
            parts.append((id(t), t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(parts)


def fold_uncached(conv: nn.Conv2d, norm: nn.Module, dtype: torch.dtype):
    """(weight in ``dtype``, bias in the per-channel dtype) of conv + norm folded."""
    sd = stat_dtype(dtype)
    scale, shift = norms.running_scale_shift(norm, sd)
    weight = (conv.weight.to(sd) * scale.view(-1, 1, 1, 1)).to(dtype)
    if weight.device.type != "cpu":
        # KRSC: both GPU backends read a tap's channels contiguously, and the CUDA
        # binding would copy any other layout on every call
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = shift if conv.bias is None else shift + conv.bias.to(sd) * scale
    return weight, bias


class FoldCache:
    """Folded tensors per (conv, norm) pair, valid while their tensors are unchanged."""

    def __init__(self) -> None:
        self._entries: dict = {}

    def fold(self, conv: nn.Conv2d, norm: nn.Module, dtype: torch.dtype):
        """(weight, bias) of ``conv`` followed by ``norm``."""
        return self._cached((conv, norm), dtype, lambda: fold_uncached(conv, norm, dtype))

    def fold_projection(self, conv: nn.Conv2d, norm: nn.Module, shortcut_conv: nn.Conv2d,
                        shortcut_norm: nn.Module, dtype: torch.dtype):
        """(weight, shortcut weight, summed bias) of a last conv merged with its projection shortcut."""
        def compute():
            weight, bias = fold_uncached(conv, norm, dtype)
            s_weight, s_bias = fold_uncached(shortcut_conv, shortcut_norm, dtype)
            return weight, s_weight, bias + s_bias
        return self._cached((conv, norm, shortcut_conv, shortcut_norm), dtype, compute)

    def _cached(self, pairs, dtype: torch.dtype, compute):
        tensors = [t for i in range(0, len(pairs), 2) for t in _tensors(pairs[i], pairs[i + 1])]
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        ):
            return compute()
        key = _key(tensors, dtype, tuple(norm.eps for norm in pairs[1::2]))
        slot = tuple(id(m) for m in pairs)
        entry = self._entries.get(slot)
        if entry is not None and entry[0] == key:
            return entry[1]
        with torch.no_grad():
            folded = compute()
        # a new version of any tensor replaces the entry: the cache never grows stale copies
        self._entries[slot] = (key, folded)
        return folded

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
