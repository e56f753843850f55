// Host emulation of conv_bias_act_kernel, so CI can test its index math
// without a GPU.
//
// It runs the kernel's own pieces on the CPU, in the kernel's order, block by
// block: the operand gathers and shared-memory stores of every thread
// (TileLoader), the two-stage K loop over the convolution and the merged
// projection, and the epilogue (store_output_chunk) for every 8-channel chunk
// of the block tile -- the set the kernel's warp/lane split covers exactly.
// Only the tensor-core product is replaced: a scalar fp32 product over the
// same shared-memory tiles. Threads run one after another, so it cannot find
// a missing barrier; shared memory is poisoned with NaN per block, so a tile
// element that no thread stores turns the output NaN.
#include <algorithm>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "epilogue.cuh"
#include "tile_loader.cuh"
#include "tile_shape.cuh"

namespace fused_resblock {
namespace {

template <typename T>
constexpr uint16_t kNaNBits = 0;
template <>
constexpr uint16_t kNaNBits<__half> = 0x7e00;
template <>
constexpr uint16_t kNaNBits<__nv_bfloat16> = 0x7fc0;

// acc[r][c] += sum_k A[r][k] * B[c][k] over one K tile, as the warps' MMAs do.
template <typename T, class Tile>
void multiply_tile(const uint16_t* a_tile, const uint16_t* b_tile, std::vector<float>& acc) {
  std::vector<float> a(Tile::kBlockM * kBlockK), b(Tile::kBlockN * kBlockK);
  for (int r = 0; r < Tile::kBlockM; ++r) {
    for (int k = 0; k < kBlockK; ++k) a[r * kBlockK + k] = Numeric<T>::to_float(a_tile[r * kSmemPitch + k]);
  }
  for (int c = 0; c < Tile::kBlockN; ++c) {
    for (int k = 0; k < kBlockK; ++k) b[c * kBlockK + k] = Numeric<T>::to_float(b_tile[c * kSmemPitch + k]);
  }
  for (int r = 0; r < Tile::kBlockM; ++r) {
    for (int c = 0; c < Tile::kBlockN; ++c) {
      float sum = acc[r * Tile::kBlockN + c];
      for (int k = 0; k < kBlockK; ++k) sum += a[r * kBlockK + k] * b[c * kBlockK + k];
      acc[r * Tile::kBlockN + c] = sum;
    }
  }
}

template <typename T, class Tile>
void emulate_blocks(const ConvBiasActParams& p, const ConvGemm& g) {
  std::vector<uint16_t> a_tiles(2 * Tile::kATileElems), b_tiles(2 * Tile::kBTileElems);
  std::vector<float> acc(Tile::kBlockM * Tile::kBlockN);
  std::vector<TileLoader<Tile>> loaders;
  loaders.reserve(Tile::kThreads);

  for (int group = 0; group < p.groups; ++group) {
    for (int n0 = 0; n0 < g.out_group_channels; n0 += Tile::kBlockN) {
      for (int m0 = 0; m0 < g.m; m0 += Tile::kBlockM) {
        std::fill(a_tiles.begin(), a_tiles.end(), kNaNBits<T>);
        std::fill(b_tiles.begin(), b_tiles.end(), kNaNBits<T>);
        std::fill(acc.begin(), acc.end(), 0.f);
        loaders.clear();
        for (int thread = 0; thread < Tile::kThreads; ++thread) loaders.emplace_back(p, g, m0, n0, group, thread);

        if (g.k_tiles > 0) {
          for (auto& loader : loaders) {
            loader.load(p, g, 0);
            loader.store(a_tiles.data(), b_tiles.data());
          }
        }
        for (int k_tile = 0; k_tile < g.k_tiles; ++k_tile) {
          const int stage = k_tile & 1;
          const bool has_next = k_tile + 1 < g.k_tiles;
          if (has_next) {
            for (auto& loader : loaders) loader.load(p, g, k_tile + 1);
          }
          multiply_tile<T, Tile>(a_tiles.data() + stage * Tile::kATileElems, b_tiles.data() + stage * Tile::kBTileElems,
                                 acc);
          if (has_next) {
            for (auto& loader : loaders) {
              loader.store(a_tiles.data() + (stage ^ 1) * Tile::kATileElems,
                           b_tiles.data() + (stage ^ 1) * Tile::kBTileElems);
            }
          }
        }

        for (int r = 0; r < Tile::kBlockM && m0 + r < g.m; ++r) {
          for (int c = 0; c < Tile::kBlockN && n0 + c < g.out_group_channels; c += kVector) {
            float value[kVector];
            for (int e = 0; e < kVector; ++e) value[e] = acc[r * Tile::kBlockN + c + e];
            const int count = std::min(kVector, g.out_group_channels - (n0 + c));
            store_output_chunk<T>(p, g, value, m0 + r, group * g.out_group_channels + n0 + c, count);
          }
        }
      }
    }
  }
}

template <typename T>
void emulate_typed(const ConvBiasActParams& p, const ConvGemm& g) {
  switch (choose_tile_shape(p, g)) {
    case TileShapeKind::kNarrow:
      return emulate_blocks<T, NarrowTile>(p, g);
    case TileShapeKind::kMedium:
      return emulate_blocks<T, MediumTile>(p, g);
    case TileShapeKind::kLarge:
      return emulate_blocks<T, LargeTile>(p, g);
    case TileShapeKind::kAuto:
      return;
  }
}

}  // namespace

void emulate_conv_bias_act(const ConvBiasActParams& p) {
  const ConvGemm g = make_conv_gemm(p);
  if (g.m == 0 || p.out_channels == 0) return;
  if (p.dtype == DType::kFloat16) {
    emulate_typed<__half>(p, g);
  } else {
    emulate_typed<__nv_bfloat16>(p, g);
  }
}

}  // namespace fused_resblock
