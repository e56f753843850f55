"""Fused convolution: one implicit-GEMM Triton kernel for both modes.

    eval  (``conv_bias_act``): out = relu?(conv(x, w) + bias + conv1x1(shortcut_x, shortcut_w) + R)
    train (``conv_stats``):    y = conv(relu?(BN_in(x)), w) + bias, and y's batch mean / variance

Train mode switches on two constexpr extensions of the same kernel:
* prologue (HAS_PROLOGUE, PROLOGUE_W/B/RELU): the previous layer's BN + ReLU
  is applied to each input tile as it loads, in fp32, rounded back to x's
  dtype (as the reference does); padding is zero *after* it (padding is zero
  in the conv's input, not in x).
* epilogue statistics (WRITE_STATS): each program reduces its output tile to
  per-channel partials (shift K = the tile's first row, mean of y - K, M2
  about the tile mean) of y *as stored*, i.e. after rounding to y's dtype:
  the next BN normalises exactly those values, the reference's statistics are
  of them too, and for fp32 it is the same thing. A second tiny kernel merges
  the partials per channel in a fixed order (chunked parallel formula, then
  Chan's pairwise merge, all relative to tile 0's shift): deterministic, no
  atomics, and no Σy² - (Σy)² cancellation when |mean| >> std.

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
from .precision import dot_input_precision

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
    return tl.load(ptrs, mask=mask, other=0.0), mask


@triton.jit
def _bn_prologue(x, mask, ch, ch_mask, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr):
    """relu?((x - mean[ch]) * invstd[ch] * w[ch] + b[ch]) in fp32, rounded to x's dtype; 0 where ~mask.

    The previous layer's BN + ReLU on a loaded input tile. Padding is zero in
    the conv's input, i.e. *after* this transform, hence the final select.
    """
    mean = tl.load(mean_ptr + ch, mask=ch_mask, other=0.0)
    scale = tl.load(invstd_ptr + ch, mask=ch_mask, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=ch_mask, other=0.0)
    a = (x.to(tl.float32) - mean[None, :]) * scale[None, :]
    if HAS_B:
        a = a + tl.load(b_ptr + ch, mask=ch_mask, other=0.0)[None, :]
    if RELU:
        a = tl.where(a < 0, 0.0, a)  # NaN stays NaN, as torch.relu (tl.maximum would drop it)
    return tl.where(mask, a, 0.0).to(x.dtype)


@triton.jit
def _tile_stats(y, row_mask, col_mask, pid_m, co, C_OUT, part_shift_ptr, part_mean_ptr, part_m2_ptr):
    """Per-column statistics of the valid rows of one output tile -> partials[pid_m, co].

    Stored: the shift K (the tile's plain fp32 mean, a first estimate), the mean of y - K (its
    correction) and M2 about the tile mean. With K near the mean the deviations y - K and their
    sums stay at the scale of the spread, so nothing cancels however large |mean| is, and the
    pair (K, correction) keeps the bits one fp32 value near |mean| would round off. (A sample of
    y as K, as before v0.8, cost ~ulp(std) in the mean when |mean| << std, 5-50x fp32's sum.)
    The count is implied by pid_m: min(BLOCK_M, M - pid_m * BLOCK_M).
    """
    valid = row_mask[:, None] & col_mask[None, :]
    count = tl.sum(row_mask.to(tl.float32), axis=0)
    shift = tl.sum(tl.where(valid, y, 0.0), axis=0) / count
    shifted = tl.where(valid, y - shift[None, :], 0.0)
    mean = tl.sum(shifted, axis=0) / count
    d = tl.where(valid, shifted - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    offs = pid_m.to(tl.int64) * C_OUT + co
    tl.store(part_shift_ptr + offs, shift, mask=col_mask)
    tl.store(part_mean_ptr + offs, mean, mask=col_mask)
    tl.store(part_m2_ptr + offs, m2, mask=col_mask)


@triton.jit
def _conv_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, sc_x_ptr, sc_w_ptr, out_ptr,
    # train mode: the input's BN (prologue) and the per-tile statistics of the output (epilogue)
    in_mean_ptr, in_invstd_ptr, in_w_ptr, in_b_ptr, part_shift_ptr, part_mean_ptr, part_m2_ptr,
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
    HAS_PROLOGUE: tl.constexpr, PROLOGUE_W: tl.constexpr, PROLOGUE_B: tl.constexpr,
    PROLOGUE_RELU: tl.constexpr, WRITE_STATS: tl.constexpr,
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
            a, a_mask = _load_input_tile(x_rows, ih0, iw0, m_mask, c, k_mask, kh[None, :], kw[None, :],
                                         H, W, DIL_H, DIL_W, sx_c, sx_h, sx_w)
            if HAS_PROLOGUE:
                a = _bn_prologue(a, a_mask, group * C_IN_G + c, k_mask, in_mean_ptr, in_invstd_ptr,
                                 in_w_ptr, in_b_ptr, PROLOGUE_W, PROLOGUE_B, PROLOGUE_RELU)
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
            a, a_mask = _load_input_tile(x_rows, ih0, iw0, m_mask, c, k_mask, kh, kw,
                                         H, W, DIL_H, DIL_W, sx_c, sx_h, sx_w)
            if HAS_PROLOGUE:
                a = _bn_prologue(a, a_mask, group * C_IN_G + c, k_mask, in_mean_ptr, in_invstd_ptr,
                                 in_w_ptr, in_b_ptr, PROLOGUE_W, PROLOGUE_B, PROLOGUE_RELU)
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
        acc = tl.where(acc < 0, 0.0, acc)  # NaN stays NaN, as torch.relu
    y = acc.to(out_ptr.dtype.element_ty)
    out_rows = out_ptr + n_img * so_n + oh * so_h + ow * so_w
    out_ptrs = out_rows[:, None] + (co * so_c)[None, :]
    tl.store(out_ptrs, y, mask=out_mask)
    if WRITE_STATS:  # of y as stored (rounded): what the next BN normalises
        _tile_stats(y.to(tl.float32), m_mask, n_mask, pid_m, co,
                    C_OUT_G * tl.num_programs(1),
                    part_shift_ptr, part_mean_ptr, part_m2_ptr)


@triton.jit
def _finalize_stats_kernel(part_shift_ptr, part_mean_ptr, part_m2_ptr, out0_ptr, out1_ptr, out2_ptr,
                           M, C, NUM_TILES, TILES_PER_PROGRAM, TILE_M,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr):
    """Merges per-tile (count, K + mean, M2) rows in a fixed order (deterministic, no atomics).

    Program (c, r) takes the channels of block c and the tiles [r * TILES_PER_PROGRAM, ...).
    Everything is computed relative to the first tile's shift K0: tile means become
    u_i = (K_i - K0) + s_i, small and precise. Each chunk of BLOCK_T tiles is
    combined around its own mean (M2 = sum M2_i + n_i (u_i - u_chunk)^2), then
    merged into the running (n, u, M2) with Chan's pairwise formula: no large
    sums are subtracted. FINAL (one program per channel block, all tiles): mean and
    biased variance into out0/out1. Otherwise each program writes its range as one
    row (K0, u, M2) of out0/out1/out2: rows of a tile TILES_PER_PROGRAM times as tall,
    which a FINAL launch merges the same way.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    first = tl.program_id(1) * TILES_PER_PROGRAM
    last = tl.minimum(first + TILES_PER_PROGRAM, NUM_TILES)
    offs_t = tl.arange(0, BLOCK_T)
    k0 = tl.load(part_shift_ptr + first.to(tl.int64) * C + offs_c, mask=c_mask, other=0.0)
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(first, last, BLOCK_T):
        t = t0 + offs_t
        t_mask = t < last
        n_t = tl.where(t_mask, tl.minimum(M - t.to(tl.int64) * TILE_M, TILE_M), 0).to(tl.float32)
        offs = t.to(tl.int64)[:, None] * C + offs_c[None, :]
        mask = t_mask[:, None] & c_mask[None, :]
        mean_t = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        mean_t += tl.load(part_shift_ptr + offs, mask=mask, other=0.0) - k0[None, :]
        m2_t = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
        n_chunk = tl.sum(n_t, axis=0)  # a scalar: every channel sees the same rows
        mean_chunk = tl.sum(mean_t * n_t[:, None], axis=0) / n_chunk
        dev = mean_t - mean_chunk[None, :]
        m2_chunk = tl.sum(m2_t + n_t[:, None] * dev * dev, axis=0)
        n_new = n + n_chunk
        delta = mean_chunk - mean
        mean = mean + delta * (n_chunk / n_new)
        m2 = m2 + m2_chunk + delta * delta * (n * (n_chunk / n_new))
        n = n_new
    if FINAL:
        tl.store(out0_ptr + offs_c, k0 + mean, mask=c_mask)
        tl.store(out1_ptr + offs_c, m2 / n, mask=c_mask)
    else:
        row = tl.program_id(1).to(tl.int64) * C + offs_c
        tl.store(out0_ptr + row, k0, mask=c_mask)
        tl.store(out1_ptr + row, mean, mask=c_mask)
        tl.store(out2_ptr + row, m2, mask=c_mask)


# --------------------------------------------------------------------------- host
def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _channels_last(t: Tensor) -> Tensor:
    if t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


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


def _check_prologue(x, in_mean, in_invstd, in_weight, in_bias) -> None:
    c = x.shape[1]
    for name, t in (("in_mean", in_mean), ("in_invstd", in_invstd), ("in_weight", in_weight),
                    ("in_bias", in_bias)):
        if t is None:
            continue
        if t.device != x.device or t.dtype != torch.float32 or t.shape != (c,):
            raise ValueError(f"{name} must be float32 of shape ({c},) on {x.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if in_mean is not None and in_invstd is None:
        raise ValueError("the prologue BN needs in_invstd with in_mean")


def _conv_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, prologue: Optional[tuple], in_relu: bool, stats: bool,
    out: Optional[Tensor], config: Optional[autotune.Config], flat_k: Optional[bool],
):
    """The one launch behind both ops: (out, (part_shift, part_mean, part_m2, tile_m) or None).

    ``prologue`` = (mean, invstd, weight, bias) of the input's BN or None;
    ``stats``: also write per-tile partial statistics of ``out``.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    _check(x, weight, bias, groups, residual, residual_stride, shortcut_x, shortcut_weight,
           shortcut_stride, oh, ow)
    if prologue is not None:
        _check_prologue(x, *prologue)
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
        return out, None
    # Absent operands get harmless geometry: their code is compiled out, their ints still travel.
    if residual is None:
        residual_stride, residual_offset = 1, 0
    if shortcut_x is None:
        shortcut_stride = 1

    if CHANNELS_LAST_INSIDE:
        x = _channels_last(x)
        if shortcut_x is not None:
            shortcut_x = _channels_last(shortcut_x)

    precision = dot_input_precision(x.dtype, INTERPRETING)
    if flat_k is None:
        flat_k = kh * kw > 1 and c_in_g < autotune.FLAT_K_BELOW_CHANNELS
    m = n * oh * ow
    in_mean, in_invstd, in_weight, in_bias = prologue if prologue is not None else (None,) * 4
    partials = None

    def launch(cfg: autotune.Config) -> None:
        nonlocal partials
        # plain integer ceil-division: triton.cdiv is a slow constexpr_function on the host in 3.8
        num_pid_m = -(-m // cfg.block_m)
        grid = (num_pid_m * -(-c_out_g // cfg.block_n), groups)
        res = residual if residual is not None else x
        scx = shortcut_x if shortcut_x is not None else x
        scw = shortcut_weight if shortcut_weight is not None else weight
        if stats:  # (shift, mean, M2) per (row tile, channel); every entry is written once
            part = torch.empty((3, num_pid_m, c_out), dtype=torch.float32, device=x.device)
            partials = (part[0], part[1], part[2], cfg.block_m)
        dummy = out  # any pointer: the code that would read it is compiled out
        autotune.launch_kernel(
            _conv_bias_act_kernel, grid,
            x, weight, bias if bias is not None else x, res, scx, scw, out,
            *(t if t is not None else dummy for t in (in_mean, in_invstd, in_weight, in_bias)),
            *(partials[:3] if stats else (dummy,) * 3),
            m, oh, ow, h, w, c_in_g, c_out_g,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride(), *weight.stride(), *out.stride(),
            res.shape[1], residual_stride, residual_offset, *res.stride(),
            c_sc, shortcut_stride, *scx.stride(), scw.stride(0), scw.stride(1),
            KH=kh, KW=kw,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_SHORTCUT=shortcut_x is not None, RELU=bool(relu), FLAT_K=bool(flat_k),
            HAS_PROLOGUE=prologue is not None, PROLOGUE_W=in_weight is not None,
            PROLOGUE_B=in_bias is not None, PROLOGUE_RELU=bool(in_relu), WRITE_STATS=bool(stats),
            INPUT_PRECISION=precision,
            UPCAST_DOT=INTERPRETING and x.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is None:
        fusion = []
        if prologue is not None:
            fusion.append("bn_relu" if in_relu else "bn")
        if stats:
            fusion.append("stats")
        if residual is not None:  # one more operand stream in the epilogue
            fusion.append("residual")
        key = autotune.ShapeKey(
            device=x.device, dtype=x.dtype, batch=n, in_channels=c_in, height=h, width=w,
            out_channels=c_out, kernel=(kh, kw), stride=stride, padding=padding,
            dilation=dilation, groups=groups, shortcut_channels=c_sc,
            shortcut_stride=shortcut_stride if c_sc else 0,
            channels_last=x.is_contiguous(memory_format=torch.channels_last),
            input_precision=precision, flat_k=bool(flat_k), fusion="+".join(fusion),
        )
        config = autotune.choose_config(key, launch)
    launch(config)
    return out, partials


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
    out, _ = _conv_forward(x, weight, bias, stride, padding, dilation, groups,
                           residual, residual_stride, residual_offset,
                           shortcut_x, shortcut_weight, shortcut_stride, relu,
                           None, False, False, out, config, flat_k)
    return out


# Finalisation tiles: channels per program, tiles merged per step. Over _FINALIZE_ONE_LEVEL_TILES
# row tiles (ResNet's stem at batch 256 has ~10^5), one program per channel block would read them
# all alone: a first launch merges ranges of tiles in parallel (about _FINALIZE_RANGES of them),
# a second merges those ranges. Both in a fixed order: the result does not depend on scheduling.
_FINALIZE_BLOCK_C = 64
_FINALIZE_BLOCK_T = 64
_FINALIZE_ONE_LEVEL_TILES = 512
_FINALIZE_RANGES = 128


def _merge_stats(shift, mean, m2, m: int, tile_m: int, out, tiles_per_program: int, final: bool) -> None:
    num_tiles, c = mean.shape
    block_t = min(_FINALIZE_BLOCK_T, max(2, 1 << max(0, min(num_tiles, tiles_per_program) - 1).bit_length()))
    grid = (-(-c // _FINALIZE_BLOCK_C), -(-num_tiles // tiles_per_program))
    # the tile height is a run-time argument: a second level's (ranges of tiles) differs per layer
    _finalize_stats_kernel[grid](shift, mean, m2, *out, m, c, num_tiles, tiles_per_program, tile_m,
                                 BLOCK_T=block_t, BLOCK_C=_FINALIZE_BLOCK_C, FINAL=final)


def finalize_stats(part_shift: Tensor, part_mean: Tensor, part_m2: Tensor, m: int, tile_m: int):
    """(mean, biased var) per channel from the per-tile partials: one small launch, two for many tiles."""
    num_tiles, c = part_mean.shape
    dev = part_mean.device
    mean = torch.empty(c, dtype=torch.float32, device=dev)
    var = torch.empty(c, dtype=torch.float32, device=dev)
    if POISON_OUTPUT:
        mean.fill_(float("nan"))
        var.fill_(float("nan"))
    if num_tiles > _FINALIZE_ONE_LEVEL_TILES:
        per_range = -(-num_tiles // _FINALIZE_RANGES)
        ranges = -(-num_tiles // per_range)
        partial = [torch.empty((ranges, c), dtype=torch.float32, device=dev) for _ in range(3)]
        _merge_stats(part_shift, part_mean, part_m2, m, tile_m, partial, per_range, final=False)
        part_shift, part_mean, part_m2 = partial
        tile_m, num_tiles = tile_m * per_range, ranges
    _merge_stats(part_shift, part_mean, part_m2, m, tile_m, (mean, var, var), num_tiles, final=True)
    return mean, var


def conv_stats_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, compute_stats: bool,
    *, config: Optional[autotune.Config] = None, flat_k: Optional[bool] = None,
):
    """``reference.conv_stats``: one conv launch (BN_in + ReLU prologue, statistics epilogue)
    plus, when ``compute_stats``, one tiny launch merging the per-tile statistics."""
    prologue = (in_mean, in_invstd, in_weight, in_bias) if in_mean is not None else None
    y, partials = _conv_forward(x, weight, bias, stride, padding, dilation, groups,
                                None, 1, 0, None, None, 1, False,
                                prologue, in_relu and prologue is not None, compute_stats,
                                None, config, flat_k)
    c_out = weight.shape[0]
    if not compute_stats:
        empty = y.new_empty((0,), dtype=torch.float32)
        return y, empty, empty.clone()
    if partials is None:  # nothing to average: NaN, as the reference (and PyTorch) give
        nan = torch.full((c_out,), float("nan"), dtype=torch.float32, device=y.device)
        return y, nan, nan.clone()
    mean, var = finalize_stats(*partials[:3], y.numel() // c_out, partials[3])
    return y, mean, var
