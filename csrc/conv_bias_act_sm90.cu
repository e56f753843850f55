// Hopper's path for the common case: CUTLASS 3's sm90 implicit-GEMM convolution
// (TMA im2col loads, wgmma, warp-specialized) with its epilogue fused to ours:
//
//   out = relu(conv(x, W) + bias + residual)        (residual optional)
//
// as CUTLASS's LinCombPerColBiasEltAct: D = ReLU(acc + C + bias[col]), columns
// being output channels and C the residual. Without a residual the epilogue has
// no source at all (ElementC void): with a source and beta 0, CUTLASS skips the
// load but still multiplies 0 by the never-written source registers, and 0 * NaN
// is NaN.
//
// It covers the convolutions of a ResNet's hot path -- 1x1 and 3x3, strides up to
// 8 (TMA im2col's limit), padding and dilation within CUTLASS's can_implement, groups 1, folded-BN bias, identity residual, ReLU -- on
// dense channels_last tensors. Everything else (grouped convolutions, the merged
// projection, the CIFAR option-A residual, no ReLU, NCHW outputs, unaligned
// channels) runs the WMMA kernel (conv_bias_act_kernel.cuh), which does it all.
// tma_wgmma_refusal() says which, in words; the choice is the launcher's
// (conv_bias_act.cu), and the binding reports a forced choice that cannot run.
//
// Not emulated on the host: CI compiles it; a GPU session tests it.
#include <cstdint>
#include <type_traits>

#include "conv_bias_act.h"
#include "conv_gemm.cuh"

#if FUSED_RESBLOCK_WITH_CUTLASS
// In this order: the conv collectives use types they do not include themselves.
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/version.h"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

#define FR_SM90_STR_(x) #x
#define FR_SM90_STR(x) FR_SM90_STR_(x)
#endif

namespace fused_resblock {
namespace {

// Dense NHWC as the kernel addresses it (its strides come from the shape): a size-1 dimension's
// stride is never used, and torch gives an (N, C, 1, 1) tensor NCHW strides, channels_last or not.
bool dense_nhwc(const Strides4& s, int batch, int channels, int h, int w) {
  return s.c == 1 && (w == 1 || s.w == channels) && (h == 1 || s.h == int64_t(w) * channels) &&
         (batch == 1 || s.n == int64_t(h) * w * channels);
}

// Never launched: only the sm_90a image gives it static shared memory, so its attributes say
// which image the runtime loaded for the current device.
constexpr int kMarkerInts = 8;
__global__ void sm90a_image_marker(int* sink) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[kMarkerInts];
  marker[threadIdx.x % kMarkerInts] = int(threadIdx.x);
  __syncthreads();
  *sink = marker[(threadIdx.x + 1) % kMarkerInts];
#else
  (void)sink;
#endif
}

}  // namespace

bool sm90a_image_loaded() {
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, sm90a_image_marker) != cudaSuccess) {
    (void)cudaGetLastError();  // no image for this device at all: the WMMA probe reports that
    return false;
  }
  return attributes.sharedSizeBytes == kMarkerInts * sizeof(int);
}

const char* tma_wgmma_refusal(const ConvBiasActParams& p) {
#if !FUSED_RESBLOCK_WITH_CUTLASS
  (void)p;
  return "the extension was built without CUTLASS headers (pip install nvidia-cutlass, then rebuild)";
#else
  if (p.compute_capability != 90) return "it needs an sm_90 GPU (Hopper's TMA and wgmma)";
  if (!p.sm90a_image) {
    return "the extension has no sm_90a image for this GPU (wgmma needs the 'a' target: build with "
           "TORCH_CUDA_ARCH_LIST naming 9.0a)";
  }
  if (p.grad_mask != nullptr || p.pad_h < 0 || p.pad_w < 0 || p.dilation_h < 1 || p.dilation_w < 1) {
    return "a convolution's input gradient (dgrad) runs the WMMA kernel";
  }
  if (p.in_mean != nullptr || p.stats_partials != nullptr) {
    return "conv_stats (its BN prologue and statistics epilogue) runs the WMMA kernel";
  }
  if (p.groups != 1) return "grouped convolutions run the WMMA kernel";
  if (p.shortcut_x != nullptr) return "a merged projection shortcut runs the WMMA kernel";
  if (!p.relu) return "it always ends in a ReLU";
  if (p.bias == nullptr) return "it needs a bias";
  if (p.in_channels < 8 || p.in_channels % 8 != 0 || p.out_channels % 8 != 0) {
    return "channel counts must be positive multiples of 8 (TMA moves 16-byte rows)";
  }
  if (p.stride_h > 8 || p.stride_w > 8) return "TMA im2col takes strides of at most 8";
  if (!dense_nhwc(p.out_strides, p.batch, p.out_channels, p.out_h, p.out_w)) return "the output must be dense channels_last";
  if (p.residual != nullptr &&
      (p.residual_stride != 1 || p.residual_offset != 0 || p.residual_channels != p.out_channels ||
       !dense_nhwc(p.residual_strides, p.batch, p.out_channels, p.out_h, p.out_w))) {
    return "the residual must be a dense channels_last tensor shaped like the output";
  }
  if (!aligned16(p.x) || !aligned16(p.weight) || !aligned16(p.out) || (p.residual && !aligned16(p.residual)) ||
      !aligned16(p.bias)) {
    return "x, weight, bias, residual and output must be 16-byte aligned (TMA; 4-float bias vectors)";
  }
  return nullptr;
#endif
}

const char* tma_wgmma_version() {
#if FUSED_RESBLOCK_WITH_CUTLASS
  return "CUTLASS " FR_SM90_STR(CUTLASS_MAJOR) "." FR_SM90_STR(CUTLASS_MINOR) "." FR_SM90_STR(CUTLASS_PATCH);
#else
  return "";
#endif
}

#if FUSED_RESBLOCK_WITH_CUTLASS
namespace {

using namespace cute;

// One CUTLASS sm90 conv fprop: Element in and out, fp32 accumulation and epilogue, fp32 bias, and
// the residual as the epilogue's source (Source = Element) or no source at all (Source = void).
template <class Element, class TileShape, class Source>
struct Sm90ConvBiasReLU {
  using Cluster = Shape<_1, _1, _1>;
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::ReLu, Element, float,
                                                                     float, Source, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Source, cutlass::layout::TensorNHWC, 8, Element,
      cutlass::layout::TensorNHWC, 8, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, Element,
      cutlass::layout::TensorNHWC, 8, Element, cutlass::layout::TensorNHWC, 8, float, TileShape, Cluster,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

// The epilogue's C/D strides for a dense NHWC output: its (w, h, n) element strides.
template <class Stride>
Stride output_stride(const ConvBiasActParams& p) {
  Stride stride{};
  const int64_t by_mode[3] = {p.out_channels, int64_t(p.out_w) * p.out_channels,
                              int64_t(p.out_h) * p.out_w * p.out_channels};
  cute::for_each(cute::make_seq<cute::rank<0>(Stride{})>{}, [&](auto i) { cute::get<0, i>(stride) = by_mode[i]; });
  return stride;
}

template <class Element, class Source, class Conv>
cudaError_t run(const ConvBiasActParams& p, cudaStream_t stream) {
  using Op = typename Conv::Op;
  using Kernel = typename Conv::Kernel;
  constexpr bool kResidual = !std::is_void_v<Source>;
  // Symmetric padding, as PyTorch's: CUTLASS derives the same output size from it.
  const typename Conv::Problem problem(cutlass::conv::Mode::kCrossCorrelation,
                                       {p.batch, p.in_h, p.in_w, p.in_channels},
                                       {p.out_channels, p.kernel_h, p.kernel_w, p.in_channels}, {p.pad_h, p.pad_w},
                                       {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w}, {p.dilation_h, p.dilation_w}, 1);
  const auto stride_c = output_stride<typename Kernel::StrideC>(p);
  const auto stride_d = output_stride<typename Kernel::StrideD>(p);
  const Source* source = nullptr;
  if constexpr (kResidual) source = static_cast<const Source*>(p.residual);
  typename Op::Arguments args{
      problem,
      {static_cast<const Element*>(p.x), static_cast<const Element*>(p.weight)},
      {{}, source, stride_c, static_cast<Element*>(p.out), stride_d}};
  args.hw_info.sm_count = p.num_sms;
  const cudaError_t no_device = cudaGetDevice(&args.hw_info.device_id);  // x's device: the binding's guard set it
  if (no_device != cudaSuccess) return no_device;
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = kResidual ? 1.f : 0.f;
  fusion.bias_ptr = p.bias;

  // CUTLASS's own limits (TMA im2col's padding, dilation and filter extents): auto then runs WMMA.
  if (Op::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Op::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // we allocate nothing per call
  if (Kernel::initialize_workspace(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  // Launched here rather than by Op::run, which clears the launch error and reports every failure as one
  // status: the caller gets CUDA's own error. Cluster 1x1x1: a plain launch, as Op::run makes it.
  const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  constexpr int kSmemBytes = Kernel::SharedStorageSize;
  auto* const kernel = cutlass::device_kernel<Kernel>;
  if constexpr (kSmemBytes >= 48 * 1024) {
    const cudaError_t opted_in = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (opted_in != cudaSuccess) return opted_in;
  }
  kernel<<<Op::get_grid_shape(params), Kernel::get_block_shape(), kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

// 128 output channels a tile where there are that many; 64 for the narrow layers (ResNet's 64-channel stage).
template <class Element, class Source>
cudaError_t run_tiled(const ConvBiasActParams& p, cudaStream_t stream) {
  if (p.out_channels <= 64) {
    return run<Element, Source, Sm90ConvBiasReLU<Element, Shape<_128, _64, Shape<_64>>, Source>>(p, stream);
  }
  return run<Element, Source, Sm90ConvBiasReLU<Element, Shape<_128, _128, Shape<_64>>, Source>>(p, stream);
}

template <class Element>
cudaError_t run_typed(const ConvBiasActParams& p, cudaStream_t stream) {
  if (p.residual != nullptr) return run_tiled<Element, Element>(p, stream);
  return run_tiled<Element, void>(p, stream);
}

}  // namespace
#endif

cudaError_t launch_conv_bias_act_tma_wgmma(const ConvBiasActParams& p, cudaStream_t stream) {
  if (tma_wgmma_refusal(p) != nullptr) return cudaErrorNotSupported;
#if FUSED_RESBLOCK_WITH_CUTLASS
  switch (p.dtype) {
    case DType::kFloat16:
      return run_typed<cutlass::half_t>(p, stream);
    case DType::kBFloat16:
      return run_typed<cutlass::bfloat16_t>(p, stream);
  }
#endif
  (void)stream;
  return cudaErrorNotSupported;
}

}  // namespace fused_resblock
