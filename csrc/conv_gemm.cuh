// The convolution as an implicit GEMM: the sizes every part of the kernel shares.
//
//   rows  m = batch * out_h * out_w    one per output pixel (NHWC order)
//   cols  n = out_channels / groups    per group; the group is grid axis z
//   depth k = kernel_h * kernel_w * in_channels / groups     (KRSC order: tap-major,
//             channel-minor, the layout of a channels_last weight)
//         then, when a projection is merged, shortcut_channels more: a second
//         K segment accumulated into the same fp32 accumulators.
#pragma once

#include <cstdint>

#include "conv_bias_act.h"

namespace fused_resblock {

constexpr int kBlockK = 32;  // K depth of one shared-memory tile, all tile shapes

struct ConvGemm {
  int m;
  int out_hw;
  int in_group_channels;
  int out_group_channels;
  int k_conv;        // kernel_h * kernel_w * in_group_channels
  int k_tiles_conv;  // K tiles of the convolution segment
  int k_tiles;       // all K tiles: convolution, then the merged projection
  bool vector_conv;  // conv operands may move 8 channels per 16-byte load
  bool vector_shortcut;
};

inline int ceil_div(int a, int b) {
  return (a + b - 1) / b;
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

inline ConvGemm make_conv_gemm(const ConvBiasActParams& p) {
  ConvGemm g;
  g.out_hw = p.out_h * p.out_w;
  g.m = p.batch * g.out_hw;
  g.in_group_channels = p.in_channels / p.groups;
  g.out_group_channels = p.out_channels / p.groups;
  g.k_conv = p.kernel_h * p.kernel_w * g.in_group_channels;
  g.k_tiles_conv = ceil_div(g.k_conv, kBlockK);
  g.k_tiles = g.k_tiles_conv + (p.shortcut_x ? ceil_div(p.shortcut_channels, kBlockK) : 0);
  // A 16-byte chunk of 8 K elements stays inside one filter tap (and one
  // group) when the per-group channel count is a multiple of 8; every row
  // start is then 16-byte aligned if the base pointers are.
  g.vector_conv = g.in_group_channels % 8 == 0 && aligned16(p.x) && aligned16(p.weight) &&
                  (p.grad_mask == nullptr || aligned16(p.grad_mask));
  g.vector_shortcut = p.shortcut_x != nullptr && p.shortcut_channels % 8 == 0 && aligned16(p.shortcut_x) &&
                      aligned16(p.shortcut_weight);
  return g;
}

// kAsyncCopy moves whole 16-byte chunks only: every operand must be vector-loadable, and a
// dgrad's ReLU mask or conv_stats' prologue needs the registers (applied between the load and the store).
inline bool async_copy_applies(const ConvBiasActParams& p, const ConvGemm& g) {
  return g.vector_conv && (p.shortcut_x == nullptr || g.vector_shortcut) && p.grad_mask == nullptr &&
         p.in_mean == nullptr;
}

inline Pipeline choose_pipeline(const ConvBiasActParams& p, const ConvGemm& g) {
  if (p.pipeline != Pipeline::kAuto && p.pipeline != Pipeline::kWmma) return p.pipeline;
  return async_copy_applies(p, g) ? Pipeline::kAsyncCopy : Pipeline::kRegisters;
}

}  // namespace fused_resblock
