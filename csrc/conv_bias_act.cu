// Host side of the fused convolution: pick a tile shape and a pipeline, instantiate, launch.
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

template <typename T, class Tile, Pipeline kPipeline>
cudaError_t launch_pipeline(const ConvBiasActParams& p, const ConvGemm& g, cudaStream_t stream) {
  constexpr int kSmemBytes = Tile::smem_bytes(kPipeline == Pipeline::kAsyncCopy ? kAsyncStages : 2);
  auto* const kernel = conv_bias_act_kernel<T, Tile, kPipeline>;
  if constexpr (kSmemBytes > 48 * 1024) {
    // Opt in to more than the default limit. The attribute belongs to the device's context,
    // so it is set on every launch (as CUTLASS does): cheap, and right on every GPU of a process.
    const cudaError_t opted_in = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (opted_in != cudaSuccess) return opted_in;
  }
  const dim3 grid(unsigned(ceil_div(g.m, Tile::kBlockM)), unsigned(ceil_div(g.out_group_channels, Tile::kBlockN)),
                  unsigned(p.groups));
  kernel<<<grid, Tile::kThreads, kSmemBytes, stream>>>(p, g);
  return cudaGetLastError();
}

template <typename T, class Tile>
cudaError_t launch_tile(const ConvBiasActParams& p, const ConvGemm& g, cudaStream_t stream) {
  switch (choose_pipeline(p, g)) {
    case Pipeline::kAsyncCopy:
      if (!async_copy_applies(p, g)) return cudaErrorInvalidValue;  // forced where it cannot run
      return launch_pipeline<T, Tile, Pipeline::kAsyncCopy>(p, g, stream);
    case Pipeline::kRegisters:
      return launch_pipeline<T, Tile, Pipeline::kRegisters>(p, g, stream);
    case Pipeline::kAuto:
    case Pipeline::kWmma:      // resolved by choose_pipeline
    case Pipeline::kTmaWgmma:  // launch_conv_bias_act's, not this kernel's
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_typed(const ConvBiasActParams& p, const ConvGemm& g, cudaStream_t stream) {
  return with_tile_shape(choose_tile_shape(p, g), cudaErrorInvalidValue,
                         [&](auto tile) { return launch_tile<T, decltype(tile)>(p, g, stream); });
}

}  // namespace

cudaError_t launch_conv_bias_act(const ConvBiasActParams& p, cudaStream_t stream) {
  const ConvGemm g = make_conv_gemm(p);
  if (g.m == 0 || p.out_channels == 0) return cudaSuccess;  // nothing to write
  if (p.pipeline == Pipeline::kTmaWgmma) return launch_conv_bias_act_tma_wgmma(p, stream);
  if (p.pipeline == Pipeline::kAuto && tma_wgmma_refusal(p) == nullptr) {
    const cudaError_t error = launch_conv_bias_act_tma_wgmma(p, stream);
    if (error != cudaErrorNotSupported) return error;  // else CUTLASS's own checks refused: the WMMA kernel runs it
  }
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
  return cudaFuncGetAttributes(&attributes, conv_bias_act_kernel<__nv_bfloat16, LargeTile, Pipeline::kAsyncCopy>);
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
