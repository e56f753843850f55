// Block tile shapes of the implicit GEMM and the automatic choice among them.
//
// A block computes kBlockM output pixels x kBlockN output channels of one
// group with 8 warps, each a kWarpM x kWarpN grid of 16x16 WMMA fragments.
// Shared memory holds two stages of the A (pixels x K) and B (channels x K)
// tiles, rows padded by 16 bytes; after the main loop the same bytes hold one
// 16x16 fp32 scratch tile per warp for the epilogue.
#pragma once

#include <cstdint>

#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "numeric.cuh"

namespace fused_resblock {

// Shared-memory row pitch in elements: the 16-byte pad staggers banks and keeps
// every 16-row fragment start 32-byte aligned, as WMMA requires.
constexpr int kSmemPitch = kBlockK + 8;

constexpr int kFragment = 16;  // WMMA m16n16k16

// Shared-memory stages of the cp.async pipeline: two K tiles in flight while a third is multiplied.
constexpr int kAsyncStages = 3;

template <int BlockM, int BlockN, int WarpsM, int WarpsN, int MinBlocksPerSM>
struct TileShape {
  static constexpr int kMinBlocksPerSM = MinBlocksPerSM;  // __launch_bounds__: caps registers per thread
  static constexpr int kBlockM = BlockM;
  static constexpr int kBlockN = BlockN;
  static constexpr int kWarpsM = WarpsM;
  static constexpr int kWarpsN = WarpsN;
  static constexpr int kWarps = WarpsM * WarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpM = BlockM / WarpsM;  // one warp's sub-tile
  static constexpr int kWarpN = BlockN / WarpsN;
  static constexpr int kFragmentsM = kWarpM / kFragment;
  static constexpr int kFragmentsN = kWarpN / kFragment;
  static_assert(kWarpM % kFragment == 0 && kWarpN % kFragment == 0, "warp tiles are whole fragments");
  static_assert(kBlockK % kFragment == 0, "K tiles are whole fragments");

  // Shared memory: `stages` A and B tiles for the main loop; afterwards the same
  // bytes hold one 16x16 fp32 scratch tile per warp for the epilogue.
  static constexpr int kATileElems = kBlockM * kSmemPitch;
  static constexpr int kBTileElems = kBlockN * kSmemPitch;
  static constexpr int kEpilogueBytes = kWarps * kFragment * kFragment * int(sizeof(float));
  // conv_stats: the block's stored outputs, [kBlockM][kBlockN] 16-bit, after the scratch tiles.
  static constexpr int kStatsTileBytes = kBlockM * kBlockN * int(sizeof(uint16_t));
  static constexpr int smem_bytes(int stages) {
    const int mainloop = stages * (kATileElems + kBTileElems) * int(sizeof(uint16_t));
    return mainloop > kEpilogueBytes ? mainloop : kEpilogueBytes;
  }
  static_assert(smem_bytes(2) <= 48 * 1024, "the register pipeline fits the default shared-memory limit");
  static_assert(kEpilogueBytes + kStatsTileBytes <= smem_bytes(2), "the stats tile fits beside the scratch tiles");
  static_assert(smem_bytes(kAsyncStages) <= 227 * 1024, "the cp.async pipeline fits an sm_80/sm_90 block");
  // WMMA pointers must be 32-byte aligned: fragment rows are 16 apart, columns 16 elements apart.
  static_assert((kFragment * kSmemPitch * sizeof(uint16_t)) % 32 == 0, "A/B fragment rows 32-byte aligned");
  static_assert((kATileElems * sizeof(uint16_t)) % 128 == 0 && (kBTileElems * sizeof(uint16_t)) % 128 == 0,
                "tile buffers keep the base alignment");
};

// How a stage's A and B tiles lie in shared memory: where element (row, k) of A and (column, k) of
// B go. The forward's loaders move 8 K elements of one row per 16 bytes, so K runs fastest (A is
// WMMA's row-major matrix_a, B its column-major matrix_b: TileShape's own layout). wgrad's loaders
// move 8 rows (columns) at one K position: rows run fastest (A column-major, B row-major), padded
// by 16 bytes, so each chunk is one 16-byte store and a row of threads hits every bank once.
template <class Tile>
struct KFastTiles {
  static constexpr bool kKFast = true;
  static constexpr int kALdm = kSmemPitch;
  static constexpr int kBLdm = kSmemPitch;
  static constexpr int kAElems = Tile::kATileElems;
  static constexpr int kBElems = Tile::kBTileElems;
  static FR_HOST_DEVICE int a_index(int row, int k) { return row * kALdm + k; }
  static FR_HOST_DEVICE int b_index(int col, int k) { return col * kBLdm + k; }
};

template <class Tile>
struct RowFastTiles {
  static constexpr bool kKFast = false;
  static constexpr int kALdm = Tile::kBlockM + 8;
  static constexpr int kBLdm = Tile::kBlockN + 8;
  static constexpr int kAElems = kBlockK * kALdm;
  static constexpr int kBElems = kBlockK * kBLdm;
  static FR_HOST_DEVICE int a_index(int row, int k) { return k * kALdm + row; }
  static FR_HOST_DEVICE int b_index(int col, int k) { return k * kBLdm + col; }
  // WMMA: fragment starts 32-byte aligned (16 K rows apart, 16 rows or columns apart), stages 128.
  static_assert((kFragment * kALdm * sizeof(uint16_t)) % 32 == 0 && (kFragment * kBLdm * sizeof(uint16_t)) % 32 == 0,
                "fragment starts 32-byte aligned");
  static_assert((kAElems * sizeof(uint16_t)) % 128 == 0 && (kBElems * sizeof(uint16_t)) % 128 == 0,
                "tile buffers keep the base alignment");
};

// Shared memory of `stages` A and B tiles laid out as `Tiles`.
template <class Tiles>
constexpr int mainloop_smem_bytes(int stages) {
  return stages * (Tiles::kAElems + Tiles::kBElems) * int(sizeof(uint16_t));
}

// 8 warps; per-warp tiles 64x32, 32x32 and 16x16. The narrow shape serves
// grouped convolutions with few channels per group (ResNeXt: 4 or 8).
// Blocks per SM, from ptxas -v for sm_90a (nvcc 13.0): large needs 163-175
// registers (a cap of 128 for 2 blocks spills 40-184 bytes), medium fits 2 at
// 114-120, narrow fits 3 at 74-78 without spilling (uncapped, fp16 chose 64
// registers and spilled 12 bytes).
using LargeTile = TileShape<128, 128, 2, 4, 1>;
using MediumTile = TileShape<128, 64, 4, 2, 2>;
using NarrowTile = TileShape<128, 16, 8, 1, 3>;

// f(Tile{}) for the tile shape `kind` names (kNarrow, kMedium, kLarge): the one place a kind becomes
// its type, for the launchers and the emulator. kAuto (unresolved) returns `unresolved`.
template <class F, class R>
R with_tile_shape(TileShapeKind kind, R unresolved, F&& f) {
  switch (kind) {
    case TileShapeKind::kNarrow:
      return f(NarrowTile{});
    case TileShapeKind::kMedium:
      return f(MediumTile{});
    case TileShapeKind::kLarge:
      return f(LargeTile{});
    case TileShapeKind::kAuto:
      break;
  }
  return unresolved;
}

// kAuto: narrow tiles for per-group widths up to 16 (ResNeXt), medium up to 64
// or when large tiles would leave SMs idle (small batches, 7x7 maps), else large.
inline TileShapeKind choose_tile_shape(const ConvBiasActParams& p, const ConvGemm& g) {
  if (p.tile != TileShapeKind::kAuto) return p.tile;
  if (g.out_group_channels <= NarrowTile::kBlockN) return TileShapeKind::kNarrow;
  const long long large_blocks =
      1LL * ceil_div(g.m, LargeTile::kBlockM) * ceil_div(g.out_group_channels, LargeTile::kBlockN) * p.groups;
  if (g.out_group_channels <= MediumTile::kBlockN || large_blocks < p.num_sms) return TileShapeKind::kMedium;
  return TileShapeKind::kLarge;
}

}  // namespace fused_resblock
