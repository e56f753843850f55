// Global -> registers -> shared memory: the implicit-GEMM operand tiles.
//
// Each K tile is kBlockK deep. A (activations) is kBlockM rows x kBlockK and
// B (weights) kBlockN rows x kBlockK, both stored row-major in shared memory
// with a padded pitch, K contiguous: A is WMMA's row-major matrix_a, B (one
// row per output channel) its column-major matrix_b.
//
// The unit of work is a chunk of 8 consecutive K elements of one row (16
// bytes). Every chunk a thread owns keeps the same K position within the
// tile, so a thread decodes its rows' output pixels once, before the K loop.
// Anything outside the problem (rows past m, K past the segment's end, taps
// in the padding, channels past the group) loads as zero, so partial tiles
// need no other care: zeros add nothing to the accumulators.
//
// Two K segments feed the same accumulators: the convolution (K tiles
// [0, k_tiles_conv)) and, when merged, the 1x1 projection shortcut (the rest).
//
// Two ways in: load() + store() stage a tile through registers (any operand,
// element-wise gathers included); copy_async() issues cp.async copies straight
// to shared memory (16-byte operands only).
#pragma once

#include <cstdint>

#include "async_copy.cuh"
#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "numeric.cuh"
#include "tile_shape.cuh"

namespace fused_resblock {

// Where one GEMM row (output pixel) reads its inputs.
struct PixelRow {
  int ih0, iw0;             // input coordinates of filter tap (0, 0); negative inside the padding
  int64_t x_offset;         // element offset of x[n, 0, 0, group * in_group_channels]
  int64_t shortcut_offset;  // element offset of shortcut_x[n, oh * s, ow * s, 0]
  bool valid;               // row < m
};

FR_HOST_DEVICE PixelRow make_pixel_row(const ConvBiasActParams& p, const ConvGemm& g, int m, int group) {
  PixelRow row;
  row.valid = m < g.m;
  const int pixel = row.valid ? m : 0;  // rows past m decode as pixel 0 and never load
  const int n = pixel / g.out_hw;
  const int rem = pixel - n * g.out_hw;
  const int oh = rem / p.out_w;
  const int ow = rem - oh * p.out_w;
  row.ih0 = oh * p.stride_h - p.pad_h;
  row.iw0 = ow * p.stride_w - p.pad_w;
  row.x_offset = int64_t(n) * p.in_h * p.in_w * p.in_channels + int64_t(group) * g.in_group_channels;
  row.shortcut_offset = ((int64_t(n) * p.shortcut_h + oh * p.shortcut_stride) * p.shortcut_w + ow * p.shortcut_stride) *
                        p.shortcut_channels;
  return row;
}

// Element offset in x of convolution K index k for `row`, or -1 when it reads zero
// (past the segment, or a tap in the padding).
FR_HOST_DEVICE int64_t conv_offset(const ConvBiasActParams& p, const ConvGemm& g, const PixelRow& row, int k) {
  if (!row.valid || k >= g.k_conv) return -1;
  const int tap = k / g.in_group_channels;
  const int c = k - tap * g.in_group_channels;
  const int r = tap / p.kernel_w;
  const int s = tap - r * p.kernel_w;
  const int ih = row.ih0 + r * p.dilation_h;
  const int iw = row.iw0 + s * p.dilation_w;
  if (unsigned(ih) >= unsigned(p.in_h) || unsigned(iw) >= unsigned(p.in_w)) return -1;
  return row.x_offset + (int64_t(ih) * p.in_w + iw) * p.in_channels + c;
}

// src[offset], or 0 where `mask` (a ReLU's output, for its backward; null: none) is <= 0 there.
FR_HOST_DEVICE uint16_t load_masked(const uint16_t* src, const uint16_t* mask, int64_t offset, DType dtype) {
  const uint16_t value = load_global(src + offset);
  return mask != nullptr && relu_masks(load_global(mask + offset), dtype) ? uint16_t(0) : value;
}

// The 8 elements at src + offset (16-byte aligned) in one load, masked the same way.
FR_HOST_DEVICE uint4 load_masked8(const uint16_t* src, const uint16_t* mask, int64_t offset, DType dtype) {
  const uint4 value = load_global(reinterpret_cast<const uint4*>(src + offset));
  if (mask == nullptr) return value;
  uint16_t e[kVector], m[kVector];
  unpack8(value, e);
  unpack8(load_global(reinterpret_cast<const uint4*>(mask + offset)), m);
#pragma unroll
  for (int j = 0; j < kVector; ++j) e[j] = relu_masks(m[j], dtype) ? uint16_t(0) : e[j];
  return pack8(e);
}

// conv_stats' prologue on one element of x with its channel's vectors (p.in_mean set): the
// previous BN, then its ReLU; NaN stays NaN, as torch.relu.
template <class Params>  // ConvBiasActParams, ConvWgradParams: in_mean, in_invstd, in_weight, in_bias, in_relu, dtype
FR_HOST_DEVICE uint16_t prologue_value(const Params& p, uint16_t bits, float mean, float invstd, float weight,
                                       float bias) {
  float value = normalize(to_float(bits, p.dtype), mean, invstd, weight, bias);
  if (p.in_relu) value = value < 0.f ? 0.f : value;
  return from_float(value, p.dtype);
}

// The prologue on x's element of input channel `channel`.
template <class Params>
FR_HOST_DEVICE uint16_t apply_prologue(const Params& p, uint16_t bits, int channel) {
  const float weight = p.in_weight != nullptr ? load_global(p.in_weight + channel) : 1.f;
  const float bias = p.in_bias != nullptr ? load_global(p.in_bias + channel) : 0.f;
  return prologue_value(p, bits, load_global(p.in_mean + channel), load_global(p.in_invstd + channel), weight, bias);
}

// The prologue on 8 consecutive channels [channel, channel + 8) of one tap: the four vectors in
// 16-byte loads where aligned (8 loads, not 32, per chunk of the A tile).
template <class Params>
FR_HOST_DEVICE void apply_prologue8(const Params& p, uint16_t (&e)[kVector], int channel) {
#pragma unroll
  for (int half = 0; half < kVector; half += 4) {
    const ChannelBn4 bn = load_bn4(p.in_mean, p.in_invstd, p.in_weight, p.in_bias, channel + half);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      e[half + j] = prologue_value(p, e[half + j], bn.mean[j], bn.invstd[j], bn.weight[j], bn.bias[j]);
    }
  }
}

// x's channel (within the whole tensor) of convolution K index k of group `channel_base / in_group_channels`.
FR_HOST_DEVICE int conv_channel(const ConvGemm& g, int channel_base, int k) {
  return channel_base + k % g.in_group_channels;
}

// 8 convolution K elements [k, k + 8) of `row` (a dgrad's ReLU mask, or conv_stats' prologue, applied;
// padding taps stay zero). channel_base: the group's first channel of x.
FR_HOST_DEVICE uint4 conv_chunk(const ConvBiasActParams& p, const ConvGemm& g, const PixelRow& row, int k,
                                int channel_base) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint16_t* mask = static_cast<const uint16_t*>(p.grad_mask);
  uint16_t e[kVector];
  if (g.vector_conv) {  // k % 8 == 0 and in_group_channels % 8 == 0: one tap, one aligned load
    const int64_t offset = conv_offset(p, g, row, k);
    if (offset < 0) return make_uint4(0, 0, 0, 0);
    const uint4 chunk = load_masked8(x, mask, offset, p.dtype);
    if (p.in_mean == nullptr) return chunk;
    unpack8(chunk, e);
    apply_prologue8(p, e, conv_channel(g, channel_base, k));
    return pack8(e);
  }
#pragma unroll
  for (int j = 0; j < kVector; ++j) {
    const int64_t offset = conv_offset(p, g, row, k + j);
    e[j] = offset < 0 ? uint16_t(0) : load_masked(x, mask, offset, p.dtype);
    if (offset >= 0 && p.in_mean != nullptr) e[j] = apply_prologue(p, e[j], conv_channel(g, channel_base, k + j));
  }
  return pack8(e);
}

// 8 elements [k, k + 8) of a dense row of `length` elements (a weight row, or a
// shortcut pixel's channels). `vector`: length % 8 == 0 and the row is 16-byte aligned.
FR_HOST_DEVICE uint4 row_chunk(const uint16_t* row_start, bool valid, int k, int length, bool vector) {
  if (vector) {
    return valid && k < length ? load_global(reinterpret_cast<const uint4*>(row_start + k)) : make_uint4(0, 0, 0, 0);
  }
  uint16_t e[kVector];
#pragma unroll
  for (int j = 0; j < kVector; ++j) {
    e[j] = valid && k + j < length ? load_global(row_start + k + j) : uint16_t(0);
  }
  return pack8(e);
}

// One thread's share of the A and B tiles, staged in registers so the next
// tile's global loads overlap the current tile's tensor-core work.
template <class Tile>
class TileLoader {
 public:
  static constexpr int kChunksPerRow = kBlockK / kVector;
  static constexpr int kAChunks = Tile::kBlockM * kChunksPerRow;
  static constexpr int kBChunks = Tile::kBlockN * kChunksPerRow;
  static constexpr int kAIters = (kAChunks + Tile::kThreads - 1) / Tile::kThreads;
  static constexpr int kBIters = (kBChunks + Tile::kThreads - 1) / Tile::kThreads;
  static constexpr int kRowsPerIter = Tile::kThreads / kChunksPerRow;
  static_assert(Tile::kThreads % kChunksPerRow == 0, "a thread's chunks must share one K position");

  // m0: the block's first GEMM row; n0: its first output channel within `group`;
  // thread: this thread's index in the block.
  FR_HOST_DEVICE TileLoader(const ConvBiasActParams& p, const ConvGemm& g, int m0, int n0, int group, int thread)
      : k_chunk_(thread % kChunksPerRow * kVector),
        row0_(thread / kChunksPerRow),
        channel_base_(group * g.in_group_channels) {
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int row = row0_ + i * kRowsPerIter;
      a_rows_[i] = make_pixel_row(p, g, m0 + row, group);
      a_rows_[i].valid = a_rows_[i].valid && row < Tile::kBlockM;
    }
    const uint16_t* weight = static_cast<const uint16_t*>(p.weight);
    const uint16_t* shortcut_weight = static_cast<const uint16_t*>(p.shortcut_weight);
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int row = row0_ + i * kRowsPerIter;
      const int channel = n0 + row;  // within the group
      b_valid_[i] = row < Tile::kBlockN && channel < g.out_group_channels;
      const int64_t out_channel = b_valid_[i] ? int64_t(group) * g.out_group_channels + channel : 0;
      b_conv_[i] = weight + out_channel * g.k_conv;
      b_shortcut_[i] = shortcut_weight ? shortcut_weight + out_channel * p.shortcut_channels : nullptr;
    }
  }

  // Global -> registers: K tile `k_tile` of the concatenated K (conv, then shortcut).
  FR_HOST_DEVICE void load(const ConvBiasActParams& p, const ConvGemm& g, int k_tile) {
    if (k_tile < g.k_tiles_conv) {
      const int k = k_tile * kBlockK + k_chunk_;
#pragma unroll
      for (int i = 0; i < kAIters; ++i) a_regs_[i] = conv_chunk(p, g, a_rows_[i], k, channel_base_);
#pragma unroll
      for (int i = 0; i < kBIters; ++i) {
        b_regs_[i] = row_chunk(b_conv_[i], b_valid_[i], k, g.k_conv, g.vector_conv);
      }
    } else {
      const int k = (k_tile - g.k_tiles_conv) * kBlockK + k_chunk_;
      const uint16_t* shortcut_x = static_cast<const uint16_t*>(p.shortcut_x);
#pragma unroll
      for (int i = 0; i < kAIters; ++i) {
        a_regs_[i] = row_chunk(shortcut_x + a_rows_[i].shortcut_offset, a_rows_[i].valid, k, p.shortcut_channels,
                               g.vector_shortcut);
      }
#pragma unroll
      for (int i = 0; i < kBIters; ++i) {
        b_regs_[i] = row_chunk(b_shortcut_[i], b_valid_[i], k, p.shortcut_channels, g.vector_shortcut);
      }
    }
  }

  // Global -> shared with cp.async (the kAsyncCopy pipeline): K tile `k_tile` straight
  // into `a_tile`/`b_tile`. Only for vector-loadable operands (async_copy_applies):
  // every chunk is one aligned 16-byte load or 16 zero bytes. The caller commits.
  FR_HOST_DEVICE void copy_async(const ConvBiasActParams& p, const ConvGemm& g, int k_tile, uint16_t* a_tile,
                                 uint16_t* b_tile) const {
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
    const bool conv = k_tile < g.k_tiles_conv;
    const int k = (conv ? k_tile : k_tile - g.k_tiles_conv) * kBlockK + k_chunk_;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int row = row0_ + i * kRowsPerIter;
      if (row >= Tile::kBlockM) continue;
      const uint16_t* src = x;  // any valid address for a zero-filled chunk
      bool valid;
      if (conv) {
        const int64_t offset = conv_offset(p, g, a_rows_[i], k);
        valid = offset >= 0;
        if (valid) src = x + offset;
      } else {
        valid = a_rows_[i].valid && k < p.shortcut_channels;
        if (valid) src = static_cast<const uint16_t*>(p.shortcut_x) + a_rows_[i].shortcut_offset + k;
      }
      copy_chunk_async(a_tile + row * kSmemPitch + k_chunk_, src, valid);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int row = row0_ + i * kRowsPerIter;
      if (row >= Tile::kBlockN) continue;
      const uint16_t* row_start = conv ? b_conv_[i] : b_shortcut_[i];
      const bool valid = b_valid_[i] && k < (conv ? g.k_conv : p.shortcut_channels);
      copy_chunk_async(b_tile + row * kSmemPitch + k_chunk_, valid ? row_start + k : x, valid);
    }
  }

  // The main loops show each stage here before multiplying it; the forward has no use for it.
  template <typename T>
  FR_HOST_DEVICE void observe(const uint16_t*) const {}

  // Registers -> shared: the tiles the next compute step reads.
  FR_HOST_DEVICE void store(uint16_t* a_tile, uint16_t* b_tile) const {
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int row = row0_ + i * kRowsPerIter;
      if (row < Tile::kBlockM) *reinterpret_cast<uint4*>(a_tile + row * kSmemPitch + k_chunk_) = a_regs_[i];
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int row = row0_ + i * kRowsPerIter;
      if (row < Tile::kBlockN) *reinterpret_cast<uint4*>(b_tile + row * kSmemPitch + k_chunk_) = b_regs_[i];
    }
  }

 private:
  const int k_chunk_;  // this thread's K offset within a tile: 0, 8, 16 or 24
  const int row0_;     // this thread's first row within a tile
  const int channel_base_;  // the group's first channel of x (conv_stats' prologue vectors)
  PixelRow a_rows_[kAIters];
  const uint16_t* b_conv_[kBIters];
  const uint16_t* b_shortcut_[kBIters];
  bool b_valid_[kBIters];
  uint4 a_regs_[kAIters];
  uint4 b_regs_[kBIters];
};

}  // namespace fused_resblock
