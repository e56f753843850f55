// The fused epilogue: fp32 accumulators -> + bias -> + mapped residual -> ReLU
// -> cast -> store, 8 output channels of one output pixel per call.
//
// Residual and output are addressed through their (N, C, H, W) strides, so
// NCHW and NHWC tensors (and a residual that is a strided view) need no copy.
// Where 8 channels are contiguous and 16-byte aligned, they move as one vector.
#pragma once

#include <cstdint>

#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "numeric.cuh"

namespace fused_resblock {

// value[0..count) are output channels [channel, channel + count) of GEMM row m
// (count <= 8; m < g.m and channel + count <= out_channels: the caller masks). stats_row, when
// set (conv_stats), receives the stored 16-bit values too (16-byte aligned: the stats tile's row).
template <typename T>
FR_HOST_DEVICE void store_output_chunk(const ConvBiasActParams& p, const ConvGemm& g, float (&value)[kVector], int m,
                                       int channel, int count, uint16_t* stats_row = nullptr) {
  const int n = m / g.out_hw;
  const int rem = m - n * g.out_hw;
  const int oh = rem / p.out_w;
  const int ow = rem - oh * p.out_w;

  if (p.bias != nullptr) {
#pragma unroll
    for (int j = 0; j < kVector; ++j) {
      if (j < count) value[j] += load_global(p.bias + channel + j);
    }
  }

  if (p.residual != nullptr) {
    const Strides4& s = p.residual_strides;
    // residual[n, :, oh * rs, ow * rs]; channel c of the output reads channel c - offset.
    const uint16_t* pixel = static_cast<const uint16_t*>(p.residual) + int64_t(n) * s.n +
                            int64_t(oh) * p.residual_stride * s.h + int64_t(ow) * p.residual_stride * s.w;
    const int rc0 = channel - p.residual_offset;
    if (count == kVector && s.c == 1 && rc0 >= 0 && rc0 + kVector <= p.residual_channels && is_aligned16(pixel + rc0)) {
      uint16_t e[kVector];
      unpack8(load_global(reinterpret_cast<const uint4*>(pixel + rc0)), e);
#pragma unroll
      for (int j = 0; j < kVector; ++j) value[j] += Numeric<T>::to_float(e[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kVector; ++j) {
        const int rc = rc0 + j;  // outside [0, residual_channels): R is zero there
        if (j < count && rc >= 0 && rc < p.residual_channels) {
          value[j] += Numeric<T>::to_float(load_global(pixel + int64_t(rc) * s.c));
        }
      }
    }
  }

  if (p.relu) {
#pragma unroll
    for (int j = 0; j < kVector; ++j) value[j] = value[j] < 0.f ? 0.f : value[j];  // NaN stays NaN, as torch.relu
  }

  const Strides4& o = p.out_strides;
  uint16_t* dst =
      static_cast<uint16_t*>(p.out) + int64_t(n) * o.n + int64_t(channel) * o.c + int64_t(oh) * o.h + int64_t(ow) * o.w;
  uint16_t e[kVector];
#pragma unroll
  for (int j = 0; j < kVector; ++j) e[j] = Numeric<T>::from_float(value[j]);
  if (stats_row != nullptr) {
    if (count == kVector) {
      *reinterpret_cast<uint4*>(stats_row) = pack8(e);
    } else {
      for (int j = 0; j < count; ++j) stats_row[j] = e[j];
    }
  }
  if (count == kVector && o.c == 1 && is_aligned16(dst)) {
    *reinterpret_cast<uint4*>(dst) = pack8(e);
  } else {
#pragma unroll
    for (int j = 0; j < kVector; ++j) {
      if (j < count) dst[int64_t(j) * o.c] = e[j];
    }
  }
}

}  // namespace fused_resblock
