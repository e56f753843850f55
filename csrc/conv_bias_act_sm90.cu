// Hopper's path for the common case: CUTLASS 3's sm90 implicit-GEMM convolution
// (TMA im2col loads, wgmma, warp-specialized) with its epilogue fused to ours:
//
//   out = relu(conv(x, W) + bias + residual)        (residual optional)
//
// as CUTLASS's LinCombPerColBiasEltAct: D = ReLU(1 * acc + beta * C + bias[col]),
// columns being output channels, C the residual (beta 1) or, without one, the
// output itself read never (beta 0: CUTLASS skips the source load).
//
// It covers the convolutions of a ResNet's hot path -- 1x1 and 3x3, any stride,
// padding and dilation, groups 1, folded-BN bias, identity residual, ReLU -- on
// dense channels_last tensors. Everything else (grouped convolutions, the merged
// projection, the CIFAR option-A residual, no ReLU, NCHW outputs, unaligned
// channels) runs the WMMA kernel (conv_bias_act_kernel.cuh), which does it all.
// tma_wgmma_refusal() says which, in words; the choice is the launcher's
// (conv_bias_act.cu), and the binding reports a forced choice that cannot run.
//
// Not emulated on the host: CI compiles it; a GPU session tests it.
#include <cstdint>

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

bool dense_nhwc(const Strides4& s, int channels, int h, int w) {
  return s.c == 1 && s.w == channels && s.h == int64_t(w) * channels && s.n == int64_t(h) * w * channels;
}

}  // namespace

const char* tma_wgmma_refusal(const ConvBiasActParams& p) {
#if !FUSED_RESBLOCK_WITH_CUTLASS
  (void)p;
  return "the extension was built without CUTLASS headers (pip install nvidia-cutlass, then rebuild)";
#else
  if (p.compute_capability != 90) return "it needs an sm_90 GPU (Hopper's TMA and wgmma)";
  if (p.groups != 1) return "grouped convolutions run the WMMA kernel";
  if (p.shortcut_x != nullptr) return "a merged projection shortcut runs the WMMA kernel";
  if (!p.relu) return "it always ends in a ReLU";
  if (p.bias == nullptr) return "it needs a bias";
  if (p.in_channels % 8 != 0 || p.out_channels % 8 != 0) {
    return "channel counts must be multiples of 8 (TMA moves 16-byte rows)";
  }
  if (!dense_nhwc(p.out_strides, p.out_channels, p.out_h, p.out_w)) return "the output must be dense channels_last";
  if (p.residual != nullptr &&
      (p.residual_stride != 1 || p.residual_offset != 0 || p.residual_channels != p.out_channels ||
       !dense_nhwc(p.residual_strides, p.out_channels, p.out_h, p.out_w))) {
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

// One CUTLASS sm90 conv fprop: Element in and out, fp32 accumulation and epilogue, fp32 bias.
template <class Element, class TileShape>
struct Sm90ConvBiasReLU {
  using Cluster = Shape<_1, _1, _1>;
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::ReLu, Element, float,
                                                                     float, Element, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, cutlass::layout::TensorNHWC, 8, Element,
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

template <class Element, class Conv>
cudaError_t run(const ConvBiasActParams& p, cudaStream_t stream) {
  using Op = typename Conv::Op;
  using Kernel = typename Conv::Kernel;
  // Symmetric padding, as PyTorch's: CUTLASS derives the same output size from it.
  const typename Conv::Problem problem(cutlass::conv::Mode::kCrossCorrelation,
                                       {p.batch, p.in_h, p.in_w, p.in_channels},
                                       {p.out_channels, p.kernel_h, p.kernel_w, p.in_channels}, {p.pad_h, p.pad_w},
                                       {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w}, {p.dilation_h, p.dilation_w}, 1);
  const auto stride_c = output_stride<typename Kernel::StrideC>(p);
  const auto stride_d = output_stride<typename Kernel::StrideD>(p);
  // Without a residual, C points at the output with beta 0: CUTLASS then loads no source.
  const void* source = p.residual != nullptr ? p.residual : p.out;
  typename Op::Arguments args{
      problem,
      {static_cast<const Element*>(p.x), static_cast<const Element*>(p.weight)},
      {{}, static_cast<const Element*>(source), stride_c, static_cast<Element*>(p.out), stride_d}};
  args.hw_info.sm_count = p.num_sms;
  const cudaError_t no_device = cudaGetDevice(&args.hw_info.device_id);  // x's device: the binding's guard set it
  if (no_device != cudaSuccess) return no_device;
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = p.residual != nullptr ? 1.f : 0.f;
  fusion.bias_ptr = p.bias;

  Op op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Op::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // we allocate nothing per call
  if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  const cutlass::Status status = op.run(stream);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  return status == cutlass::Status::kSuccess ? cudaSuccess : cudaErrorLaunchFailure;
}

// 128 output channels a tile where there are that many; 64 for the narrow layers (ResNet's 64-channel stage).
template <class Element>
cudaError_t run_typed(const ConvBiasActParams& p, cudaStream_t stream) {
  if (p.out_channels <= 64) return run<Element, Sm90ConvBiasReLU<Element, Shape<_128, _64, Shape<_64>>>>(p, stream);
  return run<Element, Sm90ConvBiasReLU<Element, Shape<_128, _128, Shape<_64>>>>(p, stream);
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
