// Python bindings of fused_resblock._C: input checks, layout preparation and
// the launch on PyTorch's current stream. The only translation unit that
// includes torch headers (each costs minutes to compile); kernels live in the
// torch-free .cu files behind conv_bias_act.h.
//
// pybind11 rather than TORCH_LIBRARY: fused_resblock/ops.py already registers
// the op with the dispatcher (torch.library.custom_op, with its fake kernel and
// autograd) and calls a backend from inside it. A second registration here
// would add a dispatcher hop to every call and a namespace that two loaded
// copies of this library (installed and JIT-built) would collide on.
//
// The launch path is CUDA-graph capturable: no host synchronisation, and no
// allocation besides the output when inputs are already channels_last (NCHW
// inputs and non-channels_last weights are converted through the caching
// allocator, which is also capture-safe, but costs a copy per call).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "channel_ops.h"
#include "conv_bias_act.h"
#include "conv_gemm.cuh"
#include "conv_wgrad.h"

namespace fr = fused_resblock;

#define FR_STRINGIFY_(...) #__VA_ARGS__
#define FR_STRINGIFY(...) FR_STRINGIFY_(__VA_ARGS__)

namespace {

constexpr char kOp[] = "fused_resblock._C.conv_bias_act";

// The real launch wants CUDA tensors; the host emulator (tests without a GPU) CPU ones.
enum class Target { kCuda, kHost };

// `x` names the op's first tensor, which the others must match (the backward ops' is their `grad`).
void check_device(const at::Tensor& t, const char* name, const at::Tensor& x, Target target, const char* op = kOp,
                  const char* x_name = "x") {
  if (target == Target::kCuda) {
    TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensor for ", name, ", got a tensor on ", t.device(),
                " (the cuda backend runs CUDA tensors only; the reference backend runs CPU ones)");
  } else {
    TORCH_CHECK(t.is_cpu(), op, " (host emulator): expected CPU tensor for ", name, ", got a tensor on ", t.device());
  }
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ", x_name, " is on ", x.device());
}

void check_activation(const at::Tensor& t, const char* name, const at::Tensor& x, Target target, const char* op = kOp,
                      const char* x_name = "x") {
  check_device(t, name, x, target, op, x_name);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", x_name,
              " has ", x.scalar_type(), "; activations, weights and their gradients share one dtype");
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D tensor for ", name, ", got shape ", t.sizes());
}

// `out` may be the residual itself (each element is read before the same thread writes it) and
// share no other memory with it. ATen decides overlap only for dense tensors: a residual with
// gaps or zero strides ("too hard") that shares out's storage is refused as well.
void check_residual_aliasing(const at::Tensor& out, const at::Tensor& residual) {
  if (out.data_ptr() == residual.data_ptr() && out.sizes().equals(residual.sizes()) &&
      out.strides().equals(residual.strides())) {
    return;
  }
  if (!out.storage().is_alias_of(residual.storage())) return;
  TORCH_CHECK(at::get_overlap_status(out, residual) == at::MemOverlapStatus::No, kOp,
              ": out shares memory with the residual without being that very tensor (same data pointer, "
              "sizes and strides); other blocks would read residual elements already overwritten. Pass the "
              "residual itself as out, or a separate tensor");
}

int checked_int(int64_t v, const char* what, const char* op = kOp) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, op, ": ", what, " = ", v, " is outside the kernel's 32-bit range");
  return int(v);
}

std::pair<int64_t, int64_t> checked_pair(const std::vector<int64_t>& v, const char* name, int64_t min,
                                         const char* op = kOp) {
  TORCH_CHECK(v.size() == 2, op, ": expected 2 values for ", name, ", got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", name, " must be >= ", min, ", got (", v[0], ", ", v[1], ")");
  return {v[0], v[1]};
}

fr::Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The reference backend's rule: channels_last out only for a channels_last x
// that is not also NCHW-contiguous.
at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

fr::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? fr::DType::kFloat16 : fr::DType::kBFloat16;
}

// A per-channel vector (BN statistics and parameters): fp32 [channels] on `like`'s device, when
// given (kept alive in `keep`).
const float* channel_vector(const std::optional<at::Tensor>& v, const char* name, int64_t channels,
                            const at::Tensor& like, Target target, const char* op, std::vector<at::Tensor>& keep,
                            const char* like_name = "y") {
  if (!v || !v->defined()) return nullptr;
  check_device(*v, name, like, target, op, like_name);
  TORCH_CHECK(v->scalar_type() == at::kFloat, op, ": expected float32 for ", name, " (BN vectors are fp32 for "
              "fp16/bf16 activations), got ", v->scalar_type());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == channels, op, ": expected ", name, " of shape (", channels, ",), got ",
              v->sizes());
  const at::Tensor dense = v->contiguous();
  keep.push_back(dense);
  return dense.data_ptr<float>();
}

void check_half_activation(const at::Tensor& t, const char* name, Target target, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  check_device(t, name, t, target, op, name);
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": expected float16 or bfloat16 for ",
              name, ", got ", t.scalar_type(), " (float32 and TF32 run on the triton or reference backend)");
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor for ", name, ", got shape ", t.sizes());
}

// The forward's prologue (conv_stats, and the wgrad of its backward): the previous BN's vectors over
// x's `channels`, checked and set in `p` (ConvBiasActParams or ConvWgradParams).
template <class Params>
void set_prologue(Params& p, const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_invstd,
                  const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias, bool in_relu,
                  int64_t channels, const at::Tensor& like, Target target, const char* op, const char* like_name,
                  std::vector<at::Tensor>& keep) {
  TORCH_CHECK(in_mean.has_value() == in_invstd.has_value(), op, ": in_mean and in_invstd go together");
  TORCH_CHECK(in_mean || (!in_weight && !in_bias), op, ": in_weight and in_bias need in_mean and in_invstd");
  p.in_mean = channel_vector(in_mean, "in_mean", channels, like, target, op, keep, like_name);
  p.in_invstd = channel_vector(in_invstd, "in_invstd", channels, like, target, op, keep, like_name);
  p.in_weight = channel_vector(in_weight, "in_weight", channels, like, target, op, keep, like_name);
  p.in_bias = channel_vector(in_bias, "in_bias", channels, like, target, op, keep, like_name);
  p.in_relu = in_relu && in_mean.has_value();
}

// Checks every input, converts the kernel's operands to its layouts and fills
// the launch parameters. `keep` holds converted copies alive until the launch.
fr::ConvBiasActParams prepare(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation, int64_t groups,
                              const std::optional<at::Tensor>& residual, int64_t residual_stride,
                              int64_t residual_offset, const std::optional<at::Tensor>& shortcut_x,
                              const std::optional<at::Tensor>& shortcut_weight, int64_t shortcut_stride, bool relu,
                              std::optional<at::Tensor>& out, int64_t tile, int64_t pipeline, Target target,
                              std::vector<at::Tensor>& keep, const char* op = kOp) {
  // ---- devices and dtypes
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  check_device(x, "x", x, target, op);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": expected float16 or bfloat16 for x, got ", x.scalar_type(),
              " (float32 and TF32 run on the triton or reference backend)");
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor for x, got shape ", x.sizes());
  check_activation(weight, "weight", x, target, op);

  // ---- convolution geometry
  const auto [stride_h, stride_w] = checked_pair(stride, "stride", 1, op);
  const auto [pad_h, pad_w] = checked_pair(padding, "padding", 0, op);
  const auto [dilation_h, dilation_w] = checked_pair(dilation, "dilation", 1, op);
  const int64_t batch = x.size(0), in_channels = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t out_channels = weight.size(0), kernel_h = weight.size(2), kernel_w = weight.size(3);
  TORCH_CHECK(groups >= 1 && groups <= 65535, op, ": groups must be in [1, 65535], got ", groups);
  TORCH_CHECK(in_channels % groups == 0 && out_channels % groups == 0, op, ": groups=", groups, " must divide x's ",
              in_channels, " channels and weight's ", out_channels, " output channels");
  TORCH_CHECK(weight.size(1) * groups == in_channels, op, ": weight of shape ", weight.sizes(), " expects ",
              weight.size(1) * groups, " input channels (", weight.size(1), " per group x groups=", groups,
              "), but x has ", in_channels);
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, op, ": empty kernel, weight shape ", weight.sizes());
  TORCH_CHECK(
      in_h + 2 * pad_h >= dilation_h * (kernel_h - 1) + 1 && in_w + 2 * pad_w >= dilation_w * (kernel_w - 1) + 1, op,
      ": the padded input ", in_h, "x", in_w, " (padding ", at::IntArrayRef(padding), ") is smaller than the kernel ",
      kernel_h, "x", kernel_w, " at dilation ", at::IntArrayRef(dilation));
  const int64_t out_h = (in_h + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1;
  const int64_t out_w = (in_w + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1;
  const int64_t rows = batch * out_h * out_w;
  TORCH_CHECK(rows <= INT_MAX - 4096, op, ": batch * out_h * out_w = ", rows, " exceeds the kernel's 32-bit range");
  const int64_t depth = kernel_h * kernel_w * (in_channels / groups);
  TORCH_CHECK(depth <= INT_MAX - 4096, op, ": kernel_h * kernel_w * in_channels / groups = ", depth,
              " exceeds the kernel's 32-bit range");
  // grid.y counts column tiles of at least 16 channels, and CUDA caps it at 65535
  TORCH_CHECK(out_channels / groups <= 65535 * 16, op, ": ", out_channels / groups,
              " output channels per group exceed the grid's limit (", 65535 * 16, ")");

  // ---- bias
  if (bias) {
    check_device(*bias, "bias", x, target, op);
    TORCH_CHECK(bias->scalar_type() == at::kFloat, op, ": expected float32 bias (BN folded in fp32), got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, op, ": expected bias of shape (", out_channels,
                ",), got ", bias->sizes());
  }

  // ---- mapped residual
  if (residual) {
    check_activation(*residual, "residual", x, target, op);
    TORCH_CHECK(residual_stride >= 1 && residual_offset >= 0, op, ": residual_stride must be >= 1 and ",
                "residual_offset >= 0, got ", residual_stride, " and ", residual_offset);
    const int64_t rh = (residual->size(2) + residual_stride - 1) / residual_stride;
    const int64_t rw = (residual->size(3) + residual_stride - 1) / residual_stride;
    TORCH_CHECK(residual->size(0) == batch && rh == out_h && rw == out_w, op, ": residual of shape ",
                residual->sizes(), " read at stride ", residual_stride, " gives ", rh, "x", rw,
                " pixels; the output is ", batch, "x", out_channels, "x", out_h, "x", out_w);
    TORCH_CHECK(residual_offset + residual->size(1) <= out_channels, op, ": residual channels [", residual_offset,
                ", ", residual_offset + residual->size(1), ") fall outside the ", out_channels, " output channels");
  }

  // ---- merged projection shortcut
  TORCH_CHECK(shortcut_x.has_value() == shortcut_weight.has_value(), op,
              ": shortcut_x and shortcut_weight go together");
  if (shortcut_x) {
    check_activation(*shortcut_x, "shortcut_x", x, target, op);
    check_activation(*shortcut_weight, "shortcut_weight", x, target, op);
    TORCH_CHECK(shortcut_stride >= 1, op, ": shortcut_stride must be >= 1, got ", shortcut_stride);
    const int64_t sc_channels = shortcut_x->size(1);
    TORCH_CHECK(shortcut_weight->size(0) == out_channels && shortcut_weight->size(1) == sc_channels &&
                    shortcut_weight->size(2) == 1 && shortcut_weight->size(3) == 1,
                op, ": expected shortcut_weight of shape (", out_channels, ", ", sc_channels, ", 1, 1), got ",
                shortcut_weight->sizes());
    const int64_t sh = (shortcut_x->size(2) - 1) / shortcut_stride + 1;
    const int64_t sw = (shortcut_x->size(3) - 1) / shortcut_stride + 1;
    TORCH_CHECK(shortcut_x->size(0) == batch && shortcut_x->size(2) >= 1 && shortcut_x->size(3) >= 1 && sh == out_h &&
                    sw == out_w,
                op, ": shortcut_x of shape ", shortcut_x->sizes(), " at stride ", shortcut_stride, " gives ", sh, "x",
                sw, " pixels; the output is ", batch, "x", out_channels, "x", out_h, "x", out_w);
  }

  // ---- output
  if (out) {
    check_device(*out, "out", x, target, op);
    TORCH_CHECK(out->scalar_type() == x.scalar_type(), op, ": out has dtype ", out->scalar_type(), ", x has ",
                x.scalar_type());
    TORCH_CHECK(out->sizes() == at::IntArrayRef({batch, out_channels, out_h, out_w}), op, ": expected out of shape (",
                batch, ", ", out_channels, ", ", out_h, ", ", out_w, "), got ", out->sizes());
    TORCH_CHECK(out->is_non_overlapping_and_dense(), op, ": out must be non-overlapping and dense");
  } else {
    out = at::empty({batch, out_channels, out_h, out_w}, x.options().memory_format(memory_format_of(x)));
  }
  TORCH_CHECK(tile >= 0 && tile <= 3, op, ": tile must be 0 (auto), 1 (narrow), 2 (medium) or 3 (large)");
  TORCH_CHECK(pipeline >= 0 && pipeline <= 4, op,
              ": pipeline must be 0 (auto), 1 (registers), 2 (cp.async), 3 (TMA + wgmma) or 4 (WMMA, its own main "
              "loop), got ", pipeline);

  // ---- the kernel's layouts: NHWC activations, KRSC weights (channels_last)
  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight_krsc = weight.contiguous(at::MemoryFormat::ChannelsLast);
  keep.push_back(x_nhwc);
  keep.push_back(weight_krsc);

  // The kernels read their inputs while other blocks write `out`: it must share no memory with them
  // (the residual may be `out` itself: each element is read before the same element is written).
  at::assert_no_overlap(*out, x_nhwc);
  at::assert_no_overlap(*out, weight_krsc);
  if (bias) at::assert_no_overlap(*out, *bias);
  if (residual) check_residual_aliasing(*out, *residual);
  if (shortcut_x) {
    at::assert_no_overlap(*out, *shortcut_x);
    at::assert_no_overlap(*out, *shortcut_weight);
  }

  fr::ConvBiasActParams p{};
  p.dtype = dtype_of(x);
  p.x = x_nhwc.data_ptr();
  p.batch = checked_int(batch, "batch", op);
  p.in_h = checked_int(in_h, "input height", op);
  p.in_w = checked_int(in_w, "input width", op);
  p.in_channels = checked_int(in_channels, "input channels", op);
  p.weight = weight_krsc.data_ptr();
  p.out_channels = checked_int(out_channels, "output channels", op);
  p.kernel_h = checked_int(kernel_h, "kernel height", op);
  p.kernel_w = checked_int(kernel_w, "kernel width", op);
  p.groups = int(groups);
  p.stride_h = checked_int(stride_h, "stride", op);
  p.stride_w = checked_int(stride_w, "stride", op);
  p.pad_h = checked_int(pad_h, "padding", op);
  p.pad_w = checked_int(pad_w, "padding", op);
  p.dilation_h = checked_int(dilation_h, "dilation", op);
  p.dilation_w = checked_int(dilation_w, "dilation", op);
  if (bias) {
    const at::Tensor b = bias->contiguous();
    keep.push_back(b);
    p.bias = b.data_ptr<float>();
  }
  if (residual) {
    p.residual = residual->data_ptr();
    p.residual_strides = strides_of(*residual);
    p.residual_channels = checked_int(residual->size(1), "residual channels", op);
    p.residual_stride = checked_int(residual_stride, "residual_stride", op);
    p.residual_offset = checked_int(residual_offset, "residual_offset", op);
  }
  if (shortcut_x) {
    const at::Tensor sx = shortcut_x->contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor sw = shortcut_weight->contiguous();
    keep.push_back(sx);
    keep.push_back(sw);
    p.shortcut_x = sx.data_ptr();
    p.shortcut_weight = sw.data_ptr();
    p.shortcut_h = checked_int(sx.size(2), "shortcut height", op);
    p.shortcut_w = checked_int(sx.size(3), "shortcut width", op);
    p.shortcut_channels = checked_int(sx.size(1), "shortcut channels", op);
    p.shortcut_stride = checked_int(shortcut_stride, "shortcut_stride", op);
  }
  p.out = out->data_ptr();
  p.out_strides = strides_of(*out);
  p.out_h = int(out_h);
  p.out_w = int(out_w);
  p.relu = relu;
  p.tile = fr::TileShapeKind(int(tile));
  p.pipeline = fr::Pipeline(int(pipeline));
  TORCH_CHECK(p.pipeline != fr::Pipeline::kAsyncCopy || fr::async_copy_applies(p, fr::make_conv_gemm(p)), op,
              ": pipeline 2 (cp.async) moves 16-byte chunks only: it needs channels per group and shortcut "
              "channels that are multiples of 8 and 16-byte-aligned x, weight, shortcut_x and shortcut_weight");
  p.num_sms = 1;
  p.compute_capability = 0;  // the caller's: the device's, or the emulated one
  p.sm90a_image = false;
  return p;
}

// A forced kTmaWgmma that cannot run is the caller's error, said in words.
void check_forced_tma_wgmma(const fr::ConvBiasActParams& p) {
  if (p.pipeline != fr::Pipeline::kTmaWgmma) return;
  const char* refusal = fr::tma_wgmma_refusal(p);
  TORCH_CHECK(refusal == nullptr, kOp, ": pipeline 3 (CUTLASS's TMA + wgmma kernel) cannot run this call: ", refusal,
              " (pipeline 0 picks a kernel that can)");
}

// Whether `device` runs this build's sm_90a image (CUTLASS's kernel needs it), asked once per device.
bool sm90a_image_on(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= kMaxDevices) return fr::sm90a_image_loaded();
  int answer = known[device].load(std::memory_order_relaxed);
  if (answer == 0) {
    answer = fr::sm90a_image_loaded() ? 1 : 2;  // the caller's guard made `device` current
    known[device].store(answer, std::memory_order_relaxed);
  }
  return answer == 1;
}

// A device attribute: a cheap driver query (no synchronisation, fine during graph capture).
int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  const cudaError_t error = cudaDeviceGetAttribute(&value, attribute, device);
  TORCH_CHECK(error == cudaSuccess, kOp, ": cudaDeviceGetAttribute failed: ", cudaGetErrorString(error));
  return value;
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                         const std::vector<int64_t>& dilation, int64_t groups,
                         const std::optional<at::Tensor>& residual, int64_t residual_stride, int64_t residual_offset,
                         const std::optional<at::Tensor>& shortcut_x, const std::optional<at::Tensor>& shortcut_weight,
                         int64_t shortcut_stride, bool relu, std::optional<at::Tensor> out, int64_t tile,
                         int64_t pipeline) {
  TORCH_CHECK(x.defined() && x.is_cuda(), kOp, ": expected CUDA tensor for x, got ",
              x.defined() ? x.device().str() : std::string("an undefined tensor"),
              " (the cuda backend runs CUDA tensors only; the reference backend runs CPU ones)");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int device = x.device().index();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(major >= 8, kOp, ": needs a GPU of compute capability 8.0 or newer, device ", device, " is ", major, ".",
              device_attribute(cudaDevAttrComputeCapabilityMinor, device));
  std::vector<at::Tensor> keep;
  fr::ConvBiasActParams p =
      prepare(x, weight, bias, stride, padding, dilation, groups, residual, residual_stride, residual_offset,
              shortcut_x, shortcut_weight, shortcut_stride, relu, out, tile, pipeline, Target::kCuda, keep);
  p.num_sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  p.compute_capability = major * 10 + device_attribute(cudaDevAttrComputeCapabilityMinor, device);
  p.sm90a_image = p.compute_capability == 90 && sm90a_image_on(device);
  check_forced_tma_wgmma(p);
  const cudaError_t error = fr::launch_conv_bias_act(p, c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(!(error == cudaErrorNotSupported && p.pipeline == fr::Pipeline::kTmaWgmma), kOp,
              ": pipeline 3 (CUTLASS's TMA + wgmma kernel) cannot run this call: CUTLASS's can_implement refused it "
              "(TMA im2col's limits on padding, dilation and filter extent; pipeline 0 picks a kernel that can)");
  TORCH_CHECK(error == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(error));
  return *out;
}

at::Tensor emulate_conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                 const std::vector<int64_t>& dilation, int64_t groups,
                                 const std::optional<at::Tensor>& residual, int64_t residual_stride,
                                 int64_t residual_offset, const std::optional<at::Tensor>& shortcut_x,
                                 const std::optional<at::Tensor>& shortcut_weight, int64_t shortcut_stride, bool relu,
                                 std::optional<at::Tensor> out, int64_t tile, int64_t pipeline) {
  std::vector<at::Tensor> keep;
  fr::ConvBiasActParams p =
      prepare(x, weight, bias, stride, padding, dilation, groups, residual, residual_stride, residual_offset,
              shortcut_x, shortcut_weight, shortcut_stride, relu, out, tile, pipeline, Target::kHost, keep);
  p.num_sms = 132;  // an H100's, so kAuto picks what it would there
  p.compute_capability = 90;
  p.sm90a_image = true;
  check_forced_tma_wgmma(p);
  TORCH_CHECK(p.pipeline != fr::Pipeline::kTmaWgmma, kOp,
              " (host emulator): pipeline 3 (CUTLASS's TMA + wgmma kernel) has no host emulation; a GPU tests it");
  fr::emulate_conv_bias_act(p);  // kAuto emulates the WMMA kernel's choice, also where a GPU would take kTmaWgmma
  return *out;
}

// Why the kTmaWgmma kernel would not run this call on a GPU of `compute_capability` (running this build's
// sm_90a image or not), or "" when it would.
// CPU tensors, like the emulator: the choice is host code, so CI tests it.
std::string tma_wgmma_refusal(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation, int64_t groups,
                              const std::optional<at::Tensor>& residual, int64_t residual_stride,
                              int64_t residual_offset, const std::optional<at::Tensor>& shortcut_x,
                              const std::optional<at::Tensor>& shortcut_weight, int64_t shortcut_stride, bool relu,
                              std::optional<at::Tensor> out, int64_t compute_capability, bool sm90a_image) {
  std::vector<at::Tensor> keep;
  fr::ConvBiasActParams p =
      prepare(x, weight, bias, stride, padding, dilation, groups, residual, residual_stride, residual_offset,
              shortcut_x, shortcut_weight, shortcut_stride, relu, out, 0, 0, Target::kHost, keep);
  p.compute_capability = int(compute_capability);
  p.sm90a_image = sm90a_image;
  const char* refusal = fr::tma_wgmma_refusal(p);
  return refusal == nullptr ? std::string() : std::string(refusal);
}

std::string kernel_image_error(int64_t device_index) {
  const c10::cuda::CUDAGuard device_guard(c10::Device(c10::DeviceType::CUDA, c10::DeviceIndex(device_index)));
  const cudaError_t error = fr::probe_conv_bias_act_kernels();
  if (error == cudaSuccess) return "";
  (void)cudaGetLastError();  // the probe's error must not surface at an unrelated later check
  return cudaGetErrorString(error);
}

// ---------------------------------------------------------------- conv_stats (training mode)
// y = conv(relu?(BN_in(x))) + bias with the batch statistics of y: the forward kernel with the
// prologue in its operand gather and the statistics epilogue, then the finalize launch (conv_stats.cuh).
constexpr char kStatsOp[] = "fused_resblock._C.conv_stats";

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats_impl(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    int64_t groups, const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_invstd,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias, bool in_relu,
    bool compute_stats, std::optional<at::Tensor> out, int64_t tile, int64_t pipeline, Target target, int num_sms,
    int compute_capability) {
  TORCH_CHECK(pipeline != 3, kStatsOp, ": pipeline 3 (CUTLASS's TMA + wgmma kernel) has no prologue or statistics "
              "epilogue; use 0 (auto), 1 (registers), 2 (cp.async) or 4 (WMMA)");
  std::vector<at::Tensor> keep;
  const std::optional<at::Tensor> none;
  fr::ConvBiasActParams p = prepare(x, weight, bias, stride, padding, dilation, groups, none, 1, 0, none, none, 1,
                                    false, out, tile, pipeline, target, keep, kStatsOp);
  set_prologue(p, in_mean, in_invstd, in_weight, in_bias, in_relu, x.size(1), x, target, kStatsOp, "x", keep);
  for (const at::Tensor& input : keep) {
    if (input.scalar_type() == at::kFloat) at::assert_no_overlap(*out, input);
  }
  TORCH_CHECK(p.pipeline != fr::Pipeline::kAsyncCopy || fr::async_copy_applies(p, fr::make_conv_gemm(p)), kStatsOp,
              ": pipeline 2 (cp.async) moves 16-byte chunks only: it needs channels per group that are a multiple of "
              "8, 16-byte-aligned x and weight, and no prologue (applied in registers)");
  p.num_sms = num_sms;
  p.compute_capability = compute_capability;
  p.sm90a_image = false;  // never CUTLASS's kernel (tma_wgmma_refusal says so too)

  const int64_t out_channels = weight.size(0);
  const int64_t rows = x.size(0) * out->size(2) * out->size(3);
  const at::TensorOptions stat_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({compute_stats ? out_channels : 0}, stat_options);
  at::Tensor var = at::empty({compute_stats ? out_channels : 0}, stat_options);
  at::Tensor partials;
  if (compute_stats) {  // every (row tile, channel) entry is written by its block: no fill
    const int64_t row_tiles = (rows + fr::kStatsRowTile - 1) / fr::kStatsRowTile;
    partials = at::empty({std::max<int64_t>(row_tiles * out_channels * 2, 1)}, stat_options);
    p.stats_partials = partials.data_ptr<float>();
  }
  if (target == Target::kHost) {
    fr::emulate_conv_bias_act(p);
    if (compute_stats) fr::emulate_conv_stats_finalize(p, mean.data_ptr<float>(), var.data_ptr<float>());
    return {*out, mean, var};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t error = fr::launch_conv_bias_act(p, stream);
  TORCH_CHECK(error == cudaSuccess, kStatsOp, ": kernel launch failed: ", cudaGetErrorString(error));
  if (compute_stats) {
    error = fr::launch_conv_stats_finalize(p, mean.data_ptr<float>(), var.data_ptr<float>(), stream);
    TORCH_CHECK(error == cudaSuccess, kStatsOp, ": finalize launch failed: ", cudaGetErrorString(error));
  }
  return {*out, mean, var};
}

// ---------------------------------------------------------------- the training-mode BN ops
// bn_add_act and its backward, and the per-channel pass conv_stats_backward's prologue and
// statistics take (channel_ops.h). Tensors are made dense NHWC for the kernels; outputs come back
// in their input's memory format (an NCHW one costs a copy each way).
constexpr char kBnOp[] = "fused_resblock._C.bn_add_act";
constexpr char kBnBackwardOp[] = "fused_resblock._C.bn_add_act_backward";
constexpr char kChannelOp[] = "fused_resblock._C.channel_backward";

// residual read at `stride` from channel `offset` must give `like`'s (N, H, W) inside its channels.
void check_mapped_residual(const at::Tensor& residual, const at::Tensor& like, int64_t stride, int64_t offset,
                           const char* op) {
  TORCH_CHECK(stride >= 1 && offset >= 0, op, ": residual_stride must be >= 1 and residual_offset >= 0, got ", stride,
              " and ", offset);
  const int64_t rh = (residual.size(2) + stride - 1) / stride, rw = (residual.size(3) + stride - 1) / stride;
  TORCH_CHECK(residual.size(0) == like.size(0) && rh == like.size(2) && rw == like.size(3), op, ": residual of shape ",
              residual.sizes(), " read at stride ", stride, " gives ", rh, "x", rw, " pixels; y is ", like.sizes());
  TORCH_CHECK(offset + residual.size(1) <= like.size(1), op, ": residual channels [", offset, ", ",
              offset + residual.size(1), ") fall outside y's ", like.size(1));
}

at::Tensor nhwc(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// A dense NHWC result as `like`'s memory format (no copy when that is channels_last).
at::Tensor in_format_of(const at::Tensor& result, const at::Tensor& like) {
  return result.contiguous(memory_format_of(like));
}

void launch_or_emulate(const fr::ChannelBackwardParams& p, Target target, const char* op) {
  if (target == Target::kHost) {
    fr::emulate_channel_backward(p);
    return;
  }
  const cudaError_t error = fr::launch_channel_backward(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
}

at::Tensor bn_add_act_impl(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_mean,
                           const std::optional<at::Tensor>& res_invstd, const std::optional<at::Tensor>& res_weight,
                           const std::optional<at::Tensor>& res_bias, int64_t residual_stride, int64_t residual_offset,
                           bool relu, Target target) {
  const char* op = kBnOp;
  check_half_activation(y, "y", target, op);
  const int64_t channels = y.size(1);
  std::vector<at::Tensor> keep;
  fr::BnAddActParams p{};
  p.dtype = dtype_of(y);
  p.mean = channel_vector(mean, "mean", channels, y, target, op, keep);
  p.invstd = channel_vector(invstd, "invstd", channels, y, target, op, keep);
  p.weight = channel_vector(weight, "weight", channels, y, target, op, keep);
  p.bias = channel_vector(bias, "bias", channels, y, target, op, keep);
  const at::Tensor y_nhwc = nhwc(y);
  at::Tensor residual_nhwc;
  if (residual) {
    check_activation(*residual, "residual", y, target, op, "y");
    check_mapped_residual(*residual, y, residual_stride, residual_offset, op);
    TORCH_CHECK(res_mean.has_value() == res_invstd.has_value(), op, ": res_mean and res_invstd go together");
    residual_nhwc = nhwc(*residual);
    const int64_t rc = residual->size(1);
    p.residual = residual_nhwc.data_ptr();
    p.res_h = checked_int(residual->size(2), "residual height", op);
    p.res_w = checked_int(residual->size(3), "residual width", op);
    p.res_channels = checked_int(rc, "residual channels", op);
    p.res_stride = checked_int(residual_stride, "residual_stride", op);
    p.res_offset = checked_int(residual_offset, "residual_offset", op);
    p.res_mean = channel_vector(res_mean, "res_mean", rc, y, target, op, keep);
    p.res_invstd = channel_vector(res_invstd, "res_invstd", rc, y, target, op, keep);
    p.res_weight = channel_vector(res_weight, "res_weight", rc, y, target, op, keep);
    p.res_bias = channel_vector(res_bias, "res_bias", rc, y, target, op, keep);
  } else {
    TORCH_CHECK(!res_mean && !res_invstd && !res_weight && !res_bias, op, ": a residual BN needs a residual");
  }
  at::Tensor out = at::empty_like(y_nhwc, y_nhwc.options(), at::MemoryFormat::ChannelsLast);
  p.y = y_nhwc.data_ptr();
  p.out = out.data_ptr();
  p.batch = checked_int(y.size(0), "batch", op);
  p.channels = checked_int(channels, "channels", op);
  p.height = checked_int(y.size(2), "height", op);
  p.width = checked_int(y.size(3), "width", op);
  p.relu = relu;
  if (target == Target::kHost) {
    fr::emulate_bn_add_act(p);
  } else {
    const cudaError_t error = fr::launch_bn_add_act(p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
  }
  return in_format_of(out, y);
}

// One channel_backward pass over T (tensor `t`, NHWC copy `t_nhwc`): grad_t when `want_t`, the
// requested per-channel outputs (each fp32 [channels] or undefined) from its sums.
struct ChannelPass {
  at::Tensor grad_t, grad_mean, grad_invstd, grad_weight, grad_bias;
};

ChannelPass run_channel_pass(fr::ChannelBackwardParams p, const at::Tensor& t_nhwc, bool want_t,
                             const std::array<bool, 4>& want, Target target, const char* op) {
  ChannelPass out;
  const at::TensorOptions f32 = t_nhwc.options().dtype(at::kFloat);
  const int64_t channels = t_nhwc.size(1);
  p.t = t_nhwc.data_ptr();
  p.batch = checked_int(t_nhwc.size(0), "batch", op);
  p.t_channels = checked_int(channels, "channels", op);
  p.t_h = checked_int(t_nhwc.size(2), "height", op);
  p.t_w = checked_int(t_nhwc.size(3), "width", op);
  if (want_t) {
    out.grad_t = at::empty_like(t_nhwc, t_nhwc.options(), at::MemoryFormat::ChannelsLast);
    p.grad_t = out.grad_t.data_ptr();
  }
  at::Tensor* const targets[4] = {&out.grad_mean, &out.grad_invstd, &out.grad_weight, &out.grad_bias};
  float** const slots[4] = {&p.grad_mean, &p.grad_invstd, &p.grad_weight, &p.grad_bias};
  bool sums = false;
  for (int i = 0; i < 4; ++i) {
    if (!want[i]) continue;
    *targets[i] = at::empty({channels}, f32);
    *slots[i] = targets[i]->data_ptr<float>();
    sums = true;
  }
  at::Tensor partials;
  if (sums) {
    partials = at::empty({std::max<int64_t>(fr::channel_backward_partial_floats(p), 1)}, f32);
    p.partials = partials.data_ptr<float>();
  }
  if (want_t || sums) launch_or_emulate(p, target, op);
  return out;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::vector<std::optional<at::Tensor>> bn_add_act_backward_impl(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& res_mean, const std::optional<at::Tensor>& res_invstd,
    const std::optional<at::Tensor>& res_weight, int64_t residual_stride, int64_t residual_offset, bool relu,
    const std::vector<bool>& needs, Target target) {
  const char* op = kBnBackwardOp;
  TORCH_CHECK(needs.size() == 10, op, ": expected 10 needs, got ", needs.size());
  check_half_activation(grad, "grad", target, op);
  check_activation(out, "out", grad, target, op, "grad");
  check_activation(y, "y", grad, target, op, "grad");
  TORCH_CHECK(out.sizes() == grad.sizes() && y.sizes() == grad.sizes(), op, ": grad ", grad.sizes(), ", out ",
              out.sizes(), " and y ", y.sizes(), " must have one shape");
  const int64_t channels = y.size(1);
  std::vector<at::Tensor> keep;
  const at::Tensor grad_nhwc = nhwc(grad), y_nhwc = nhwc(y);
  at::Tensor mask_nhwc;
  if (relu) mask_nhwc = nhwc(out);

  fr::ChannelBackwardParams base{};
  base.dtype = dtype_of(grad);
  base.grad = grad_nhwc.data_ptr();
  base.mask = relu ? mask_nhwc.data_ptr() : nullptr;
  base.out_h = checked_int(grad.size(2), "height", op);
  base.out_w = checked_int(grad.size(3), "width", op);
  base.out_channels = checked_int(channels, "channels", op);
  base.stride = 1;

  std::vector<std::optional<at::Tensor>> grads(10);
  fr::ChannelBackwardParams main = base;
  main.mean = channel_vector(mean, "mean", channels, grad, target, op, keep, "grad");
  main.invstd = channel_vector(invstd, "invstd", channels, grad, target, op, keep, "grad");
  main.weight = channel_vector(weight, "weight", channels, grad, target, op, keep, "grad");
  const bool has_weight = main.weight != nullptr;
  const ChannelPass m = run_channel_pass(main, y_nhwc, needs[0], {needs[1], needs[2], needs[3] && has_weight, needs[4]},
                                         target, op);
  if (m.grad_t.defined()) grads[0] = in_format_of(m.grad_t, y);
  grads[1] = defined_or_none(m.grad_mean);
  grads[2] = defined_or_none(m.grad_invstd);
  grads[3] = defined_or_none(m.grad_weight);
  grads[4] = defined_or_none(m.grad_bias);

  const bool any_residual = needs[5] || needs[6] || needs[7] || needs[8] || needs[9];
  if (residual && any_residual) {
    check_activation(*residual, "residual", grad, target, op, "grad");
    check_mapped_residual(*residual, y, residual_stride, residual_offset, op);
    TORCH_CHECK(res_mean.has_value() == res_invstd.has_value(), op, ": res_mean and res_invstd go together");
    const int64_t rc = residual->size(1);
    fr::ChannelBackwardParams res = base;
    res.stride = checked_int(residual_stride, "residual_stride", op);
    res.offset = checked_int(residual_offset, "residual_offset", op);
    res.mean = channel_vector(res_mean, "res_mean", rc, grad, target, op, keep, "grad");
    res.invstd = channel_vector(res_invstd, "res_invstd", rc, grad, target, op, keep, "grad");
    res.weight = channel_vector(res_weight, "res_weight", rc, grad, target, op, keep, "grad");
    const bool bn = res.mean != nullptr;
    const at::Tensor residual_nhwc = nhwc(*residual);
    const ChannelPass r = run_channel_pass(
        res, residual_nhwc, needs[5],
        {bn && needs[6], bn && needs[7], bn && needs[8] && res.weight != nullptr, bn && needs[9]}, target, op);
    if (r.grad_t.defined()) grads[5] = in_format_of(r.grad_t, *residual);
    grads[6] = defined_or_none(r.grad_mean);
    grads[7] = defined_or_none(r.grad_invstd);
    grads[8] = defined_or_none(r.grad_weight);
    grads[9] = defined_or_none(r.grad_bias);
  }
  return grads;
}

// conv_stats_backward's two per-channel passes (fused_resblock/backends/cuda.py composes them with
// conv_dgrad and conv_wgrad):
// * fold (t = y, the conv's output): g = grad_y + shift[c] + slope[c] * (y - mean[c]) in fp32, out in
//   the dtype, and its channel sums as grad_bias when asked;
// * prologue (t = x, grad = the dgrad's result): the ReLU mask recomputed from x when in_relu, grad_x =
//   g * in_weight * in_invstd, and the prologue BN's gradients (grad_in_*) from the sums.
// Returns [grad_t, grad_mean, grad_invstd, grad_weight, grad_bias] (None where not asked).
std::vector<std::optional<at::Tensor>> channel_backward_impl(
    const at::Tensor& grad, const at::Tensor& t, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& fold_shift,
    const std::optional<at::Tensor>& fold_slope, bool prologue_relu, const std::vector<bool>& needs, Target target) {
  const char* op = kChannelOp;
  TORCH_CHECK(needs.size() == 5, op, ": expected 5 needs, got ", needs.size());
  check_half_activation(grad, "grad", target, op);
  check_activation(t, "t", grad, target, op, "grad");
  TORCH_CHECK(t.sizes() == grad.sizes(), op, ": t ", t.sizes(), " and grad ", grad.sizes(), " must have one shape");
  TORCH_CHECK(!prologue_relu || (mean && invstd), op, ": the prologue's ReLU mask needs mean and invstd");
  TORCH_CHECK(!(needs[1] || needs[2] || needs[3]) || (mean && invstd), op, ": BN gradients need mean and invstd");
  const int64_t channels = t.size(1);
  std::vector<at::Tensor> keep;
  const at::Tensor grad_nhwc = nhwc(grad), t_nhwc = nhwc(t);
  fr::ChannelBackwardParams p{};
  p.dtype = dtype_of(grad);
  p.grad = grad_nhwc.data_ptr();
  p.out_h = checked_int(grad.size(2), "height", op);
  p.out_w = checked_int(grad.size(3), "width", op);
  p.out_channels = checked_int(channels, "channels", op);
  p.stride = 1;
  p.mean = channel_vector(mean, "mean", channels, grad, target, op, keep, "grad");
  p.invstd = channel_vector(invstd, "invstd", channels, grad, target, op, keep, "grad");
  p.weight = channel_vector(weight, "weight", channels, grad, target, op, keep, "grad");
  p.prologue_bias = channel_vector(bias, "bias", channels, grad, target, op, keep, "grad");
  p.fold_shift = channel_vector(fold_shift, "fold_shift", channels, grad, target, op, keep, "grad");
  p.fold_slope = channel_vector(fold_slope, "fold_slope", channels, grad, target, op, keep, "grad");
  p.prologue_mask = prologue_relu;
  const ChannelPass r = run_channel_pass(p, t_nhwc, needs[0], {needs[1], needs[2], needs[3] && p.weight != nullptr,
                                                                 needs[4]}, target, op);
  return {r.grad_t.defined() ? std::optional<at::Tensor>(in_format_of(r.grad_t, t)) : std::nullopt,
          defined_or_none(r.grad_mean), defined_or_none(r.grad_invstd), defined_or_none(r.grad_weight),
          defined_or_none(r.grad_bias)};
}

// ---------------------------------------------------------------- the eval-mode backward
// The op layer's conv_bias_act_backward on the cuda backend (fused_resblock/backends/cuda.py) calls
// these two per convolution: g, the output's gradient, is masked by the forward's output where a ReLU
// ended it (grad_mask) as the kernels load it, never stored.
constexpr char kDgradOp[] = "fused_resblock._C.conv_dgrad";
constexpr char kWgradOp[] = "fused_resblock._C.conv_wgrad";

void check_grad(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask, const char* op, Target target) {
  check_half_activation(grad, "grad", target, op);
  if (grad_mask) {
    check_activation(*grad_mask, "grad_mask", grad, target, op, "grad");
    TORCH_CHECK(grad_mask->sizes() == grad.sizes(), op, ": grad_mask (the forward's output) has shape ",
                grad_mask->sizes(), ", grad ", grad.sizes());
  }
}

// The forward convolution's geometry, checked against grad: an input of in_h x in_w gives grad's map.
struct Geometry {
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

Geometry check_geometry(const at::Tensor& grad, int64_t in_h, int64_t in_w, int64_t kernel_h, int64_t kernel_w,
                        const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                        const std::vector<int64_t>& dilation, const char* op) {
  const auto [stride_h, stride_w] = checked_pair(stride, "stride", 1, op);
  const auto [pad_h, pad_w] = checked_pair(padding, "padding", 0, op);
  const auto [dilation_h, dilation_w] = checked_pair(dilation, "dilation", 1, op);
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, op, ": empty kernel ", kernel_h, "x", kernel_w);
  TORCH_CHECK(in_h + 2 * pad_h >= dilation_h * (kernel_h - 1) + 1 && in_w + 2 * pad_w >= dilation_w * (kernel_w - 1) + 1,
              op, ": the padded input ", in_h, "x", in_w, " is smaller than the kernel ", kernel_h, "x", kernel_w);
  const int64_t out_h = (in_h + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1;
  const int64_t out_w = (in_w + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1;
  TORCH_CHECK(grad.size(2) == out_h && grad.size(3) == out_w, op, ": grad's map is ", grad.size(2), "x", grad.size(3),
              ", but the convolution of a ", in_h, "x", in_w, " input gives ", out_h, "x", out_w);
  return {stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w};
}

void check_rows(int64_t rows, int64_t depth, const char* op) {
  TORCH_CHECK(rows <= INT_MAX - 4096 && depth <= INT_MAX - 4096, op, ": ", rows, " pixels or a depth of ", depth,
              " exceed the kernel's 32-bit range");
}

// One stride phase of a dgrad along one axis: the input rows ih = phase + stride * i, the taps that
// reach them (first, first + step, ...: taps - 1 more), and how they read g: g[i + offset - t * g_dilation]
// for the t-th of them.
struct PhaseTaps {
  int64_t first = 0, step = 1, taps = 0, offset = 0, g_dilation = 1;
};

PhaseTaps phase_taps(int64_t phase, int64_t pad, int64_t dilation, int64_t stride, int64_t kernel) {
  // tap r reaches ih when (ih + pad - r * dilation) is a multiple of the stride
  PhaseTaps t;
  t.step = stride / std::gcd(stride, dilation);
  for (int64_t r = 0; r < std::min(t.step, kernel); ++r) {
    if (((phase + pad - r * dilation) % stride + stride) % stride == 0) {
      t.first = r;
      t.taps = (kernel - 1 - r) / t.step + 1;
      t.offset = (phase + pad - r * dilation) / stride;  // exact
      t.g_dilation = t.step * dilation / stride;
      return t;
    }
  }
  return t;  // no tap reaches this phase: its gradient is zero
}

// grad_x = conv_transpose(g, weight), one launch of the forward's WMMA kernel per stride phase
// (rows ih = ph + stride * i): in one phase the taps that reach a row are the same for every row, so
// the phase is a stride-1 convolution of g with those taps at a negative dilation (row i reads g at
// i + offset - t * g_dilation: the kernel's gather takes any sign), their channel axes swapped
// ([C_in, taps_h, taps_w, C_out / groups]: one copy of that part of the weight), written into the
// strided view out[:, :, ph::stride, pw::stride]. No MAC is spent on a tap that misses.
at::Tensor conv_dgrad_impl(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask, const at::Tensor& weight,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t groups,
                           const std::vector<int64_t>& input_size, std::optional<at::Tensor> out, int64_t tile,
                           int64_t pipeline, Target target, int num_sms, int compute_capability) {
  const char* op = kDgradOp;
  check_grad(grad, grad_mask, op, target);
  check_activation(weight, "weight", grad, target, op, "grad");
  TORCH_CHECK(input_size.size() == 2, op, ": expected input_size (h, w), got ", input_size.size(), " values");
  TORCH_CHECK(groups >= 1 && groups <= 65535, op, ": groups must be in [1, 65535], got ", groups);
  const int64_t batch = grad.size(0), out_channels = weight.size(0), group_in = weight.size(1);
  const int64_t kernel_h = weight.size(2), kernel_w = weight.size(3);
  TORCH_CHECK(out_channels % groups == 0 && grad.size(1) == out_channels, op, ": weight of shape ", weight.sizes(),
              " at groups=", groups, " does not fit grad's ", grad.size(1), " channels");
  const int64_t in_channels = group_in * groups, in_h = input_size[0], in_w = input_size[1];
  const Geometry geo = check_geometry(grad, in_h, in_w, kernel_h, kernel_w, stride, padding, dilation, op);
  check_rows(batch * in_h * in_w, kernel_h * kernel_w * (out_channels / groups), op);
  if (out) {
    check_activation(*out, "out", grad, target, op, "grad");
    TORCH_CHECK(out->sizes() == at::IntArrayRef({batch, in_channels, in_h, in_w}), op, ": expected out of shape (",
                batch, ", ", in_channels, ", ", in_h, ", ", in_w, "), got ", out->sizes());
    TORCH_CHECK(out->is_non_overlapping_and_dense(), op, ": out must be non-overlapping and dense");
  } else {
    out = at::empty({batch, in_channels, in_h, in_w}, grad.options().memory_format(memory_format_of(grad)));
  }
  TORCH_CHECK(tile >= 0 && tile <= 3, op, ": tile must be 0 (auto), 1 (narrow), 2 (medium) or 3 (large)");
  TORCH_CHECK(pipeline == 0 || pipeline == 1 || pipeline == 2 || pipeline == 4, op,
              ": pipeline must be 0 (auto), 1 (registers), 2 (cp.async) or 4 (WMMA); the dgrad has no TMA + wgmma "
              "kernel, got ", pipeline);

  const at::Tensor grad_nhwc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor mask_nhwc;
  if (grad_mask) mask_nhwc = grad_mask->contiguous(at::MemoryFormat::ChannelsLast);
  at::assert_no_overlap(*out, grad_nhwc);
  at::assert_no_overlap(*out, weight);
  if (grad_mask) at::assert_no_overlap(*out, mask_nhwc);

  fr::ConvBiasActParams base{};
  base.dtype = dtype_of(grad);
  base.x = grad_nhwc.data_ptr();
  base.grad_mask = grad_mask ? mask_nhwc.data_ptr() : nullptr;
  base.batch = checked_int(batch, "batch", op);
  base.in_h = checked_int(grad.size(2), "grad height", op);
  base.in_w = checked_int(grad.size(3), "grad width", op);
  base.in_channels = checked_int(out_channels, "output channels", op);
  base.out_channels = checked_int(in_channels, "input channels", op);
  base.groups = int(groups);
  base.stride_h = base.stride_w = 1;
  base.relu = false;
  base.tile = fr::TileShapeKind(int(tile));
  base.pipeline = fr::Pipeline(int(pipeline));
  base.num_sms = num_sms;
  base.compute_capability = compute_capability;
  base.sm90a_image = false;  // never CUTLASS's kernel (tma_wgmma_refusal says so too)
  const cudaStream_t stream = target == Target::kCuda ? c10::cuda::getCurrentCUDAStream().stream() : nullptr;

  // Rows no tap reaches (a 1x1 projection's at stride 2: three phases of four) are zero: one fill of the
  // whole output first, cheaper than a strided fill per phase; the other phases overwrite their part.
  const int64_t phases_h = std::min(geo.stride_h, in_h), phases_w = std::min(geo.stride_w, in_w);
  bool some_phase_untouched = false;
  for (int64_t ph = 0; ph < phases_h; ++ph) {
    some_phase_untouched |= phase_taps(ph, geo.pad_h, geo.dilation_h, geo.stride_h, kernel_h).taps == 0;
  }
  for (int64_t pw = 0; pw < phases_w; ++pw) {
    some_phase_untouched |= phase_taps(pw, geo.pad_w, geo.dilation_w, geo.stride_w, kernel_w).taps == 0;
  }
  if (some_phase_untouched) out->zero_();

  for (int64_t ph = 0; ph < phases_h; ++ph) {
    for (int64_t pw = 0; pw < phases_w; ++pw) {
      const PhaseTaps th = phase_taps(ph, geo.pad_h, geo.dilation_h, geo.stride_h, kernel_h);
      const PhaseTaps tw = phase_taps(pw, geo.pad_w, geo.dilation_w, geo.stride_w, kernel_w);
      if (th.taps == 0 || tw.taps == 0) continue;  // zero-filled above
      at::Tensor phase_out = out->slice(2, ph, in_h, geo.stride_h).slice(3, pw, in_w, geo.stride_w);
      // [in_channels, taps_h, taps_w, out_channels / groups] (a channels_last [in, out / groups, taps_h,
      // taps_w]): this phase's taps, channel axes swapped, in one copy
      const at::Tensor weight_t = at::empty({in_channels, out_channels / groups, th.taps, tw.taps},
                                            weight.options().memory_format(at::MemoryFormat::ChannelsLast));
      weight_t.view({groups, group_in, out_channels / groups, th.taps, tw.taps})
          .copy_(weight.slice(2, th.first, kernel_h, th.step)
                     .slice(3, tw.first, kernel_w, tw.step)
                     .reshape({groups, out_channels / groups, group_in, th.taps, tw.taps})
                     .transpose(1, 2));
      fr::ConvBiasActParams p = base;
      p.weight = weight_t.data_ptr();
      p.kernel_h = int(th.taps);
      p.kernel_w = int(tw.taps);
      // the gather reads g at i - pad + t * dilation: i + offset - t * g_dilation
      p.pad_h = int(-th.offset);
      p.pad_w = int(-tw.offset);
      p.dilation_h = int(-th.g_dilation);
      p.dilation_w = int(-tw.g_dilation);
      p.out = phase_out.data_ptr();
      p.out_strides = strides_of(phase_out);
      p.out_h = int(phase_out.size(2));
      p.out_w = int(phase_out.size(3));
      TORCH_CHECK(p.pipeline != fr::Pipeline::kAsyncCopy || fr::async_copy_applies(p, fr::make_conv_gemm(p)), op,
                  ": pipeline 2 (cp.async) needs output channels per group that are a multiple of 8, 16-byte-aligned "
                  "grad and weight, and no grad_mask (the mask is applied in registers)");
      if (target == Target::kHost) {
        fr::emulate_conv_bias_act(p);
      } else {
        const cudaError_t error = fr::launch_conv_bias_act(p, stream);
        TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
      }
    }
  }
  return *out;
}

// Output `t` of `name`, when wanted: device, dtype, shape, no overlap with the inputs.
void check_wgrad_output(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& grad,
                        at::IntArrayRef shape, at::ScalarType dtype, Target target,
                        std::initializer_list<const at::Tensor*> inputs) {
  if (!t) return;
  check_device(*t, name, grad, target, kWgradOp, "grad");
  TORCH_CHECK(t->scalar_type() == dtype, kWgradOp, ": expected ", dtype, " for ", name, ", got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, kWgradOp, ": expected ", name, " of shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->is_non_overlapping_and_dense(), kWgradOp, ": ", name, " must be non-overlapping and dense");
  for (const at::Tensor* input : inputs) {
    if (input->defined()) at::assert_no_overlap(*t, *input);
  }
}

// grad_weight, grad_shortcut_weight and grad_bias (each optional: None is not computed), written in place.
void conv_wgrad_impl(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask, const at::Tensor& x,
                     const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& stride,
                     const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
                     const std::optional<at::Tensor>& shortcut_x, int64_t shortcut_stride,
                     const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_shortcut_weight,
                     const std::optional<at::Tensor>& grad_bias, int64_t tile, int64_t splits, int64_t pipeline,
                     Target target, int num_sms, const std::optional<at::Tensor>& in_mean,
                     const std::optional<at::Tensor>& in_invstd, const std::optional<at::Tensor>& in_weight,
                     const std::optional<at::Tensor>& in_bias, bool in_relu) {
  const char* op = kWgradOp;
  check_grad(grad, grad_mask, op, target);
  check_activation(x, "x", grad, target, op, "grad");
  TORCH_CHECK(kernel_size.size() == 2, op, ": expected kernel_size (h, w), got ", kernel_size.size(), " values");
  TORCH_CHECK(groups >= 1 && groups <= 65535, op, ": groups must be in [1, 65535], got ", groups);
  const int64_t batch = grad.size(0), out_channels = grad.size(1), in_channels = x.size(1);
  TORCH_CHECK(x.size(0) == batch, op, ": x has batch ", x.size(0), ", grad ", batch);
  TORCH_CHECK(in_channels % groups == 0 && out_channels % groups == 0, op, ": groups=", groups, " must divide x's ",
              in_channels, " channels and grad's ", out_channels);
  const int64_t kernel_h = kernel_size[0], kernel_w = kernel_size[1];
  const Geometry geo = check_geometry(grad, x.size(2), x.size(3), kernel_h, kernel_w, stride, padding, dilation, op);
  check_rows(batch * grad.size(2) * grad.size(3), kernel_h * kernel_w * (in_channels / groups), op);
  TORCH_CHECK(out_channels / groups <= 65535 * 16, op, ": ", out_channels / groups,
              " output channels per group exceed the grid's limit");
  TORCH_CHECK(!grad_shortcut_weight || shortcut_x, op,
              ": grad_shortcut_weight needs shortcut_x");
  if (shortcut_x) {
    check_activation(*shortcut_x, "shortcut_x", grad, target, op, "grad");
    TORCH_CHECK(groups == 1, op, ": a merged projection shortcut comes with groups=1 only, got ", groups);
    TORCH_CHECK(shortcut_stride >= 1, op, ": shortcut_stride must be >= 1, got ", shortcut_stride);
    TORCH_CHECK(shortcut_x->size(0) == batch && shortcut_x->size(2) >= 1 && shortcut_x->size(3) >= 1 &&
                    (shortcut_x->size(2) - 1) / shortcut_stride + 1 == grad.size(2) &&
                    (shortcut_x->size(3) - 1) / shortcut_stride + 1 == grad.size(3),
                op, ": shortcut_x of shape ", shortcut_x->sizes(), " at stride ", shortcut_stride,
                " does not give grad's ", grad.size(2), "x", grad.size(3), " map");
  }
  const at::Tensor grad_nhwc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor mask_nhwc, shortcut_nhwc;
  if (grad_mask) mask_nhwc = grad_mask->contiguous(at::MemoryFormat::ChannelsLast);
  if (shortcut_x) shortcut_nhwc = shortcut_x->contiguous(at::MemoryFormat::ChannelsLast);
  const std::initializer_list<const at::Tensor*> inputs = {&grad_nhwc, &x_nhwc, &mask_nhwc, &shortcut_nhwc};
  check_wgrad_output(grad_weight, "grad_weight", grad, {out_channels, in_channels / groups, kernel_h, kernel_w},
                     grad.scalar_type(), target, inputs);
  if (grad_shortcut_weight) {
    check_wgrad_output(grad_shortcut_weight, "grad_shortcut_weight", grad,
                       {out_channels, shortcut_x->size(1), 1, 1}, grad.scalar_type(), target, inputs);
  }
  check_wgrad_output(grad_bias, "grad_bias", grad, {out_channels}, at::kFloat, target, inputs);
  TORCH_CHECK(tile >= 0 && tile <= 3, op, ": tile must be 0 (auto), 1 (narrow), 2 (medium) or 3 (large)");
  TORCH_CHECK(splits >= 0, op, ": splits must be >= 0 (0: chosen per shape), got ", splits);
  TORCH_CHECK(pipeline >= 0 && pipeline <= 2, op, ": pipeline must be 0 (auto), 1 (registers) or 2 (cp.async), got ",
              pipeline);

  fr::ConvWgradParams p{};
  p.dtype = dtype_of(grad);
  p.grad = grad_nhwc.data_ptr();
  p.grad_mask = grad_mask ? mask_nhwc.data_ptr() : nullptr;
  p.batch = checked_int(batch, "batch", op);
  p.out_h = checked_int(grad.size(2), "grad height", op);
  p.out_w = checked_int(grad.size(3), "grad width", op);
  p.out_channels = checked_int(out_channels, "output channels", op);
  p.x = x_nhwc.data_ptr();
  p.in_h = checked_int(x.size(2), "input height", op);
  p.in_w = checked_int(x.size(3), "input width", op);
  p.in_channels = checked_int(in_channels, "input channels", op);
  p.kernel_h = checked_int(kernel_h, "kernel height", op);
  p.kernel_w = checked_int(kernel_w, "kernel width", op);
  p.groups = int(groups);
  p.stride_h = checked_int(geo.stride_h, "stride", op);
  p.stride_w = checked_int(geo.stride_w, "stride", op);
  p.pad_h = checked_int(geo.pad_h, "padding", op);
  p.pad_w = checked_int(geo.pad_w, "padding", op);
  p.dilation_h = checked_int(geo.dilation_h, "dilation", op);
  p.dilation_w = checked_int(geo.dilation_w, "dilation", op);
  if (shortcut_x) {
    p.shortcut_x = shortcut_nhwc.data_ptr();
    p.shortcut_h = checked_int(shortcut_x->size(2), "shortcut height", op);
    p.shortcut_w = checked_int(shortcut_x->size(3), "shortcut width", op);
    p.shortcut_channels = checked_int(shortcut_x->size(1), "shortcut channels", op);
    p.shortcut_stride = checked_int(shortcut_stride, "shortcut_stride", op);
  }
  if (grad_weight) {
    p.grad_weight = grad_weight->data_ptr();
    p.grad_weight_strides = strides_of(*grad_weight);
  }
  if (grad_shortcut_weight) {
    p.grad_shortcut_weight = grad_shortcut_weight->data_ptr();
    p.grad_shortcut_weight_strides = strides_of(*grad_shortcut_weight);
  }
  if (grad_bias) {
    TORCH_CHECK(grad_bias->is_contiguous(), op, ": grad_bias must be contiguous");
    p.grad_bias = grad_bias->data_ptr<float>();
  }
  TORCH_CHECK(!in_mean || !shortcut_x, op, ": the prologue applies to x alone, never with a merged projection");
  std::vector<at::Tensor> keep;
  set_prologue(p, in_mean, in_invstd, in_weight, in_bias, in_relu, in_channels, grad, target, op, "grad", keep);
  p.tile = fr::TileShapeKind(int(tile));
  p.splits = checked_int(splits, "splits", op);
  p.num_sms = num_sms;
  p.pipeline = fr::Pipeline(int(pipeline));
  int64_t workspace_floats = 0;
  const char* refusal = fr::plan_conv_wgrad(p, workspace_floats);
  TORCH_CHECK(refusal == nullptr, op, ": ", refusal, " (splits=", splits, ", groups=", groups, ", pipeline=",
              pipeline, ")");
  // Every block writes its whole tile of the workspace: no zero fill needed (the emulator's NaN-free too).
  const at::Tensor workspace = at::empty({std::max<int64_t>(workspace_floats, 1)}, grad.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  if (target == Target::kHost) {
    fr::emulate_conv_wgrad(p);
    return;
  }
  const cudaError_t error = fr::launch_conv_wgrad(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
}

// The device's SM count and compute capability, after checking it runs the kernels (sm_80+).
std::pair<int, int> launch_device(const at::Tensor& grad, const char* op, const char* name = "grad") {
  TORCH_CHECK(grad.defined() && grad.is_cuda(), op, ": expected CUDA tensor for ", name, ", got ",
              grad.defined() ? grad.device().str() : std::string("an undefined tensor"),
              " (the cuda backend runs CUDA tensors only; the reference backend runs CPU ones)");
  const int device = grad.device().index();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, device ", device, " is ", major, ".",
              minor);
  return {device_attribute(cudaDevAttrMultiProcessorCount, device), major * 10 + minor};
}

constexpr int kEmulatedSms = 132;  // an H100's, so the automatic choices are what they would be there

at::Tensor conv_dgrad(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask, const at::Tensor& weight,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                      const std::vector<int64_t>& dilation, int64_t groups, const std::vector<int64_t>& input_size,
                      std::optional<at::Tensor> out, int64_t tile, int64_t pipeline) {
  const auto [num_sms, compute_capability] = launch_device(grad, kDgradOp);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return conv_dgrad_impl(grad, grad_mask, weight, stride, padding, dilation, groups, input_size, out, tile, pipeline,
                         Target::kCuda, num_sms, compute_capability);
}

at::Tensor emulate_conv_dgrad(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask,
                              const at::Tensor& weight, const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                              int64_t groups, const std::vector<int64_t>& input_size, std::optional<at::Tensor> out,
                              int64_t tile, int64_t pipeline) {
  return conv_dgrad_impl(grad, grad_mask, weight, stride, padding, dilation, groups, input_size, out, tile, pipeline,
                         Target::kHost, kEmulatedSms, 90);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    int64_t groups, const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_invstd,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias, bool in_relu,
    bool compute_stats, std::optional<at::Tensor> out, int64_t tile, int64_t pipeline) {
  const auto [num_sms, compute_capability] = launch_device(x, kStatsOp, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return conv_stats_impl(x, weight, bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias,
                         in_relu, compute_stats, out, tile, pipeline, Target::kCuda, num_sms, compute_capability);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_conv_stats(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    int64_t groups, const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_invstd,
    const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias, bool in_relu,
    bool compute_stats, std::optional<at::Tensor> out, int64_t tile, int64_t pipeline) {
  return conv_stats_impl(x, weight, bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias,
                         in_relu, compute_stats, out, tile, pipeline, Target::kHost, kEmulatedSms, 90);
}

void conv_wgrad(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask, const at::Tensor& x,
                const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& stride,
                const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
                const std::optional<at::Tensor>& shortcut_x, int64_t shortcut_stride,
                const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_shortcut_weight,
                const std::optional<at::Tensor>& grad_bias, int64_t tile, int64_t splits, int64_t pipeline,
                const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_invstd,
                const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias, bool in_relu) {
  const int num_sms = launch_device(grad, kWgradOp).first;
  const c10::cuda::CUDAGuard device_guard(grad.device());
  conv_wgrad_impl(grad, grad_mask, x, kernel_size, stride, padding, dilation, groups, shortcut_x, shortcut_stride,
                  grad_weight, grad_shortcut_weight, grad_bias, tile, splits, pipeline, Target::kCuda, num_sms,
                  in_mean, in_invstd, in_weight, in_bias, in_relu);
}

void emulate_conv_wgrad(const at::Tensor& grad, const std::optional<at::Tensor>& grad_mask, const at::Tensor& x,
                        const std::vector<int64_t>& kernel_size, const std::vector<int64_t>& stride,
                        const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
                        const std::optional<at::Tensor>& shortcut_x, int64_t shortcut_stride,
                        const std::optional<at::Tensor>& grad_weight,
                        const std::optional<at::Tensor>& grad_shortcut_weight,
                        const std::optional<at::Tensor>& grad_bias, int64_t tile, int64_t splits,
                        int64_t pipeline, const std::optional<at::Tensor>& in_mean,
                        const std::optional<at::Tensor>& in_invstd, const std::optional<at::Tensor>& in_weight,
                        const std::optional<at::Tensor>& in_bias, bool in_relu) {
  conv_wgrad_impl(grad, grad_mask, x, kernel_size, stride, padding, dilation, groups, shortcut_x, shortcut_stride,
                  grad_weight, grad_shortcut_weight, grad_bias, tile, splits, pipeline, Target::kHost, kEmulatedSms,
                  in_mean, in_invstd, in_weight, in_bias, in_relu);
}

at::Tensor bn_add_act(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_mean,
                      const std::optional<at::Tensor>& res_invstd, const std::optional<at::Tensor>& res_weight,
                      const std::optional<at::Tensor>& res_bias, int64_t residual_stride, int64_t residual_offset,
                      bool relu) {
  launch_device(y, kBnOp, "y");
  const c10::cuda::CUDAGuard device_guard(y.device());
  return bn_add_act_impl(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias,
                         residual_stride, residual_offset, relu, Target::kCuda);
}

at::Tensor emulate_bn_add_act(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_mean,
                              const std::optional<at::Tensor>& res_invstd, const std::optional<at::Tensor>& res_weight,
                              const std::optional<at::Tensor>& res_bias, int64_t residual_stride,
                              int64_t residual_offset, bool relu) {
  return bn_add_act_impl(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight, res_bias,
                         residual_stride, residual_offset, relu, Target::kHost);
}

std::vector<std::optional<at::Tensor>> bn_add_act_backward(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& res_mean, const std::optional<at::Tensor>& res_invstd,
    const std::optional<at::Tensor>& res_weight, int64_t residual_stride, int64_t residual_offset, bool relu,
    const std::vector<bool>& needs) {
  launch_device(grad, kBnBackwardOp);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return bn_add_act_backward_impl(grad, out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight,
                                  residual_stride, residual_offset, relu, needs, Target::kCuda);
}

std::vector<std::optional<at::Tensor>> emulate_bn_add_act_backward(
    const at::Tensor& grad, const at::Tensor& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& res_mean, const std::optional<at::Tensor>& res_invstd,
    const std::optional<at::Tensor>& res_weight, int64_t residual_stride, int64_t residual_offset, bool relu,
    const std::vector<bool>& needs) {
  return bn_add_act_backward_impl(grad, out, y, mean, invstd, weight, residual, res_mean, res_invstd, res_weight,
                                  residual_stride, residual_offset, relu, needs, Target::kHost);
}

std::vector<std::optional<at::Tensor>> channel_backward(
    const at::Tensor& grad, const at::Tensor& t, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& fold_shift,
    const std::optional<at::Tensor>& fold_slope, bool prologue_relu, const std::vector<bool>& needs) {
  launch_device(grad, kChannelOp);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  return channel_backward_impl(grad, t, mean, invstd, weight, bias, fold_shift, fold_slope, prologue_relu, needs,
                               Target::kCuda);
}

std::vector<std::optional<at::Tensor>> emulate_channel_backward(
    const at::Tensor& grad, const at::Tensor& t, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& fold_shift,
    const std::optional<at::Tensor>& fold_slope, bool prologue_relu, const std::vector<bool>& needs) {
  return channel_backward_impl(grad, t, mean, invstd, weight, bias, fold_shift, fold_slope, prologue_relu, needs,
                               Target::kHost);
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_arch_list"] = std::string(fr::conv_bias_act_arch_list());
#ifdef FUSED_RESBLOCK_CUDA_ARCHS  // the build's arch list, e.g. -DFUSED_RESBLOCK_CUDA_ARCHS=8.0,9.0a
  info["arch_flags"] = std::string(FR_STRINGIFY(FUSED_RESBLOCK_CUDA_ARCHS));
#else
  info["arch_flags"] = pybind11::none();
#endif
#ifdef FUSED_RESBLOCK_SOURCES_DIGEST  // csrc/'s digest at build time (fused_resblock/backends/extension_sources.py)
  info["sources_digest"] = std::string(FR_STRINGIFY(FUSED_RESBLOCK_SOURCES_DIGEST));
#else
  info["sources_digest"] = pybind11::none();
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  info["kernels"] = std::string(
      "conv_bias_act: nvcuda::wmma implicit GEMM, fp16/bf16 in, fp32 accumulate; cp.async 3-stage or "
      "register-staged 2-stage main loop; on sm_90, CUTLASS's TMA + wgmma implicit GEMM where it applies. "
      "conv_dgrad: the same WMMA kernel as a transposed convolution, the ReLU mask applied as it loads. "
      "conv_wgrad: a split-K WMMA implicit GEMM (weight, projection and bias gradients in one), fixed-order sum. "
      "conv_stats: the WMMA kernel with a BN + ReLU prologue in its gather and a batch-statistics epilogue "
      "(per-tile mean and M2, merged in a fixed order by a second launch). bn_add_act: one elementwise launch; "
      "its backward and conv_stats_backward's prologue and statistics: a per-channel pass with a fixed-order "
      "finalize (conv_stats_backward's dgrad and wgrad as above, the wgrad applying the prologue as it loads)");
  const std::string cutlass = fr::tma_wgmma_version();
  if (cutlass.empty()) {
    info["tma_wgmma"] = pybind11::none();
  } else {
    info["tma_wgmma"] = cutlass;
  }
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fused_resblock's CUDA kernels (see fused_resblock/backends/cuda.py)";
  m.def("conv_bias_act", &conv_bias_act,
        "act(conv(x, weight) + bias + conv1x1(shortcut_x, shortcut_weight) + mapped residual) on the current "
        "CUDA stream; the contract is reference.conv_bias_act. `out` (optional) receives the result; `tile` "
        "forces a tile shape and `pipeline` a kernel (1 WMMA registers, 2 WMMA cp.async, 3 TMA + wgmma, 4 WMMA with "
        "its own choice of main loop; tests and benchmarks).",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("residual"), py::arg("residual_stride"), py::arg("residual_offset"),
        py::arg("shortcut_x"), py::arg("shortcut_weight"), py::arg("shortcut_stride"), py::arg("relu"),
        py::arg("out") = py::none(), py::arg("tile") = 0, py::arg("pipeline") = 0);
  m.def("_emulate_conv_bias_act", &emulate_conv_bias_act,
        "The same op on CPU tensors through a host emulation of the kernel (its gathers, tiles and epilogue); "
        "for tests without a GPU.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("residual"), py::arg("residual_stride"), py::arg("residual_offset"),
        py::arg("shortcut_x"), py::arg("shortcut_weight"), py::arg("shortcut_stride"), py::arg("relu"),
        py::arg("out") = py::none(), py::arg("tile") = 0, py::arg("pipeline") = 0);
  m.def("_tma_wgmma_refusal", &tma_wgmma_refusal,
        "Why pipeline 3 (CUTLASS's TMA + wgmma kernel) would not run this call on a GPU of the given compute "
        "capability (running an sm_90a image or not), or '' when it would. CPU tensors; for tests.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("residual"), py::arg("residual_stride"), py::arg("residual_offset"),
        py::arg("shortcut_x"), py::arg("shortcut_weight"), py::arg("shortcut_stride"), py::arg("relu"),
        py::arg("out") = py::none(), py::arg("compute_capability") = 90, py::arg("sm90a_image") = true);
  m.def("conv_dgrad", &conv_dgrad,
        "The input gradient of conv(x, weight) for the output gradient `grad`, zero where `grad_mask` (the "
        "forward's ReLU output, optional) is <= 0, on the current CUDA stream; input_size = x's (h, w).",
        py::arg("grad"), py::arg("grad_mask"), py::arg("weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("input_size"), py::arg("out") = py::none(),
        py::arg("tile") = 0, py::arg("pipeline") = 0);
  m.def("_emulate_conv_dgrad", &emulate_conv_dgrad, "conv_dgrad on CPU tensors through the host emulator; for tests.",
        py::arg("grad"), py::arg("grad_mask"), py::arg("weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("input_size"), py::arg("out") = py::none(),
        py::arg("tile") = 0, py::arg("pipeline") = 0);
  m.def("conv_wgrad", &conv_wgrad,
        "Writes the weight gradient of conv(x, weight), of a merged 1x1 projection of shortcut_x and the bias "
        "gradient (each output optional) for the output gradient `grad`, masked by `grad_mask` as in conv_dgrad; "
        "`splits` forces the split-K count and `pipeline` the main loop (0: per shape; 1 registers, 2 cp.async).",
        py::arg("grad"), py::arg("grad_mask"), py::arg("x"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("shortcut_x"),
        py::arg("shortcut_stride"), py::arg("grad_weight"), py::arg("grad_shortcut_weight"), py::arg("grad_bias"),
        py::arg("tile") = 0, py::arg("splits") = 0, py::arg("pipeline") = 0, py::arg("in_mean") = py::none(),
        py::arg("in_invstd") = py::none(), py::arg("in_weight") = py::none(), py::arg("in_bias") = py::none(),
        py::arg("in_relu") = false);
  m.def("_emulate_conv_wgrad", &emulate_conv_wgrad, "conv_wgrad on CPU tensors through the host emulator; for tests.",
        py::arg("grad"), py::arg("grad_mask"), py::arg("x"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("shortcut_x"),
        py::arg("shortcut_stride"), py::arg("grad_weight"), py::arg("grad_shortcut_weight"), py::arg("grad_bias"),
        py::arg("tile") = 0, py::arg("splits") = 0, py::arg("pipeline") = 0, py::arg("in_mean") = py::none(),
        py::arg("in_invstd") = py::none(), py::arg("in_weight") = py::none(), py::arg("in_bias") = py::none(),
        py::arg("in_relu") = false);
  m.def("conv_stats", &conv_stats,
        "(y, mean, var): y = conv(relu?(BN_in(x))) + bias and its per-channel batch mean and biased variance "
        "(empty when compute_stats is false), on the current CUDA stream; the contract is reference.conv_stats. "
        "The prologue BN_in (in_mean, in_invstd, optional in_weight, in_bias) applies as x loads.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("in_mean"), py::arg("in_invstd"), py::arg("in_weight"), py::arg("in_bias"),
        py::arg("in_relu"), py::arg("compute_stats"), py::arg("out") = py::none(), py::arg("tile") = 0,
        py::arg("pipeline") = 0);
  m.def("_emulate_conv_stats", &emulate_conv_stats, "conv_stats on CPU tensors through the host emulator; for tests.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("in_mean"), py::arg("in_invstd"), py::arg("in_weight"), py::arg("in_bias"),
        py::arg("in_relu"), py::arg("compute_stats"), py::arg("out") = py::none(), py::arg("tile") = 0,
        py::arg("pipeline") = 0);
  m.def("bn_add_act", &bn_add_act,
        "relu?(BN(y) + BN_res(residual) or the mapped residual) in one elementwise launch on the current CUDA "
        "stream; the contract is reference.bn_add_act.",
        py::arg("y"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("res_mean"), py::arg("res_invstd"), py::arg("res_weight"), py::arg("res_bias"),
        py::arg("residual_stride"), py::arg("residual_offset"), py::arg("relu"));
  m.def("_emulate_bn_add_act", &emulate_bn_add_act, "bn_add_act on CPU tensors through the host emulator; for tests.",
        py::arg("y"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("res_mean"), py::arg("res_invstd"), py::arg("res_weight"), py::arg("res_bias"),
        py::arg("residual_stride"), py::arg("residual_offset"), py::arg("relu"));
  m.def("bn_add_act_backward", &bn_add_act_backward,
        "The gradients of bn_add_act (reference.bn_add_act_backward's order, None where not needed): one "
        "per-channel pass per BN and a fixed-order finalize, on the current CUDA stream.",
        py::arg("grad"), py::arg("out"), py::arg("y"), py::arg("mean"), py::arg("invstd"), py::arg("weight"),
        py::arg("residual"), py::arg("res_mean"), py::arg("res_invstd"), py::arg("res_weight"),
        py::arg("residual_stride"), py::arg("residual_offset"), py::arg("relu"), py::arg("needs"));
  m.def("_emulate_bn_add_act_backward", &emulate_bn_add_act_backward,
        "bn_add_act_backward on CPU tensors through the host emulator; for tests.",
        py::arg("grad"), py::arg("out"), py::arg("y"), py::arg("mean"), py::arg("invstd"), py::arg("weight"),
        py::arg("residual"), py::arg("res_mean"), py::arg("res_invstd"), py::arg("res_weight"),
        py::arg("residual_stride"), py::arg("residual_offset"), py::arg("relu"), py::arg("needs"));
  m.def("channel_backward", &channel_backward,
        "conv_stats_backward's per-channel pass over t (y or x): [grad_t, grad_mean, grad_invstd, grad_weight, "
        "grad_bias] for needs, g = grad + fold_shift + fold_slope * (t - mean), masked by the recomputed prologue "
        "ReLU when prologue_relu, grad_t = g * weight * invstd (g without invstd).",
        py::arg("grad"), py::arg("t"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"),
        py::arg("fold_shift"), py::arg("fold_slope"), py::arg("prologue_relu"), py::arg("needs"));
  m.def("_emulate_channel_backward", &emulate_channel_backward,
        "channel_backward on CPU tensors through the host emulator; for tests.",
        py::arg("grad"), py::arg("t"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"),
        py::arg("fold_shift"), py::arg("fold_slope"), py::arg("prologue_relu"), py::arg("needs"));
  m.def("kernel_image_error", &kernel_image_error,
        "'' when the device can load the kernels, else the CUDA error a launch would give.", py::arg("device"));
  m.def("build_info", &build_info, "How this extension was built: CUDA version, architectures, torch version.");
}
