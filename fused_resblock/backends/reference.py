"""The reference backend: every fused op in plain PyTorch.

It is the ground truth that tests and benchmarks import, and the path that runs
on the CPU. Every backend implements these six functions with these signatures
and these semantics; the docstrings below are the contract.

Shared conventions
------------------
* Activations are 4-D (N, C, H, W) in either memory format; outputs take the
  memory format of ``x`` (channels_last in, channels_last out).
* ``x``, ``weight`` and the optional ``shortcut_*`` / ``residual`` tensors share
  one dtype. Per-channel vectors (conv bias, BN mean/invstd/weight/bias, batch
  statistics) are float32 for float16/bfloat16/float32 activations and float64
  for float64.
* A *mapped residual* ``R`` is read from ``residual`` at a spatial stride and a
  channel offset, zero outside its channels (the CIFAR option-A shortcut reads
  the block input this way instead of materialising the padded tensor):
  ``R[n, c, h, w] = residual[n, c - offset, h * stride, w * stride]`` when
  ``0 <= c - offset < residual.shape[1]``, else 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "reference"


def available() -> Optional[str]:
    """None when usable here, else the reason it is not."""
    return None


def supports(op: str, config: dict) -> Optional[str]:
    """None when ``op`` is supported for ``config``, else the reason it is not."""
    return None


# --------------------------------------------------------------------------- helpers
def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of per-channel vectors for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_sum(t: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Per-channel sum over (N, H, W); accumulated in float64 on the CPU, as PyTorch's CPU batch norm does."""
    acc = torch.float64 if t.device.type == "cpu" else out_dtype
    return t.sum((0, 2, 3), dtype=acc).to(out_dtype)


def memory_format_of(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def weight_grad_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of a conv weight's gradient, for every backend (and the ops' fake kernels,
    which torch.compile holds to it): channels_last when x or the weight is, as
    ``convolution_backward`` on a GPU. The input's gradient follows x alone (``memory_format_of``)."""
    if torch.channels_last in (memory_format_of(x), memory_format_of(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def map_residual(residual: Tensor, channels: int, stride: int, offset: int) -> Tensor:
    """The mapped residual R (see module docstring), shape (N, channels, H', W')."""
    r = residual[:, :, ::stride, ::stride] if stride != 1 else residual
    after = channels - offset - r.shape[1]
    if offset != 0 or after != 0:
        r = F.pad(r, (0, 0, 0, 0, offset, after))
    return r


def unmap_residual_grad(grad: Tensor, residual: Tensor, stride: int, offset: int) -> Tensor:
    """Gradient of ``map_residual`` with respect to ``residual``."""
    g = grad[:, offset : offset + residual.shape[1]]
    if stride == 1:  # a copy: a custom op's output may not alias its input
        return g.clone(memory_format=memory_format_of(residual))
    out = torch.zeros_like(residual)
    out[:, :, ::stride, ::stride] = g
    return out


def _relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    """``grad`` through a ReLU whose output (or input) was ``out``: torch's rule, zero where
    ``out <= 0``, so a NaN passes its gradient as it passes its value."""
    return torch.where(out <= 0, torch.zeros_like(grad), grad)


def _conv(x, weight, stride, padding, dilation, groups):
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def _conv_backward(grad, x, weight, stride, padding, dilation, groups, mask):
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [mask[0], mask[1], False],
    )
    # aten's formats vary with the device and its conv algorithm (a channels_last weight can make gx
    # channels_last for an NCHW x): hold them to the contract (no copy when they already match)
    if gx is not None:
        gx = gx.contiguous(memory_format=memory_format_of(x))
    if gw is not None:
        gw = gw.contiguous(memory_format=weight_grad_format(x, weight))
    return gx, gw


# --------------------------------------------------------------------------- inference
def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride, padding, dilation, groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool,
) -> Tensor:
    """out = act(conv(x, weight) + bias + conv1x1(shortcut_x, shortcut_weight, stride=shortcut_stride) + R).

    The eval-mode step: BN is already folded into ``weight``/``bias``; the
    optional shortcut term is a downsample projection merged into the same GEMM.
    """
    acc = stat_dtype(x.dtype)
    y = _conv(x, weight, stride, padding, dilation, groups).to(acc)
    if bias is not None:
        y = y + _per_channel(bias.to(acc))
    if shortcut_x is not None:
        y = y + F.conv2d(shortcut_x, shortcut_weight, None, shortcut_stride).to(acc)
    if residual is not None:
        y = y + map_residual(residual, y.shape[1], residual_stride, residual_offset).to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def conv_bias_act_backward(
    grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
    stride, padding, dilation, groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, needs: list,
):
    """Gradients of ``conv_bias_act``; ``out`` is its saved output (for the ReLU mask).

    ``needs`` = [x, weight, bias, residual, shortcut_x, shortcut_weight];
    returns a tuple in that order with None where not needed or not present.
    """
    g = _relu_backward(grad, out) if relu else grad
    gx, gw = _conv_backward(g, x, weight, stride, padding, dilation, groups, needs[0:2])
    gb = _channel_sum(g, stat_dtype(g.dtype)) if (has_bias and needs[2]) else None
    gr = None
    if residual is not None and needs[3]:
        gr = unmap_residual_grad(g, residual, residual_stride, residual_offset)
    gsx = gsw = None
    if shortcut_x is not None and (needs[4] or needs[5]):
        gsx, gsw = _conv_backward(g, shortcut_x, shortcut_weight, (shortcut_stride,) * 2, (0, 0), (1, 1), 1, needs[4:6])
    return (
        gx if needs[0] else None, gw if needs[1] else None, gb, gr,
        gsx if needs[4] else None, gsw if needs[5] else None,
    )


# --------------------------------------------------------------------------- training
# A BN is passed as its per-channel (mean, invstd, weight, bias): weight/bias None
# for affine=False. Gradients then come from centred values, (x - mean) * invstd,
# as in PyTorch's own BN backward; a (scale, shift) form would sum g * x and
# subtract, losing the answer to cancellation when |mean| >> std.
def _normalize(x: Tensor, mean, invstd, weight, bias) -> Tensor:
    """(x - mean) * invstd * weight + bias in the per-channel dtype."""
    out = (x.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd)
    if weight is not None:
        out = out * _per_channel(weight)
    if bias is not None:
        out = out + _per_channel(bias)
    return out


def _normalize_backward(g: Tensor, x: Tensor, mean, invstd, weight, needs):
    """Gradients of ``_normalize`` for needs = [x, mean, invstd, weight, bias]; g in the per-channel dtype."""
    sd = mean.dtype
    g_hat = g if weight is None else g * _per_channel(weight)       # gradient of x_hat
    centred = x.to(sd) - _per_channel(mean)
    gx = g_hat * _per_channel(invstd)
    return (
        gx.to(x.dtype) if needs[0] else None,
        -_channel_sum(gx, sd) if needs[1] else None,
        _channel_sum(g_hat * centred, sd) if needs[2] else None,
        _channel_sum(g * centred * _per_channel(invstd), sd) if needs[3] and weight is not None else None,
        _channel_sum(g, sd) if needs[4] else None,
    )


def _prologue(x, in_mean, in_invstd, in_weight, in_bias, in_relu):
    """relu?(BN(x)) cast back to x's dtype: the previous layer's BN + ReLU, applied as the input loads."""
    if in_mean is None:
        return x
    a = _normalize(x, in_mean, in_invstd, in_weight, in_bias)
    if in_relu:
        a = torch.relu(a)
    return a.to(x.dtype)


def conv_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride, padding, dilation, groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, compute_stats: bool,
):
    """(y, mean, var): y = conv(relu?(BN_in(x))) + bias, with the batch statistics of y.

    The prologue BN_in (``in_*``; absent when ``in_mean`` is None) is the
    previous BN and ReLU applied as the input loads. ``mean``/``var`` are the
    per-output-channel mean and biased variance over (N, H, W) in the
    per-channel dtype; empty tensors when ``compute_stats`` is False.
    """
    a = _prologue(x, in_mean, in_invstd, in_weight, in_bias, in_relu)
    y = _conv(a, weight, stride, padding, dilation, groups)
    if bias is not None:
        y = (y.to(bias.dtype) + _per_channel(bias)).to(x.dtype)
    y = y.contiguous(memory_format=memory_format_of(x))
    sd = stat_dtype(x.dtype)
    if compute_stats and y.numel() > 0:
        acc = torch.float64 if y.device.type == "cpu" else sd
        var, mean = (s.to(sd) for s in torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0))
    elif compute_stats:
        mean = torch.full((y.shape[1],), float("nan"), dtype=sd, device=y.device)
        var = torch.full((y.shape[1],), float("nan"), dtype=sd, device=y.device)
    else:
        mean, var = y.new_empty((0,), dtype=sd), y.new_empty((0,), dtype=sd)
    return y, mean, var


def conv_stats_backward(
    grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
    x: Tensor, y: Tensor, mean: Tensor, weight: Tensor, has_bias: bool,
    stride, padding, dilation, groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, needs: list,
):
    """Gradients of ``conv_stats``; ``y``/``mean`` are its saved outputs.

    The statistics' gradients fold into y's gradient (dmean/dy = 1/count,
    dvar/dy = 2 (y - mean)/count); the prologue is recomputed from ``x``, not
    saved. ``needs`` = [x, weight, bias, in_mean, in_invstd, in_weight,
    in_bias]; returns a tuple in that order.
    """
    sd = stat_dtype(x.dtype)
    g = grad_y.to(sd)
    count = y.numel() // max(y.shape[1], 1)
    if grad_mean is not None:
        g = g + _per_channel(grad_mean) / count
    if grad_var is not None:
        g = g + _per_channel(grad_var) * 2.0 * (y.to(sd) - _per_channel(mean)) / count
    gb = _channel_sum(g, sd) if (has_bias and needs[2]) else None
    g = g.to(x.dtype)
    has_prologue = in_mean is not None
    a = _prologue(x, in_mean, in_invstd, in_weight, in_bias, in_relu)
    need_ga = needs[0] or (has_prologue and any(needs[3:7]))
    ga, gw = _conv_backward(g, a, weight, stride, padding, dilation, groups, [need_ga, needs[1]])
    prologue_grads = (None,) * 4
    gx = ga if needs[0] else None
    if need_ga and has_prologue:
        ga = ga.to(sd)
        if in_relu:
            ga = _relu_backward(ga, a)
        gx, *prologue_grads = _normalize_backward(ga, x, in_mean, in_invstd, in_weight, [needs[0], *needs[3:7]])
    # the formats follow x, as the ops' fake kernels say, not the prologue's dense copy of it (a
    # channel slice of a channels_last x is neither format: its copy is channels_last)
    if gx is not None:
        gx = gx.contiguous(memory_format=memory_format_of(x))
    if gw is not None:
        gw = gw.contiguous(memory_format=weight_grad_format(x, weight))
    return (gx, gw if needs[1] else None, gb, *prologue_grads)


def bn_add_act(
    y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], res_bias: Optional[Tensor],
    residual_stride: int, residual_offset: int, relu: bool,
) -> Tensor:
    """out = act(BN(y) + R'), R' = BN_res(residual) when ``res_mean`` is given, else the mapped residual R.

    A block's last BN, the shortcut's BN (projection) or identity, the residual
    add and the ReLU in one pass.
    """
    out = _normalize(y, mean, invstd, weight, bias)
    if residual is not None:
        if res_mean is not None:
            r = _normalize(residual, res_mean, res_invstd, res_weight, res_bias)
        else:
            r = residual.to(mean.dtype)
        out = out + map_residual(r, y.shape[1], residual_stride, residual_offset)
    if relu:
        out = torch.relu(out)
    return out.to(y.dtype).contiguous(memory_format=memory_format_of(y))


def bn_add_act_backward(
    grad: Tensor, out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], residual_stride: int, residual_offset: int, relu: bool, needs: list,
):
    """Gradients of ``bn_add_act``; ``out`` is its saved output (for the ReLU mask).

    ``needs`` = [y, mean, invstd, weight, bias, residual, res_mean, res_invstd,
    res_weight, res_bias]; returns a tuple in that order.
    """
    g = grad.to(mean.dtype)
    if relu:
        g = _relu_backward(g, out)
    main = _normalize_backward(g, y, mean, invstd, weight, needs[0:5])
    rest = (None,) * 5
    if residual is not None and any(needs[5:10]):
        gm = unmap_residual_grad(g, residual.to(g.dtype), residual_stride, residual_offset)
        if res_mean is not None:
            rest = _normalize_backward(gm, residual, res_mean, res_invstd, res_weight, needs[5:10])
        elif needs[5]:
            rest = (gm.to(residual.dtype), None, None, None, None)
    gy = main[0].contiguous(memory_format=memory_format_of(y)) if main[0] is not None else None
    if rest[0] is not None:  # the residual's own format, not its dense fp32 copy's
        rest = (rest[0].contiguous(memory_format=memory_format_of(residual)), *rest[1:])
    return (gy, *main[1:], *rest)
