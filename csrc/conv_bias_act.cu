// Host side of the fused convolution: pick a tile shape, instantiate, launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "conv_bias_act.h"
#include "conv_bias_act_kernel.cuh"
#include "conv_gemm.cuh"
#include "tile_shape.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fused_resblock's kernels need sm_80+ (bf16 tensor cores): drop older archs from TORCH_CUDA_ARCH_LIST"
#endif

namespace fused_resblock {
namespace {

template <typename T, class Tile>
cudaError_t launch_tile(const ConvBiasActParams& p, const ConvGemm& g, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(g.m, Tile::kBlockM)), unsigned(ceil_div(g.out_group_channels, Tile::kBlockN)),
                  unsigned(p.groups));
  conv_bias_act_kernel<T, Tile><<<grid, Tile::kThreads, 0, stream>>>(p, g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const ConvBiasActParams& p, const ConvGemm& g, cudaStream_t stream) {
  switch (choose_tile_shape(p, g)) {
    case TileShapeKind::kNarrow:
      return launch_tile<T, NarrowTile>(p, g, stream);
    case TileShapeKind::kMedium:
      return launch_tile<T, MediumTile>(p, g, stream);
    case TileShapeKind::kLarge:
      return launch_tile<T, LargeTile>(p, g, stream);
    case TileShapeKind::kAuto:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_conv_bias_act(const ConvBiasActParams& p, cudaStream_t stream) {
  const ConvGemm g = make_conv_gemm(p);
  if (g.m == 0 || p.out_channels == 0) return cudaSuccess;  // nothing to write
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(p, g, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t probe_conv_bias_act_kernels() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, conv_bias_act_kernel<__nv_bfloat16, LargeTile>);
}

#define FUSED_RESBLOCK_STR_(...) #__VA_ARGS__
#define FUSED_RESBLOCK_STR(...) FUSED_RESBLOCK_STR_(__VA_ARGS__)

const char* conv_bias_act_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return FUSED_RESBLOCK_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace fused_resblock
