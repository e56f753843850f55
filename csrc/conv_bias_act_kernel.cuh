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
// convolution's KRSC depth, then over the merged shortcut's channels, in one
// of two pipelines (Pipeline in conv_bias_act.h), one barrier per K tile each:
//   kRegisters: a register-staged double buffer -- tile k+1's global loads are
//     in flight while the warps multiply tile k from shared memory;
//   kAsyncCopy: cp.async copies kAsyncStages deep -- tiles k+1 and k+2 land in
//     shared memory while tile k is multiplied, with no register staging.
#pragma once

#include <cstdint>
#include <type_traits>

#include <mma.h>

#include "async_copy.cuh"
#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "conv_stats.cuh"
#include "epilogue.cuh"
#include "numeric.cuh"
#include "tile_loader.cuh"
#include "tile_shape.cuh"

namespace fused_resblock {

// The accumulators of one warp: its kFragmentsM x kFragmentsN 16x16 fp32 fragments.
template <class Tile>
using WarpAccumulators =
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFragment, kFragment, kFragment, float>[Tile::kFragmentsM]
                                                                                            [Tile::kFragmentsN];

// acc += this warp's part of A_tile x B_tile^T over one K tile, on the tensor cores; the tiles lie
// in shared memory as `Tiles` says (tile_shape.cuh: K fastest, or rows fastest).
template <typename T, class Tile, class Tiles>
__device__ __forceinline__ void multiply_tile(const uint16_t* a_stage, const uint16_t* b_stage, int warp_m,
                                              int warp_n, WarpAccumulators<Tile>& acc) {
  namespace wmma = nvcuda::wmma;
  using LayoutA = std::conditional_t<Tiles::kKFast, wmma::row_major, wmma::col_major>;
  using LayoutB = std::conditional_t<Tiles::kKFast, wmma::col_major, wmma::row_major>;
  using FragmentA = wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, LayoutA>;
  using FragmentB = wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, LayoutB>;
  const T* a_tile = reinterpret_cast<const T*>(a_stage);
  const T* b_tile = reinterpret_cast<const T*>(b_stage);
#pragma unroll
  for (int kk = 0; kk < kBlockK; kk += kFragment) {
    FragmentA a[Tile::kFragmentsM];
    FragmentB b[Tile::kFragmentsN];
#pragma unroll
    for (int i = 0; i < Tile::kFragmentsM; ++i) {
      const int row = warp_m * Tile::kWarpM + i * kFragment;
      wmma::load_matrix_sync(a[i], a_tile + Tiles::a_index(row, kk), Tiles::kALdm);
    }
#pragma unroll
    for (int j = 0; j < Tile::kFragmentsN; ++j) {
      const int col = warp_n * Tile::kWarpN + j * kFragment;
      wmma::load_matrix_sync(b[j], b_tile + Tiles::b_index(col, kk), Tiles::kBLdm);
    }
#pragma unroll
    for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
      for (int j = 0; j < Tile::kFragmentsN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
}

// kRegisters: two shared-memory stages, the next tile staged in registers. Any loader with
// load(p, g, k_tile), store(a_tile, b_tile) and observe<T>(b_tile) (shown each stage before it is
// multiplied): the forward's TileLoader, wgrad's WgradLoader.
template <typename T, class Tile, class Tiles, class Params, class Gemm, class Loader>
__device__ __forceinline__ void mainloop_registers(const Params& p, const Gemm& g, Loader& loader, int k_tiles,
                                                   uint16_t* a_tiles, uint16_t* b_tiles, int warp_m, int warp_n,
                                                   WarpAccumulators<Tile>& acc) {
  if (k_tiles > 0) {
    loader.load(p, g, 0);
    loader.store(a_tiles, b_tiles);
  }
  __syncthreads();
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    const int stage = k_tile & 1;
    const bool has_next = k_tile + 1 < k_tiles;
    if (has_next) loader.load(p, g, k_tile + 1);  // in flight during the MMAs below
    loader.template observe<T>(b_tiles + stage * Tiles::kBElems);
    multiply_tile<T, Tile, Tiles>(a_tiles + stage * Tiles::kAElems, b_tiles + stage * Tiles::kBElems, warp_m, warp_n,
                                  acc);
    // The other stage was last read in iteration k_tile - 1, which every warp
    // finished before the barrier that ended it.
    if (has_next) {
      loader.store(a_tiles + (stage ^ 1) * Tiles::kAElems, b_tiles + (stage ^ 1) * Tiles::kBElems);
    }
    __syncthreads();  // stage ^ 1 is written; stage is free again
  }
}

// kAsyncCopy: kAsyncStages shared-memory stages filled by cp.async (loader.copy_async(p, g, k_tile,
// a_tile, b_tile) issues a tile's copies; plain shared-memory stores there are fine too: each stage
// is written only after the barrier that ended its last reads, and read only after a later one).
template <typename T, class Tile, class Tiles, class Params, class Gemm, class Loader>
__device__ __forceinline__ void mainloop_async(const Params& p, const Gemm& g, Loader& loader, int k_tiles,
                                               uint16_t* a_tiles, uint16_t* b_tiles, int warp_m, int warp_n,
                                               WarpAccumulators<Tile>& acc) {
  constexpr int kStages = kAsyncStages;
  // Prologue: tiles 0 .. kStages-2 in flight, one commit group each (empty past the last tile,
  // so the group count -- and the wait below -- is the same for every K length).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) loader.copy_async(p, g, s, a_tiles + s * Tiles::kAElems, b_tiles + s * Tiles::kBElems);
    commit_async_copies();
  }
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    wait_async_copies<kStages - 2>();  // this thread's copies of tile k_tile have landed...
    __syncthreads();  // ...everyone's have, and every warp is done with tile k_tile - 1's stage
    const int next = k_tile + kStages - 1;  // goes into tile k_tile - 1's stage, free since the barrier
    if (next < k_tiles) {
      const int stage = next % kStages;
      loader.copy_async(p, g, next, a_tiles + stage * Tiles::kAElems, b_tiles + stage * Tiles::kBElems);
    }
    commit_async_copies();
    const int stage = k_tile % kStages;
    loader.template observe<T>(b_tiles + stage * Tiles::kBElems);
    multiply_tile<T, Tile, Tiles>(a_tiles + stage * Tiles::kAElems, b_tiles + stage * Tiles::kBElems, warp_m, warp_n,
                                  acc);
  }
  wait_async_copies<0>();  // only empty groups remain; none may write shared memory past here
  __syncthreads();         // every warp is done with the stages before the epilogue reuses them
}

// conv_stats: the block's (mean, M2) per channel from its stats tile (the outputs it stored, in shared
// memory after the warps' scratch tiles) into its row of the workspace (conv_stats.cuh).
template <typename T, class Tile>
__device__ __forceinline__ void store_block_stats(const ConvBiasActParams& p, const ConvGemm& g, unsigned char* smem,
                                                  int m0, int n0, int group) {
  using Parts = StatsParts<T, Tile>;
  static_assert(Tile::kThreads * sizeof(Moments) <= Tile::kEpilogueBytes, "the parts fit in the scratch tiles' bytes");
  const uint16_t* stats_tile = reinterpret_cast<const uint16_t*>(smem + Tile::kEpilogueBytes);
  Moments* const parts = reinterpret_cast<Moments*>(smem);  // [kParts][kBlockN]: part * kBlockN + column = thread
  const int valid_rows = min(Tile::kBlockM, g.m - m0);
  __syncthreads();  // every warp has stored its outputs in the stats tile and finished with its scratch tile
  parts[threadIdx.x] = Parts::part(stats_tile, valid_rows, int(threadIdx.x));
  __syncthreads();
  const int col = int(threadIdx.x);
  if (col < Tile::kBlockN && n0 + col < g.out_group_channels) {
    const Moments total = Parts::block(parts, col);
    const int64_t at = stats_partial_offset(int(blockIdx.x), group * g.out_group_channels + n0 + col, p.out_channels);
    p.stats_partials[at] = total.mean;
    p.stats_partials[at + 1] = total.m2;
  }
}

// grid: (ceil(m / kBlockM), ceil(out_group_channels / kBlockN), groups);
// dynamic shared memory: Tile::smem_bytes(2) for kRegisters, Tile::smem_bytes(kAsyncStages) for kAsyncCopy.
template <typename T, class Tile, Pipeline kPipeline>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocksPerSM)
    conv_bias_act_kernel(const __grid_constant__ ConvBiasActParams p, const __grid_constant__ ConvGemm g) {
  namespace wmma = nvcuda::wmma;
  static_assert(kPipeline == Pipeline::kRegisters || kPipeline == Pipeline::kAsyncCopy, "a concrete pipeline");
  extern __shared__ __align__(128) unsigned char smem[];
  const int stages = kPipeline == Pipeline::kAsyncCopy ? kAsyncStages : 2;
  uint16_t* const a_tiles = reinterpret_cast<uint16_t*>(smem);             // [stages][kBlockM][kSmemPitch]
  uint16_t* const b_tiles = a_tiles + stages * Tile::kATileElems;         // [stages][kBlockN][kSmemPitch]

  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;
  const int warp_m = warp % Tile::kWarpsM;
  const int warp_n = warp / Tile::kWarpsM;
  const int m0 = int(blockIdx.x) * Tile::kBlockM;
  const int n0 = int(blockIdx.y) * Tile::kBlockN;  // output channel within the group
  const int group = int(blockIdx.z);

  WarpAccumulators<Tile> acc;
#pragma unroll
  for (int i = 0; i < Tile::kFragmentsM; ++i) {
#pragma unroll
    for (int j = 0; j < Tile::kFragmentsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // ---- main loop: K tiles of the convolution, then of the merged projection
  TileLoader<Tile> loader(p, g, m0, n0, group, int(threadIdx.x));
  if constexpr (kPipeline == Pipeline::kAsyncCopy) {
    mainloop_async<T, Tile, KFastTiles<Tile>>(p, g, loader, g.k_tiles, a_tiles, b_tiles, warp_m, warp_n, acc);
  } else {
    mainloop_registers<T, Tile, KFastTiles<Tile>>(p, g, loader, g.k_tiles, a_tiles, b_tiles, warp_m, warp_n, acc);
  }

  // ---- epilogue: each warp stages one 16x16 fragment at a time in its own
  // scratch tile (aliasing the main-loop buffers: the barrier above ended all
  // reads of them); lane l then owns row l / 2, columns (l % 2) * 8 .. + 8.
  float* const scratch = reinterpret_cast<float*>(smem) + warp * kFragment * kFragment;
  uint16_t* const stats_tile = p.stats_partials != nullptr
                                   ? reinterpret_cast<uint16_t*>(smem + Tile::kEpilogueBytes)  // [kBlockM][kBlockN]
                                   : nullptr;
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
        uint16_t* const stats_row =
            stats_tile != nullptr ? stats_tile + (m - m0) * Tile::kBlockN + (channel - n0) : nullptr;
        store_output_chunk<T>(p, g, value, m, group * g.out_group_channels + channel, count, stats_row);
      }
      __syncwarp();  // all lanes have read the scratch before the next fragment overwrites it
    }
  }
  if (p.stats_partials != nullptr) store_block_stats<T, Tile>(p, g, smem, m0, n0, group);
}

}  // namespace fused_resblock
