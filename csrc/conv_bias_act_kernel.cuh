// The fused eval-mode convolution kernel: implicit GEMM on the tensor cores.
//
// Why hand-written WMMA rather than CUTLASS: the kernel was written without a
// GPU to test on, so it favours a design that is correct by construction over
// peak speed. Every operand element goes through one masked gather
// (tile_loader.cuh) into shared memory, the tensor cores see only whole,
// zero-padded 16x16x16 tiles (nvcuda::wmma: no register-layout assumptions,
// no ldmatrix/swizzle arithmetic), and the epilogue reads the accumulators
// back through shared memory with plain (row, column) indices. The two pieces
// CUTLASS does not offer ready-made -- the merged projection as a second K
// segment into the same accumulators, and the mapped (strided, channel-offset)
// residual -- are then a few obvious lines. CUTLASS 3.x / wgmma is the path to
// peak Hopper throughput once a GPU can verify it (see csrc/README.md).
//
// One thread block computes a kBlockM x kBlockN tile of one group's output
// (rows: output pixels, columns: output channels). Its K loop runs over the
// convolution's KRSC depth, then over the merged shortcut's channels, with a
// register-staged double buffer: tile k+1's global loads are in flight while
// the warps multiply tile k from shared memory, and one barrier per K tile
// separates the buffers.
#pragma once

#include <cstdint>

#include <mma.h>

#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "epilogue.cuh"
#include "numeric.cuh"
#include "tile_loader.cuh"
#include "tile_shape.cuh"

namespace fused_resblock {

// grid: (ceil(m / kBlockM), ceil(out_group_channels / kBlockN), groups)
template <typename T, class Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocksPerSM)
    conv_bias_act_kernel(const __grid_constant__ ConvBiasActParams p, const __grid_constant__ ConvGemm g) {
  namespace wmma = nvcuda::wmma;
  using FragmentA = wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major>;
  using FragmentB = wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::col_major>;
  using Accumulator = wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float>;

  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  uint16_t* const a_tiles = reinterpret_cast<uint16_t*>(smem);  // [2][kBlockM][kSmemPitch]
  uint16_t* const b_tiles = a_tiles + 2 * Tile::kATileElems;    // [2][kBlockN][kSmemPitch]

  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;
  const int warp_m = warp % Tile::kWarpsM;
  const int warp_n = warp / Tile::kWarpsM;
  const int m0 = int(blockIdx.x) * Tile::kBlockM;
  const int n0 = int(blockIdx.y) * Tile::kBlockN;  // output channel within the group
  const int group = int(blockIdx.z);

  Accumulator acc[Tile::kFragmentsM][Tile::kFragmentsN];
#pragma unroll
  for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kFragmentsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // ---- main loop: K tiles of the convolution, then of the merged projection
  TileLoader<Tile> loader(p, g, m0, n0, group, int(threadIdx.x));
  if (g.k_tiles > 0) {
    loader.load(p, g, 0);
    loader.store(a_tiles, b_tiles);
  }
  __syncthreads();

  for (int k_tile = 0; k_tile < g.k_tiles; ++k_tile) {
    const int stage = k_tile & 1;
    const bool has_next = k_tile + 1 < g.k_tiles;
    if (has_next) loader.load(p, g, k_tile + 1);  // in flight during the MMAs below

    const T* a_tile = reinterpret_cast<const T*>(a_tiles + stage * Tile::kATileElems);
    const T* b_tile = reinterpret_cast<const T*>(b_tiles + stage * Tile::kBTileElems);
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kFragment) {
      FragmentA a[Tile::kFragmentsM];
      FragmentB b[Tile::kFragmentsN];
#pragma unroll
      for (int i = 0; i < Tile::kFragmentsM; ++i) {
        const int row = warp_m * Tile::kWarpM + i * kFragment;
        wmma::load_matrix_sync(a[i], a_tile + row * kSmemPitch + kk, kSmemPitch);
      }
#pragma unroll
      for (int j = 0; j < Tile::kFragmentsN; ++j) {
        const int col = warp_n * Tile::kWarpN + j * kFragment;
        wmma::load_matrix_sync(b[j], b_tile + col * kSmemPitch + kk, kSmemPitch);
      }
#pragma unroll
      for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
        for (int j = 0; j < Tile::kFragmentsN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }

    // The other stage was last read in iteration k_tile - 1, which every warp
    // finished before the barrier that ended it.
    if (has_next) {
      loader.store(a_tiles + (stage ^ 1) * Tile::kATileElems, b_tiles + (stage ^ 1) * Tile::kBTileElems);
    }
    __syncthreads();  // stage ^ 1 is written; stage is free again
  }

  // ---- epilogue: each warp stages one 16x16 fragment at a time in its own
  // scratch tile (aliasing the main-loop buffers: the barrier above ended all
  // reads of them); lane l then owns row l / 2, columns (l % 2) * 8 .. + 8.
  float* const scratch = reinterpret_cast<float*>(smem) + warp * kFragment * kFragment;
  const int lane_row = lane / 2;
  const int lane_col = (lane % 2) * kVector;
#pragma unroll
  for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kFragmentsN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], kFragment, wmma::mem_row_major);
      __syncwarp();
      const int m = m0 + warp_m * Tile::kWarpM + i * kFragment + lane_row;
      const int channel = n0 + warp_n * Tile::kWarpN + j * kFragment + lane_col;  // within the group
      if (m < g.m && channel < g.out_group_channels) {
        float value[kVector];
#pragma unroll
        for (int e = 0; e < kVector; ++e) value[e] = scratch[lane_row * kFragment + lane_col + e];
        const int count = min(kVector, g.out_group_channels - channel);
        store_output_chunk<T>(p, g, value, m, group * g.out_group_channels + channel, count);
      }
      __syncwarp();  // all lanes have read the scratch before the next fragment overwrites it
    }
  }
}

}  // namespace fused_resblock
