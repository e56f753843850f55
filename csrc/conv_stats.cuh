// conv_stats' batch statistics: per-channel mean and biased variance of the stored outputs, from
// per-tile moments merged in a fixed order (deterministic, no atomics).
//
//   1. The forward kernel's epilogue (conv_bias_act_kernel.cuh) keeps its block's rounded outputs in
//      shared memory (the stats tile, [kBlockM][kBlockN] 16-bit), then each thread takes one column
//      part (kBlockM / kStatsParts rows), two passes over it: its mean, then M2 about that mean (no
//      sum-of-squares cancellation). The parts merge in order into the block's (mean, M2) per
//      channel, one row of the workspace per row tile: partials[row_tile][channel] = (mean, M2).
//   2. A finalize launch (conv_stats.cu), one block per channel: thread t merges row tiles
//      t, t + threads, ... in order, then a fixed tree over the threads; mean and M2 / count out.
//
// Merges use Chan et al.'s pairwise formula, written with explicit fmaf so the device (which would
// contract a*b+c on its own) and the host emulator round alike.
#pragma once

#include <cmath>
#include <cstdint>

#include "conv_bias_act.h"
#include "numeric.cuh"

namespace fused_resblock {

constexpr int kStatsFinalizeThreads = 256;

struct Moments {
  float count, mean, m2;  // m2: the sum of squared deviations from mean
};

FR_HOST_DEVICE Moments merge_moments(const Moments& a, const Moments& b) {
  if (b.count == 0.f) return a;
  if (a.count == 0.f) return b;
  const float count = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float b_share = b.count / count;
  return {count, fmaf(delta, b_share, a.mean), fmaf(delta * delta * a.count, b_share, a.m2 + b.m2)};
}

// Rows [row_begin, row_end) of column `col` of a row-major tile of 16-bit values (pitch `pitch`).
template <typename T>
FR_HOST_DEVICE Moments column_moments(const uint16_t* tile, int pitch, int col, int row_begin, int row_end) {
  if (row_end <= row_begin) return {0.f, 0.f, 0.f};
  float sum = 0.f;
  for (int r = row_begin; r < row_end; ++r) sum += Numeric<T>::to_float(tile[r * pitch + col]);
  const float count = float(row_end - row_begin);
  const float mean = sum / count;
  float m2 = 0.f;
  for (int r = row_begin; r < row_end; ++r) {
    const float d = Numeric<T>::to_float(tile[r * pitch + col]) - mean;
    m2 = fmaf(d, d, m2);
  }
  return {count, mean, m2};
}

// Thread `thread`'s part of its block's stats tile (the first `valid_rows` rows are outputs): column
// thread % kBlockN, rows part * kRowsPerPart ..., part = thread / kBlockN.
template <typename T, class Tile>
struct StatsParts {
  static constexpr int kParts = Tile::kThreads / Tile::kBlockN;
  static constexpr int kRowsPerPart = Tile::kBlockM / kParts;
  static_assert(Tile::kThreads % Tile::kBlockN == 0 && Tile::kBlockM % kParts == 0, "whole column parts");
  static_assert(Tile::kBlockM == kStatsRowTile, "the workspace's row tile is the block's");

  static FR_HOST_DEVICE Moments part(const uint16_t* stats_tile, int valid_rows, int thread) {
    const int col = thread % Tile::kBlockN;
    const int part = thread / Tile::kBlockN;
    const int begin = part * kRowsPerPart < valid_rows ? part * kRowsPerPart : valid_rows;
    const int end = (part + 1) * kRowsPerPart < valid_rows ? (part + 1) * kRowsPerPart : valid_rows;
    return column_moments<T>(stats_tile, Tile::kBlockN, col, begin, end);
  }

  // The block's moments of column `col`: its parts (parts[part * kBlockN + col]) merged in order.
  static FR_HOST_DEVICE Moments block(const Moments* parts, int col) {
    Moments total = parts[col];
    for (int part = 1; part < kParts; ++part) total = merge_moments(total, parts[part * Tile::kBlockN + col]);
    return total;
  }
};

// The workspace: [row_tiles][out_channels][2] fp32, (mean, M2) of each row tile's outputs.
FR_HOST_DEVICE int64_t stats_partial_offset(int row_tile, int channel, int out_channels) {
  return (int64_t(row_tile) * out_channels + channel) * 2;
}

FR_HOST_DEVICE int stats_row_tiles(int rows) {
  return (rows + kStatsRowTile - 1) / kStatsRowTile;
}

// Finalize, thread `thread` of channel `channel`'s block: row tiles thread, thread + kStatsFinalizeThreads, ...
// merged in order (each tile's count from its place: kStatsRowTile, less in the last).
FR_HOST_DEVICE Moments finalize_thread_moments(const float* partials, int rows, int out_channels, int channel,
                                               int thread) {
  Moments total{0.f, 0.f, 0.f};
  const int tiles = stats_row_tiles(rows);
  for (int tile = thread; tile < tiles; tile += kStatsFinalizeThreads) {
    const int64_t at = stats_partial_offset(tile, channel, out_channels);
    const int count = rows - tile * kStatsRowTile < kStatsRowTile ? rows - tile * kStatsRowTile : kStatsRowTile;
    total = merge_moments(total, {float(count), partials[at], partials[at + 1]});
  }
  return total;
}

// The channel's mean and biased variance from its merged moments (NaN for an empty batch, as torch).
FR_HOST_DEVICE void store_channel_stats(const Moments& total, int channel, float* mean, float* var) {
  mean[channel] = total.count > 0.f ? total.mean : NAN;
  var[channel] = total.count > 0.f ? total.m2 / total.count : NAN;
}

}  // namespace fused_resblock
