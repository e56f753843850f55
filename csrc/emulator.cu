// Host emulation of conv_bias_act_kernel (also the dgrad and conv_stats, with its statistics epilogue
// and finalize), of conv_wgrad's two launches and of the training-mode BN ops (channel_ops.h), so CI
// can test their index math without a GPU.
//
// It runs the kernel's own pieces on the CPU, in the kernel's order, block by
// block: the operand gathers and shared-memory stores of every thread
// (TileLoader: load/store for the register pipeline, copy_async -- a plain copy
// on the host -- for the cp.async one), the K loop over the convolution and the
// merged projection through the pipeline's stages, and the epilogue
// (store_output_chunk) for every 8-channel chunk of the block tile -- the set
// the kernel's warp/lane split covers exactly.
// Only the tensor-core product is replaced: a scalar fp32 product over the
// same shared-memory tiles (so the WMMA fragments, the stage rotation and the
// epilogue's warp/lane map are not what runs here: see the K loop below). Threads run one after another, so it cannot find
// a missing barrier; shared memory is poisoned with NaN per block, so a tile
// element that no thread stores turns the output NaN.
#include <algorithm>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "channel_ops.cuh"
#include "channel_ops.h"
#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "conv_stats.cuh"
#include "conv_wgrad.cuh"
#include "conv_wgrad.h"
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

// acc[r][c] += sum_k A[r][k] * B[c][k] over one K tile, as the warps' MMAs do, the tiles read
// where `Tiles` lays them out (K fastest: the forward's; rows fastest: wgrad's).
template <typename T, class Tile, class Tiles = KFastTiles<Tile>>
void multiply_tile_on_host(const uint16_t* a_tile, const uint16_t* b_tile, std::vector<float>& acc) {
  std::vector<float> a(Tile::kBlockM * kBlockK), b(Tile::kBlockN * kBlockK);
  for (int r = 0; r < Tile::kBlockM; ++r) {
    for (int k = 0; k < kBlockK; ++k) a[r * kBlockK + k] = Numeric<T>::to_float(a_tile[Tiles::a_index(r, k)]);
  }
  for (int c = 0; c < Tile::kBlockN; ++c) {
    for (int k = 0; k < kBlockK; ++k) b[c * kBlockK + k] = Numeric<T>::to_float(b_tile[Tiles::b_index(c, k)]);
  }
  for (int r = 0; r < Tile::kBlockM; ++r) {
    for (int c = 0; c < Tile::kBlockN; ++c) {
      float sum = acc[r * Tile::kBlockN + c];
      for (int k = 0; k < kBlockK; ++k) sum += a[r * kBlockK + k] * b[c * kBlockK + k];
      acc[r * Tile::kBlockN + c] = sum;
    }
  }
}

template <typename T, class Tile, Pipeline kPipeline>
void emulate_blocks(const ConvBiasActParams& p, const ConvGemm& g) {
  constexpr int kStages = kPipeline == Pipeline::kAsyncCopy ? kAsyncStages : 2;
  std::vector<uint16_t> a_tiles(kStages * Tile::kATileElems), b_tiles(kStages * Tile::kBTileElems);
  std::vector<float> acc(Tile::kBlockM * Tile::kBlockN);
  std::vector<uint16_t> stats_tile(Tile::kBlockM * Tile::kBlockN);  // conv_stats: the block's stored outputs
  std::vector<Moments> parts(Tile::kThreads);
  std::vector<TileLoader<Tile>> loaders;
  loaders.reserve(Tile::kThreads);
  const auto a_stage = [&](int k_tile) { return a_tiles.data() + k_tile % kStages * Tile::kATileElems; };
  const auto b_stage = [&](int k_tile) { return b_tiles.data() + k_tile % kStages * Tile::kBTileElems; };

  for (int group = 0; group < p.groups; ++group) {
    for (int n0 = 0; n0 < g.out_group_channels; n0 += Tile::kBlockN) {
      for (int m0 = 0; m0 < g.m; m0 += Tile::kBlockM) {
        std::fill(a_tiles.begin(), a_tiles.end(), kNaNBits<T>);
        std::fill(b_tiles.begin(), b_tiles.end(), kNaNBits<T>);
        std::fill(acc.begin(), acc.end(), 0.f);
        loaders.clear();
        for (int thread = 0; thread < Tile::kThreads; ++thread) loaders.emplace_back(p, g, m0, n0, group, thread);

        for (int k_tile = 0; k_tile < g.k_tiles; ++k_tile) {
          // Each tile reaches a stage the way the pipeline moves it (synchronously here) and is
          // multiplied at once: the kernel's stage rotation (mainloop_async's next % kStages,
          // mainloop_registers' stage ^ 1), its WMMA fragments and its epilogue's warp/lane map
          // are not emulated -- only a GPU run checks those (tests/test_cuda_ext.py).
          for (auto& loader : loaders) {
            if constexpr (kPipeline == Pipeline::kAsyncCopy) {
              loader.copy_async(p, g, k_tile, a_stage(k_tile), b_stage(k_tile));
            } else {
              loader.load(p, g, k_tile);
              loader.store(a_stage(k_tile), b_stage(k_tile));
            }
          }
          multiply_tile_on_host<T, Tile>(a_stage(k_tile), b_stage(k_tile), acc);
        }

        std::fill(stats_tile.begin(), stats_tile.end(), kNaNBits<T>);  // an output not kept there turns NaN
        for (int r = 0; r < Tile::kBlockM && m0 + r < g.m; ++r) {
          for (int c = 0; c < Tile::kBlockN && n0 + c < g.out_group_channels; c += kVector) {
            float value[kVector];
            for (int e = 0; e < kVector; ++e) value[e] = acc[r * Tile::kBlockN + c + e];
            const int count = std::min(kVector, g.out_group_channels - (n0 + c));
            uint16_t* const stats_row = p.stats_partials != nullptr ? &stats_tile[r * Tile::kBlockN + c] : nullptr;
            store_output_chunk<T>(p, g, value, m0 + r, group * g.out_group_channels + n0 + c, count, stats_row);
          }
        }
        if (p.stats_partials != nullptr) {  // store_block_stats' two phases, thread by thread
          using Parts = StatsParts<T, Tile>;
          const int valid_rows = std::min(Tile::kBlockM, g.m - m0);
          for (int thread = 0; thread < Tile::kThreads; ++thread) {
            parts[thread] = Parts::part(stats_tile.data(), valid_rows, thread);
          }
          for (int col = 0; col < Tile::kBlockN && n0 + col < g.out_group_channels; ++col) {
            const Moments total = Parts::block(parts.data(), col);
            const int64_t at =
                stats_partial_offset(m0 / Tile::kBlockM, group * g.out_group_channels + n0 + col, p.out_channels);
            p.stats_partials[at] = total.mean;
            p.stats_partials[at + 1] = total.m2;
          }
        }
      }
    }
  }
}

template <typename T, class Tile>
void emulate_tile(const ConvBiasActParams& p, const ConvGemm& g) {
  if (choose_pipeline(p, g) == Pipeline::kAsyncCopy) {
    emulate_blocks<T, Tile, Pipeline::kAsyncCopy>(p, g);
  } else {
    emulate_blocks<T, Tile, Pipeline::kRegisters>(p, g);
  }
}

template <typename T>
void emulate_typed(const ConvBiasActParams& p, const ConvGemm& g) {
  with_tile_shape(choose_tile_shape(p, g), false, [&](auto tile) {
    emulate_tile<T, decltype(tile)>(p, g);
    return true;
  });
}

// wgrad's blocks in grid order, each writing its padded tile of partial sums, then the reduction.
template <typename T, class Tile>
void emulate_wgrad(const ConvWgradParams& p, const WgradGemm& w) {
  using Tiles = RowFastTiles<Tile>;
  std::vector<uint16_t> a_tile(Tiles::kAElems), b_tile(Tiles::kBElems);
  std::vector<float> acc(Tile::kBlockM * Tile::kBlockN);
  std::vector<WgradLoader<Tile>> loaders;
  loaders.reserve(Tile::kThreads);
  std::vector<float> bias_sums(Tile::kThreads * kVector);
  for (int split_group = 0; split_group < p.splits * p.groups; ++split_group) {
    const int split = split_group / p.groups;
    const int group = split_group - split * p.groups;
    const int first_tile = split * w.tiles_per_split;
    const int k_tiles = std::max(0, std::min(w.depth_tiles, first_tile + w.tiles_per_split) - first_tile);
    for (int col0 = 0; col0 < w.cols_padded; col0 += Tile::kBlockN) {
      for (int row0 = 0; row0 < w.rows_padded; row0 += Tile::kBlockM) {
        std::fill(acc.begin(), acc.end(), 0.f);
        loaders.clear();
        for (int thread = 0; thread < Tile::kThreads; ++thread) {
          loaders.emplace_back(w, row0, col0, group, first_tile * kBlockK, thread);
        }
        for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
          std::fill(a_tile.begin(), a_tile.end(), kNaNBits<T>);  // an element no thread stores turns NaN
          std::fill(b_tile.begin(), b_tile.end(), kNaNBits<T>);
          for (auto& loader : loaders) {
            if (p.pipeline == Pipeline::kAsyncCopy) {
              loader.copy_async(p, w, k_tile, a_tile.data(), b_tile.data());
            } else {
              loader.load(p, w, k_tile);
              loader.store(a_tile.data(), b_tile.data());
            }
          }
          for (auto& loader : loaders) loader.template observe<T>(b_tile.data());
          multiply_tile_on_host<T, Tile, Tiles>(a_tile.data(), b_tile.data(), acc);
        }
        if (w.bias && row0 == 0) {  // the block's bias partials, summed as the kernel does
          for (int thread = 0; thread < Tile::kThreads; ++thread) {
            loaders[thread].write_bias_sums(bias_sums.data() + thread * kVector);
          }
          for (int t = 0; t < Tile::kBlockN; ++t) {
            p.workspace[wgrad_bias_offset(w, split_group, col0 + t)] = block_bias_sum<Tile>(bias_sums.data(), t);
          }
        }
        for (int r = 0; r < Tile::kBlockM; ++r) {
          for (int c = 0; c < Tile::kBlockN; ++c) {
            p.workspace[wgrad_workspace_offset(w, split_group, row0 + r, col0 + c)] = acc[r * Tile::kBlockN + c];
          }
        }
      }
    }
  }
  const int64_t elements = wgrad_outputs(p, w);
  for (int64_t index = 0; index < elements; ++index) reduce_wgrad_element<T>(p, w, index);
}

template <typename T>
void emulate_wgrad_typed(const ConvWgradParams& p, const WgradGemm& w) {
  with_tile_shape(p.tile, false, [&](auto tile) {  // kAuto never gets here: plan_conv_wgrad resolves it
    emulate_wgrad<T, decltype(tile)>(p, w);
    return true;
  });
}

}  // namespace

void emulate_conv_wgrad(const ConvWgradParams& p) {
  const WgradGemm w = make_wgrad_gemm(p);
  if (wgrad_outputs(p, w) == 0) return;
  if (p.dtype == DType::kFloat16) {
    emulate_wgrad_typed<__half>(p, w);
  } else {
    emulate_wgrad_typed<__nv_bfloat16>(p, w);
  }
}

void emulate_bn_add_act(const BnAddActParams& p) {
  const int64_t chunks = bn_add_act_chunks(p);
  const bool vectorized = bn_add_act_vectorized(p);
  // last chunk first: one writing past its own 8 channels (a wrong vector decision) then clobbers
  // a chunk already done, as a device thread racing it could, and the test sees it
  for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
    if (vectorized) {
      bn_add_act_chunk<true>(p, chunk);
    } else {
      bn_add_act_chunk<false>(p, chunk);
    }
  }
}

// channel_backward_kernel's blocks (each thread, then its row lanes' sums in order), then the
// finalize's threads and tree, as on the device.
void emulate_channel_backward(const ChannelBackwardParams& p) {
  if (p.t_channels == 0) return;
  const int row_blocks = channel_backward_row_blocks(p);
  std::vector<float2> sums(kChannelThreads);
  for (int c0 = 0; c0 < p.t_channels; c0 += kChannelLanes) {
    for (int row_block = 0; row_block < row_blocks; ++row_block) {
      for (int row_lane = 0; row_lane < kRowLanes; ++row_lane) {
        for (int lane = 0; lane < kChannelLanes; ++lane) {
          sums[row_lane * kChannelLanes + lane] = channel_backward_thread(p, row_block, c0 + lane, row_lane);
        }
      }
      if (p.partials == nullptr) continue;
      for (int lane = 0; lane < kChannelLanes && c0 + lane < p.t_channels; ++lane) {
        const float2 total = channel_backward_block_sum(sums.data(), lane);
        const int64_t at = (int64_t(row_block) * p.t_channels + c0 + lane) * 2;
        p.partials[at] = total.x;
        p.partials[at + 1] = total.y;
      }
    }
  }
  if (p.partials == nullptr) return;
  std::vector<float2> finals(kFinalizeThreads);
  for (int c = 0; c < p.t_channels; ++c) {
    for (int thread = 0; thread < kFinalizeThreads; ++thread) finals[thread] = channel_finalize_thread(p, c, thread);
    for (int half = kFinalizeThreads / 2; half > 0; half /= 2) {
      for (int thread = 0; thread < half; ++thread) {
        finals[thread].x += finals[thread + half].x;
        finals[thread].y += finals[thread + half].y;
      }
    }
    store_channel_grads(p, c, finals[0]);
  }
}

void emulate_conv_stats_finalize(const ConvBiasActParams& p, float* mean, float* var) {
  const int rows = p.batch * p.out_h * p.out_w;
  std::vector<Moments> moments(kStatsFinalizeThreads);
  for (int channel = 0; channel < p.out_channels; ++channel) {  // conv_stats_finalize_kernel's block
    for (int thread = 0; thread < kStatsFinalizeThreads; ++thread) {
      moments[thread] = finalize_thread_moments(p.stats_partials, rows, p.out_channels, channel, thread);
    }
    for (int half = kStatsFinalizeThreads / 2; half > 0; half /= 2) {
      for (int thread = 0; thread < half; ++thread) moments[thread] = merge_moments(moments[thread], moments[thread + half]);
    }
    store_channel_stats(moments[0], channel, mean, var);
  }
}

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
