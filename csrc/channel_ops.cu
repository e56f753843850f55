// The training-mode BN ops on the device (channel_ops.h): bn_add_act's elementwise launch, and the
// per-channel backward pass with its fixed-order finalize.
#include <algorithm>

#include "channel_ops.cuh"
#include "channel_ops.h"

namespace fused_resblock {
namespace {

template <bool kVectorized>
__global__ void __launch_bounds__(kElementwiseThreads) bn_add_act_kernel(const __grid_constant__ BnAddActParams p) {
  const int64_t chunks = bn_add_act_chunks(p);
  const int64_t step = int64_t(gridDim.x) * kElementwiseThreads;
  for (int64_t chunk = int64_t(blockIdx.x) * kElementwiseThreads + threadIdx.x; chunk < chunks; chunk += step) {
    bn_add_act_chunk<kVectorized>(p, chunk);
  }
}

// grid: (ceil(t_channels / kChannelLanes), row blocks); thread (lane, row lane) = threadIdx (x, y).
__global__ void __launch_bounds__(kChannelThreads)
    channel_backward_kernel(const __grid_constant__ ChannelBackwardParams p) {
  __shared__ float2 sums[kChannelThreads];
  const int lane = int(threadIdx.x), row_lane = int(threadIdx.y);
  const int c = int(blockIdx.x) * kChannelLanes + lane;
  const int row_blocks = channel_backward_row_blocks(p);
  for (int row_block = int(blockIdx.y); row_block < row_blocks; row_block += int(gridDim.y)) {  // grid y <= 65535
    const float2 mine = channel_backward_thread(p, row_block, c, row_lane);
    if (p.partials == nullptr) continue;
    sums[row_lane * kChannelLanes + lane] = mine;
    __syncthreads();
    if (row_lane == 0 && c < p.t_channels) {
      const float2 total = channel_backward_block_sum(sums, lane);
      const int64_t at = (int64_t(row_block) * p.t_channels + c) * 2;
      p.partials[at] = total.x;
      p.partials[at + 1] = total.y;
    }
    __syncthreads();  // the sums are read before the next row block's overwrite them
  }
}

// grid: t_channels blocks of kFinalizeThreads.
__global__ void __launch_bounds__(kFinalizeThreads)
    channel_finalize_kernel(const __grid_constant__ ChannelBackwardParams p) {
  __shared__ float2 sums[kFinalizeThreads];
  const int c = int(blockIdx.x), thread = int(threadIdx.x);
  sums[thread] = channel_finalize_thread(p, c, thread);
  __syncthreads();
  for (int half = kFinalizeThreads / 2; half > 0; half /= 2) {
    if (thread < half) {
      sums[thread].x += sums[thread + half].x;
      sums[thread].y += sums[thread + half].y;
    }
    __syncthreads();
  }
  if (thread == 0) store_channel_grads(p, c, sums[0]);
}

}  // namespace

cudaError_t launch_bn_add_act(const BnAddActParams& p, cudaStream_t stream) {
  const int64_t chunks = bn_add_act_chunks(p);
  if (chunks == 0) return cudaSuccess;
  // enough blocks to fill any GPU several times over; the grid-stride loop takes the rest
  const unsigned blocks = unsigned(std::min<int64_t>((chunks + kElementwiseThreads - 1) / kElementwiseThreads, 65536));
  if (bn_add_act_vectorized(p)) {
    bn_add_act_kernel<true><<<blocks, kElementwiseThreads, 0, stream>>>(p);
  } else {
    bn_add_act_kernel<false><<<blocks, kElementwiseThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

int64_t channel_backward_partial_floats(const ChannelBackwardParams& p) {
  return int64_t(channel_backward_row_blocks(p)) * p.t_channels * 2;
}

cudaError_t launch_channel_backward(const ChannelBackwardParams& p, cudaStream_t stream) {
  if (p.t_channels == 0) return cudaSuccess;
  const int row_blocks = channel_backward_row_blocks(p);
  if (row_blocks > 0) {
    const dim3 grid(unsigned((p.t_channels + kChannelLanes - 1) / kChannelLanes), unsigned(std::min(row_blocks, 65535)));
    channel_backward_kernel<<<grid, dim3(kChannelLanes, kRowLanes), 0, stream>>>(p);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (p.partials == nullptr) return cudaSuccess;
  channel_finalize_kernel<<<unsigned(p.t_channels), kFinalizeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fused_resblock
