"""The fused steps of a residual block as ``torch.library`` custom ops.

Three forward ops, each with a fake (meta) implementation and registered
autograd whose backward is itself a custom op, so ``torch.compile(fullgraph=True)``
traces a fused model without graph breaks:

* ``conv_bias_act``  — eval: conv with folded BN, + merged 1x1 projection,
  + (mapped) residual, ReLU;
* ``conv_stats``     — train: conv of relu?(BN(x)) (the previous BN + ReLU
  applied as the input loads) with per-channel batch mean/variance;
* ``bn_add_act``     — train: a block's last BN, the shortcut's BN or
  identity, the residual add and the ReLU in one pass.

Each op picks its backend at run time (``backends.select``); the public
functions below check their inputs, apply autocast, and call the op.
Double backward (``create_graph=True``: gradient penalties, Hessian-vector
products) recomputes the op with the reference's differentiable PyTorch ops
(``_differentiable_grads``), with one warning where a kernel ran the forward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends
from ._warnings import warn_once
from .backends import reference
from .backends.reference import memory_format_of, stat_dtype, weight_grad_format

_NS = "fused_resblock"


# --------------------------------------------------------------------------- dispatch helpers
def _config(x: Tensor, weight: Optional[Tensor], stride=(1, 1), padding=(0, 0), dilation=(1, 1),
            groups: int = 1, merged_shortcut: bool = False, prologue: bool = False) -> dict:
    config = {"device": x.device, "dtype": x.dtype}
    if weight is not None:
        x_shape, w_shape = x.shape, weight.shape  # each .shape read builds a torch.Size (~0.3 us)
        config.update(
            kernel=tuple(w_shape[2:]), stride=tuple(stride), padding=tuple(padding),
            dilation=tuple(dilation), groups=groups, in_channels=x_shape[1],
            out_channels=w_shape[0], merged_shortcut=merged_shortcut, prologue=prologue,
        )
        # a cheap bound first (the padded input's pixels >= the output's rows); a key only when
        # needed: one in every config would lengthen every warning
        if (x_shape[0] * (x_shape[2] + 2 * padding[0]) * (x_shape[3] + 2 * padding[1]) > _INDEX_LIMIT
                or w_shape[1] * w_shape[2] * w_shape[3] > _INDEX_LIMIT):
            beyond = _beyond_32bit_indexing(x_shape, w_shape, stride, padding, dilation)
            if beyond:
                config["indexing"] = beyond
    return config


# The kernels index GEMM rows (output pixels) and depth (taps x channels per group) in 32 bits; the
# margin covers a last tile's overshoot. Element offsets are 64-bit: a tensor may pass 2**31 elements.
_INDEX_LIMIT = 2 ** 31 - 1 - 4096


def _beyond_32bit_indexing(x_shape, w_shape, stride, padding, dilation) -> Optional[str]:
    n, _, h, w = x_shape
    rows = (n * _conv_out_size(h, w_shape[2], stride[0], padding[0], dilation[0])
            * _conv_out_size(w, w_shape[3], stride[1], padding[1], dilation[1]))
    depth = w_shape[1] * w_shape[2] * w_shape[3]
    if rows > _INDEX_LIMIT or depth > _INDEX_LIMIT:
        return f"{rows} output pixels x {depth} taps x channels: beyond the kernels' 32-bit indexing"
    return None


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_out_shape(x: Tensor, weight: Tensor, stride, padding, dilation):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2:]
    return (
        n, weight.shape[0],
        _conv_out_size(h, kh, stride[0], padding[0], dilation[0]),
        _conv_out_size(w, kw, stride[1], padding[1], dilation[1]),
    )


def _layout(t: Optional[Tensor]):
    """What about a tensor can change which kernel is fastest: shape and channels_last-ness."""
    if t is None:
        return None
    return (*t.shape, t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _empty_like_format(shape, like: Tensor, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device,
                       memory_format=memory_format_of(like))


def _weight_grad_like(x: Tensor, weight: Tensor) -> Tensor:
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                       memory_format=weight_grad_format(x, weight))


def _fill_absent(grads, like: Tensor) -> tuple:
    """Custom ops cannot return None: an absent gradient travels as an empty tensor. A tuple of fixed
    arity, not a list: legacy vmap (``is_grads_batched=True``) can loop over an op only then."""
    return tuple(like.new_empty((0,)) if g is None else g for g in grads)


def _by_needs(grads, needs) -> list:
    """Back from ``_fill_absent``: a gradient exists exactly where it was needed."""
    return [g if need else None for g, need in zip(grads, needs)]


def _differentiable_grads(op: str, backend: str, inputs: tuple, needs: Sequence[bool], grads: tuple) -> list:
    """The gradients of ``op`` as a graph of PyTorch ops, for a backward with ``create_graph=True``.

    The fused backward kernels are not differentiable, so the op's forward is recomputed with the
    reference backend (the same math in differentiable PyTorch ops) and differentiated by autograd:
    torchvision's numbers, at its speed. A forced kernel backend has no such path and raises."""
    name = backends.resolve_name(backend or None)
    if name not in ("auto", "reference"):
        raise backends.BackendUnsupportedError(
            f"fused_resblock backend {name!r} (forced) has no double backward for {op} (create_graph=True): "
            "its backward kernels are not differentiable; use backend='auto' or 'reference' for it")
    if name == "auto" and inputs[0].device.type != "cpu":  # on the CPU auto is the reference anyway
        warn_once(("double backward", op),
                  f"fused_resblock: double backward (create_graph=True) of {op} recomputes it with the "
                  "unfused reference ops", stacklevel=4)
    # Differentiate with respect to fresh aliases: an input may also be an ancestor of another (a
    # block's input is conv1's x and the last op's residual), and the gradient with respect to the
    # tensor itself would add the paths through the other one.
    inputs = tuple(t.view_as(t) if need else t for t, need in zip(inputs, needs))
    wrt = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        outputs = getattr(reference, op)(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.numel()]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                     create_graph=True, allow_unused=True) if pairs and wrt else ())
    return [next(found) if need else None for need in needs]


# --------------------------------------------------------------------------- conv_bias_act
def _conv_bias_act_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, backend: str,
) -> Tensor:
    config = _config(x, weight, stride, padding, dilation, groups, merged_shortcut=shortcut_x is not None)
    args = (x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups,
            residual, residual_stride, residual_offset, shortcut_x, shortcut_weight, shortcut_stride, relu)

    def measure():  # built only when auto has several backends to choose from
        shape_key = (str(x.dtype), *(_layout(t) for t in (x, weight, bias, residual, shortcut_x)), *args[3:7],
                     residual_stride, residual_offset, shortcut_stride, relu)
        return shape_key, lambda module: module.conv_bias_act(*args)

    impl = backends.select("conv_bias_act", backend or None, config, measure=measure)
    return impl.conv_bias_act(*args)


_conv_bias_act = torch.library.custom_op(f"{_NS}::conv_bias_act", mutates_args=())(_conv_bias_act_impl)


@_conv_bias_act.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, residual, residual_stride, residual_offset,
      shortcut_x, shortcut_weight, shortcut_stride, relu, backend):
    return _empty_like_format(_conv_out_shape(x, weight, stride, padding, dilation), x)


@torch.library.custom_op(f"{_NS}::conv_bias_act_backward", mutates_args=())
def _conv_bias_act_backward(
    grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, needs: Sequence[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(x, weight, stride, padding, dilation, groups, merged_shortcut=shortcut_x is not None)
    args = (grad, out, x, weight, has_bias, tuple(stride), tuple(padding), tuple(dilation), groups,
            residual, residual_stride, residual_offset, shortcut_x, shortcut_weight, shortcut_stride,
            relu, list(needs))

    def measure():  # built only when auto has several backends to choose from
        shape_key = (str(x.dtype), *(_layout(t) for t in (grad, x, weight, residual, shortcut_x)), *args[4:9],
                     residual_stride, residual_offset, shortcut_stride, relu, tuple(bool(n) for n in needs))
        return shape_key, lambda module: module.conv_bias_act_backward(*args)

    impl = backends.select("conv_bias_act_backward", backend or None, config, measure=measure)
    return _fill_absent(impl.conv_bias_act_backward(*args), grad)


@_conv_bias_act_backward.register_fake
def _(grad, out, x, weight, has_bias, stride, padding, dilation, groups, residual, residual_stride,
      residual_offset, shortcut_x, shortcut_weight, shortcut_stride, relu, needs, backend):
    sd = stat_dtype(x.dtype)
    bias_grad = grad.new_empty((weight.shape[0],), dtype=sd) if has_bias and needs[2] else None
    return _fill_absent([
        _empty_like_format(x.shape, x) if needs[0] else None,
        _weight_grad_like(x, weight) if needs[1] else None,
        bias_grad,
        _empty_like_format(residual.shape, residual) if residual is not None and needs[3] else None,
        _empty_like_format(shortcut_x.shape, shortcut_x) if shortcut_x is not None and needs[4] else None,
        _weight_grad_like(shortcut_x, shortcut_weight) if shortcut_x is not None and needs[5] else None,
    ], grad)


def _conv_bias_act_setup(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, residual, residual_stride, residual_offset,
     shortcut_x, shortcut_weight, shortcut_stride, relu, backend) = inputs
    ctx.save_for_backward(output, x, weight, residual, shortcut_x, shortcut_weight, bias)
    ctx.args = (bias is not None, stride, padding, dilation, groups, residual_stride, residual_offset,
                shortcut_stride, relu, backend)


def _conv_bias_act_grad(ctx, grad):
    out, x, weight, residual, shortcut_x, shortcut_weight, bias = ctx.saved_tensors
    (has_bias, stride, padding, dilation, groups, residual_stride, residual_offset,
     shortcut_stride, relu, backend) = ctx.args
    ng = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True
        return (*_differentiable_grads("conv_bias_act", backend, (
            x, weight, bias, stride, padding, dilation, groups, residual, residual_stride, residual_offset,
            shortcut_x, shortcut_weight, shortcut_stride, relu), ng[:14], (grad,)), None)
    needs = [ng[0], ng[1], ng[2], ng[7], ng[10], ng[11]]
    gx, gw, gb, gr, gsx, gsw = _by_needs(_conv_bias_act_backward(
        grad.contiguous(memory_format=memory_format_of(out)), out, x, weight, has_bias,
        stride, padding, dilation, groups, residual, residual_stride, residual_offset,
        shortcut_x, shortcut_weight, shortcut_stride, relu, needs, backend,
    ), needs)
    return gx, gw, gb, None, None, None, None, gr, None, None, gsx, gsw, None, None, None


_conv_bias_act.register_autograd(_conv_bias_act_grad, setup_context=_conv_bias_act_setup)


# --------------------------------------------------------------------------- conv_stats
@torch.library.custom_op(f"{_NS}::conv_stats", mutates_args=())
def _conv_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, compute_stats: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    config = _config(x, weight, stride, padding, dilation, groups, prologue=in_mean is not None)
    args = (x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups,
            in_mean, in_invstd, in_weight, in_bias, in_relu, compute_stats)

    def measure():  # built only when auto has several backends to choose from
        shape_key = (str(x.dtype), *(_layout(t) for t in (x, weight, bias)), *args[3:7],
                     in_mean is not None, in_weight is not None, in_bias is not None, in_relu, compute_stats)
        return shape_key, lambda module: module.conv_stats(*args)

    impl = backends.select("conv_stats", backend or None, config, measure=measure)
    return impl.conv_stats(*args)


@_conv_stats.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias,
      in_relu, compute_stats, backend):
    y = _empty_like_format(_conv_out_shape(x, weight, stride, padding, dilation), x)
    channels = weight.shape[0] if compute_stats else 0
    sd = stat_dtype(x.dtype)
    return y, x.new_empty((channels,), dtype=sd), x.new_empty((channels,), dtype=sd)


@torch.library.custom_op(f"{_NS}::conv_stats_backward", mutates_args=())
def _conv_stats_backward(
    grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
    x: Tensor, y: Tensor, mean: Tensor, weight: Tensor, has_bias: bool,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, needs: Sequence[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    config = _config(x, weight, stride, padding, dilation, groups, prologue=in_mean is not None)
    args = (grad_y, grad_mean, grad_var, x, y, mean, weight, has_bias, tuple(stride), tuple(padding),
            tuple(dilation), groups, in_mean, in_invstd, in_weight, in_bias, in_relu, list(needs))

    def measure():  # built only when auto has several backends to choose from
        shape_key = (str(x.dtype), *(_layout(t) for t in (grad_y, x, weight)), *args[7:12],
                     grad_mean is not None, grad_var is not None, in_mean is not None, in_weight is not None,
                     in_bias is not None, in_relu, tuple(bool(n) for n in needs))
        return shape_key, lambda module: module.conv_stats_backward(*args)

    impl = backends.select("conv_stats_backward", backend or None, config, measure=measure)
    return _fill_absent(impl.conv_stats_backward(*args), grad_y)


@_conv_stats_backward.register_fake
def _(grad_y, grad_mean, grad_var, x, y, mean, weight, has_bias, stride, padding, dilation, groups,
      in_mean, in_invstd, in_weight, in_bias, in_relu, needs, backend):
    sd = stat_dtype(x.dtype)
    per_in = lambda t, need: x.new_empty((x.shape[1],), dtype=sd) if t is not None and need else None  # noqa: E731
    return _fill_absent([
        _empty_like_format(x.shape, x) if needs[0] else None,
        _weight_grad_like(x, weight) if needs[1] else None,
        x.new_empty((weight.shape[0],), dtype=sd) if has_bias and needs[2] else None,
        per_in(in_mean, needs[3]), per_in(in_invstd, needs[4]), per_in(in_weight, needs[5]), per_in(in_bias, needs[6]),
    ], grad_y)


def _conv_stats_setup(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias,
     in_relu, compute_stats, backend) = inputs
    y, mean, _ = output
    ctx.save_for_backward(x, y, mean, weight, in_mean, in_invstd, in_weight, in_bias, bias)
    ctx.args = (bias is not None, stride, padding, dilation, groups, in_relu, compute_stats, backend)


def _conv_stats_grad(ctx, grad_y, grad_mean, grad_var):
    x, y, mean, weight, in_mean, in_invstd, in_weight, in_bias, bias = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups, in_relu, compute_stats, backend = ctx.args
    if not compute_stats:
        grad_mean = grad_var = None
    ng = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True
        return (*_differentiable_grads("conv_stats", backend, (
            x, weight, bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias,
            in_relu, compute_stats), ng[:13], (grad_y, grad_mean, grad_var)), None)
    needs = [ng[0], ng[1], ng[2], ng[7], ng[8], ng[9], ng[10]]
    gx, gw, gb, g_mean, g_invstd, g_weight, g_bias = _by_needs(_conv_stats_backward(
        grad_y.contiguous(memory_format=memory_format_of(y)), grad_mean, grad_var, x, y, mean, weight,
        has_bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias, in_relu,
        needs, backend,
    ), needs)
    return gx, gw, gb, None, None, None, None, g_mean, g_invstd, g_weight, g_bias, None, None, None


_conv_stats.register_autograd(_conv_stats_grad, setup_context=_conv_stats_setup)


# --------------------------------------------------------------------------- bn_add_act
@torch.library.custom_op(f"{_NS}::bn_add_act", mutates_args=())
def _bn_add_act(
    y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], res_bias: Optional[Tensor],
    residual_stride: int, residual_offset: int, relu: bool, backend: str,
) -> Tensor:
    args = (y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias,
            residual_stride, residual_offset, relu)

    def measure():  # built only when auto has several backends to choose from
        shape_key = (str(y.dtype), _layout(y), _layout(residual), weight is not None, bias is not None,
                     res_mean is not None, res_weight is not None, res_bias is not None, residual_stride,
                     residual_offset, relu)
        return shape_key, lambda module: module.bn_add_act(*args)

    impl = backends.select("bn_add_act", backend or None, _config(y, None), measure=measure)
    return impl.bn_add_act(*args)


@_bn_add_act.register_fake
def _(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias,
      residual_stride, residual_offset, relu, backend):
    return _empty_like_format(y.shape, y)


@torch.library.custom_op(f"{_NS}::bn_add_act_backward", mutates_args=())
def _bn_add_act_backward(
    grad: Tensor, out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], residual_stride: int, residual_offset: int, relu: bool,
    needs: Sequence[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (grad, out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight,
            residual_stride, residual_offset, relu, list(needs))

    def measure():  # built only when auto has several backends to choose from
        shape_key = (str(y.dtype), *(_layout(t) for t in (grad, y, residual)), weight is not None,
                     res_mean is not None, res_weight is not None, residual_stride, residual_offset, relu,
                     tuple(bool(n) for n in needs))
        return shape_key, lambda module: module.bn_add_act_backward(*args)

    impl = backends.select("bn_add_act_backward", backend or None, _config(y, None), measure=measure)
    return _fill_absent(impl.bn_add_act_backward(*args), grad)


@_bn_add_act_backward.register_fake
def _(grad, out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight,
      residual_stride, residual_offset, relu, needs, backend):
    per_c = lambda need: mean.new_empty((y.shape[1],)) if need else None  # noqa: E731
    has_r, has_rn = residual is not None, res_mean is not None
    per_r = lambda need: mean.new_empty((residual.shape[1],)) if has_r and has_rn and need else None  # noqa: E731
    return _fill_absent([
        _empty_like_format(y.shape, y) if needs[0] else None,
        per_c(needs[1]), per_c(needs[2]), per_c(needs[3] and weight is not None), per_c(needs[4]),
        _empty_like_format(residual.shape, residual) if has_r and needs[5] else None,
        per_r(needs[6]), per_r(needs[7]), per_r(needs[8] and res_weight is not None), per_r(needs[9]),
    ], grad)


def _bn_add_act_setup(ctx, inputs, output):
    (y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias,
     residual_stride, residual_offset, relu, backend) = inputs
    ctx.save_for_backward(output, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight,
                          bias, res_bias)
    ctx.args = (residual_stride, residual_offset, relu, backend)


def _bn_add_act_grad(ctx, grad):
    out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight, bias, res_bias = ctx.saved_tensors
    residual_stride, residual_offset, relu, backend = ctx.args
    needs = list(ctx.needs_input_grad[:10])
    if torch.is_grad_enabled():  # create_graph=True
        return (*_differentiable_grads("bn_add_act", backend, (
            y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias,
            residual_stride, residual_offset, relu), ctx.needs_input_grad[:13], (grad,)), None)
    grads = _by_needs(_bn_add_act_backward(
        grad.contiguous(memory_format=memory_format_of(out)), out, y, mean, invstd, weight, residual,
        res_mean, res_invstd, res_weight, residual_stride, residual_offset, relu, needs, backend,
    ), needs)
    return (*grads, None, None, None, None)


_bn_add_act.register_autograd(_bn_add_act_grad, setup_context=_bn_add_act_setup)


# --------------------------------------------------------------------------- batching (vmap)
def _batching_by_loop(op):
    """A vmap rule for ``op`` that calls it once per batch element and stacks the results: what
    ``torch.autograd.grad(..., is_grads_batched=True)`` (a Jacobian by vmap over the backward) and
    ``torch.func.vmap`` of a direct op call need. Correct, not fast: one launch per element."""
    def rule(info, in_dims, *args):
        # in_dims: an int where an argument is batched (a list argument gets a list of Nones)
        results = [op(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        if isinstance(results[0], Tensor):
            return torch.stack(results), 0
        stacked = [torch.stack(parts) for parts in zip(*results)]
        if isinstance(results[0], tuple):
            return tuple(stacked), (0,) * len(stacked)
        return stacked, [0] * len(stacked)
    return rule


for _op in (_conv_bias_act, _conv_bias_act_backward, _conv_stats, _conv_stats_backward,
            _bn_add_act, _bn_add_act_backward):
    torch.library.register_vmap(_op, _batching_by_loop(_op))


# --------------------------------------------------------------------------- public functions
class InputShapeError(ValueError, RuntimeError):
    """A tensor of the wrong rank or channel count. Also a RuntimeError: torchvision's own modules
    raise RuntimeError for these mistakes, and code written against them catches that."""


class InputDtypeError(TypeError, RuntimeError):
    """Tensors of mismatched or non-floating dtypes (a RuntimeError in torchvision too)."""


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """Autocast's rule: float16/bfloat16/float32 tensors go to ``dtype``; float64 stays."""
    if t is None or dtype is None or t.dtype == dtype or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def check_activation(name: str, t: Tensor, channels: Optional[int] = None) -> None:
    """Clear errors for a bad activation tensor (rank, channels, dtype)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise InputShapeError(
            f"{name}: expected a 4-D tensor (N, C, H, W), got {t.dim()}-D with shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise InputShapeError(f"{name}: expected {channels} channels, got {t.shape[1]} (shape {tuple(t.shape)})")
    if not t.is_floating_point():
        raise InputDtypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _check_device(name: str, t: Optional[Tensor], like: Tensor) -> None:
    if t is not None and t.device != like.device:
        raise RuntimeError(f"{name} is on {t.device} but the input is on {like.device}; move them to one device")


def check_same(name: str, t: Optional[Tensor], like: Tensor) -> None:
    if t is None:
        return
    _check_device(name, t, like)
    if t.dtype != like.dtype:
        raise InputDtypeError(f"{name} has dtype {t.dtype} but the input has {like.dtype}; use one dtype (or autocast)")


def check_per_channel(name: str, v: Optional[Tensor], like: Tensor, channels: int) -> None:
    """A per-channel vector (a conv's bias, a BN's mean/invstd/weight/bias) holds one value per
    channel, on the input's device: the kernels read it at ptr + channel, so a broadcastable (1,)
    or (C, 1) would be read past its end on a GPU while the CPU's reference broadcast it."""
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(v).__name__}")
    _check_device(name, v, like)
    if v.shape != (channels,):
        raise InputShapeError(f"{name}: expected one value per channel, shape ({channels},), got {tuple(v.shape)}")


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_output_size(x_shape, w_shape, stride, padding, dilation) -> tuple:
    """(OH, OW) of the convolution; an InputShapeError, as torch's conv raises, when it would be empty.
    Shapes, not tensors: ``Tensor.shape`` costs ~0.3 us a read, on every eval conv's path."""
    oh = _conv_out_size(x_shape[2], w_shape[2], stride[0], padding[0], dilation[0])
    ow = _conv_out_size(x_shape[3], w_shape[3], stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise InputShapeError(
            f"input: padded size {x_shape[2] + 2 * padding[0]} x {x_shape[3] + 2 * padding[1]} is smaller than "
            f"the (dilated) kernel {tuple(w_shape[2:])} (input shape {tuple(x_shape)})")
    return oh, ow


def check_residual(name: str, shape, stride: int, offset: int, out_shape) -> None:
    """A residual of ``shape``, read at ``stride`` (and from channel ``offset``: CIFAR's option A),
    must cover the output: torchvision's ``out += identity`` raises for a shortcut of another
    shape, so must we (a zero-padded or cropped residual would be a silent wrong answer)."""
    n, c, h, w = out_shape
    mapped = (shape[0], shape[1], -(-shape[2] // stride), -(-shape[3] // stride))
    fits = offset + mapped[1] <= c if offset > 0 else mapped[1] == c
    if offset < 0 or not fits or mapped[0] != n or mapped[2:] != (h, w):
        where = f" at stride {stride}" if stride != 1 else ""
        where += f" from channel {offset}" if offset else ""
        raise InputShapeError(
            f"{name} of shape {tuple(shape)}{where} does not match the output's shape {tuple(out_shape)}: "
            "the shortcut must give the block's output shape")


def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, padding=0, dilation=1,
    groups: int = 1, residual: Optional[Tensor] = None, residual_stride: int = 1, residual_offset: int = 0,
    shortcut_x: Optional[Tensor] = None, shortcut_weight: Optional[Tensor] = None, shortcut_stride: int = 1,
    relu: bool = False, backend: Optional[str] = None,
) -> Tensor:
    """act(conv(x, weight) + bias [+ conv1x1(shortcut_x, shortcut_weight)] [+ residual]); see reference.py."""
    check_activation("input", x)
    _check_device("weight", weight, x)
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, weight, residual, shortcut_x, shortcut_weight = (
            _cast(t, cast) for t in (x, weight, residual, shortcut_x, shortcut_weight))
    check_activation("input", x, weight.shape[1] * groups)
    check_same("weight", weight, x)
    if residual is not None:
        check_activation("residual", residual)
        check_same("residual", residual, x)
    if residual_stride < 1 or shortcut_stride < 1:
        raise ValueError(f"residual_stride ({residual_stride}) and shortcut_stride ({shortcut_stride}) must be >= 1")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x_shape, w_shape = x.shape, weight.shape
    out_shape = (x_shape[0], w_shape[0], *conv_output_size(x_shape, w_shape, stride, padding, dilation))
    if residual is not None:
        check_residual("residual", residual.shape, residual_stride, residual_offset, out_shape)
    if shortcut_x is not None or shortcut_weight is not None:
        if shortcut_x is None or shortcut_weight is None:
            raise ValueError("shortcut_x and shortcut_weight go together")
        check_same("shortcut input", shortcut_x, x)
        check_same("shortcut weight", shortcut_weight, x)
        check_activation("shortcut input", shortcut_x, shortcut_weight.shape[1])
        if shortcut_weight.dim() != 4 or shortcut_weight.shape[2:] != (1, 1):
            raise InputShapeError(f"shortcut weight: expected a 1x1 conv weight, got shape {tuple(shortcut_weight.shape)}")
        projected = (shortcut_x.shape[0], shortcut_weight.shape[0], *shortcut_x.shape[2:])
        check_residual("projection shortcut", projected, shortcut_stride, 0, out_shape)
    if bias is not None:
        check_per_channel("bias", bias, x, w_shape[0])
        if bias.dtype != stat_dtype(x.dtype):
            bias = bias.to(stat_dtype(x.dtype))
    args = (x, weight, bias, stride, padding, dilation, groups,
            residual, residual_stride, residual_offset, shortcut_x, shortcut_weight, shortcut_stride,
            relu, backends.resolve_name(backend))
    if _eager_without_grad(args):
        # inference outside torch.compile: the op's own function, without the dispatcher's ~60 us
        # (a ResNet-50 forward has 53 of these: at small batch the host time is the run time)
        return _conv_bias_act_impl(*args)
    return _conv_bias_act(*args)


def _eager_without_grad(args) -> bool:
    """True when neither autograd nor a compiler nor a torch.func transform needs to see the op: no
    input needs a gradient (or grad mode is off) and nothing is being traced or transformed."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(a, Tensor) and a.requires_grad for a in args)


_NORM_PARTS = ("mean", "invstd", "weight", "bias")


def _norm_args(norm: Optional[tuple], sd: torch.dtype) -> tuple:
    """A BN as (mean, invstd, weight, bias) in the per-channel dtype; four Nones for no BN."""
    if norm is None:
        return (None,) * 4
    mean, invstd, weight, bias = norm
    if mean is None or invstd is None:
        raise ValueError("a BN needs its mean and invstd (weight and bias may be None)")
    return tuple(None if t is None else t.to(sd) for t in (mean, invstd, weight, bias))


def conv_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, padding=0, dilation=1,
    groups: int = 1, in_norm: Optional[tuple] = None, in_relu: bool = False, compute_stats: bool = True,
    backend: Optional[str] = None,
):
    """(y, mean, var) with y = conv(relu?(BN_in(x))) + bias; ``in_norm`` = (mean, invstd, weight, bias)."""
    check_activation("input", x)
    _check_device("weight", weight, x)
    cast = autocast_dtype(x.device.type)
    x, weight = _cast(x, cast), _cast(weight, cast)
    if weight.is_cuda and weight.dim() == 4:
        # KRSC for the GPU kernels (an NCHW weight's taps are strided, gathered element by element);
        # free under autocast, whose cast copies anyway; the gradient flows back to the parameter
        weight = weight.contiguous(memory_format=torch.channels_last)
    check_activation("input", x, weight.shape[1] * groups)
    check_same("weight", weight, x)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    check_per_channel("bias", bias, x, weight.shape[0])
    for label, v in zip(_NORM_PARTS, in_norm or ()):
        check_per_channel(f"in_norm {label}", v, x, x.shape[1])
    sd = stat_dtype(x.dtype)
    bias = None if bias is None else bias.to(sd)
    return _conv_stats(
        x, weight, bias, stride, padding, dilation, groups,
        *_norm_args(in_norm, sd), in_relu, compute_stats, backends.resolve_name(backend),
    )


def bn_add_act(
    y: Tensor, norm: tuple, *, residual: Optional[Tensor] = None, residual_norm: Optional[tuple] = None,
    residual_stride: int = 1, residual_offset: int = 0, relu: bool = False, backend: Optional[str] = None,
) -> Tensor:
    """act(BN(y) + (BN_res(residual) | mapped residual)); each BN given as (mean, invstd, weight, bias)."""
    check_activation("input", y)
    for label, v in zip(_NORM_PARTS, norm):
        check_per_channel(f"norm {label}", v, y, y.shape[1])
    if residual is not None:
        check_activation("residual", residual)
        for label, v in zip(_NORM_PARTS, residual_norm or ()):
            check_per_channel(f"residual_norm {label}", v, y, residual.shape[1])
    if residual_stride < 1:
        raise ValueError(f"residual_stride ({residual_stride}) must be >= 1")
    if residual is not None:
        check_residual("residual", residual.shape, residual_stride, residual_offset, y.shape)
    if residual is not None and residual.dtype != y.dtype and autocast_dtype(y.device.type) is not None:
        residual = residual.to(y.dtype)
    check_same("residual", residual, y)
    sd = stat_dtype(y.dtype)
    return _bn_add_act(
        y, *_norm_args(norm, sd), residual, *_norm_args(residual_norm, sd), residual_stride,
        residual_offset, relu, backends.resolve_name(backend),
    )
