// 16-bit element types, moved around as raw bits.
//
// Loads, shared-memory staging and stores treat fp16 and bf16 alike as
// uint16_t bit patterns (all-zero bits is +0.0 in both); only the tensor-core
// fragments and the epilogue's fp32 arithmetic need to know which type it is.
// Conversions are explicit intrinsics: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
//
// The gathers and the epilogue are host-and-device functions: the host
// emulator (emulator.cu) runs the very same index math on CPU tensors, which
// is how CI checks it without a GPU.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv_bias_act.h"  // DType

#define FR_HOST_DEVICE __host__ __device__ __forceinline__

namespace fused_resblock {

// A read-only global load: through the non-coherent cache on the device, plain on the host.
template <typename V>
FR_HOST_DEVICE V load_global(const V* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

template <typename T>
struct Numeric;

template <>
struct Numeric<__half> {
  static FR_HOST_DEVICE float to_float(uint16_t bits) {
    return __half2float(__ushort_as_half(bits));
  }
  static FR_HOST_DEVICE uint16_t from_float(float value) {
    return __half_as_ushort(__float2half_rn(value));
  }
};

template <>
struct Numeric<__nv_bfloat16> {
  static FR_HOST_DEVICE float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  static FR_HOST_DEVICE uint16_t from_float(float value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
  }
};

// The same at a dtype known at run time (the gathers and the BN passes, typed by their params).
FR_HOST_DEVICE float to_float(uint16_t bits, DType dtype) {
  return dtype == DType::kFloat16 ? Numeric<__half>::to_float(bits) : Numeric<__nv_bfloat16>::to_float(bits);
}

FR_HOST_DEVICE uint16_t from_float(float value, DType dtype) {
  return dtype == DType::kFloat16 ? Numeric<__half>::from_float(value) : Numeric<__nv_bfloat16>::from_float(value);
}

// The ReLU backward's test on one raw fp16/bf16 value: true where it is <= 0 (+-0, negatives,
// -inf), false for positives and every NaN (torch's threshold_backward passes a NaN's gradient).
FR_HOST_DEVICE bool relu_masks(uint16_t bits, DType dtype) {
  const uint16_t magnitude = bits & 0x7fffu;
  const uint16_t infinity = dtype == DType::kFloat16 ? 0x7c00u : 0x7f80u;
  return magnitude == 0 || ((bits & 0x8000u) != 0 && magnitude <= infinity);
}

// Eight 16-bit elements = 16 bytes: the unit every vector load and store moves.
constexpr int kVector = 8;

FR_HOST_DEVICE uint4 pack8(const uint16_t (&e)[kVector]) {
  uint4 v;
  v.x = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  v.y = uint32_t(e[2]) | (uint32_t(e[3]) << 16);
  v.z = uint32_t(e[4]) | (uint32_t(e[5]) << 16);
  v.w = uint32_t(e[6]) | (uint32_t(e[7]) << 16);
  return v;
}

FR_HOST_DEVICE void unpack8(uint4 v, uint16_t (&e)[kVector]) {
  e[0] = uint16_t(v.x & 0xffffu);
  e[1] = uint16_t(v.x >> 16);
  e[2] = uint16_t(v.y & 0xffffu);
  e[3] = uint16_t(v.y >> 16);
  e[4] = uint16_t(v.z & 0xffffu);
  e[5] = uint16_t(v.z >> 16);
  e[6] = uint16_t(v.w & 0xffffu);
  e[7] = uint16_t(v.w >> 16);
}

FR_HOST_DEVICE bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// BN(v) with one channel's statistics and affine, centred first as the reference computes it; one
// rounding (the fma) on the host and the device alike. Every BN our kernels apply goes through it.
FR_HOST_DEVICE float normalize(float v, float mean, float invstd, float weight, float bias) {
  return fmaf((v - mean) * invstd, weight, bias);
}

// The fp32 per-channel vector v's entries [c, c + 4), or `absent` each where v is null: one
// 16-byte load where v + c is aligned (torch's own allocations are), else four.
FR_HOST_DEVICE void load_channels4(const float* v, int c, float absent, float (&out)[4]) {
  if (v == nullptr) {
    out[0] = out[1] = out[2] = out[3] = absent;
  } else if (is_aligned16(v + c)) {
    const float4 q = load_global(reinterpret_cast<const float4*>(v + c));
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = load_global(v + c + j);
  }
}

// One BN's vectors at 4 consecutive channels [c, c + 4) in 16-byte loads where aligned: scalar
// loads from threads 8 channels apart would cost 4 times the L1 wavefronts.
struct ChannelBn4 {
  float mean[4], invstd[4], weight[4], bias[4];
};

FR_HOST_DEVICE ChannelBn4 load_bn4(const float* mean, const float* invstd, const float* weight, const float* bias,
                                   int c) {
  ChannelBn4 bn;
  load_channels4(mean, c, 0.f, bn.mean);
  load_channels4(invstd, c, 1.f, bn.invstd);
  load_channels4(weight, c, 1.f, bn.weight);
  load_channels4(bias, c, 0.f, bn.bias);
  return bn;
}

}  // namespace fused_resblock
