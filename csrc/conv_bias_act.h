// The eval-mode fused convolution, as the torch-free kernels see it.
//
//   out = act(conv(x, weight) + bias + conv1x1(shortcut_x, shortcut_weight) + R)
//
// with R the mapped residual (see fused_resblock/backends/reference.py, the
// contract). bindings.cpp checks and prepares the tensors and fills
// ConvBiasActParams; conv_bias_act.cu launches the kernel. Nothing here
// includes a torch header, so the kernels compile in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fused_resblock {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Block tile of the implicit GEMM (rows: output pixels x columns: output
// channels of one group). kAuto lets the launcher pick; tests force each.
enum class TileShapeKind : int { kAuto = 0, kNarrow = 1, kMedium = 2, kLarge = 3 };

// Which kernel and main loop. The WMMA kernel's (any configuration): kRegisters,
// global -> registers -> shared, two stages (any operands); kAsyncCopy, cp.async
// straight into shared memory, kAsyncStages deep (16-byte operands only: every
// K chunk one aligned load). kTmaWgmma: CUTLASS's sm90 implicit GEMM (TMA +
// wgmma), for what tma_wgmma_refusal() accepts. kAuto: kTmaWgmma where it
// applies, else kAsyncCopy where that applies, else kRegisters. kWmma: kAuto
// without kTmaWgmma (what auto runs on GPUs before sm_90: the benchmarks' A/B).
// Tests and benchmarks force each.
enum class Pipeline : int { kAuto = 0, kRegisters = 1, kAsyncCopy = 2, kTmaWgmma = 3, kWmma = 4 };

// Element strides of a 4-D tensor in logical (N, C, H, W) order.
struct Strides4 {
  int64_t n, c, h, w;
};

// conv_stats' workspace has one row of partial statistics per kStatsRowTile output pixels: every
// tile shape's rows per block (conv_stats.cuh asserts it).
constexpr int kStatsRowTile = 128;

struct ConvBiasActParams {
  DType dtype;

  // x: dense NHWC [batch, in_h, in_w, in_channels].
  const void* x;
  int batch, in_h, in_w, in_channels;

  // weight: dense KRSC [out_channels, kernel_h, kernel_w, in_channels / groups]
  // (a channels_last conv weight).
  const void* weight;
  int out_channels, kernel_h, kernel_w, groups;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;

  // bias: fp32 [out_channels], or null.
  const float* bias;

  // residual, or null: any strides; R[n, c, h, w] = residual[n, c - residual_offset,
  // h * residual_stride, w * residual_stride] for 0 <= c - residual_offset < residual_channels.
  const void* residual;
  Strides4 residual_strides;
  int residual_channels, residual_stride, residual_offset;

  // Merged 1x1 projection, or null: shortcut_x dense NHWC [batch, shortcut_h,
  // shortcut_w, shortcut_channels] read at shortcut_stride; shortcut_weight
  // dense [out_channels, shortcut_channels].
  const void* shortcut_x;
  const void* shortcut_weight;
  int shortcut_h, shortcut_w, shortcut_channels, shortcut_stride;

  // out: [batch, out_channels, out_h, out_w] at any non-overlapping strides.
  void* out;
  Strides4 out_strides;
  int out_h, out_w;

  bool relu;

  // A convolution's input gradient (dgrad) runs as this kernel, one stride phase at a time
  // (bindings.cpp: conv_dgrad): x is then the output gradient, and grad_mask, when set, zeroes x's
  // elements where it is <= 0 (a ReLU's backward, NaN passing; the same dense NHWC layout as x).
  // pad_h/pad_w and dilation_h/dilation_w may then be negative (taps walk g backwards).
  const void* grad_mask;

  // conv_stats (training mode) runs as this kernel too (bindings.cpp: conv_stats), with relu false,
  // no residual and no projection:
  // * the prologue, when in_mean is set: x's elements load as relu?((x - in_mean[c]) * in_invstd[c]
  //   * in_weight[c] + in_bias[c]) (fp32 [in_channels] each; in_weight/in_bias may be null: 1 and 0),
  //   rounded to the dtype, the padding still zero (the previous layer's BN and ReLU, applied as the
  //   conv reads its input: the register main loop);
  // * the statistics epilogue, when stats_partials is set: each block's (mean, M2) of its stored
  //   outputs per channel into stats_partials [ceil(m / kStatsRowTile)][out_channels][2] fp32, which
  //   launch_conv_stats_finalize() turns into the batch mean and variance (conv_stats.cuh).
  const float* in_mean;
  const float* in_invstd;
  const float* in_weight;
  const float* in_bias;
  bool in_relu;
  float* stats_partials;

  TileShapeKind tile;
  Pipeline pipeline;
  int num_sms;             // of the launching device: for kAuto's choice
  int compute_capability;  // of the launching device, major * 10 + minor (90: Hopper)
  bool sm90a_image;        // the launching device loads this build's sm_90a image (sm90a_image_loaded())
};

// Enqueues the fused convolution on `stream`. No host synchronisation and no
// allocation, so it can be captured in a CUDA graph. Returns the launch error.
cudaError_t launch_conv_bias_act(const ConvBiasActParams& params, cudaStream_t stream);

// nullptr when the kTmaWgmma kernel (conv_bias_act_sm90.cu) can run `params`,
// else why not, in words (also when the build had no CUTLASS headers).
const char* tma_wgmma_refusal(const ConvBiasActParams& params);

// Launches the kTmaWgmma kernel; cudaErrorNotSupported where it cannot run (tma_wgmma_refusal,
// or CUTLASS's own can_implement: its TMA im2col limits), else the launch's error.
cudaError_t launch_conv_bias_act_tma_wgmma(const ConvBiasActParams& params, cudaStream_t stream);

// Whether the current device runs this build's sm_90a image (wgmma needs the "a" target: compiled
// for plain sm_90, CUTLASS's kernel body is a printf that writes nothing). A host-side attribute
// query, no launch and no synchronisation: fine during graph capture.
bool sm90a_image_loaded();

// "CUTLASS x.y.z" when the kTmaWgmma kernel was built, else "".
const char* tma_wgmma_version();

// Runs the kernel's schedule on the host instead (every pointer in `params` is
// CPU memory): its operand gathers, shared-memory tiles and epilogue, with a
// scalar product in place of the tensor cores. For tests without a GPU.
void emulate_conv_bias_act(const ConvBiasActParams& params);

// conv_stats' second launch: mean[c] and var[c] (biased; fp32 [out_channels]) from the partials the
// forward kernel wrote for `params` (its m = batch * out_h * out_w rows); NaN for an empty batch.
cudaError_t launch_conv_stats_finalize(const ConvBiasActParams& params, float* mean, float* var, cudaStream_t stream);
void emulate_conv_stats_finalize(const ConvBiasActParams& params, float* mean, float* var);

// cudaSuccess when the current device can load the kernels (an image for its
// architecture was compiled in), else the error the launch would give.
cudaError_t probe_conv_bias_act_kernels();

// The architectures the kernels were compiled for, as nvcc's __CUDA_ARCH_LIST__
// ("800,900"). It cannot tell sm_90 from sm_90a: nvcc hides that from host code.
const char* conv_bias_act_arch_list();

}  // namespace fused_resblock
