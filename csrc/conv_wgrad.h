// The weight gradient of the eval-mode fused convolution (wgrad), as the torch-free kernels see it.
//
//   grad_weight[k, c, r, s]     = sum over output pixels of g[pixel, k] * x[input pixel of tap (r, s), c]
//   grad_shortcut_weight[k, c]  = the same for the merged 1x1 projection's input
//   grad_bias[k]                = sum over output pixels of g[pixel, k]
//
// with g the output's gradient, zero where the forward's output (grad_mask) is <= 0 when a ReLU
// ended it. One implicit GEMM per group computes all three: rows are the weight gradient's
// (tap, input channel) pairs, then the projection's input channels (the bias gradient is summed by
// the first row tile's blocks as g lands); columns are the group's output channels; the depth is
// the output pixels, split across blocks (split-K) whose fp32 partial sums land in a workspace,
// summed in a fixed order by a second launch that also casts and stores: deterministic, no
// atomics. bindings.cpp checks and prepares the tensors; conv_wgrad.cu launches; emulator.cu runs
// the same schedule on the host.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_bias_act.h"

namespace fused_resblock {

struct ConvWgradParams {
  DType dtype;

  // grad: dense NHWC [batch, out_h, out_w, out_channels]; grad_mask null or the forward's output
  // in the same layout (grad reads as zero where it is <= 0, NaN passing).
  const void* grad;
  const void* grad_mask;
  int batch, out_h, out_w, out_channels;

  // x: dense NHWC [batch, in_h, in_w, in_channels], and the convolution's geometry.
  const void* x;
  int in_h, in_w, in_channels;
  int kernel_h, kernel_w, groups;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;

  // conv_stats_backward's wgrad reads x through the forward's prologue (conv_bias_act.h: in_mean
  // set): relu?((x - in_mean[c]) * in_invstd[c] * in_weight[c] + in_bias[c]) rounded to the dtype, the
  // padding zero -- the prologue's output, recomputed as x loads rather than stored.
  const float* in_mean;
  const float* in_invstd;
  const float* in_weight;
  const float* in_bias;
  bool in_relu;

  // The merged 1x1 projection (groups 1), or null: shortcut_x dense NHWC [batch, shortcut_h,
  // shortcut_w, shortcut_channels] read at shortcut_stride.
  const void* shortcut_x;
  int shortcut_h, shortcut_w, shortcut_channels, shortcut_stride;

  // Outputs, each null when not wanted. grad_weight [out_channels, in_channels / groups, kernel_h,
  // kernel_w] and grad_shortcut_weight [out_channels, shortcut_channels, 1, 1] in the activations'
  // dtype at any strides (logical (N, C, H, W) order); grad_bias fp32 [out_channels].
  void* grad_weight;
  Strides4 grad_weight_strides;
  void* grad_shortcut_weight;
  Strides4 grad_shortcut_weight_strides;
  float* grad_bias;

  // fp32 scratch of wgrad_workspace_floats() elements (the caller allocates it after
  // plan_conv_wgrad()); splits > 0 forces the split count (tests), 0 lets plan_conv_wgrad choose.
  float* workspace;
  int splits;
  TileShapeKind tile;
  // kAuto: kAsyncCopy (3-stage cp.async) where every operand chunk is one aligned 16-byte copy and
  // no ReLU mask is applied, else kRegisters (2 stages, staged in registers). Tests force each.
  Pipeline pipeline;
  int num_sms;  // of the launching device: for the automatic choices
};

// Resolves params.tile, params.splits and params.pipeline (the automatic choices, or checks forced
// ones) and sets the workspace size in floats. nullptr, or why a forced choice cannot run.
const char* plan_conv_wgrad(ConvWgradParams& params, int64_t& workspace_floats);

// Enqueues both launches on `stream`: no host synchronisation, no allocation (graph-capturable).
cudaError_t launch_conv_wgrad(const ConvWgradParams& params, cudaStream_t stream);

// The same schedule on the host (CPU memory everywhere), for tests without a GPU.
void emulate_conv_wgrad(const ConvWgradParams& params);

}  // namespace fused_resblock
