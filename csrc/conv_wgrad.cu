// wgrad on the device: the split-K implicit GEMM (the forward's tensor-core step and register main
// loop over WgradLoader's tiles), then the fixed-order sum of the splits (conv_wgrad.h).
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mma.h>

#include "conv_bias_act_kernel.cuh"
#include "conv_wgrad.cuh"
#include "conv_wgrad.h"
#include "tile_shape.cuh"

namespace fused_resblock {
namespace {

// A split covers at least this many K tiles (256 pixels): fewer would spend more on the
// workspace's traffic than the split gains in parallelism.
constexpr int kMinTilesPerSplit = 8;
constexpr int kReduceThreads = 256;

// grid: (rows_padded / kBlockM, cols_padded / kBlockN, splits * groups); dynamic shared memory
// mainloop_smem_bytes<RowFastTiles<Tile>>(stages). Each block writes its whole padded tile of partial
// sums (zeros past the problem) into the workspace.
template <typename T, class Tile, Pipeline kPipeline>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocksPerSM)
    conv_wgrad_kernel(const __grid_constant__ ConvWgradParams p, const __grid_constant__ WgradGemm w) {
  namespace wmma = nvcuda::wmma;
  using Tiles = RowFastTiles<Tile>;
  static_assert(kPipeline == Pipeline::kRegisters || kPipeline == Pipeline::kAsyncCopy, "a concrete pipeline");
  extern __shared__ __align__(128) unsigned char smem[];
  const int stages = kPipeline == Pipeline::kAsyncCopy ? kAsyncStages : 2;
  uint16_t* const a_tiles = reinterpret_cast<uint16_t*>(smem);  // [stages][kBlockK][kBlockM + 8]
  uint16_t* const b_tiles = a_tiles + stages * Tiles::kAElems;  // [stages][kBlockK][kBlockN + 8]

  const int warp = int(threadIdx.x) / 32;
  const int warp_m = warp % Tile::kWarpsM;
  const int warp_n = warp / Tile::kWarpsM;
  const int row0 = int(blockIdx.x) * Tile::kBlockM;
  const int col0 = int(blockIdx.y) * Tile::kBlockN;
  const int split_group = int(blockIdx.z);
  const int split = split_group / p.groups;
  const int group = split_group - split * p.groups;
  const int first_tile = split * w.tiles_per_split;
  const int k_tiles = max(0, min(w.depth_tiles, first_tile + w.tiles_per_split) - first_tile);

  WarpAccumulators<Tile> acc;
#pragma unroll
  for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kFragmentsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  WgradLoader<Tile> loader(w, row0, col0, group, first_tile * kBlockK, int(threadIdx.x));
  if constexpr (kPipeline == Pipeline::kAsyncCopy) {
    mainloop_async<T, Tile, Tiles>(p, w, loader, k_tiles, a_tiles, b_tiles, warp_m, warp_n, acc);
  } else {
    mainloop_registers<T, Tile, Tiles>(p, w, loader, k_tiles, a_tiles, b_tiles, warp_m, warp_n, acc);
  }

  // The first row tile's blocks: the bias partial of each column, summed over the block in thread order
  // (the main loop's last barrier has freed the shared memory).
  if (w.bias && row0 == 0) {
    float* const sums = reinterpret_cast<float*>(smem);  // [kThreads][kVector]
    loader.write_bias_sums(sums + threadIdx.x * kVector);
    __syncthreads();
    if (int(threadIdx.x) < Tile::kBlockN) {
      p.workspace[wgrad_bias_offset(w, split_group, col0 + int(threadIdx.x))] =
          block_bias_sum<Tile>(sums, int(threadIdx.x));
    }
  }

  // The workspace is padded to whole tiles: every fragment stores unmasked.
#pragma unroll
  for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kFragmentsN; ++j) {
      const int row = row0 + warp_m * Tile::kWarpM + i * kFragment;
      const int col = col0 + warp_n * Tile::kWarpN + j * kFragment;
      wmma::store_matrix_sync(p.workspace + wgrad_workspace_offset(w, split_group, row, col), acc[i][j],
                              unsigned(w.cols_padded), wmma::mem_row_major);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_wgrad_kernel(const __grid_constant__ ConvWgradParams p, const __grid_constant__ WgradGemm w) {
  const int64_t index = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (index < wgrad_outputs(p, w)) reduce_wgrad_element<T>(p, w, index);
}

template <typename T, class Tile, Pipeline kPipeline>
cudaError_t launch_typed_tile(const ConvWgradParams& p, const WgradGemm& w, cudaStream_t stream) {
  constexpr int kSmemBytes =
      mainloop_smem_bytes<RowFastTiles<Tile>>(kPipeline == Pipeline::kAsyncCopy ? kAsyncStages : 2);
  auto* const kernel = conv_wgrad_kernel<T, Tile, kPipeline>;
  if constexpr (kSmemBytes > 48 * 1024) {  // opt in past the default limit (see conv_bias_act.cu)
    const cudaError_t opted_in = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (opted_in != cudaSuccess) return opted_in;
  }
  const dim3 grid(unsigned(w.rows_padded / Tile::kBlockM), unsigned(w.cols_padded / Tile::kBlockN),
                  unsigned(p.splits * p.groups));
  kernel<<<grid, Tile::kThreads, kSmemBytes, stream>>>(p, w);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const int64_t elements = wgrad_outputs(p, w);
  reduce_wgrad_kernel<T><<<unsigned((elements + kReduceThreads - 1) / kReduceThreads), kReduceThreads, 0, stream>>>(
      p, w);
  return cudaGetLastError();
}

template <typename T, class Tile>
cudaError_t launch_pipeline(const ConvWgradParams& p, const WgradGemm& w, cudaStream_t stream) {
  return p.pipeline == Pipeline::kAsyncCopy ? launch_typed_tile<T, Tile, Pipeline::kAsyncCopy>(p, w, stream)
                                            : launch_typed_tile<T, Tile, Pipeline::kRegisters>(p, w, stream);
}

template <typename T>
cudaError_t launch_typed(const ConvWgradParams& p, const WgradGemm& w, cudaStream_t stream) {
  // kAuto never gets here: plan_conv_wgrad resolves it
  return with_tile_shape(p.tile, cudaErrorInvalidValue,
                         [&](auto tile) { return launch_pipeline<T, decltype(tile)>(p, w, stream); });
}

}  // namespace

const char* plan_conv_wgrad(ConvWgradParams& p, int64_t& workspace_floats) {
  const int out_group_channels = p.out_channels / p.groups;
  if (p.tile == TileShapeKind::kAuto) {  // the columns are the group's output channels
    p.tile = out_group_channels <= NarrowTile::kBlockN  ? TileShapeKind::kNarrow
             : out_group_channels <= MediumTile::kBlockN ? TileShapeKind::kMedium
                                                          : TileShapeKind::kLarge;
  }
  const int forced = p.splits;
  p.splits = 1;
  const WgradGemm unsplit = make_wgrad_gemm(p);
  const int max_splits = std::max(1, 65535 / p.groups);  // grid axis z
  if (forced > max_splits) return "the split count exceeds the grid's limit of 65535 / groups";
  int splits = forced;
  if (splits <= 0) {  // enough blocks for two waves, each split at least kMinTilesPerSplit deep
    const int64_t blocks = int64_t(unsplit.rows_padded / unsplit.block_m) * (unsplit.cols_padded / unsplit.block_n) *
                           p.groups;
    const int64_t wanted = (2LL * std::max(p.num_sms, 1) + blocks - 1) / std::max<int64_t>(blocks, 1);
    const int64_t deepest = std::max(1, unsplit.depth_tiles / kMinTilesPerSplit);
    splits = int(std::min<int64_t>({wanted, deepest, int64_t(max_splits)}));
  }
  // No empty split: as many as the tiles per split need.
  const int tiles_per_split = ceil_div(std::max(unsplit.depth_tiles, 1), std::max(splits, 1));
  p.splits = std::max(1, ceil_div(unsplit.depth_tiles, tiles_per_split));
  const WgradGemm w = make_wgrad_gemm(p);
  workspace_floats = w.bias_offset + (w.bias ? int64_t(p.splits) * p.groups * w.cols_padded : 0);
  if (p.pipeline == Pipeline::kAuto) p.pipeline = w.async_copy ? Pipeline::kAsyncCopy : Pipeline::kRegisters;
  if (p.pipeline == Pipeline::kAsyncCopy && !w.async_copy) {
    return "pipeline 2 (cp.async) moves 16-byte chunks only: it needs channel counts that are multiples of 8, "
           "16-byte-aligned operands and no grad_mask (the mask is applied in registers)";
  }
  return p.pipeline == Pipeline::kRegisters || p.pipeline == Pipeline::kAsyncCopy
             ? nullptr
             : "pipeline must be 0 (auto), 1 (registers) or 2 (cp.async)";
}

cudaError_t launch_conv_wgrad(const ConvWgradParams& p, cudaStream_t stream) {
  const WgradGemm w = make_wgrad_gemm(p);
  if (wgrad_outputs(p, w) == 0) return cudaSuccess;  // nothing wanted, or nothing to write
  return p.dtype == DType::kFloat16 ? launch_typed<__half>(p, w, stream) : launch_typed<__nv_bfloat16>(p, w, stream);
}

}  // namespace fused_resblock
