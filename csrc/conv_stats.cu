// conv_stats' finalize launch: the row tiles' (mean, M2) partials merged into each channel's batch
// mean and biased variance, in a fixed order (conv_stats.cuh).
#include "conv_bias_act.h"
#include "conv_stats.cuh"

namespace fused_resblock {
namespace {

// grid: out_channels blocks. Thread t merges row tiles t, t + kStatsFinalizeThreads, ... in order,
// then the threads' moments merge in a fixed tree (the host emulator runs the same tree).
__global__ void __launch_bounds__(kStatsFinalizeThreads)
    conv_stats_finalize_kernel(const float* partials, int rows, int out_channels, float* mean, float* var) {
  __shared__ Moments moments[kStatsFinalizeThreads];
  const int channel = int(blockIdx.x);
  const int thread = int(threadIdx.x);
  moments[thread] = finalize_thread_moments(partials, rows, out_channels, channel, thread);
  __syncthreads();
  for (int half = kStatsFinalizeThreads / 2; half > 0; half /= 2) {
    if (thread < half) moments[thread] = merge_moments(moments[thread], moments[thread + half]);
    __syncthreads();
  }
  if (thread == 0) store_channel_stats(moments[0], channel, mean, var);
}

}  // namespace

cudaError_t launch_conv_stats_finalize(const ConvBiasActParams& p, float* mean, float* var, cudaStream_t stream) {
  if (p.out_channels == 0) return cudaSuccess;
  const int rows = p.batch * p.out_h * p.out_w;
  conv_stats_finalize_kernel<<<unsigned(p.out_channels), kStatsFinalizeThreads, 0, stream>>>(
      p.stats_partials, rows, p.out_channels, mean, var);
  return cudaGetLastError();
}

}  // namespace fused_resblock
