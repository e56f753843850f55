"""Train-mode backward of ``conv_stats``: dgrad and wgrad as implicit GEMMs.

Forward: y = conv(a, w) + bias, a = relu?(BN_in(x)) (the prologue), with the
batch statistics (mean, var) of y. Backward, g is y's total gradient

    g = grad_y + grad_mean/count + grad_var·2(y − mean)/count

and is never materialised: both GEMMs rebuild it from grad_y, y and three
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

from ..reference import memory_format_of, stat_dtype
from .autotune import interpreter_requested
from .bn_act_bwd import finalize_channel_grads, new_output

INTERPRETING = interpreter_requested()


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _g_tile(gy_ptr, y_ptr, gmean_ptr, gvar_ptr, mean_ptr, inv_count,
            off_gy, off_y, co, co_mask, mask,
            HAS_GM: tl.constexpr, HAS_GV: tl.constexpr):
    """fp32 tile of y's total gradient at element offsets off_gy/off_y; co (broadcastable) its channels."""
    g = tl.load(gy_ptr + off_gy, mask=mask, other=0.0).to(tl.float32)
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
        a = tl.maximum(a, 0.0)
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
    KH: tl.constexpr, KW: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
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
                            co[None, :], k_mask[None, :], mask, HAS_GM, HAS_GV)
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
            ga = tl.where(a_in.to(x_ptr.dtype.element_ty) > 0, ga, 0.0)
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
    KW: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
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
                    co[:, None], m_mask[:, None], g_mask, HAS_GM, HAS_GV)
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


def _pow2(v: int, low: int = 16) -> int:
    return max(low, 1 << max(0, int(v) - 1).bit_length())


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 operands exactly when PyTorch's conv flag allows it (IEEE under the interpreter)."""
    if dtype != torch.float32:
        return "tf32"
    if INTERPRETING or not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _tiles(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM of m x n over k."""
    if INTERPRETING or device.type != "cuda":  # few, large programs: the interpreter pays per program
        return min(_pow2(m), 64), min(_pow2(n), 128), min(_pow2(k), 128), 1, 1
    bk = 32 if dtype == torch.float32 else 64
    return (min(128, _pow2(m, 32)), min(128 if dtype != torch.float32 else 64, _pow2(n)),
            min(bk, _pow2(k)), 4, 3)


def _check(grad_y, x, y, mean, weight, groups, oh, ow, in_mean) -> None:
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
    if in_mean is not None and in_mean.shape != (x.shape[1],):
        raise ValueError(f"in_mean must have shape ({x.shape[1]},), got {tuple(in_mean.shape)}")


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
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    _check(grad_y, x, y, mean, weight, groups, oh, ow, in_mean)
    c_out_g = c_out // groups
    dev = x.device
    sd = stat_dtype(x.dtype)
    count = y.numel() // max(c_out, 1)
    inv_count = 1.0 / max(count, 1)
    has_gm, has_gv = grad_mean is not None, grad_var is not None
    dummy = mean if mean.numel() else grad_y
    gm_t = grad_mean if has_gm else dummy
    gv_t = grad_var if has_gv else dummy
    mean_t = mean if has_gv else dummy
    prologue = in_mean is not None
    p_needs = needs[3:7] if prologue else [False] * 4
    p_needs_eff = [p_needs[0], p_needs[1], p_needs[2] and in_weight is not None, p_needs[3]]
    part_sums = any(p_needs_eff)
    store_gx = needs[0]
    need_dgrad = store_gx or part_sums
    bias_grad = has_bias and needs[2]
    need_wgrad = needs[1] or bias_grad
    precision = _input_precision(x.dtype)
    upcast = INTERPRETING and x.dtype == torch.bfloat16
    pro = dict(PROLOGUE=prologue, IN_HAS_W=prologue and in_weight is not None,
               IN_HAS_B=prologue and in_bias is not None, IN_RELU=prologue and bool(in_relu))
    in_t = [t if t is not None else dummy for t in (in_mean, in_invstd, in_weight, in_bias)]
    g_args = (grad_y, y, gm_t, gv_t, mean_t, inv_count)

    gx = part = None
    p_grads = [None] * 4
    if need_dgrad:
        if store_gx:
            gx = new_output(x.shape, x.dtype, dev, memory_format_of(x))
        phases = stride[0] * stride[1]
        rows = n * (-(-h // stride[0])) * (-(-w // stride[1]))
        bm, bn, bk, warps, stages = _tiles(rows, c_in_g, c_out_g, x.dtype, dev)
        num_pid_m = max(1, -(-rows // bm))
        if part_sums:
            part = torch.empty((phases * num_pid_m, 2 * c_in), dtype=torch.float32, device=dev)
        if x.numel() > 0:
            gx_t = gx if gx is not None else x
            _dgrad_kernel[(num_pid_m * -(-c_in_g // bn), groups, phases)](
                *g_args, weight, x, *in_t, gx_t, part if part is not None else dummy,
                n, h, w, oh, ow, c_in, c_in_g, c_out_g, num_pid_m,
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                *grad_y.stride(), *y.stride(), *weight.stride(), *x.stride(), *gx_t.stride(),
                KH=kh, KW=kw, HAS_GM=has_gm, HAS_GV=has_gv, **pro,
                STORE_GX=store_gx, PART_SUMS=part_sums,
                INPUT_PRECISION=precision, UPCAST_DOT=upcast,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            )
        elif part is not None:
            part.zero_()
        if part_sums:
            p_grads = finalize_channel_grads(part, 0, c_in, c_in, 0, in_invstd, in_weight, p_needs)

    gw = gb = None
    if need_wgrad:
        p_total = n * oh * ow
        k_cols = kh * kw * c_in_g
        bm, bn, bk, warps, stages = _tiles(c_out_g, k_cols, p_total, x.dtype, dev)
        num_pid_n = -(-k_cols // bn) if needs[1] else 1
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
        if needs[1]:
            # as convolution_backward: channels_last when x or the weight is
            gw_format = (torch.channels_last if torch.channels_last in (memory_format_of(x), memory_format_of(weight))
                         else torch.contiguous_format)
            gw = new_output(weight.shape, weight.dtype, dev, gw_format)
            gw_t = gw if direct else torch.empty((split_k, *weight.shape), dtype=torch.float32, device=dev)
        else:
            gw_t = dummy
        if bias_grad:
            gb = new_output((c_out,), sd, dev)
            gb_t = gb if direct else torch.empty((split_k, c_out), dtype=torch.float32, device=dev)
        else:
            gb_t = dummy
        gw_strides = ((0, *gw_t.stride()) if direct else gw_t.stride()) if needs[1] else (0,) * 5
        if p_total > 0:
            _wgrad_kernel[(-(-c_out_g // bm) * num_pid_n, groups, split_k)](
                *g_args, x, *in_t, gw_t, gb_t,
                p_total, oh * ow, ow, h, w, c_in_g, c_out_g, k_cols, k_per_split, num_pid_n,
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                *grad_y.stride(), *y.stride(), *x.stride(),
                *gw_strides, 0 if direct or not bias_grad else gb_t.stride(0),
                KW=kw, HAS_GM=has_gm, HAS_GV=has_gv, **pro,
                STORE_GW=needs[1], BIAS_GRAD=bias_grad,
                INPUT_PRECISION=precision, UPCAST_DOT=upcast,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            )
            if not direct:  # fixed-order sum of the splits, then the final dtype
                if needs[1]:
                    gw.copy_(gw_t.sum(0))
                if bias_grad:
                    gb.copy_(gb_t.sum(0))
        else:
            if gw is not None:
                gw.zero_()
            if gb is not None:
                gb.zero_()
    return (gx, gw, gb, *p_grads)
