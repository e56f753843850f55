"""Train-mode backward of ``bn_add_act``: two deterministic Triton launches per call.

    out = relu?(BN(y) + R'),   R' = BN_res(residual) or the mapped residual R

1. ``_bn_add_act_bwd_kernel`` (elementwise + partial reductions): the GEMM-free
   view is rows = N·H·W output pixels × columns = channels. Each program owns
   a column block and a run of ``M_ITERS`` row blocks; it applies the ReLU mask
   (``out > 0``, from the saved output), writes grad y = g·weight·invstd and the
   residual's gradient (scattered back through the stride/offset mapping, or
   through the residual's BN), and accumulates, per channel, Σg and Σg·(y−mean)
   (and the same pair for the residual's BN) in fp32. Each program stores its
   partial sums in its own row of a [tiles, 4, C] fp32 buffer: no atomics.
2. ``channel_grads_kernel`` (finalize, shared with the conv backward): sums the
   partial rows in a fixed order and turns (Σg, Σg·(x−mean)) into the gradients
   of mean, invstd, weight and bias exactly as ``reference._normalize_backward``:

       d mean = −weight·invstd·Σg,   d invstd = weight·Σg(x−mean),
       d weight = invstd·Σg(x−mean), d bias = Σg          (weight = 1 when absent)

Results are bitwise reproducible run to run (fixed tiling, fixed order).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import memory_format_of
from .autotune import interpreter_requested

INTERPRETING = interpreter_requested()

# Tests set it: fill fresh outputs with NaN before a launch so an unwritten element fails.
POISON_OUTPUT = os.environ.get("FUSED_RESBLOCK_POISON", "0") == "1"


def new_output(shape, dtype, device, memory_format=torch.contiguous_format) -> Tensor:
    """An uninitialised output (NaN-filled when ``POISON_OUTPUT``)."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUT and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _pow2(v: int, low: int = 1) -> int:
    return max(low, 1 << max(0, int(v) - 1).bit_length())


# --------------------------------------------------------------------------- kernels
@triton.jit
def channel_grads_kernel(
    part_ptr, T, stride_t, S1_OFF, S2_OFF, C, COL_OFFSET,
    invstd_ptr, w_ptr, gmean_ptr, ginvstd_ptr, gweight_ptr, gbias_ptr,
    HAS_WEIGHT: tl.constexpr, NEED_MEAN: tl.constexpr, NEED_INVSTD: tl.constexpr,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel c < C: reduce part[t, S1_OFF + COL_OFFSET + c], part[t, S2_OFF + COL_OFFSET + c] over t."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cols = COL_OFFSET + offs_c
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        mask = (t < T)[:, None] & c_mask[None, :]
        rows = part_ptr + t.to(tl.int64)[:, None] * stride_t + cols[None, :]
        s1 += tl.sum(tl.load(rows + S1_OFF, mask=mask, other=0.0), axis=0)
        s2 += tl.sum(tl.load(rows + S2_OFF, mask=mask, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        scale = w * invstd
        s2w = s2 * w
    else:
        scale = invstd
        s2w = s2
    if NEED_MEAN:
        tl.store(gmean_ptr + offs_c, -(scale * s1), mask=c_mask)
    if NEED_INVSTD:
        tl.store(ginvstd_ptr + offs_c, s2w, mask=c_mask)
    if NEED_WEIGHT:
        tl.store(gweight_ptr + offs_c, s2 * invstd, mask=c_mask)
    if NEED_BIAS:
        tl.store(gbias_ptr + offs_c, s1, mask=c_mask)


@triton.jit
def _bn_add_act_bwd_kernel(
    grad_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr,
    res_ptr, rmean_ptr, rinvstd_ptr, rw_ptr,
    gy_ptr, gr_ptr, part_ptr,
    M, HW, W, C, C_RES, RES_STRIDE, RES_OFFSET, M_ITERS,
    sg_n, sg_c, sg_h, sg_w,
    so_n, so_c, so_h, so_w,
    sy_n, sy_c, sy_h, sy_w,
    sgy_n, sgy_c, sgy_h, sgy_w,
    sr_n, sr_c, sr_h, sr_w,
    sgr_n, sgr_c, sgr_h, sgr_w,
    RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, STORE_GY: tl.constexpr,
    MAIN_SUMS: tl.constexpr, MAIN_CENTRED: tl.constexpr,
    RES_GRAD: tl.constexpr, RES_BN: tl.constexpr, RES_HAS_WEIGHT: tl.constexpr,
    STORE_GR: tl.constexpr, RES_SUMS: tl.constexpr, RES_CENTRED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    # ---- per-channel constants (fp32), loaded only when used (the residual-only call has none)
    if MAIN_CENTRED:
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    if STORE_GY:
        scale = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            scale *= tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    rc = offs_c - RES_OFFSET  # residual channel that output channel c reads
    rc_mask = c_mask & (rc >= 0) & (rc < C_RES)
    if RES_BN:
        rmean = tl.load(rmean_ptr + rc, mask=rc_mask, other=0.0).to(tl.float32)
        rscale = tl.load(rinvstd_ptr + rc, mask=rc_mask, other=0.0).to(tl.float32)
        if RES_HAS_WEIGHT:
            rscale *= tl.load(rw_ptr + rc, mask=rc_mask, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    r1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    r2 = tl.zeros((BLOCK_C,), dtype=tl.float32)

    # ---- this program's rows: M_ITERS consecutive blocks of output pixels
    for it in range(0, M_ITERS):
        offs_m = (pid_t * M_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        n = (offs_m // HW).to(tl.int64)
        pix = offs_m % HW
        h = pix // W
        w = pix % W
        mask = m_mask[:, None] & c_mask[None, :]
        g = tl.load(grad_ptr + (n * sg_n + h * sg_h + w * sg_w)[:, None] + (offs_c * sg_c)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        if RELU:
            o = tl.load(out_ptr + (n * so_n + h * so_h + w * so_w)[:, None] + (offs_c * so_c)[None, :],
                        mask=mask, other=0.0)
            g = tl.where(o <= 0, 0.0, g)  # torch's ReLU backward: NaN passes
        if STORE_GY:
            gy = g * scale[None, :]
            tl.store(gy_ptr + (n * sgy_n + h * sgy_h + w * sgy_w)[:, None] + (offs_c * sgy_c)[None, :],
                     gy.to(gy_ptr.dtype.element_ty), mask=mask)
        if MAIN_SUMS:
            s1 += tl.sum(g, axis=0)
            if MAIN_CENTRED:
                y = tl.load(y_ptr + (n * sy_n + h * sy_h + w * sy_w)[:, None] + (offs_c * sy_c)[None, :],
                            mask=mask, other=0.0).to(tl.float32)
                s2 += tl.sum(tl.where(mask, g * (y - mean[None, :]), 0.0), axis=0)
        if RES_GRAD:
            # the mapped residual's element (n, c - offset, h * stride, w * stride)
            hr = h * RES_STRIDE
            wr = w * RES_STRIDE
            rmask = m_mask[:, None] & rc_mask[None, :]
            gm = tl.where(rmask, g, 0.0)
            if RES_BN:
                if STORE_GR:
                    gr = gm * rscale[None, :]
                    tl.store(gr_ptr + (n * sgr_n + hr * sgr_h + wr * sgr_w)[:, None] + (rc * sgr_c)[None, :],
                             gr.to(gr_ptr.dtype.element_ty), mask=rmask)
                if RES_SUMS:
                    r1 += tl.sum(gm, axis=0)
                    if RES_CENTRED:
                        r = tl.load(res_ptr + (n * sr_n + hr * sr_h + wr * sr_w)[:, None] + (rc * sr_c)[None, :],
                                    mask=rmask, other=0.0).to(tl.float32)
                        r2 += tl.sum(tl.where(rmask, gm * (r - rmean[None, :]), 0.0), axis=0)
            else:
                tl.store(gr_ptr + (n * sgr_n + hr * sgr_h + wr * sgr_w)[:, None] + (rc * sgr_c)[None, :],
                         gm.to(gr_ptr.dtype.element_ty), mask=rmask)

    # ---- this program's partial sums: its own row of part[T, 4, C]
    row = part_ptr + pid_t.to(tl.int64) * 4 * C + offs_c
    if MAIN_SUMS:
        tl.store(row, s1, mask=c_mask)
        tl.store(row + C, s2, mask=c_mask)
    if RES_SUMS:
        tl.store(row + 2 * C, r1, mask=c_mask)
        tl.store(row + 3 * C, r2, mask=c_mask)


# --------------------------------------------------------------------------- host
def finalize_channel_grads(part: Tensor, s1_off: int, s2_off: int, channels: int, col_offset: int,
                           invstd: Tensor, weight: Optional[Tensor], needs, empty: bool = False) -> list:
    """[mean, invstd, weight, bias] gradients from partial sums ``part`` ([T, stride_t] fp32).

    ``needs`` = [mean, invstd, weight, bias]; the weight gradient exists only
    with a weight. Returns a list of 4 (None where not needed). ``empty``: the
    sums are over no elements, so every gradient is 0, as PyTorch's (the kernel's
    products with an empty batch's NaN invstd would be NaN).
    """
    needs = [bool(needs[0]), bool(needs[1]), bool(needs[2]) and weight is not None, bool(needs[3])]
    dev = invstd.device
    outs = [new_output((channels,), torch.float32, dev) if nd else None for nd in needs]
    if empty:
        return [None if o is None else o.zero_() for o in outs]
    if not any(needs) or channels == 0:
        return outs
    dummy = invstd
    t = part.shape[0]
    block_c = min(_pow2(channels, 16), 128 if INTERPRETING else 64)
    block_t = min(_pow2(t), 256 if INTERPRETING else 32)
    channel_grads_kernel[(-(-channels // block_c),)](
        part, t, part.stride(0), s1_off, s2_off, channels, col_offset,
        invstd, weight if weight is not None else dummy,
        *[o if o is not None else dummy for o in outs],
        HAS_WEIGHT=weight is not None, NEED_MEAN=needs[0], NEED_INVSTD=needs[1],
        NEED_WEIGHT=needs[2], NEED_BIAS=needs[3],
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
    )
    return outs


def _row_tiling(m: int, c: int, device: torch.device):
    """(BLOCK_M, BLOCK_C, M_ITERS, T): row-block size, channel block, row blocks per program, programs along M."""
    if INTERPRETING or device.type != "cuda":
        block_c = min(_pow2(c, 16), 64)
        block_m = min(_pow2(m, 16), 512)
        iters = 1
    else:
        block_c = min(_pow2(c, 16), 64)
        block_m = 64
        # about 4 waves of programs over the SMs, but no more than 64 row blocks each
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        c_blocks = -(-c // block_c)
        m_blocks = -(-m // block_m)
        want = max(1, (4 * sms) // c_blocks)
        iters = max(1, min(64, -(-m_blocks // want)))
    t = -(-m // (block_m * iters))
    return block_m, block_c, iters, t


def mapped_residual_grad(grad: Tensor, out: Tensor, residual: Tensor, residual_stride: int,
                         residual_offset: int, relu: bool) -> Tensor:
    """The gradient of a mapped residual added before an optional ReLU (``out`` its output): one launch.

    The conv_bias_act backward's residual term: the kernel above with no BN on either side.
    """
    return bn_add_act_backward(grad, out, out, None, None, None, residual, None, None, None,
                               residual_stride, residual_offset, relu, [False] * 5 + [True] + [False] * 4)[5]


def bn_add_act_backward(
    grad: Tensor, out: Tensor, y: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor],
    weight: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], residual_stride: int, residual_offset: int, relu: bool, needs: list,
):
    """``reference.bn_add_act_backward`` in two Triton launches (same contract, same return tuple).

    ``mean``/``invstd`` may be None when none of y's or its BN's gradients is needed.
    """
    needs = [bool(v) for v in needs]
    if (mean is None or invstd is None) and any(needs[0:5]):
        raise ValueError("mean and invstd are required for the gradients of y and of its BN")
    n, c, h, w = y.shape
    if grad.shape != y.shape or out.shape != y.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and out {tuple(out.shape)} must match y {tuple(y.shape)}")
    dev = y.device
    has_res = residual is not None and any(needs[5:10])
    res_bn = has_res and res_mean is not None
    if has_res:
        c_res = residual.shape[1]
        rh, rw = -(-residual.shape[2] // residual_stride), -(-residual.shape[3] // residual_stride)
        if (residual.shape[0] != n or (rh, rw) != (h, w) or residual_offset < 0
                or residual_offset + c_res > c):
            raise ValueError(f"residual {tuple(residual.shape)} at stride {residual_stride}, offset "
                             f"{residual_offset} does not map onto y {tuple(y.shape)}")
    else:
        c_res, residual_stride, residual_offset = 0, 1, 0

    store_gy = needs[0]
    main_sums = any(needs[1:5]) and not (needs[1:5] == [False, False, True, False] and weight is None)
    main_centred = needs[2] or (needs[3] and weight is not None)
    store_gr = has_res and needs[5]
    res_sums = res_bn and any(needs[6:10]) and not (needs[6:10] == [False, False, True, False] and res_weight is None)
    res_centred = res_bn and (needs[7] or (needs[8] and res_weight is not None))

    gy = new_output(y.shape, y.dtype, dev, memory_format_of(y)) if store_gy else None
    gr = None
    if store_gr:
        if residual_stride == 1:  # every residual element is some output's image
            gr = new_output(residual.shape, residual.dtype, dev, memory_format_of(residual))
        else:  # elements between the strided samples get no gradient
            gr = torch.zeros_like(residual)

    m = n * h * w
    block_m, block_c, iters, t = _row_tiling(m, c, dev)
    part = None
    if main_sums or res_sums:
        part = torch.empty((t, 4 * c), dtype=torch.float32, device=dev)
    if m > 0 and c > 0 and (store_gy or store_gr or main_sums or res_sums):
        res = residual if has_res else y
        dummy = mean if mean is not None else grad  # a pointer for absent tensors, never read
        _bn_add_act_bwd_kernel[(t, -(-c // block_c))](
            grad, out, y, dummy, invstd if invstd is not None else dummy, weight if weight is not None else dummy,
            res, res_mean if res_bn else dummy, res_invstd if res_bn else dummy,
            res_weight if (res_bn and res_weight is not None) else dummy,
            gy if gy is not None else y, gr if gr is not None else y, part if part is not None else dummy,
            m, h * w, w, c, c_res, residual_stride, residual_offset, iters,
            *grad.stride(), *out.stride(), *y.stride(),
            *(gy if gy is not None else y).stride(), *res.stride(),
            *(gr if gr is not None else res).stride(),
            RELU=bool(relu), HAS_WEIGHT=weight is not None, STORE_GY=store_gy,
            MAIN_SUMS=main_sums, MAIN_CENTRED=main_centred,
            RES_GRAD=store_gr or res_sums, RES_BN=res_bn,
            RES_HAS_WEIGHT=res_bn and res_weight is not None,
            STORE_GR=store_gr, RES_SUMS=res_sums, RES_CENTRED=res_centred,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
        )
    elif part is not None:
        part.zero_()  # an empty batch: every sum is 0

    main = [None] * 4
    if any(needs[1:5]):
        main = finalize_channel_grads(part, 0, c, c, 0, invstd, weight, needs[1:5], empty=m == 0)
    rest = [gr, None, None, None, None]
    if res_bn and any(needs[6:10]):
        rest[1:] = finalize_channel_grads(part, 2 * c, 3 * c, c_res, residual_offset,
                                          res_invstd, res_weight, needs[6:10], empty=m == 0)
    if residual is None:
        rest = [None] * 5
    return (gy, *main, *rest)
