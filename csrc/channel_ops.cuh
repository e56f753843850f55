// The per-element work and the fixed reduction orders of the training-mode BN ops (channel_ops.h),
// shared by the kernels (channel_ops.cu) and the host emulator.
//
// bn_add_act: one thread per element (grid-stride), elementwise.
// The backward pass: blocks of kChannelLanes channels x kRowLanes row lanes over kRowsPerBlock rows
// of T; each thread walks its channel down rows ty, ty + kRowLanes, ... adding S1 and S2, the
// block adds its row lanes in order, and its row of the partials holds the block's sums; the
// finalize (one block per channel) adds the row blocks: thread t takes blocks t, t + threads, ...
// in order, then a fixed tree. No atomics: bitwise reproducible.
#pragma once

#include <cstdint>

#include "channel_ops.h"
#include "numeric.cuh"

namespace fused_resblock {

constexpr int kChannelLanes = 32;
constexpr int kRowLanes = 8;
constexpr int kRowsPerLane = 32;
constexpr int kRowsPerBlock = kRowLanes * kRowsPerLane;
constexpr int kChannelThreads = kChannelLanes * kRowLanes;
constexpr int kFinalizeThreads = 256;
constexpr int kElementwiseThreads = 256;

FR_HOST_DEVICE float vector_or(const float* v, int c, float absent) {
  return v != nullptr ? load_global(v + c) : absent;
}

// BN(v) of channel c, centred first as the reference computes it.
FR_HOST_DEVICE float normalize(float v, const float* mean, const float* invstd, const float* weight,
                               const float* bias, int c) {
  const float centred = (v - load_global(mean + c)) * load_global(invstd + c);
  return fmaf(centred, vector_or(weight, c, 1.f), vector_or(bias, c, 0.f));
}

// bn_add_act's element `index` (NHWC order).
FR_HOST_DEVICE void bn_add_act_element(const BnAddActParams& p, int64_t index) {
  const int c = int(index % p.channels);
  const int64_t row = index / p.channels;
  float value = normalize(to_float(load_global(static_cast<const uint16_t*>(p.y) + index), p.dtype), p.mean,
                          p.invstd, p.weight, p.bias, c);
  const int rc = c - p.res_offset;
  if (p.residual != nullptr && rc >= 0 && rc < p.res_channels) {
    const int w = int(row % p.width);
    const int64_t nh = row / p.width;
    const int h = int(nh % p.height);
    const int64_t n = nh / p.height;
    const int64_t at =
        ((n * p.res_h + int64_t(h) * p.res_stride) * p.res_w + int64_t(w) * p.res_stride) * p.res_channels + rc;
    float r = to_float(load_global(static_cast<const uint16_t*>(p.residual) + at), p.dtype);
    if (p.res_mean != nullptr) r = normalize(r, p.res_mean, p.res_invstd, p.res_weight, p.res_bias, rc);
    value += r;
  }
  if (p.relu) value = value < 0.f ? 0.f : value;  // NaN stays NaN, as torch.relu
  static_cast<uint16_t*>(p.out)[index] = from_float(value, p.dtype);
}

FR_HOST_DEVICE int64_t channel_backward_rows(const ChannelBackwardParams& p) {
  return int64_t(p.batch) * p.t_h * p.t_w;
}

FR_HOST_DEVICE int channel_backward_row_blocks(const ChannelBackwardParams& p) {
  return int((channel_backward_rows(p) + kRowsPerBlock - 1) / kRowsPerBlock);
}

// g at T's element (row, c): its share of the output gradient, after the ReLU's mask.
FR_HOST_DEVICE float channel_backward_g(const ChannelBackwardParams& p, int64_t row, int c, uint16_t t_bits) {
  const int oc = c + p.offset;
  if (oc < 0 || oc >= p.out_channels) return 0.f;
  const int w = int(row % p.t_w);
  const int64_t nh = row / p.t_w;
  const int h = int(nh % p.t_h);
  const int64_t n = nh / p.t_h;
  if (h % p.stride != 0 || w % p.stride != 0) return 0.f;
  const int oh = h / p.stride, ow = w / p.stride;
  if (oh >= p.out_h || ow >= p.out_w) return 0.f;
  const int64_t at = ((n * p.out_h + oh) * p.out_w + ow) * p.out_channels + oc;
  if (p.mask != nullptr && relu_masks(load_global(static_cast<const uint16_t*>(p.mask) + at), p.dtype)) return 0.f;
  if (p.prologue_mask) {  // relu(prologue) rounded to the dtype, as the forward stored it: zero stops g
    const float pre = normalize(to_float(t_bits, p.dtype), p.mean, p.invstd, p.weight, p.prologue_bias, c);
    if ((from_float(pre < 0.f ? 0.f : pre, p.dtype) & 0x7fffu) == 0) return 0.f;
  }
  return to_float(load_global(static_cast<const uint16_t*>(p.grad) + at), p.dtype);
}

// One thread of a backward block: channel c, rows row0, row0 + kRowLanes, ... of its row block;
// writes grad_t and returns its (S1, S2).
FR_HOST_DEVICE float2 channel_backward_thread(const ChannelBackwardParams& p, int row_block, int c, int row_lane) {
  float s1 = 0.f, s2 = 0.f;
  if (c >= p.t_channels) return make_float2(0.f, 0.f);
  const int64_t rows = channel_backward_rows(p);
  const float mean = vector_or(p.mean, c, 0.f);
  const float scale = p.invstd != nullptr ? vector_or(p.weight, c, 1.f) * load_global(p.invstd + c) : 1.f;
  const float shift = vector_or(p.fold_shift, c, 0.f);
  const float slope = vector_or(p.fold_slope, c, 0.f);
  const bool fold = p.fold_shift != nullptr || p.fold_slope != nullptr;
  for (int i = 0; i < kRowsPerLane; ++i) {
    const int64_t row = int64_t(row_block) * kRowsPerBlock + row_lane + i * kRowLanes;
    if (row >= rows) break;
    const int64_t at = row * p.t_channels + c;
    const uint16_t t_bits = load_global(static_cast<const uint16_t*>(p.t) + at);
    float g = channel_backward_g(p, row, c, t_bits);
    if (fold) g += fmaf(slope, to_float(t_bits, p.dtype) - mean, shift);
    if (p.grad_t != nullptr) static_cast<uint16_t*>(p.grad_t)[at] = from_float(g * scale, p.dtype);
    s1 += g;
    s2 = fmaf(g, to_float(t_bits, p.dtype) - mean, s2);
  }
  return make_float2(s1, s2);
}

// The block's sums of channel lane `lane`: its row lanes' (sums[row_lane * kChannelLanes + lane]) in order.
FR_HOST_DEVICE float2 channel_backward_block_sum(const float2* sums, int lane) {
  float2 total = sums[lane];
  for (int row_lane = 1; row_lane < kRowLanes; ++row_lane) {
    total.x += sums[row_lane * kChannelLanes + lane].x;
    total.y += sums[row_lane * kChannelLanes + lane].y;
  }
  return total;
}

// Finalize thread `thread` of channel c: row blocks thread, thread + kFinalizeThreads, ... in order.
FR_HOST_DEVICE float2 channel_finalize_thread(const ChannelBackwardParams& p, int c, int thread) {
  float2 total = make_float2(0.f, 0.f);
  const int blocks = channel_backward_row_blocks(p);
  for (int block = thread; block < blocks; block += kFinalizeThreads) {
    const int64_t at = (int64_t(block) * p.t_channels + c) * 2;
    total.x += p.partials[at];
    total.y += p.partials[at + 1];
  }
  return total;
}

// The channel's gradients from its sums (reference._normalize_backward's, with weight 1 when absent).
FR_HOST_DEVICE void store_channel_grads(const ChannelBackwardParams& p, int c, float2 sums) {
  const float weight = vector_or(p.weight, c, 1.f);
  const float invstd = vector_or(p.invstd, c, 1.f);  // null only where just grad_bias is wanted
  if (p.grad_mean != nullptr) p.grad_mean[c] = -(weight * invstd) * sums.x;
  if (p.grad_invstd != nullptr) p.grad_invstd[c] = weight * sums.y;
  if (p.grad_weight != nullptr) p.grad_weight[c] = invstd * sums.y;
  if (p.grad_bias != nullptr) p.grad_bias[c] = sums.x;
}

}  // namespace fused_resblock
