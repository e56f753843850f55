// The training-mode BN ops on the extension, as the torch-free kernels see them: the elementwise
// bn_add_act and the per-channel backward pass that bn_add_act_backward and conv_stats_backward's
// prologue share. Every tensor is dense NHWC (bindings.cpp makes it so); per-channel vectors are
// fp32. channel_ops.cu launches; emulator.cu runs the same schedule on the host.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_bias_act.h"

namespace fused_resblock {

// out = relu?(BN(y) + R'), R' = BN_res(residual) mapped, or the mapped residual, or nothing:
// R'[n, c, h, w] = residual'[n, c - res_offset, h * res_stride, w * res_stride] inside its channels.
struct BnAddActParams {
  DType dtype;
  const void* y;  // [batch, height, width, channels]
  void* out;      // the same shape
  int batch, height, width, channels;
  const float* mean;
  const float* invstd;
  const float* weight;  // null: 1
  const float* bias;    // null: 0
  const void* residual;  // null, or [batch, res_h, res_w, res_channels]
  int res_h, res_w, res_channels, res_stride, res_offset;
  const float* res_mean;  // null: the residual is added as it is
  const float* res_invstd;
  const float* res_weight;
  const float* res_bias;
  bool relu;
};

cudaError_t launch_bn_add_act(const BnAddActParams& params, cudaStream_t stream);
void emulate_bn_add_act(const BnAddActParams& params);

// One backward pass over a tensor T (dense NHWC [batch, t_h, t_w, t_channels]) of an op that read
// T per channel: g, T's share of the output gradient, is
//   grad[n, h / stride, w / stride, c + offset] where h and w are multiples of stride (else 0),
// zero where the ReLU ended the forward: where `mask` (the forward's output, grad's layout) is <= 0,
// or, with prologue_mask, where the prologue's output relu(fma((t - mean) * invstd, weight, bias)),
// rounded to the dtype, is 0 (conv_stats_backward recomputes it rather than saving it). Then
//   g += fold_shift[c] + fold_slope[c] * (t - mean[c])   (conv_stats_backward: the batch statistics'
//                                                         gradients folded into y's; each optional)
//   grad_t = g * weight * invstd   (T's BN; invstd null: grad_t = g)
// and per channel S1 = sum g, S2 = sum g * (t - mean) (mean null: 0), which the finalize turns into
//   grad_mean = -weight * invstd * S1, grad_invstd = weight * S2, grad_weight = invstd * S2, grad_bias = S1.
struct ChannelBackwardParams {
  DType dtype;
  const void* grad;  // [batch, out_h, out_w, out_channels]
  const void* mask;  // null, or the forward's output in grad's layout
  int out_h, out_w, out_channels;
  const void* t;
  int batch, t_h, t_w, t_channels, stride, offset;
  const float* mean;    // T's BN's (or the statistics' for the fold), or null
  const float* invstd;  // T's BN, or null: grad_t = g
  const float* weight;  // null: 1
  const float* fold_shift;  // each null or fp32 [t_channels]
  const float* fold_slope;
  bool prologue_mask;   // conv_stats_backward's ReLU mask, recomputed: needs mean and prologue_bias' BN
  const float* prologue_bias;  // null: 0
  void* grad_t;      // T's layout, or null
  float* partials;   // channel_backward_partial_floats() of scratch, or null (no sums wanted)
  float* grad_mean;  // each fp32 [t_channels], or null
  float* grad_invstd;
  float* grad_weight;
  float* grad_bias;
};

// The partial sums' floats: 2 per (row block, channel).
int64_t channel_backward_partial_floats(const ChannelBackwardParams& params);

cudaError_t launch_channel_backward(const ChannelBackwardParams& params, cudaStream_t stream);
void emulate_channel_backward(const ChannelBackwardParams& params);

}  // namespace fused_resblock
