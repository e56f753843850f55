"""The convolutions' backward, dgrad and wgrad as implicit GEMMs, for both modes.

Train (``conv_stats_backward``): forward y = conv(a, w) + bias, a =
relu?(BN_in(x)) (the prologue), with the batch statistics (mean, var) of y.
Backward, g is y's total gradient

    g = grad_y + grad_mean/count + grad_var·2(y − mean)/count

Eval (``conv_bias_act_backward``, BN folded): g = grad where the forward's
output > 0 (the ReLU's mask), and no prologue. A merged projection shortcut is
a second dgrad/wgrad pair on the same g; the mapped residual's gradient is one
elementwise launch (``bn_act_bwd.mapped_residual_grad``).

g is never materialised: both GEMMs rebuild it from grad_y, y (or out) and
per-channel vectors in their operand loads (``_g_tile``), in fp32, then round
it to x's dtype for the tensor cores (as the reference does before its conv).

* **dgrad** (``_dgrad_kernel``): ga = conv_transpose(g, w). Rows = input pixels
  (n, ih, iw), columns = the input channels of one group (grid axis 1),
  K = taps × output channels of the group. A strided conv is split into its
  stride phases (grid axis 2: ih ≡ ph mod stride_h, iw ≡ pw mod stride_w): in
  one phase a tap either hits an output pixel for every row or for none, so
  the test is a scalar per tap and no MACs are spent on structural zeros.
  Epilogue (the prologue's backward): recompute a = relu?(BN_in(x)) at the same
  pixels for the ReLU mask, write gx = ga_pre·in_weight·in_invstd, and write
  this tile's per-input-channel Σga_pre and Σga_pre·(x − in_mean) into its own
  row of a partial-sum buffer, reduced afterwards in a fixed order by
  ``bn_act_bwd.channel_grads_kernel``: deterministic, no atomics.
* **wgrad** (``_wgrad_kernel``): gw[co, (kh, kw, ci)] = Σ_pixels g ⊗ a. Rows =
  output channels of one group, columns = (tap, input channel) flattened
  (channel fastest), K = the N·OH·OW output pixels; a is recomputed from x in
  the operand load (prologue + zero padding), never read from a saved tensor.
  The conv-bias gradient Σg rides along in the column-0 programs. Split-K over
  the pixels (grid axis 2) when there are few output tiles: each split writes
  fp32 partials into its own slice, summed afterwards in a fixed order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import memory_format_of, stat_dtype, weight_grad_format
from . import autotune
from .precision import dot_input_precision
from .autotune import interpreter_requested
from . import bn_act_bwd
from .bn_act_bwd import finalize_channel_grads, mapped_residual_grad, new_output

INTERPRETING = interpreter_requested()


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _g_tile(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, inv_count,
            off_gy, off_y, co, co_mask, mask,
            HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, RELU_MASK: tl.constexpr):
    """fp32 tile of y's total gradient at element offsets off_gy/off_y; co (broadcastable) its channels.

    RELU_MASK (the eval backward): y_ptr is the forward's output and g is zero where it is <= 0
    (torch's ReLU backward: a NaN output passes the gradient).
    """
    g = tl.load(gy_ptr + off_gy, mask=mask, other=0.0).to(tl.float32)
    if RELU_MASK:
        g = tl.where(tl.load(y_ptr + off_y, mask=mask, other=0.0) <= 0, 0.0, g)
    if HAS_GM:
        g += tl.load(gmean_ptr + co, mask=co_mask, other=0.0).to(tl.float32) * inv_count
    if HAS_GV:
        yv = tl.load(y_ptr + off_y, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
        gv = tl.load(gvar_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
        g += gv * 2.0 * (yv - mu) * inv_count
    return tl.where(mask, g, 0.0)


@triton.jit
def _bn_in(xv, mean, invstd, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr):
    """relu?((x − mean)·invstd·w + b) in fp32 (the forward's prologue, same order of operations)."""
    a = (xv - mean) * invstd
    if HAS_W:
        a = a * w
    if HAS_B:
        a = a + b
    if RELU:
        a = tl.where(a < 0, 0.0, a)  # NaN stays NaN, as torch.relu
    return a


@triton.jit
def _dgrad_kernel(
    gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, inv_count,
    w_ptr, x_ptr, in_mean_ptr, in_invstd_ptr, in_w_ptr, in_b_ptr,
    gx_ptr, part_ptr,
    N_IMG, H, W, OH, OW, C_IN, C_IN_G, C_OUT_G, NUM_PID_M,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    sgy_n, sgy_c, sgy_h, sgy_w,
    sy_n, sy_c, sy_h, sy_w,
    sw_o, sw_c, sw_h, sw_w,
    sx_n, sx_c, sx_h, sx_w,
    sgx_n, sgx_c, sgx_h, sgx_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, RELU_MASK: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_HAS_W: tl.constexpr, IN_HAS_B: tl.constexpr, IN_RELU: tl.constexpr,
    STORE_GX: tl.constexpr, PART_SUMS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ---- which tile: (row block, column block), group, stride phase
    num_pid_n = tl.cdiv(C_IN_G, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    group = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // STRIDE_W
    pw = phase % STRIDE_W
    # this phase's pixels: ih = qh * STRIDE_H + ph, iw = qw * STRIDE_W + pw
    hq = (H - ph + STRIDE_H - 1) // STRIDE_H
    wq = (W - pw + STRIDE_W - 1) // STRIDE_W
    wq1 = tl.maximum(wq, 1)
    hwq = tl.maximum(hq * wq, 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_img = offs_m // hwq
    q = offs_m % hwq
    qh = q // wq1
    qw = q % wq1
    m_mask = offs_m < N_IMG * hq * wq
    n_img = n_img.to(tl.int64)
    n_mask = offs_n < C_IN_G
    ci = group * C_IN_G + offs_n
    co_base = group * C_OUT_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # ---- K loop: taps that reach an output pixel in this phase, x output-channel blocks
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap % KW
        # (ih + PAD - kh*DIL) / STRIDE must be exact; shifted by STRIDE*K*DIL to stay >= 0
        rh = ph + PAD_H - kh * DIL_H + STRIDE_H * KH * DIL_H
        rw = pw + PAD_W - kw * DIL_W + STRIDE_W * KW * DIL_W
        if (rh % STRIDE_H == 0) & (rw % STRIDE_W == 0):
            oh = qh + rh // STRIDE_H - KH * DIL_H
            ow = qw + rw // STRIDE_W - KW * DIL_W
            valid = m_mask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            row_gy = n_img * sgy_n + oh * sgy_h + ow * sgy_w
            row_y = n_img * sy_n + oh * sy_h + ow * sy_w
            for c0 in range(0, C_OUT_G, BLOCK_K):
                ck = c0 + offs_k
                k_mask = ck < C_OUT_G
                co = co_base + ck
                mask = valid[:, None] & k_mask[None, :]
                g = _g_tile(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, inv_count,
                            row_gy[:, None] + (co * sgy_c)[None, :], row_y[:, None] + (co * sy_c)[None, :],
                            co[None, :], k_mask[None, :], mask, HAS_GM, HAS_GV, RELU_MASK)
                a = g.to(w_ptr.dtype.element_ty)
                b = tl.load(w_ptr + (co * sw_o)[:, None] + (offs_n * sw_c)[None, :] + (kh * sw_h + kw * sw_w),
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # ---- epilogue: the prologue's backward at the same input pixels
    ih = qh * STRIDE_H + ph
    iw = qw * STRIDE_W + pw
    out_mask = m_mask[:, None] & n_mask[None, :]
    gx_ptrs = gx_ptr + (n_img * sgx_n + ih * sgx_h + iw * sgx_w)[:, None] + (ci * sgx_c)[None, :]
    if PROLOGUE:
        mean = tl.load(in_mean_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
        invstd = tl.load(in_invstd_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
        scale = invstd
        w_in = invstd
        b_in = invstd
        if IN_HAS_W:
            w_in = tl.load(in_w_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
            scale = invstd * w_in
        if IN_HAS_B:
            b_in = tl.load(in_b_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + (n_img * sx_n + ih * sx_h + iw * sx_w)[:, None] + (ci * sx_c)[None, :],
                     mask=out_mask, other=0.0).to(tl.float32)
        ga = acc
        if IN_RELU:
            a_in = _bn_in(xv, mean[None, :], invstd[None, :], w_in[None, :], b_in[None, :],
                          IN_HAS_W, IN_HAS_B, False)
            # the mask of the forward's a, which was rounded to x's dtype
            ga = tl.where(a_in.to(x_ptr.dtype.element_ty) <= 0, 0.0, ga)
        ga = tl.where(out_mask, ga, 0.0)
        if STORE_GX:
            tl.store(gx_ptrs, (ga * scale[None, :]).to(gx_ptr.dtype.element_ty), mask=out_mask)
        if PART_SUMS:
            row = part_ptr + (phase * NUM_PID_M + pid_m).to(tl.int64) * (2 * C_IN) + ci
            tl.store(row, tl.sum(ga, axis=0), mask=n_mask)
            tl.store(row + C_IN, tl.sum(ga * (xv - mean[None, :]), axis=0), mask=n_mask)
    else:
        tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wgrad_kernel(
    gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, inv_count,
    x_ptr, in_mean_ptr, in_invstd_ptr, in_w_ptr, in_b_ptr,
    gw_ptr, gb_ptr,
    P, OHW, OW, H, W, C_IN_G, C_OUT_G, K_COLS, K_PER_SPLIT, NUM_PID_N,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    sgy_n, sgy_c, sgy_h, sgy_w,
    sy_n, sy_c, sy_h, sy_w,
    sx_n, sx_c, sx_h, sx_w,
    sgw_s, sgw_o, sgw_c, sgw_h, sgw_w, sgb_s,
    KW: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr, RELU_MASK: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_HAS_W: tl.constexpr, IN_HAS_B: tl.constexpr, IN_RELU: tl.constexpr,
    STORE_GW: tl.constexpr, BIAS_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ---- which tile: (output-channel block, (tap, channel) block), group, K split
    pid = tl.program_id(0)
    pid_m = pid // NUM_PID_N
    pid_n = pid % NUM_PID_N
    group = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < C_OUT_G
    co = group * C_OUT_G + offs_m
    n_mask = offs_n < K_COLS
    c_loc = offs_n % C_IN_G
    tap = offs_n // C_IN_G
    kh = tap // KW
    kw = tap % KW
    ci = group * C_IN_G + c_loc
    if PROLOGUE:
        mean = tl.load(in_mean_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
        invstd = tl.load(in_invstd_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
        w_in = invstd
        b_in = invstd
        if IN_HAS_W:
            w_in = tl.load(in_w_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
        if IN_HAS_B:
            b_in = tl.load(in_b_ptr + ci, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # ---- K loop over this split's output pixels
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, P)
    for k0 in range(k_start, k_end, BLOCK_K):
        p = k0 + offs_k
        p_mask = p < k_end
        n_img = (p // OHW).to(tl.int64)
        pix = p % OHW
        oh = pix // OW
        ow = pix % OW
        g_mask = m_mask[:, None] & p_mask[None, :]
        g = _g_tile(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, inv_count,
                    (co * sgy_c)[:, None] + (n_img * sgy_n + oh * sgy_h + ow * sgy_w)[None, :],
                    (co * sy_c)[:, None] + (n_img * sy_n + oh * sy_h + ow * sy_w)[None, :],
                    co[:, None], m_mask[:, None], g_mask, HAS_GM, HAS_GV, RELU_MASK)
        if BIAS_GRAD:
            bsum += tl.sum(g, axis=1)
        if STORE_GW:
            # a = relu?(BN_in(x)) at (n, ci, oh*s - pad + kh*dil, ow*s - pad + kw*dil); 0 in the padding
            ih = (oh * STRIDE_H - PAD_H)[:, None] + (kh * DIL_H)[None, :]
            iw = (ow * STRIDE_W - PAD_W)[:, None] + (kw * DIL_W)[None, :]
            a_mask = (p_mask[:, None] & n_mask[None, :]
                      & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            xv = tl.load(x_ptr + (n_img * sx_n)[:, None] + (ci * sx_c)[None, :] + ih * sx_h + iw * sx_w,
                         mask=a_mask, other=0.0)
            if PROLOGUE:
                a = _bn_in(xv.to(tl.float32), mean[None, :], invstd[None, :], w_in[None, :], b_in[None, :],
                           IN_HAS_W, IN_HAS_B, IN_RELU)
                a = tl.where(a_mask, a, 0.0).to(x_ptr.dtype.element_ty)
            else:
                a = xv
            lhs = g.to(x_ptr.dtype.element_ty)
            if UPCAST_DOT:
                lhs = lhs.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(lhs, a, acc, input_precision=INPUT_PRECISION)

    # ---- store this split's slice (fp32 partials when split, else the final dtype)
    if STORE_GW:
        gw_ptrs = (gw_ptr + split.to(tl.int64) * sgw_s + (co * sgw_o)[:, None]
                   + (c_loc * sgw_c + kh * sgw_h + kw * sgw_w)[None, :])
        tl.store(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if BIAS_GRAD:
        tl.store(gb_ptr + split * sgb_s + co, bsum, mask=m_mask & (pid_n == 0))


# --------------------------------------------------------------------------- host
def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tuning_key(kind: str, x: Tensor, weight: Tensor, geometry, src: "_GradSource",
                prologue: "_Prologue", outputs: Sequence[str]) -> autotune.ShapeKey:
    """The autotune key of one backward GEMM: the conv's geometry plus what the kernel fuses and
    writes (a bias-only wgrad is another kernel than a full one, and may want other tiles)."""
    stride, padding, dilation, groups = geometry
    n, c_in, h, w = x.shape
    extras = [name for name, on in (("bn", prologue.present), ("mask", src.flags["RELU_MASK"]),
                                    ("stats", src.flags["HAS_GV"])) if on] + list(outputs)
    return autotune.ShapeKey(
        device=x.device, dtype=x.dtype, batch=n, in_channels=c_in, height=h, width=w,
        out_channels=weight.shape[0], kernel=tuple(weight.shape[2:]), stride=stride, padding=padding,
        dilation=dilation, groups=groups, shortcut_channels=0, shortcut_stride=0,
        channels_last=x.is_contiguous(memory_format=torch.channels_last),
        input_precision=dot_input_precision(x.dtype, INTERPRETING), flat_k=False, fusion="+".join([kind, *extras]),
    )


def _config_for(key: autotune.ShapeKey, launch) -> autotune.Config:
    """The tile config for ``key``: timed once per shape on a GPU (``autotune``), else the default."""
    return autotune.choose_config(key, launch)


def _check(grad_y, x, y, weight, groups, oh, ow) -> None:
    if x.dim() != 4 or weight.dim() != 4 or y.dim() != 4:
        raise ValueError(f"x, y and weight must be 4-D, got {tuple(x.shape)}, {tuple(y.shape)}, "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype or y.dtype != x.dtype:
        raise ValueError(f"weight {weight.dtype} / y {y.dtype} differ from x {x.dtype}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} with groups={groups}")
    expect = (x.shape[0], weight.shape[0], oh, ow)
    if tuple(y.shape) != expect or tuple(grad_y.shape) != expect:
        raise ValueError(f"y {tuple(y.shape)} / grad_y {tuple(grad_y.shape)} must be {expect}")


class _GradSource:
    """How the kernels rebuild the output gradient g in their operand loads.

    conv_stats: g = grad_y + grad_mean/count + grad_var·2(y − mean)/count.
    conv_bias_act: g = grad_y where the forward's output > 0 (``relu_out``), else grad_y.
    """

    def __init__(self, grad_y: Tensor, *, y: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                 grad_mean: Optional[Tensor] = None, grad_var: Optional[Tensor] = None,
                 relu_out: Optional[Tensor] = None):
        count = grad_y.numel() // max(grad_y.shape[1], 1)
        dummy = grad_y
        y_like = relu_out if relu_out is not None else (y if grad_var is not None else dummy)
        self.args = (grad_y, y_like,
                     grad_mean if grad_mean is not None else dummy,
                     grad_var if grad_var is not None else dummy,
                     mean if grad_var is not None else dummy,
                     1.0 / max(count, 1))
        self.flags = dict(HAS_GM=grad_mean is not None, HAS_GV=grad_var is not None,
                          RELU_MASK=relu_out is not None)
        self.strides = (*grad_y.stride(), *y_like.stride())


class _Prologue:
    """The input's BN(+ReLU) applied in the forward's operand load (absent: plain x)."""

    def __init__(self, dummy: Tensor, mean=None, invstd=None, weight=None, bias=None, relu=False):
        self.present = mean is not None
        self.args = tuple(t if t is not None else dummy for t in (mean, invstd, weight, bias))
        self.flags = dict(PROLOGUE=self.present, IN_HAS_W=self.present and weight is not None,
                          IN_HAS_B=self.present and bias is not None, IN_RELU=self.present and bool(relu))


def _dgrad(src: _GradSource, weight: Tensor, x: Tensor, geometry, oh: int, ow: int,
           prologue: _Prologue, store_gx: bool, part_sums: bool):
    """dgrad with its tuned tiles: (gx or None, the prologue backward's per-tile partial sums or None).

    gx is allocated once: the tuner's candidates (compiled in parallel threads, then timed) write
    into it rather than each into an x-sized tensor of its own."""
    gx = new_output(x.shape, x.dtype, x.device, memory_format_of(x)) if store_gx else None

    def launch(cfg):
        return _dgrad_launch(cfg, src, weight, x, geometry, oh, ow, prologue, gx, part_sums)
    outputs = [name for name, on in (("gx", store_gx), ("sums", part_sums)) if on]
    cfg = _config_for(_tuning_key("dgrad", x, weight, geometry, src, prologue, outputs), launch)
    _repoison(gx)
    return launch(cfg)


def _dgrad_launch(cfg: autotune.Config, src: _GradSource, weight: Tensor, x: Tensor, geometry, oh: int, ow: int,
                  prologue: _Prologue, gx: Optional[Tensor], part_sums: bool):
    stride, padding, dilation, groups = geometry
    n, c_in, h, w = x.shape
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    dev = x.device
    phases = stride[0] * stride[1]
    rows = n * (-(-h // stride[0])) * (-(-w // stride[1]))
    num_pid_m = max(1, -(-rows // cfg.block_m))
    part = torch.empty((phases * num_pid_m, 2 * c_in), dtype=torch.float32, device=dev) if part_sums else None
    if x.numel() == 0:
        if part is not None:
            part.zero_()
        return gx, part
    gx_t = gx if gx is not None else x
    autotune.launch_kernel(
        _dgrad_kernel, (num_pid_m * -(-c_in_g // cfg.block_n), groups, phases),
        *src.args, weight, x, *prologue.args, gx_t, part if part is not None else x,
        n, h, w, oh, ow, c_in, c_in_g, c_out // groups, num_pid_m,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *src.strides, *weight.stride(), *x.stride(), *gx_t.stride(),
        KH=weight.shape[2], KW=weight.shape[3], **src.flags, **prologue.flags,
        STORE_GX=gx is not None, PART_SUMS=part_sums,
        INPUT_PRECISION=dot_input_precision(x.dtype, INTERPRETING),
        UPCAST_DOT=INTERPRETING and x.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return gx, part


def _wgrad(src: _GradSource, weight: Tensor, x: Tensor, geometry, oh: int, ow: int,
           prologue: _Prologue, need_gw: bool, bias_grad: bool, split_k: Optional[int]):
    """wgrad with its tuned tiles (plus a fixed-order sum of the K splits): (gw or None, gb or None).
    gw and gb are allocated once, as dgrad's gx; a candidate's own are its K-split partials only."""
    gw = new_output(weight.shape, weight.dtype, x.device, weight_grad_format(x, weight)) if need_gw else None
    gb = new_output((weight.shape[0],), stat_dtype(x.dtype), x.device) if bias_grad else None

    def launch(cfg):
        return _wgrad_launch(cfg, src, weight, x, geometry, oh, ow, prologue, gw, gb, split_k)
    outputs = [name for name, on in (("gw", need_gw), ("gb", bias_grad)) if on]
    cfg = _config_for(_tuning_key("wgrad", x, weight, geometry, src, prologue, outputs), launch)
    _repoison(gw)
    _repoison(gb)
    return launch(cfg)


def _repoison(t: Optional[Tensor]) -> None:
    """Poison again before the chosen config's launch: a tuning candidate may have written what it skips."""
    if bn_act_bwd.POISON_OUTPUT and t is not None and t.is_floating_point():
        t.fill_(float("nan"))


def _wgrad_launch(cfg: autotune.Config, src: _GradSource, weight: Tensor, x: Tensor, geometry, oh: int, ow: int,
                  prologue: _Prologue, gw: Optional[Tensor], gb: Optional[Tensor], split_k: Optional[int]):
    stride, padding, dilation, groups = geometry
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    c_out_g = c_out // groups
    dev = x.device
    need_gw, bias_grad = gw is not None, gb is not None
    p_total = n * oh * ow
    k_cols = kh * kw * c_in_g
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    num_pid_n = -(-k_cols // bn) if need_gw else 1
    tiles = -(-c_out_g // bm) * num_pid_n * groups
    if split_k is None:
        split_k = 1
        if not INTERPRETING and dev.type == "cuda":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            split_k = max(1, min(-(-2 * sms // tiles), p_total // (8 * bk)))
    k_per_split = -(-max(p_total, 1) // split_k)
    k_per_split = -(-k_per_split // bk) * bk
    split_k = max(1, -(-max(p_total, 1) // k_per_split))
    direct = split_k == 1
    gw_t = gb_t = x  # placeholders for absent outputs (never written)
    if need_gw:
        gw_t = gw if direct else torch.empty((split_k, *weight.shape), dtype=torch.float32, device=dev)
    if bias_grad:
        gb_t = gb if direct else torch.empty((split_k, c_out), dtype=torch.float32, device=dev)
    if p_total == 0:
        for t in (gw, gb):
            if t is not None:
                t.zero_()
        return gw, gb
    gw_strides = ((0, *gw_t.stride()) if direct else gw_t.stride()) if need_gw else (0,) * 5
    autotune.launch_kernel(
        _wgrad_kernel, (-(-c_out_g // bm) * num_pid_n, groups, split_k),
        *src.args, x, *prologue.args, gw_t, gb_t,
        p_total, oh * ow, ow, h, w, c_in_g, c_out_g, k_cols, k_per_split, num_pid_n,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *src.strides, *x.stride(),
        *gw_strides, 0 if direct or not bias_grad else gb_t.stride(0),
        KW=kw, **src.flags, **prologue.flags,
        STORE_GW=need_gw, BIAS_GRAD=bias_grad,
        INPUT_PRECISION=dot_input_precision(x.dtype, INTERPRETING),
        UPCAST_DOT=INTERPRETING and x.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not direct and not autotune.compiling_only():  # fixed-order sum of the splits, then the final dtype
        if need_gw:
            gw.copy_(gw_t.sum(0))
        if bias_grad:
            gb.copy_(gb_t.sum(0))
    return gw, gb


# --------------------------------------------------------------------------- the ops
def conv_stats_backward(
    grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
    x: Tensor, y: Tensor, mean: Tensor, weight: Tensor, has_bias: bool,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, needs: list,
    *, split_k: Optional[int] = None,
):
    """``reference.conv_stats_backward`` as a dgrad and a wgrad launch (plus the small reductions).

    Returns (gx, gw, gb, g_in_mean, g_in_invstd, g_in_weight, g_in_bias) with
    None where not needed. ``split_k`` overrides wgrad's K split (tests).
    """
    needs = [bool(v) for v in needs]
    geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
    oh, ow = y.shape[2], y.shape[3]
    _check(grad_y, x, y, weight, groups, oh, ow)
    if in_mean is not None and in_mean.shape != (x.shape[1],):
        raise ValueError(f"in_mean must have shape ({x.shape[1]},), got {tuple(in_mean.shape)}")
    src = _GradSource(grad_y, y=y, mean=mean, grad_mean=grad_mean, grad_var=grad_var)
    prologue = _Prologue(grad_y, in_mean, in_invstd, in_weight, in_bias, in_relu)
    p_needs = needs[3:7] if prologue.present else [False] * 4
    part_sums = any([p_needs[0], p_needs[1], p_needs[2] and in_weight is not None, p_needs[3]])

    gx = None
    p_grads = [None] * 4
    if needs[0] or part_sums:
        gx, part = _dgrad(src, weight, x, geometry, oh, ow, prologue, store_gx=needs[0], part_sums=part_sums)
        if part_sums:
            p_grads = finalize_channel_grads(part, 0, x.shape[1], x.shape[1], 0, in_invstd, in_weight, p_needs,
                                             empty=x.numel() == 0)
    gw = gb = None
    bias_grad = has_bias and needs[2]
    if needs[1] or bias_grad:
        gw, gb = _wgrad(src, weight, x, geometry, oh, ow, prologue, needs[1], bias_grad, split_k)
    return (gx, gw, gb, *p_grads)


def conv_bias_act_backward(
    grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, needs: list, *, split_k: Optional[int] = None,
):
    """``reference.conv_bias_act_backward``: the eval-mode (folded BN) backward.

    g = grad masked by out > 0 is rebuilt in every operand load, never stored:
    a dgrad and a wgrad launch for the conv (the bias gradient rides in wgrad),
    the same pair for a merged projection shortcut, and one elementwise launch
    for the mapped residual. Returns (gx, gw, gb, g_residual, g_shortcut_x,
    g_shortcut_weight) with None where not needed or not present.
    """
    needs = [bool(v) for v in needs]
    oh, ow = out.shape[2], out.shape[3]
    _check(grad, x, out, weight, groups, oh, ow)
    src = _GradSource(grad, relu_out=out if relu else None)
    no_prologue = _Prologue(grad)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
    gx = _dgrad(src, weight, x, geometry, oh, ow, no_prologue, True, False)[0] if needs[0] else None
    bias_grad = has_bias and needs[2]
    gw = gb = None
    if needs[1] or bias_grad:
        gw, gb = _wgrad(src, weight, x, geometry, oh, ow, no_prologue, needs[1], bias_grad, split_k)
    gr = None
    if residual is not None and needs[3]:
        gr = mapped_residual_grad(grad, out, residual, residual_stride, residual_offset, relu)
    gsx = gsw = None
    if shortcut_x is not None:
        sc_geometry = (_pair(shortcut_stride), (0, 0), (1, 1), 1)
        _check(grad, shortcut_x, out, shortcut_weight, 1, oh, ow)
        if needs[4]:
            gsx = _dgrad(src, shortcut_weight, shortcut_x, sc_geometry, oh, ow, no_prologue, True, False)[0]
        if needs[5]:
            gsw = _wgrad(src, shortcut_weight, shortcut_x, sc_geometry, oh, ow, no_prologue, True, False,
                         split_k)[0]
    return gx, gw, gb, gr, gsx, gsw
