"""Train-mode block tail: one elementwise Triton launch.

    out = relu?(BN(y) + R'),  R' = BN_res(residual) (projection shortcut),
                              or the mapped residual R (identity / option A), or 0

The tensor is walked as a 2-D grid of [BLOCK_P pixels, BLOCK_C channels]
tiles, each tensor addressed through its own run-time strides, so y, the
residual and the output may each be NCHW or channels_last (the output takes
y's). Triton specialises strides equal to 1, so whichever axis is contiguous
is known at compile time and those loads vectorise. Everything is computed in
fp32 from fp32 per-channel vectors; one cast and one store per element.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import memory_format_of
from . import autotune
from . import conv_fwd

INTERPRETING = autotune.interpreter_requested()

# Tile shape: 4096 elements, 4 warps on a GPU; the interpreter pays per program,
# so there the tiles are as large as the tiny test shapes.
_GPU_TILE = (64, 64, 4)
_INTERPRETER_TILE = (256, 64, 1)


@triton.jit
def _normalize(v, ch, ch_mask, mean_ptr, invstd_ptr, w_ptr, b_ptr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(v - mean[ch]) * invstd[ch] * w[ch] + b[ch] in fp32 on a [BLOCK_P, BLOCK_C] tile."""
    mean = tl.load(mean_ptr + ch, mask=ch_mask, other=0.0)
    scale = tl.load(invstd_ptr + ch, mask=ch_mask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=ch_mask, other=0.0)
    out = (v.to(tl.float32) - mean[None, :]) * scale[None, :]
    if HAS_B:
        out = out + tl.load(b_ptr + ch, mask=ch_mask, other=0.0)[None, :]
    return out


@triton.jit
def _bn_add_act_kernel(
    y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
    res_ptr, rmean_ptr, rinvstd_ptr, rw_ptr, rb_ptr, out_ptr,
    P, C, H, W,
    sy_n, sy_c, sy_h, sy_w,
    so_n, so_c, so_h, so_w,
    # R[n, c, h, w] = res[n, c - RES_OFFSET, h * RES_STRIDE, w * RES_STRIDE] for 0 <= c - RES_OFFSET < C_RES
    C_RES, RES_STRIDE, RES_OFFSET, sr_n, sr_c, sr_h, sr_w,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RES_BN: tl.constexpr, RES_W: tl.constexpr, RES_B: tl.constexpr,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < P
    c_mask = offs_c < C
    mask = p_mask[:, None] & c_mask[None, :]
    n_img = (offs_p // (H * W)).to(tl.int64)  # int64: batch offsets may pass 2**31
    pix = offs_p % (H * W)
    h = pix // W
    w = pix % W

    y_rows = y_ptr + n_img * sy_n + h * sy_h + w * sy_w
    y = tl.load(y_rows[:, None] + (offs_c * sy_c)[None, :], mask=mask, other=0.0)
    acc = _normalize(y, offs_c, c_mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    if HAS_RESIDUAL:
        rc = offs_c - RES_OFFSET
        rc_mask = c_mask & (rc >= 0) & (rc < C_RES)
        r_mask = p_mask[:, None] & rc_mask[None, :]
        r_rows = res_ptr + n_img * sr_n + (h * RES_STRIDE) * sr_h + (w * RES_STRIDE) * sr_w
        r = tl.load(r_rows[:, None] + (rc * sr_c)[None, :], mask=r_mask, other=0.0)
        if RES_BN:  # BN of the residual's own channels; zero outside them, not BN(0)
            r = tl.where(r_mask, _normalize(r, rc, rc_mask, rmean_ptr, rinvstd_ptr, rw_ptr, rb_ptr,
                                            RES_W, RES_B), 0.0)
        acc += r.to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # NaN stays NaN, as torch.relu
    out_rows = out_ptr + n_img * so_n + h * so_h + w * so_w
    tl.store(out_rows[:, None] + (offs_c * so_c)[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check_vectors(c: int, device, **vectors) -> None:
    for name, t in vectors.items():
        if t is not None and (t.device != device or t.dtype != torch.float32 or t.shape != (c,)):
            raise ValueError(f"{name} must be float32 of shape ({c},) on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def bn_add_act_forward(
    y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], res_bias: Optional[Tensor],
    residual_stride: int, residual_offset: int, relu: bool,
    *, tile: Optional[tuple] = None,
) -> Tensor:
    """``reference.bn_add_act`` in one launch; ``tile`` = (BLOCK_P, BLOCK_C, num_warps) for tests."""
    if y.dim() != 4:
        raise ValueError(f"y must be 4-D, got shape {tuple(y.shape)}")
    n, c, h, w = y.shape
    _check_vectors(c, y.device, mean=mean, invstd=invstd, weight=weight, bias=bias)
    if residual is not None:
        rh = -(-residual.shape[2] // residual_stride)
        rw = -(-residual.shape[3] // residual_stride)
        if (residual.dim() != 4 or residual.dtype != y.dtype or residual.device != y.device
                or residual.shape[0] != n or (rh, rw) != (h, w)):
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} at stride {residual_stride} "
                f"does not map onto y {tuple(y.shape)} {y.dtype}")
        if res_mean is not None:
            _check_vectors(residual.shape[1], y.device, res_mean=res_mean, res_invstd=res_invstd,
                           res_weight=res_weight, res_bias=res_bias)
    out = torch.empty_like(y, memory_format=memory_format_of(y))
    if conv_fwd.POISON_OUTPUT:
        out.fill_(float("nan"))
    if out.numel() == 0:
        return out
    if residual is None:
        res, residual_stride, residual_offset, c_res = y, 1, 0, 0
    else:
        res, c_res = residual, residual.shape[1]
    res_bn = residual is not None and res_mean is not None
    block_p, block_c, warps = tile or (_INTERPRETER_TILE if INTERPRETING else _GPU_TILE)
    p = n * h * w
    grid = (-(-p // block_p), -(-c // block_c))
    dummy = mean  # any fp32 pointer: the code that would read it is compiled out
    _bn_add_act_kernel[grid](
        y, mean, invstd, weight if weight is not None else dummy, bias if bias is not None else dummy,
        res, *(t if (res_bn and t is not None) else dummy for t in (res_mean, res_invstd, res_weight, res_bias)),
        out,
        p, c, h, w, *y.stride(), *out.stride(),
        c_res, residual_stride, residual_offset, *res.stride(),
        HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RESIDUAL=residual is not None, RES_BN=res_bn,
        RES_W=res_bn and res_weight is not None, RES_B=res_bn and res_bias is not None,
        RELU=bool(relu), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
    )
    return out
