// wgrad as an implicit GEMM (conv_wgrad.h): its sizes, its operand gathers and its final sum.
//
//   rows  j = (tap, input channel) of the group, channel fastest (KRSC order), then the merged
//             projection's input channels
//   cols  k = output channels of the group (grid axis z carries the group and the split)
//   depth m = output pixels (batch * out_h * out_w), in kBlockK tiles, split across blocks
//
// The bias gradient (the sum of g over the depth) is added up by the blocks of the first row tile
// as their g tiles land (WgradLoader::observe), then summed over the block in a fixed order: no
// row of ones in the GEMM, which would cost a whole extra row of tiles wherever the weight's rows
// fill whole tiles (a 1x1 conv of 128 or 256 channels).
//
// The operands' contiguous dimension is the rows (columns) here -- 8 channels of one pixel -- so each
// thread moves 8 rows (or columns) at one depth position in one 16-byte load, and the tiles lie in
// shared memory rows fastest (RowFastTiles: A column-major, B row-major for WMMA), so that chunk is
// one 16-byte store too, or one cp.async copy; the forward's tensor-core step and main loops run
// them. Anything outside the problem loads as zero, as in the forward.
#pragma once

#include <algorithm>
#include <cstdint>

#include "async_copy.cuh"
#include "conv_gemm.cuh"
#include "conv_wgrad.h"
#include "numeric.cuh"
#include "tile_loader.cuh"
#include "tile_shape.cuh"

namespace fused_resblock {

struct WgradGemm {
  int depth;  // output pixels
  int out_hw;
  int in_group_channels, out_group_channels;
  int conv_rows;      // kernel_h * kernel_w * in_group_channels, 0 without grad_weight
  int shortcut_rows;  // shortcut_channels, 0 without grad_shortcut_weight
  int rows;           // conv_rows + shortcut_rows
  bool bias;          // grad_bias wanted: the first row tile's blocks add up g
  int block_m, block_n;            // the tile's
  int rows_padded, cols_padded;    // to whole tiles: the workspace's shape per (split, group)
  int depth_tiles, tiles_per_split;
  int64_t bias_offset;  // where the bias partials start in the workspace: after the GEMM's
  bool vector_x;         // conv rows move 8 input channels per aligned 16-byte load
  bool vector_shortcut;  // projection rows likewise
  bool vector_grad;      // columns likewise (8 output channels of the gradient, and of its mask)
  bool async_copy;       // every chunk is a 16-byte copy or a constant: the cp.async main loop may run it
};

// params.tile and params.splits resolved (plan_conv_wgrad).
inline WgradGemm make_wgrad_gemm(const ConvWgradParams& p) {
  WgradGemm w;
  w.out_hw = p.out_h * p.out_w;
  w.depth = p.batch * w.out_hw;
  w.in_group_channels = p.in_channels / p.groups;
  w.out_group_channels = p.out_channels / p.groups;
  w.conv_rows = p.grad_weight ? p.kernel_h * p.kernel_w * w.in_group_channels : 0;
  w.shortcut_rows = p.grad_shortcut_weight ? p.shortcut_channels : 0;
  w.rows = w.conv_rows + w.shortcut_rows;
  w.bias = p.grad_bias != nullptr;
  w.block_m = with_tile_shape(p.tile, 0, [](auto tile) { return decltype(tile)::kBlockM; });
  w.block_n = with_tile_shape(p.tile, 0, [](auto tile) { return decltype(tile)::kBlockN; });
  w.rows_padded = std::max(ceil_div(w.rows, w.block_m), w.bias ? 1 : 0) * w.block_m;  // a row tile sums g
  w.cols_padded = ceil_div(w.out_group_channels, w.block_n) * w.block_n;
  w.depth_tiles = ceil_div(w.depth, kBlockK);
  w.tiles_per_split = ceil_div(w.depth_tiles, p.splits > 0 ? p.splits : 1);
  w.bias_offset = int64_t(p.splits > 0 ? p.splits : 1) * p.groups * w.rows_padded * w.cols_padded;
  w.vector_x = w.in_group_channels % 8 == 0 && aligned16(p.x);
  w.vector_shortcut = p.shortcut_x != nullptr && p.shortcut_channels % 8 == 0 && w.conv_rows % 8 == 0 &&
                      aligned16(p.shortcut_x);
  w.vector_grad = w.out_group_channels % 8 == 0 && aligned16(p.grad) &&
                  (p.grad_mask == nullptr || aligned16(p.grad_mask));
  // A ReLU mask or the prologue needs the registers (applied between the load and the store).
  w.async_copy = (w.conv_rows == 0 || w.vector_x) && (w.shortcut_rows == 0 || w.vector_shortcut) && w.vector_grad &&
                 p.grad_mask == nullptr && p.in_mean == nullptr;
  return w;
}

// One output pixel of the depth: where it reads x and the projection's input.
struct DepthPixel {
  int n, oh, ow;
  bool valid;  // inside the problem (past the last pixel: zeros)
};

FR_HOST_DEVICE DepthPixel make_depth_pixel(const WgradGemm& w, const ConvWgradParams& p, int m) {
  DepthPixel d;
  d.valid = m < w.depth;
  const int pixel = d.valid ? m : 0;
  d.n = pixel / w.out_hw;
  const int rem = pixel - d.n * w.out_hw;
  d.oh = rem / p.out_w;
  d.ow = rem - d.oh * p.out_w;
  return d;
}

// x's element offset for conv row j = (tap, channel) at pixel d, or -1 in the padding.
FR_HOST_DEVICE int64_t wgrad_x_offset(const ConvWgradParams& p, const WgradGemm& w, const DepthPixel& d, int j,
                                      int group) {
  const int tap = j / w.in_group_channels;
  const int c = j - tap * w.in_group_channels;
  const int r = tap / p.kernel_w;
  const int s = tap - r * p.kernel_w;
  const int ih = d.oh * p.stride_h - p.pad_h + r * p.dilation_h;
  const int iw = d.ow * p.stride_w - p.pad_w + s * p.dilation_w;
  if (unsigned(ih) >= unsigned(p.in_h) || unsigned(iw) >= unsigned(p.in_w)) return -1;
  return ((int64_t(d.n) * p.in_h + ih) * p.in_w + iw) * p.in_channels + int64_t(group) * w.in_group_channels + c;
}

// The projection input's element offset for its channel c at pixel d.
FR_HOST_DEVICE int64_t wgrad_shortcut_offset(const ConvWgradParams& p, const DepthPixel& d, int c) {
  return ((int64_t(d.n) * p.shortcut_h + int64_t(d.oh) * p.shortcut_stride) * p.shortcut_w +
          int64_t(d.ow) * p.shortcut_stride) * p.shortcut_channels + c;
}

// Row j's operand at pixel d, one element: conv row, projection row, or past the rows (0).
FR_HOST_DEVICE uint16_t wgrad_row_element(const ConvWgradParams& p, const WgradGemm& w, const DepthPixel& d, int j,
                                          int group) {
  if (!d.valid || j >= w.rows) return 0;
  if (j < w.conv_rows) {
    const int64_t offset = wgrad_x_offset(p, w, d, j, group);
    if (offset < 0) return 0;
    const uint16_t value = load_global(static_cast<const uint16_t*>(p.x) + offset);
    return p.in_mean == nullptr ? value : apply_prologue(p, value, group * w.in_group_channels + j % w.in_group_channels);
  }
  return load_global(static_cast<const uint16_t*>(p.shortcut_x) + wgrad_shortcut_offset(p, d, j - w.conv_rows));
}

// Each thread owns one chunk of 8 rows (A) and of 8 columns (B) of the block tile, at the depth
// positions depth0 + i * kDepthStep of every K tile.
template <class Tile>
class WgradLoader {
 public:
  using Tiles = RowFastTiles<Tile>;
  static constexpr int kAChunksPerDepth = Tile::kBlockM / kVector;
  static constexpr int kBChunksPerDepth = Tile::kBlockN / kVector;
  static constexpr int kADepthStep = Tile::kThreads / kAChunksPerDepth;
  static constexpr int kBDepthStep = Tile::kThreads / kBChunksPerDepth;
  static constexpr int kAIters = (kBlockK + kADepthStep - 1) / kADepthStep;
  static constexpr int kBIters = (kBlockK + kBDepthStep - 1) / kBDepthStep;
  static_assert(Tile::kThreads % kAChunksPerDepth == 0 && Tile::kThreads % kBChunksPerDepth == 0,
                "a thread's chunks keep their rows across depth positions");

  // row0/col0: the block's first row and column; depth_begin: its split's first pixel.
  FR_HOST_DEVICE WgradLoader(const WgradGemm& w, int row0, int col0, int group, int depth_begin, int thread)
      : group_(group),
        depth_begin_(depth_begin),
        a_chunk_(thread % kAChunksPerDepth),
        a_depth0_(thread / kAChunksPerDepth),
        b_chunk_(thread % kBChunksPerDepth),
        b_depth0_(thread / kBChunksPerDepth),
        a_row_(row0 + a_chunk_ * kVector),
        b_col_(col0 + b_chunk_ * kVector),
        sums_bias_(w.bias && row0 == 0) {
    // Whole-chunk loads where all 8 rows are 8 channels of one x tap or of the projection input.
    if (w.vector_x && a_row_ < w.conv_rows) {
      a_kind_ = kConvVector;
    } else if (w.vector_shortcut && a_row_ >= w.conv_rows && a_row_ < w.conv_rows + w.shortcut_rows) {
      a_kind_ = kShortcutVector;
    } else {
      a_kind_ = a_row_ < w.rows ? kElements : kZeros;
    }
  }

  // Global -> registers: K tile `k_tile` of this block's split.
  FR_HOST_DEVICE void load(const ConvWgradParams& p, const WgradGemm& w, int k_tile) {
    const int m0 = depth_begin_ + k_tile * kBlockK;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int depth = a_depth0_ + i * kADepthStep;
      if (depth < kBlockK) a_regs_[i] = a_chunk(p, w, make_depth_pixel(w, p, m0 + depth));
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int depth = b_depth0_ + i * kBDepthStep;
      if (depth < kBlockK) b_regs_[i] = b_chunk(p, w, m0 + depth);
    }
  }

  // Registers -> shared: one 16-byte store per chunk.
  FR_HOST_DEVICE void store(uint16_t* a_tile, uint16_t* b_tile) const {
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int depth = a_depth0_ + i * kADepthStep;
      if (depth < kBlockK) *reinterpret_cast<uint4*>(a_tile + Tiles::a_index(a_chunk_ * kVector, depth)) = a_regs_[i];
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int depth = b_depth0_ + i * kBDepthStep;
      if (depth < kBlockK) *reinterpret_cast<uint4*>(b_tile + Tiles::b_index(b_chunk_ * kVector, depth)) = b_regs_[i];
    }
  }

  // Global -> shared with cp.async (w.async_copy only: every chunk one aligned 16-byte copy, zero-filled
  // where masked). The caller commits.
  FR_HOST_DEVICE void copy_async(const ConvWgradParams& p, const WgradGemm& w, int k_tile, uint16_t* a_tile,
                                 uint16_t* b_tile) const {
    const int m0 = depth_begin_ + k_tile * kBlockK;
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int depth = a_depth0_ + i * kADepthStep;
      if (depth >= kBlockK) continue;
      uint16_t* dst = a_tile + Tiles::a_index(a_chunk_ * kVector, depth);
      const DepthPixel d = make_depth_pixel(w, p, m0 + depth);
      const uint16_t* src = x;  // any valid address for a zero-filled chunk
      bool valid = d.valid && a_kind_ != kZeros;
      if (valid && a_kind_ == kConvVector) {
        const int64_t offset = wgrad_x_offset(p, w, d, a_row_, group_);
        valid = offset >= 0;
        if (valid) src = x + offset;
      } else if (valid) {  // kShortcutVector
        src = static_cast<const uint16_t*>(p.shortcut_x) + wgrad_shortcut_offset(p, d, a_row_ - w.conv_rows);
      }
      copy_chunk_async(dst, src, valid);
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int depth = b_depth0_ + i * kBDepthStep;
      if (depth >= kBlockK) continue;
      const int m = m0 + depth;
      const bool valid = m < w.depth && b_col_ < w.out_group_channels;
      const uint16_t* grad = static_cast<const uint16_t*>(p.grad);
      const uint16_t* src = valid ? grad + grad_offset(p, w, m) : grad;
      copy_chunk_async(b_tile + Tiles::b_index(b_chunk_ * kVector, depth), src, valid);
    }
  }

  // The main loops call this with each K tile's stage once it is in shared memory (and visible):
  // a first-row-tile block adds up this thread's chunks of g there, for the bias gradient.
  template <typename T>
  FR_HOST_DEVICE void observe(const uint16_t* b_tile) {
    if (!sums_bias_) return;
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      const int depth = b_depth0_ + i * kBDepthStep;
      if (depth >= kBlockK) continue;
      uint16_t e[kVector];
      unpack8(*reinterpret_cast<const uint4*>(b_tile + Tiles::b_index(b_chunk_ * kVector, depth)), e);
#pragma unroll
      for (int j = 0; j < kVector; ++j) bias_sums_[j] += Numeric<T>::to_float(e[j]);
    }
  }

  // This thread's sums, 8 columns from its chunk's first (zeros where it observed nothing).
  FR_HOST_DEVICE void write_bias_sums(float* out) const {
#pragma unroll
    for (int j = 0; j < kVector; ++j) out[j] = bias_sums_[j];
  }

 private:
  enum Kind { kConvVector, kShortcutVector, kElements, kZeros };

  FR_HOST_DEVICE int64_t grad_offset(const ConvWgradParams& p, const WgradGemm& w, int m) const {
    return int64_t(m) * p.out_channels + int64_t(group_) * w.out_group_channels + b_col_;
  }

  FR_HOST_DEVICE uint4 a_chunk(const ConvWgradParams& p, const WgradGemm& w, const DepthPixel& d) const {
    const uint4 zeros = make_uint4(0, 0, 0, 0);
    if (a_kind_ == kZeros || !d.valid) return zeros;
    if (a_kind_ == kConvVector) {
      const int64_t offset = wgrad_x_offset(p, w, d, a_row_, group_);
      if (offset < 0) return zeros;
      const uint4 chunk = load_global(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.x) + offset));
      if (p.in_mean == nullptr) return chunk;
      uint16_t e[kVector];  // 8 consecutive channels of one tap
      unpack8(chunk, e);
      const int channel = group_ * w.in_group_channels + a_row_ % w.in_group_channels;
      // scalar vector loads: apply_prologue8's 16 live floats spill the bf16 128x64 tile (20 bytes at 128 registers)
#pragma unroll
      for (int j = 0; j < kVector; ++j) e[j] = apply_prologue(p, e[j], channel + j);
      return pack8(e);
    }
    if (a_kind_ == kShortcutVector) {
      const uint16_t* src = static_cast<const uint16_t*>(p.shortcut_x) + wgrad_shortcut_offset(p, d, a_row_ - w.conv_rows);
      return load_global(reinterpret_cast<const uint4*>(src));
    }
    uint16_t e[kVector];
#pragma unroll
    for (int j = 0; j < kVector; ++j) e[j] = wgrad_row_element(p, w, d, a_row_ + j, group_);
    return pack8(e);
  }

  // 8 output channels of the (masked) gradient at pixel m.
  FR_HOST_DEVICE uint4 b_chunk(const ConvWgradParams& p, const WgradGemm& w, int m) const {
    if (m >= w.depth || b_col_ >= w.out_group_channels) return make_uint4(0, 0, 0, 0);
    const uint16_t* grad = static_cast<const uint16_t*>(p.grad);
    const uint16_t* mask = static_cast<const uint16_t*>(p.grad_mask);
    const int64_t offset = grad_offset(p, w, m);
    if (w.vector_grad) return load_masked8(grad, mask, offset, p.dtype);
    uint16_t e[kVector];
#pragma unroll
    for (int j = 0; j < kVector; ++j) {
      e[j] = b_col_ + j < w.out_group_channels ? load_masked(grad, mask, offset + j, p.dtype) : uint16_t(0);
    }
    return pack8(e);
  }

  const int group_;
  const int depth_begin_;
  const int a_chunk_, a_depth0_, b_chunk_, b_depth0_;
  const int a_row_, b_col_;  // this thread's first row / column (within the group)
  const bool sums_bias_;
  float bias_sums_[kVector] = {};
  Kind a_kind_;
  uint4 a_regs_[kAIters];
  uint4 b_regs_[kBIters];
};

// The workspace: per (split, group), rows_padded x cols_padded fp32 partial sums, row-major.
FR_HOST_DEVICE int64_t wgrad_workspace_offset(const WgradGemm& w, int split_group, int row, int col) {
  return (int64_t(split_group) * w.rows_padded + row) * w.cols_padded + col;
}

// A first-row-tile block's bias partial of column t (of its tile): its threads' sums for that
// column (sums[thread * kVector + j], the threads that own its chunk) added in thread order.
template <class Tile>
FR_HOST_DEVICE float block_bias_sum(const float* sums, int t) {
  constexpr int kChunksPerDepth = Tile::kBlockN / kVector;
  float total = 0.f;
  for (int thread = t / kVector; thread < Tile::kThreads; thread += kChunksPerDepth) {
    total += sums[thread * kVector + t % kVector];
  }
  return total;
}

FR_HOST_DEVICE int64_t wgrad_bias_offset(const WgradGemm& w, int split_group, int col) {
  return w.bias_offset + int64_t(split_group) * w.cols_padded + col;
}

// The number of final sums: every (group, row, column) of the weights, then each bias column.
FR_HOST_DEVICE int64_t wgrad_outputs(const ConvWgradParams& p, const WgradGemm& w) {
  return int64_t(p.groups) * w.out_group_channels * (int64_t(w.rows) + (w.bias ? 1 : 0));
}

// Output `index` (wgrad_outputs' order; column fastest): the splits' partial sums added in split
// order, then stored where it belongs (weight, projection weight or bias gradient).
template <typename T>
FR_HOST_DEVICE void reduce_wgrad_element(const ConvWgradParams& p, const WgradGemm& w, int64_t index) {
  const int64_t weight_outputs = int64_t(p.groups) * w.rows * w.out_group_channels;
  if (index >= weight_outputs) {
    const int64_t bias_index = index - weight_outputs;
    const int col = int(bias_index % w.out_group_channels);
    const int group = int(bias_index / w.out_group_channels);
    float sum = 0.f;
    for (int split = 0; split < p.splits; ++split) {
      sum += p.workspace[wgrad_bias_offset(w, split * p.groups + group, col)];
    }
    p.grad_bias[int64_t(group) * w.out_group_channels + col] = sum;
    return;
  }
  const int col = int(index % w.out_group_channels);
  const int64_t rest = index / w.out_group_channels;
  const int row = int(rest % w.rows);
  const int group = int(rest / w.rows);
  float sum = 0.f;
  for (int split = 0; split < p.splits; ++split) {
    sum += p.workspace[wgrad_workspace_offset(w, split * p.groups + group, row, col)];
  }
  const int64_t k = int64_t(group) * w.out_group_channels + col;  // the output channel
  if (row < w.conv_rows) {
    const int tap = row / w.in_group_channels;
    const int c = row - tap * w.in_group_channels;
    const int r = tap / p.kernel_w;
    const int s = tap - r * p.kernel_w;
    const Strides4& st = p.grad_weight_strides;
    static_cast<uint16_t*>(p.grad_weight)[k * st.n + c * st.c + r * st.h + s * st.w] = Numeric<T>::from_float(sum);
  } else {
    const Strides4& st = p.grad_shortcut_weight_strides;
    static_cast<uint16_t*>(p.grad_shortcut_weight)[k * st.n + int64_t(row - w.conv_rows) * st.c] =
        Numeric<T>::from_float(sum);
  }
}

}  // namespace fused_resblock
