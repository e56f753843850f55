"""Eval-mode fused convolution: one implicit-GEMM Triton launch per conv.

    out = relu?(conv(x, w) + bias + conv1x1(shortcut_x, shortcut_w) + R)

The GEMM view: rows M = N·OH·OW output pixels, columns = the C_out/groups
output channels of one group (the group is grid axis 1), reduction K = kernel
taps × C_in/groups. Every tensor is addressed through strides passed at run
time, so NCHW and channels_last inputs, residuals and outputs all work; on a
GPU the K-loop operands (x, shortcut_x) are nevertheless copied to
channels_last when they are NCHW, because only channel-contiguous loads get
pipelined (see ``CHANNELS_LAST_INSIDE``). Padding is a load mask. The merged
projection shortcut is a second K loop into the same fp32 accumulator (one
GEMM concatenated along K); the epilogue adds the bias and the mapped
residual, applies ReLU, casts to the output dtype and stores once.

Two ways to walk K (``FLAT_K``):
* per tap: for each (kh, kw), blocks of input channels; the tap's spatial
  offsets are scalars, so addresses are cheap. Best when C_in/groups >= 16.
* flat: K = (kh, kw, c) flattened and split into BLOCK_K slices regardless of
  tap boundaries, so a small channel count (the stem's 3, ResNeXt's 4 per
  group) does not leave most of each BLOCK_K slice masked off.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import memory_format_of
from . import autotune

# Read once, as triton.jit does at decoration time: the kernel below is either
# compiled or interpreted for the life of the process.
INTERPRETING = autotune.interpreter_requested()

# NHWC inside: an NCHW operand of the GEMM's K loops is copied to channels_last
# first. With channels contiguous (stride 1, which Triton specialises on) the
# K-direction loads vectorise and the compiler pipelines them (cp.async); with
# NCHW they are scalar gathers and are not pipelined at all. The interpreter
# keeps the stride-generic path (nothing to gain there, and it stays tested).
CHANNELS_LAST_INSIDE = not INTERPRETING

# Debug aid: fill every freshly allocated output with NaN before the launch so
# an element the kernel forgets to write cannot pass a test. Tests set it.
POISON_OUTPUT = os.environ.get("FUSED_RESBLOCK_POISON", "0") == "1"


# --------------------------------------------------------------------------- kernel
@triton.jit
def _load_input_tile(x_rows, ih0, iw0, row_mask, c, k_mask, kh, kw,
                     H, W, DIL_H, DIL_W, sx_c, sx_h, sx_w):
    """[BLOCK_M, BLOCK_K] tile of x at taps (kh, kw) and channels c; zero where padded.

    kh/kw are scalars (per-tap walk) or [BLOCK_K] vectors (flat walk): the same
    broadcasting serves both.
    """
    ih = ih0[:, None] + kh * DIL_H
    iw = iw0[:, None] + kw * DIL_W
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    mask = row_mask[:, None] & k_mask[None, :] & inside
    ptrs = x_rows[:, None] + c[None, :] * sx_c + ih * sx_h + iw * sx_w
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _conv_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, sc_x_ptr, sc_w_ptr, out_ptr,
    # GEMM and image sizes
    M, OH, OW, H, W, C_IN_G, C_OUT_G,
    # convolution geometry
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    # element strides
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    so_n, so_c, so_h, so_w,
    # mapped residual: R[n, c] = res[n, c - RES_OFFSET, oh * RES_STRIDE, ow * RES_STRIDE]
    C_RES, RES_STRIDE, RES_OFFSET, sr_n, sr_c, sr_h, sr_w,
    # merged 1x1 projection shortcut
    C_SC, SC_STRIDE, ssx_n, ssx_c, ssx_h, ssx_w, ssw_o, ssw_c,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    RELU: tl.constexpr, FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---- which tile: grouped ordering (consecutive programs share B columns in L2)
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_OUT_G, BLOCK_N)
    pids_per_band = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_band) * GROUP_M
    band_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    # ---- rows: output pixels (n, oh, ow); columns: output channels of this group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < C_OUT_G
    n_img = (offs_m // (OH * OW)).to(tl.int64)  # int64: batch offsets may pass 2**31
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    co = group * C_OUT_G + offs_n

    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_rows = x_ptr + n_img * sx_n + (group * C_IN_G) * sx_c
    w_cols = w_ptr + co * sw_o
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # ---- main loop over K = taps x input channels of this group
    if FLAT_K:
        K_TOTAL = KH * KW * C_IN_G
        for k0 in range(0, K_TOTAL, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K_TOTAL
            c = k % C_IN_G
            tap = k // C_IN_G
            kh = tap // KW
            kw = tap % KW
            a = _load_input_tile(x_rows, ih0, iw0, m_mask, c, k_mask, kh[None, :], kw[None, :],
                                 H, W, DIL_H, DIL_W, sx_c, sx_h, sx_w)
            b_ptrs = w_cols[None, :] + (c * sw_c + kh * sw_h + kw * sw_w)[:, None]
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        c_blocks = tl.cdiv(C_IN_G, BLOCK_K)
        for step in range(0, KH * KW * c_blocks):
            tap = step // c_blocks
            kh = tap // KW
            kw = tap % KW
            c = (step % c_blocks) * BLOCK_K + offs_k
            k_mask = c < C_IN_G
            a = _load_input_tile(x_rows, ih0, iw0, m_mask, c, k_mask, kh, kw,
                                 H, W, DIL_H, DIL_W, sx_c, sx_h, sx_w)
            b_ptrs = w_cols[None, :] + (c * sw_c)[:, None] + (kh * sw_h + kw * sw_w)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # ---- merged projection shortcut: more K, same accumulator (1x1, no padding)
    if HAS_SHORTCUT:
        sc_rows = sc_x_ptr + n_img * ssx_n + (oh * SC_STRIDE) * ssx_h + (ow * SC_STRIDE) * ssx_w
        sc_w_cols = sc_w_ptr + co * ssw_o
        for c0 in range(0, C_SC, BLOCK_K):
            c = c0 + offs_k
            k_mask = c < C_SC
            a = tl.load(sc_rows[:, None] + c[None, :] * ssx_c,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(sc_w_cols[None, :] + (c * ssw_c)[:, None],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # ---- epilogue in fp32: bias, mapped residual, ReLU; one cast, one store
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + co, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        rc = co - RES_OFFSET
        r_cols = rc * sr_c
        r_rows = res_ptr + n_img * sr_n + (oh * RES_STRIDE) * sr_h + (ow * RES_STRIDE) * sr_w
        r_mask = out_mask & ((rc >= 0) & (rc < C_RES))[None, :]
        r = tl.load(r_rows[:, None] + r_cols[None, :], mask=r_mask, other=0.0)
        acc += r.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_rows = out_ptr + n_img * so_n + oh * so_h + ow * so_w
    out_ptrs = out_rows[:, None] + (co * so_c)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- host
def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _channels_last(t: Tensor) -> Tensor:
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for fp32 exactly when PyTorch's conv flag allows it.

    Only fp32 operands are affected; 16-bit operands get the compiler's default.
    The interpreter runs IEEE fp32 (numpy) whatever we ask.
    """
    if dtype != torch.float32:
        return "tf32"
    if INTERPRETING or not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _check(x, weight, bias, groups, residual, residual_stride, shortcut_x, shortcut_weight,
           shortcut_stride, oh, ow) -> None:
    """Shape, dtype and device agreement, with messages that name the offending tensor."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual),
                    ("shortcut_x", shortcut_x), ("shortcut_weight", shortcut_weight)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} with groups={groups}")
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output would be empty: {oh}x{ow}")
    if residual is not None:
        rh = -(-residual.shape[2] // residual_stride)
        rw = -(-residual.shape[3] // residual_stride)
        if residual.dtype != x.dtype or residual.shape[0] != x.shape[0] or (rh, rw) != (oh, ow):
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} at stride {residual_stride} "
                f"does not map onto the output ({x.shape[0]}, *, {oh}, {ow}) {x.dtype}")
    if shortcut_x is not None:
        sh = (shortcut_x.shape[2] - 1) // shortcut_stride + 1
        sw = (shortcut_x.shape[3] - 1) // shortcut_stride + 1
        if shortcut_weight is None or tuple(shortcut_weight.shape[2:]) != (1, 1):
            raise ValueError("shortcut_weight must be a 1x1 conv weight when shortcut_x is given")
        if (shortcut_x.dtype != x.dtype or shortcut_weight.dtype != x.dtype
                or shortcut_x.shape[0] != x.shape[0] or (sh, sw) != (oh, ow)
                or shortcut_weight.shape[0] != weight.shape[0]
                or shortcut_weight.shape[1] != shortcut_x.shape[1]):
            raise ValueError(
                f"shortcut_x {tuple(shortcut_x.shape)} / shortcut_weight {tuple(shortcut_weight.shape)} "
                f"at stride {shortcut_stride} do not fit the output ({x.shape[0]}, "
                f"{weight.shape[0]}, {oh}, {ow}) {x.dtype}")


def conv_bias_act_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool,
    *, out: Optional[Tensor] = None, config: Optional[autotune.Config] = None,
    flat_k: Optional[bool] = None,
) -> Tensor:
    """``reference.conv_bias_act`` in one Triton launch.

    ``out``: optional destination (right shape, x's dtype, any strides); a
    fresh tensor in x's memory format otherwise. ``config`` / ``flat_k``
    override the tile choice and the K walk (for tests and benchmarks).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    _check(x, weight, bias, groups, residual, residual_stride, shortcut_x, shortcut_weight,
           shortcut_stride, oh, ow)
    c_out_g = c_out // groups
    c_sc = shortcut_x.shape[1] if shortcut_x is not None else 0

    if out is None:
        out = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device,
                          memory_format=memory_format_of(x))
        if POISON_OUTPUT:
            out.fill_(float("nan"))
    elif out.shape != (n, c_out, oh, ow) or out.dtype != x.dtype:
        raise ValueError(f"out must be {(n, c_out, oh, ow)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")

    if out.numel() == 0:  # an empty batch: nothing to launch (a zero-size grid is an error)
        return out
    # Absent operands get harmless geometry: their code is compiled out, their ints still travel.
    if residual is None:
        residual_stride, residual_offset = 1, 0
    if shortcut_x is None:
        shortcut_stride = 1

    if CHANNELS_LAST_INSIDE:
        x = _channels_last(x)
        if shortcut_x is not None:
            shortcut_x = _channels_last(shortcut_x)

    precision = _input_precision(x.dtype)
    if flat_k is None:
        flat_k = kh * kw > 1 and c_in_g < autotune.FLAT_K_BELOW_CHANNELS
    m = n * oh * ow

    def launch(cfg: autotune.Config) -> None:
        # plain integer ceil-division: triton.cdiv is a slow constexpr_function on the host in 3.8
        grid = (-(-m // cfg.block_m) * -(-c_out_g // cfg.block_n), groups)
        res = residual if residual is not None else x
        scx = shortcut_x if shortcut_x is not None else x
        scw = shortcut_weight if shortcut_weight is not None else weight
        _conv_bias_act_kernel[grid](
            x, weight, bias if bias is not None else x, res, scx, scw, out,
            m, oh, ow, h, w, c_in_g, c_out_g,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride(), *weight.stride(), *out.stride(),
            res.shape[1], residual_stride, residual_offset, *res.stride(),
            c_sc, shortcut_stride, *scx.stride(), scw.stride(0), scw.stride(1),
            KH=kh, KW=kw,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_SHORTCUT=shortcut_x is not None, RELU=bool(relu), FLAT_K=bool(flat_k),
            INPUT_PRECISION=precision,
            UPCAST_DOT=INTERPRETING and x.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is None:
        key = autotune.ShapeKey(
            device=x.device, dtype=x.dtype, batch=n, in_channels=c_in, height=h, width=w,
            out_channels=c_out, kernel=(kh, kw), stride=stride, padding=padding,
            dilation=dilation, groups=groups, shortcut_channels=c_sc,
            shortcut_stride=shortcut_stride if c_sc else 0,
            channels_last=x.is_contiguous(memory_format=torch.channels_last),
            input_precision=precision, flat_k=bool(flat_k),
        )
        config = autotune.choose_config(key, launch)
    launch(config)
    return out
