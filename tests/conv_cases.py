"""Convolution test cases and their random inputs, shared by every backend's tests.

``ConvGeometry`` is one convolution's shape; ``ConvBiasActCase`` adds what the
eval-mode op fuses (residual, merged projection, ReLU). ``conv_bias_act_inputs``
draws fresh random arguments for ``conv_bias_act`` under the reference
backend's names, and ``check_conv_bias_act`` judges an output by the numerical
rule against float64 and against PyTorch at the same dtype. ``conv_stats_inputs`` and
``check_conv_stats`` do the same for the training-mode ``conv_stats`` (with its BN prologue).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from fused_resblock.backends import reference
from fused_resblock.testing import assert_rule
from helpers import DEVICE, check_grads, float64_cpu


@dataclass(frozen=True)
class ConvGeometry:
    batch: int
    in_channels: int
    size: int  # square input maps
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1


@dataclass(frozen=True)
class ConvBiasActCase(ConvGeometry):
    """One conv_bias_act call.

    residual: None, "same" (R shaped like the output) or "option_a" (the CIFAR
    shortcut: a block input with half the output channels, read at stride 2 into
    channels [C_out/4, 3 C_out/4)). shortcut_channels > 0 merges a 1x1
    projection of an input read at shortcut_stride (its size: shortcut_size, by
    default out_size * shortcut_stride).
    """

    residual: Optional[str] = None
    shortcut_channels: int = 0
    shortcut_stride: int = 1
    shortcut_size: Optional[int] = None
    relu: bool = True
    name: str = field(default="", kw_only=True)

    def __str__(self) -> str:
        return self.name or repr(self)


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def conv_bias_act_inputs(case: ConvBiasActCase, dtype: torch.dtype, device, channels_last: bool, *,
                         weight_channels_last: Optional[bool] = None,
                         residual_channels_last: Optional[bool] = None,
                         generator: Optional[torch.Generator] = None) -> dict:
    """Fresh random keyword arguments for ``conv_bias_act`` (bias random, never zero).

    Activations are channels_last when asked; weights and the residual follow
    them unless told otherwise. Drawn on the CPU (from ``generator`` when given,
    for a reproducible case), then moved to ``device``.
    """
    weight_fmt = _layout(channels_last if weight_channels_last is None else weight_channels_last)
    residual_fmt = _layout(channels_last if residual_channels_last is None else residual_channels_last)

    def rand(*shape, memory_format=_layout(channels_last), scale=1.0):
        t = torch.randn(*shape, generator=generator) * scale
        return t.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    c_in_g = case.in_channels // case.groups
    fan_in = c_in_g * case.kernel ** 2 + case.shortcut_channels
    o = case.out_size
    x = rand(case.batch, case.in_channels, case.size, case.size)
    weight = rand(case.out_channels, c_in_g, case.kernel, case.kernel, memory_format=weight_fmt,
                  scale=fan_in ** -0.5)
    bias = torch.randn(case.out_channels, generator=generator).to(device) if case.bias else None
    residual, residual_stride, residual_offset = None, 1, 0
    if case.residual == "same":
        residual = rand(case.batch, case.out_channels, o, o, memory_format=residual_fmt)
    elif case.residual == "option_a":  # odd block inputs too: ceil(size / 2) == out_size
        size = 2 * o - (o % 2)
        residual = rand(case.batch, case.out_channels // 2, size, size, memory_format=residual_fmt)
        residual_stride, residual_offset = 2, case.out_channels // 4
    shortcut_x = shortcut_weight = None
    if case.shortcut_channels:
        size = case.shortcut_size or o * case.shortcut_stride
        shortcut_x = rand(case.batch, case.shortcut_channels, size, size)
        shortcut_weight = rand(case.out_channels, case.shortcut_channels, 1, 1, memory_format=weight_fmt,
                               scale=fan_in ** -0.5)
    return dict(
        x=x, weight=weight, bias=bias, stride=(case.stride,) * 2, padding=(case.padding,) * 2,
        dilation=(case.dilation,) * 2, groups=case.groups,
        residual=residual, residual_stride=residual_stride, residual_offset=residual_offset,
        shortcut_x=shortcut_x, shortcut_weight=shortcut_weight, shortcut_stride=case.shortcut_stride,
        relu=case.relu,
    )


def poisoned_output(case: ConvBiasActCase, args: dict) -> torch.Tensor:
    """NaN everywhere, shaped, typed and laid out as the op's output: an unwritten element fails the rule."""
    x = args["x"]
    shape = (case.batch, case.out_channels, case.out_size, case.out_size)
    return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device).contiguous(
        memory_format=reference.memory_format_of(x))


def check_conv_bias_act(args: dict, out: torch.Tensor, name: str = "out") -> None:
    """The rule against float64 and PyTorch at the same dtype, plus the output's dtype and memory format."""
    ref64 = reference.conv_bias_act(**float64_cpu(args))
    torch_out = reference.conv_bias_act(**args)
    assert out.dtype == args["x"].dtype
    assert reference.memory_format_of(out) == reference.memory_format_of(args["x"]), "output memory format"
    assert_rule(name, out, ref64, torch_out, dtype=args["x"].dtype)


# --------------------------------------------------------------------------- the backward
BACKWARD_NAMES = ["grad x", "grad weight", "grad bias", "grad residual", "grad shortcut_x",
                  "grad shortcut_weight"]

# ``needs`` of the backward (in BACKWARD_NAMES' order) that a backend must honour, as pytest params.
NEEDS_SUBSETS = [pytest.param(needs, id=name) for name, needs in (
    ("x", [True, False, False, False, False, False]),   # only x (saliency through a frozen model)
    ("w", [False, True, False, False, False, False]),   # only the weight
    ("b", [False, False, True, False, False, False]),   # only the bias
    ("res", [False, False, False, True, False, False]),   # only the residual
    ("shortcut", [False, False, False, False, True, True]),
    ("mixed", [True, True, False, True, False, True]),
)]


def backward_inputs(args: dict) -> dict:
    """``conv_bias_act_backward``'s arguments for a forward call ``args``: its output and a random gradient."""
    out = reference.conv_bias_act(**args)
    grad = torch.randn(out.shape, device=out.device).to(out.dtype).contiguous(
        memory_format=reference.memory_format_of(out))
    forward = {k: v for k, v in args.items() if k != "bias"}
    return dict(grad=grad, out=out, has_bias=args["bias"] is not None, **forward)


def check_backward(backward, args: dict, needs: list, **kw) -> list:
    """``backward(**arguments, **kw)`` against the reference at the same dtype and in float64, gradient by
    gradient (presence, dtype, shape, memory format, the rule). Returns its gradients."""
    bargs = dict(backward_inputs(args), needs=list(needs))
    fused = backward(**bargs, **kw)
    ref_t = reference.conv_bias_act_backward(**bargs)
    ref64 = reference.conv_bias_act_backward(**float64_cpu(bargs))
    check_grads(BACKWARD_NAMES, fused, ref_t, ref64, args["x"].dtype)
    return fused


# --------------------------------------------------------------------------- conv_stats (training mode)
def _rand(*shape, dtype=torch.float32, scale=1.0, shift=0.0, channels_last=False, device=DEVICE):
    t = torch.randn(*shape, device=device) * scale + shift
    return t.to(dtype).contiguous(memory_format=_layout(channels_last))


def bn_vectors(c: int, affine=True, weight_only=False, device=DEVICE):
    """(mean, invstd, weight, bias) of a BN, float32, random (never the 0/1 defaults)."""
    mean = torch.randn(c, device=device)
    invstd = torch.rand(c, device=device) + 0.5
    weight = torch.rand(c, device=device) + 0.5 if affine else None
    bias = torch.randn(c, device=device) if affine and not weight_only else None
    return mean, invstd, weight, bias


PROLOGUES = {
    # (affine, relu, weight only) of the previous BN applied as the input loads
    "none": None,
    "bn_relu": (True, True, False),
    "bn_norelu": (True, False, False),
    "bn_relu_noaffine": (False, True, False),
    "bn_weight_only": (True, True, True),
}


def conv_stats_inputs(case: ConvGeometry, dtype, channels_last: bool, prologue="bn_relu", compute_stats=True,
                      bias_shift=0.0, device=DEVICE) -> dict:
    """Fresh random keyword arguments for ``conv_stats``: x shaped like a previous conv's raw output."""
    fan_in = case.in_channels // case.groups * case.kernel ** 2
    # the input looks like the previous conv's raw output: off-centre, not unit scale
    x = _rand(case.batch, case.in_channels, case.size, case.size, dtype=dtype, scale=1.5, shift=0.7,
              channels_last=channels_last, device=device)
    weight = _rand(case.out_channels, case.in_channels // case.groups, case.kernel, case.kernel,
                   dtype=dtype, scale=fan_in ** -0.5, device=device)
    bias = torch.randn(case.out_channels, device=device) + bias_shift if case.bias else None
    spec = PROLOGUES[prologue]
    if spec is None:
        vectors, in_relu = (None,) * 4, False
    else:
        affine, in_relu, weight_only = spec
        vectors = bn_vectors(case.in_channels, affine, weight_only, device=device)
    in_mean, in_invstd, in_weight, in_bias = vectors
    return dict(x=x, weight=weight, bias=bias, stride=(case.stride,) * 2, padding=(case.padding,) * 2,
                dilation=(case.dilation,) * 2, groups=case.groups, in_mean=in_mean, in_invstd=in_invstd,
                in_weight=in_weight, in_bias=in_bias, in_relu=in_relu, compute_stats=compute_stats)


def check_conv_stats(args: dict, result) -> None:
    """(y, mean, var) by the rule against float64 and PyTorch at the same dtype, with dtypes, shapes and y's format."""
    y, mean, var = result
    y64, mean64, var64 = reference.conv_stats(**float64_cpu(args))
    y_t, mean_t, var_t = reference.conv_stats(**args)
    dtype = args["x"].dtype
    assert y.dtype == dtype and mean.dtype == var.dtype == torch.float32
    assert reference.memory_format_of(y) == reference.memory_format_of(args["x"]), "y's memory format"
    assert_rule("y", y, y64, y_t, dtype=dtype)
    if args["compute_stats"]:
        assert mean.shape == var.shape == (args["weight"].shape[0],)
        assert_rule("mean", mean, mean64, mean_t, dtype=dtype)
        assert_rule("var", var, var64, var_t, dtype=dtype)
    else:
        assert mean.shape == var.shape == (0,)
