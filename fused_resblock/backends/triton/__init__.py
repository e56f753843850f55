"""The Triton backend: fused kernels written in Triton, behind the backend interface.

Every op of the contract: ``conv_bias_act`` (eval mode: one implicit-GEMM
launch per conv, see ``conv_fwd``) and its backward; the train forward ops
``conv_stats`` (the same kernel with a BN+ReLU prologue and a batch-statistics
epilogue, plus a tiny merge launch) and ``bn_add_act`` (one elementwise launch,
see ``bn_act``); their backwards (``conv_bwd``, ``bn_act_bwd``).

Importing this package never imports Triton: ``available()`` reports whether
it can be used, and the kernels load on the first call. Set
``TRITON_INTERPRET=1`` before that first call to run the kernels on CPU
tensors through Triton's interpreter (how CI tests them).
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from .. import FirstCallInCaptureError, conv_geometry_reason
from .autotune import interpreter_requested, kernel_digest  # noqa: F401  (kernel_digest: for auto's cache key)

NAME = "triton"

OPS = (
    "conv_bias_act", "conv_bias_act_backward",
    "conv_stats", "conv_stats_backward",
    "bn_add_act", "bn_add_act_backward",
)
SUPPORTED_OPS = OPS
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> Optional[str]:
    """None when usable here, else the reason it is not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    if torch.version.hip is not None:
        return "triton backend is untested on ROCm"
    if torch.cuda.is_available() or interpreter_requested():
        return None
    return "triton backend needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"


def supports(op: str, config: dict) -> Optional[str]:
    """None when ``op`` is supported for ``config``, else the reason it is not."""
    if op not in OPS:
        return f"unknown op {op!r}"
    if op not in SUPPORTED_OPS:
        return f"triton backend has no kernel for {op} yet"
    reason = available()
    if reason is not None:
        return reason
    device = torch.device(config["device"])
    if device.type == "cpu":
        if not interpreter_requested():
            return "triton backend runs CPU tensors only under TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"triton backend does not run on {device.type} devices"
    dtype = config["dtype"]
    if dtype == torch.float64:
        return "triton backend does not support float64 (its GEMMs take fp16, bf16 and fp32)"
    if dtype not in DTYPES:
        return f"triton backend does not support {dtype}"
    if (dtype == torch.bfloat16 and device.type == "cuda" and not interpreter_requested()
            and torch.cuda.get_device_capability(device) < (8, 0)):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    if "kernel" not in config:  # elementwise ops (bn_add_act): no conv geometry to check
        return None
    return conv_geometry_reason(config)


def _entry_point(*vectors: str):
    """A backend function's common host work; ``vectors`` name its per-channel vector parameters.

    Those arrive dense: the kernels read them at ptr + channel, so a strided or expanded view
    (bias[::2], a statistics gradient through torch.stack) would be misread. The function runs
    with its first tensor's GPU current: Triton launches on the current device and stream, so a
    model on cuda:1 while cuda:0 is current would launch there with cuda:1's pointers. And a
    kernel's first launch inside CUDA-graph capture (Triton loads it then, which CUDA forbids
    while a stream captures) becomes an error that says what to do.
    """
    def decorate(fn):
        names = list(inspect.signature(fn).parameters)
        positions = [names.index(name) for name in vectors]

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            args, kwargs = _dense_vectors(args, kwargs, positions, names)
            first = args[0] if args else kwargs[names[0]]
            if not first.is_cuda:
                return fn(*args, **kwargs)
            try:
                if first.device.index != torch.cuda.current_device():
                    with torch.cuda.device(first.device):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            except FirstCallInCaptureError:
                raise
            except RuntimeError as exc:
                if "capturing" in str(exc) and torch.cuda.is_current_stream_capturing():
                    raise FirstCallInCaptureError(f"{fn.__name__} at these shapes") from exc
                raise
        return entry
    return decorate


def _dense_vectors(args: tuple, kwargs: dict, positions, names):
    """``args``/``kwargs`` with the tensors at ``positions`` made contiguous (copies only where needed)."""
    dense = None
    for i in positions:
        if i < len(args):
            t = args[i]
            if t is not None and not t.is_contiguous():
                dense = dense or list(args)
                dense[i] = t.contiguous()
        elif kwargs.get(names[i]) is not None and not kwargs[names[i]].is_contiguous():
            kwargs = {**kwargs, names[i]: kwargs[names[i]].contiguous()}
    return (tuple(dense) if dense is not None else args), kwargs


_forward = None


@_entry_point("bias")
def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride, padding, dilation, groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool,
) -> Tensor:
    """``reference.conv_bias_act`` as one fused Triton launch (same contract)."""
    global _forward
    if _forward is None:  # first call: import Triton and define the kernels
        from .conv_fwd import conv_bias_act_forward

        _forward = conv_bias_act_forward
    return _forward(x, weight, bias, stride, padding, dilation, groups,
                    residual, residual_stride, residual_offset,
                    shortcut_x, shortcut_weight, shortcut_stride, relu)


@_entry_point("bias", "in_mean", "in_invstd", "in_weight", "in_bias")
def conv_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride, padding, dilation, groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, compute_stats: bool,
):
    """``reference.conv_stats``: the conv kernel with a BN+ReLU prologue and a statistics
    epilogue (per-tile mean/M2), then one small launch merging them (see ``conv_fwd``)."""
    from .conv_fwd import conv_stats_forward

    return conv_stats_forward(x, weight, bias, stride, padding, dilation, groups,
                              in_mean, in_invstd, in_weight, in_bias, in_relu, compute_stats)


@_entry_point("mean", "invstd", "weight", "bias", "res_mean", "res_invstd", "res_weight", "res_bias")
def bn_add_act(
    y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], res_bias: Optional[Tensor],
    residual_stride: int, residual_offset: int, relu: bool,
) -> Tensor:
    """``reference.bn_add_act`` as one elementwise Triton launch (see ``bn_act``)."""
    from .bn_act import bn_add_act_forward

    return bn_add_act_forward(y, mean, invstd, weight, bias, residual, res_mean, res_invstd,
                              res_weight, res_bias, residual_stride, residual_offset, relu)


@_entry_point()
def conv_bias_act_backward(
    grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
    stride, padding, dilation, groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, needs: list,
):
    """``reference.conv_bias_act_backward``: dgrad/wgrad launches that apply the ReLU mask as
    they load the gradient, and one launch for the residual's gradient (see ``conv_bwd``)."""
    from .conv_bwd import conv_bias_act_backward as impl

    return impl(grad, out, x, weight, has_bias, stride, padding, dilation, groups,
                residual, residual_stride, residual_offset, shortcut_x, shortcut_weight,
                shortcut_stride, relu, needs)


@_entry_point("grad_mean", "grad_var", "mean", "in_mean", "in_invstd", "in_weight", "in_bias")
def conv_stats_backward(
    grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
    x: Tensor, y: Tensor, mean: Tensor, weight: Tensor, has_bias: bool,
    stride, padding, dilation, groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, needs: list,
):
    """``reference.conv_stats_backward``: an implicit-GEMM dgrad (prologue backward in its
    epilogue) and wgrad (prologue recomputed in its operand load), see ``conv_bwd``."""
    from .conv_bwd import conv_stats_backward as impl

    return impl(grad_y, grad_mean, grad_var, x, y, mean, weight, has_bias, stride, padding,
                dilation, groups, in_mean, in_invstd, in_weight, in_bias, in_relu, needs)


@_entry_point("mean", "invstd", "weight", "res_mean", "res_invstd", "res_weight")
def bn_add_act_backward(
    grad: Tensor, out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], residual_stride: int, residual_offset: int, relu: bool, needs: list,
):
    """``reference.bn_add_act_backward``: one elementwise launch with per-tile channel sums,
    one deterministic finalize per BN (see ``bn_act_bwd``)."""
    from .bn_act_bwd import bn_add_act_backward as impl

    return impl(grad, out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight,
                residual_stride, residual_offset, relu, needs)
