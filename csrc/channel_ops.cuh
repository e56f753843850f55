// The per-element work and the fixed reduction orders of the training-mode BN ops (channel_ops.h),
// shared by the kernels (channel_ops.cu) and the host emulator.
//
// bn_add_act: one thread per chunk of 8 channels of a pixel (grid-stride), 16-byte loads and stores
// where the shapes and pointers allow.
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
constexpr int kRowBatch = 4;  // rows whose loads a backward thread issues before it uses any
static_assert(kRowsPerLane % kRowBatch == 0, "a lane's rows come in whole batches");
constexpr int kChannelThreads = kChannelLanes * kRowLanes;
constexpr int kFinalizeThreads = 256;
constexpr int kElementwiseThreads = 256;

FR_HOST_DEVICE float vector_or(const float* v, int c, float absent) {
  return v != nullptr ? load_global(v + c) : absent;
}

// normalize() with channel c's entries of the vectors (weight, bias null: 1, 0).
FR_HOST_DEVICE float normalize(float v, const float* mean, const float* invstd, const float* weight,
                               const float* bias, int c) {
  return normalize(v, load_global(mean + c), load_global(invstd + c), vector_or(weight, c, 1.f), vector_or(bias, c, 0.f));
}

// bn_add_act works in chunks of kVector channels of one pixel (the last chunk of a row may be
// short): the pixel's coordinates are found once per chunk, not per element.
FR_HOST_DEVICE int bn_add_act_row_chunks(const BnAddActParams& p) {
  return (p.channels + kVector - 1) / kVector;
}

FR_HOST_DEVICE int64_t bn_add_act_chunks(const BnAddActParams& p) {
  return int64_t(p.batch) * p.height * p.width * bn_add_act_row_chunks(p);
}

// Whether every chunk moves as 16-byte vectors: whole chunks, aligned rows, and the residual's
// channels covering whole chunks (or none of one).
FR_HOST_DEVICE bool bn_add_act_vectorized(const BnAddActParams& p) {
  const bool rows = p.channels % kVector == 0 && is_aligned16(p.y) && is_aligned16(p.out);
  return rows && (p.residual == nullptr || (p.res_channels % kVector == 0 && p.res_offset % kVector == 0 &&
                                            is_aligned16(p.residual)));
}

// A dense NHWC row index (n * height + h) * width + w taken apart: 64-bit divisions, so both
// passes call it only where a residual's map is strided.
struct Pixel {
  int64_t n;
  int h, w;
};

FR_HOST_DEVICE Pixel decode_pixel(int64_t row, int height, int width) {
  const int64_t nh = row / width;
  return Pixel{nh / height, int(nh % height), int(row % width)};
}

// The residual's element offset of channel 0 at output pixel `row`: the same pixel when the
// residual has y's map, else (n, h * stride, w * stride).
FR_HOST_DEVICE int64_t residual_pixel(const BnAddActParams& p, int64_t row) {
  if (p.res_stride == 1 && p.res_h == p.height && p.res_w == p.width) return row * p.res_channels;
  const Pixel q = decode_pixel(row, p.height, p.width);
  return ((q.n * p.res_h + int64_t(q.h) * p.res_stride) * p.res_w + int64_t(q.w) * p.res_stride) * p.res_channels;
}

// The output's bits from BN(y) plus the residual's term: the ReLU, the rounding.
FR_HOST_DEVICE uint16_t bn_add_act_out(const BnAddActParams& p, float value) {
  if (p.relu) value = value < 0.f ? 0.f : value;  // NaN stays NaN, as torch.relu
  return from_float(value, p.dtype);
}

// bn_add_act's chunk `chunk` (row-major over pixels, then chunks of a pixel's channels).
template <bool kVectorized>
FR_HOST_DEVICE void bn_add_act_chunk(const BnAddActParams& p, int64_t chunk) {
  const int row_chunks = bn_add_act_row_chunks(p);
  const int64_t row = chunk / row_chunks;
  const int c0 = int(chunk - row * row_chunks) * kVector;
  const int64_t at = row * p.channels + c0;
  const int rc0 = c0 - p.res_offset;  // the residual's channel of the chunk's first
  const uint16_t* y = static_cast<const uint16_t*>(p.y) + at;
  const uint16_t* res = p.residual != nullptr ? static_cast<const uint16_t*>(p.residual) + residual_pixel(p, row) : nullptr;
  uint16_t* out = static_cast<uint16_t*>(p.out) + at;
  if (!kVectorized) {
    for (int j = 0; j < kVector && c0 + j < p.channels; ++j) {
      float value = normalize(to_float(load_global(y + j), p.dtype), p.mean, p.invstd, p.weight, p.bias, c0 + j);
      const int rc = rc0 + j;
      if (res != nullptr && rc >= 0 && rc < p.res_channels) {
        float r = to_float(load_global(res + rc), p.dtype);
        if (p.res_mean != nullptr) r = normalize(r, p.res_mean, p.res_invstd, p.res_weight, p.res_bias, rc);
        value += r;
      }
      out[j] = bn_add_act_out(p, value);
    }
    return;
  }
  // whole chunks; a residual chunk is whole or absent
  const bool added = res != nullptr && rc0 >= 0 && rc0 < p.res_channels;
  uint16_t y8[kVector], r8[kVector] = {}, out8[kVector];
  unpack8(load_global(reinterpret_cast<const uint4*>(y)), y8);
  if (added) unpack8(load_global(reinterpret_cast<const uint4*>(res + rc0)), r8);
#pragma unroll
  for (int half = 0; half < kVector; half += 4) {  // 4 channels' vectors at a time: fewer registers live
    const ChannelBn4 bn = load_bn4(p.mean, p.invstd, p.weight, p.bias, c0 + half);
    const bool res_bn = added && p.res_mean != nullptr;
    const ChannelBn4 rbn = res_bn ? load_bn4(p.res_mean, p.res_invstd, p.res_weight, p.res_bias, rc0 + half) : bn;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float value = normalize(to_float(y8[half + j], p.dtype), bn.mean[j], bn.invstd[j], bn.weight[j], bn.bias[j]);
      if (added) {
        const float r = to_float(r8[half + j], p.dtype);
        value += res_bn ? normalize(r, rbn.mean[j], rbn.invstd[j], rbn.weight[j], rbn.bias[j]) : r;
      }
      out8[half + j] = bn_add_act_out(p, value);
    }
  }
  *reinterpret_cast<uint4*>(out) = pack8(out8);
}

FR_HOST_DEVICE int64_t channel_backward_rows(const ChannelBackwardParams& p) {
  return int64_t(p.batch) * p.t_h * p.t_w;
}

FR_HOST_DEVICE int channel_backward_row_blocks(const ChannelBackwardParams& p) {
  return int((channel_backward_rows(p) + kRowsPerBlock - 1) / kRowsPerBlock);
}

// What a backward thread needs of its channel c, loaded once rather than per row.
struct ChannelBackwardConstants {
  int out_channel;    // c + offset: g's channel
  bool reads_grad;    // out_channel inside [0, out_channels): else g is 0 on every row
  float mean, scale;  // T's BN: grad_t = g * scale
  float shift, slope; // the statistics' fold
  float invstd, weight, prologue_bias;  // the recomputed prologue's
};

FR_HOST_DEVICE ChannelBackwardConstants channel_backward_constants(const ChannelBackwardParams& p, int c) {
  ChannelBackwardConstants k;
  k.out_channel = c + p.offset;
  k.reads_grad = k.out_channel >= 0 && k.out_channel < p.out_channels;
  k.mean = vector_or(p.mean, c, 0.f);
  k.invstd = vector_or(p.invstd, c, 1.f);
  k.weight = vector_or(p.weight, c, 1.f);
  k.scale = p.invstd != nullptr ? k.weight * k.invstd : 1.f;
  k.shift = vector_or(p.fold_shift, c, 0.f);
  k.slope = vector_or(p.fold_slope, c, 0.f);
  k.prologue_bias = vector_or(p.prologue_bias, c, 0.f);
  return k;
}

// grad's element offset for T's (row, c), or -1 where T's pixel is not read at the stride; T's own
// pixel, without dividing, where T and grad share a pixel map.
FR_HOST_DEVICE int64_t channel_backward_grad_offset(const ChannelBackwardParams& p, const ChannelBackwardConstants& k,
                                                    int64_t row) {
  if (p.stride == 1 && p.out_h == p.t_h && p.out_w == p.t_w) return row * p.out_channels + k.out_channel;
  const Pixel q = decode_pixel(row, p.t_h, p.t_w);
  if (q.h % p.stride != 0 || q.w % p.stride != 0) return -1;
  const int oh = q.h / p.stride, ow = q.w / p.stride;
  if (oh >= p.out_h || ow >= p.out_w) return -1;
  return ((q.n * p.out_h + oh) * p.out_w + ow) * p.out_channels + k.out_channel;
}

// What one row of the pass reads: T's element and, where T's pixel is read at the stride and the
// channel is g's, grad and the mask there.
struct ChannelBackwardRow {
  uint16_t t, grad, mask;
  bool g_read;  // false: g is 0
};

FR_HOST_DEVICE ChannelBackwardRow channel_backward_load(const ChannelBackwardParams& p,
                                                         const ChannelBackwardConstants& k, int64_t row, int c) {
  ChannelBackwardRow r{};
  r.t = load_global(static_cast<const uint16_t*>(p.t) + row * p.t_channels + c);
  const int64_t at = k.reads_grad ? channel_backward_grad_offset(p, k, row) : -1;
  r.g_read = at >= 0;
  if (!r.g_read) return r;
  r.grad = load_global(static_cast<const uint16_t*>(p.grad) + at);
  if (p.mask != nullptr) r.mask = load_global(static_cast<const uint16_t*>(p.mask) + at);
  return r;
}

// g at T's element: its share of the output gradient, after the ReLU's mask.
FR_HOST_DEVICE float channel_backward_g(const ChannelBackwardParams& p, const ChannelBackwardConstants& k,
                                        const ChannelBackwardRow& r) {
  if (!r.g_read) return 0.f;
  if (p.mask != nullptr && relu_masks(r.mask, p.dtype)) return 0.f;
  if (p.prologue_mask) {  // relu(prologue) rounded to the dtype, as the forward stored it: zero stops g
    const float pre = normalize(to_float(r.t, p.dtype), k.mean, k.invstd, k.weight, k.prologue_bias);
    if ((from_float(pre < 0.f ? 0.f : pre, p.dtype) & 0x7fffu) == 0) return 0.f;
  }
  return to_float(r.grad, p.dtype);
}

// One thread of a backward block: channel c, rows row0, row0 + kRowLanes, ... of its row block;
// writes grad_t and returns its (S1, S2). Its loads go out kRowBatch rows at a time before any is
// used (2-byte accesses need the bytes in flight); the sums still take the rows in order.
FR_HOST_DEVICE float2 channel_backward_thread(const ChannelBackwardParams& p, int row_block, int c, int row_lane) {
  float s1 = 0.f, s2 = 0.f;
  if (c >= p.t_channels) return make_float2(0.f, 0.f);
  const int64_t rows = channel_backward_rows(p);
  const ChannelBackwardConstants k = channel_backward_constants(p, c);
  const bool fold = p.fold_shift != nullptr || p.fold_slope != nullptr;
  for (int i0 = 0; i0 < kRowsPerLane; i0 += kRowBatch) {
    const int64_t first = int64_t(row_block) * kRowsPerBlock + row_lane + i0 * kRowLanes;
    if (first >= rows) break;
    ChannelBackwardRow batch[kRowBatch];
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      const int64_t row = first + j * kRowLanes;
      batch[j] = row < rows ? channel_backward_load(p, k, row, c) : ChannelBackwardRow{};
    }
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      const int64_t row = first + j * kRowLanes;
      if (row >= rows) break;
      const float t = to_float(batch[j].t, p.dtype);
      float g = channel_backward_g(p, k, batch[j]);
      if (fold) g += fmaf(k.slope, t - k.mean, k.shift);
      if (p.grad_t != nullptr) static_cast<uint16_t*>(p.grad_t)[row * p.t_channels + c] = from_float(g * k.scale, p.dtype);
      s1 += g;
      s2 = fmaf(g, t - k.mean, s2);
    }
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
