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

#include <atomic>
#include <climits>
#include <optional>
#include <string>
#include <vector>

#include "conv_bias_act.h"
#include "conv_gemm.cuh"

namespace fr = fused_resblock;

#define FR_STRINGIFY_(...) #__VA_ARGS__
#define FR_STRINGIFY(...) FR_STRINGIFY_(__VA_ARGS__)

namespace {

constexpr char kOp[] = "fused_resblock._C.conv_bias_act";

// The real launch wants CUDA tensors; the host emulator (tests without a GPU) CPU ones.
enum class Target { kCuda, kHost };

void check_device(const at::Tensor& t, const char* name, const at::Tensor& x, Target target) {
  if (target == Target::kCuda) {
    TORCH_CHECK(t.is_cuda(), kOp, ": expected CUDA tensor for ", name, ", got a tensor on ", t.device(),
                " (the cuda backend runs CUDA tensors only; the reference backend runs CPU ones)");
  } else {
    TORCH_CHECK(t.is_cpu(), kOp, " (host emulator): expected CPU tensor for ", name, ", got a tensor on ", t.device());
  }
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_activation(const at::Tensor& t, const char* name, const at::Tensor& x, Target target) {
  check_device(t, name, x, target);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type(), "; x, weight, residual and shortcut tensors share one dtype");
  TORCH_CHECK(t.dim() == 4, kOp, ": expected a 4-D tensor for ", name, ", got shape ", t.sizes());
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

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, kOp, ": ", what, " = ", v, " is outside the kernel's 32-bit range");
  return int(v);
}

std::pair<int64_t, int64_t> checked_pair(const std::vector<int64_t>& v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, kOp, ": expected 2 values for ", name, ", got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, kOp, ": ", name, " must be >= ", min, ", got (", v[0], ", ", v[1], ")");
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

// Checks every input, converts the kernel's operands to its layouts and fills
// the launch parameters. `keep` holds converted copies alive until the launch.
fr::ConvBiasActParams prepare(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation, int64_t groups,
                              const std::optional<at::Tensor>& residual, int64_t residual_stride,
                              int64_t residual_offset, const std::optional<at::Tensor>& shortcut_x,
                              const std::optional<at::Tensor>& shortcut_weight, int64_t shortcut_stride, bool relu,
                              std::optional<at::Tensor>& out, int64_t tile, int64_t pipeline, Target target,
                              std::vector<at::Tensor>& keep) {
  // ---- devices and dtypes
  TORCH_CHECK(x.defined(), kOp, ": x is undefined");
  check_device(x, "x", x, target);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp,
              ": expected float16 or bfloat16 for x, got ", x.scalar_type(),
              " (float32 and TF32 run on the triton or reference backend)");
  TORCH_CHECK(x.dim() == 4, kOp, ": expected a 4-D (N, C, H, W) tensor for x, got shape ", x.sizes());
  check_activation(weight, "weight", x, target);

  // ---- convolution geometry
  const auto [stride_h, stride_w] = checked_pair(stride, "stride", 1);
  const auto [pad_h, pad_w] = checked_pair(padding, "padding", 0);
  const auto [dilation_h, dilation_w] = checked_pair(dilation, "dilation", 1);
  const int64_t batch = x.size(0), in_channels = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t out_channels = weight.size(0), kernel_h = weight.size(2), kernel_w = weight.size(3);
  TORCH_CHECK(groups >= 1 && groups <= 65535, kOp, ": groups must be in [1, 65535], got ", groups);
  TORCH_CHECK(in_channels % groups == 0 && out_channels % groups == 0, kOp, ": groups=", groups, " must divide x's ",
              in_channels, " channels and weight's ", out_channels, " output channels");
  TORCH_CHECK(weight.size(1) * groups == in_channels, kOp, ": weight of shape ", weight.sizes(), " expects ",
              weight.size(1) * groups, " input channels (", weight.size(1), " per group x groups=", groups,
              "), but x has ", in_channels);
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, kOp, ": empty kernel, weight shape ", weight.sizes());
  TORCH_CHECK(
      in_h + 2 * pad_h >= dilation_h * (kernel_h - 1) + 1 && in_w + 2 * pad_w >= dilation_w * (kernel_w - 1) + 1, kOp,
      ": the padded input ", in_h, "x", in_w, " (padding ", at::IntArrayRef(padding), ") is smaller than the kernel ",
      kernel_h, "x", kernel_w, " at dilation ", at::IntArrayRef(dilation));
  const int64_t out_h = (in_h + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1;
  const int64_t out_w = (in_w + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1;
  const int64_t rows = batch * out_h * out_w;
  TORCH_CHECK(rows <= INT_MAX - 4096, kOp, ": batch * out_h * out_w = ", rows, " exceeds the kernel's 32-bit range");
  const int64_t depth = kernel_h * kernel_w * (in_channels / groups);
  TORCH_CHECK(depth <= INT_MAX - 4096, kOp, ": kernel_h * kernel_w * in_channels / groups = ", depth,
              " exceeds the kernel's 32-bit range");
  // grid.y counts column tiles of at least 16 channels, and CUDA caps it at 65535
  TORCH_CHECK(out_channels / groups <= 65535 * 16, kOp, ": ", out_channels / groups,
              " output channels per group exceed the grid's limit (", 65535 * 16, ")");

  // ---- bias
  if (bias) {
    check_device(*bias, "bias", x, target);
    TORCH_CHECK(bias->scalar_type() == at::kFloat, kOp, ": expected float32 bias (BN folded in fp32), got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, kOp, ": expected bias of shape (", out_channels,
                ",), got ", bias->sizes());
  }

  // ---- mapped residual
  if (residual) {
    check_activation(*residual, "residual", x, target);
    TORCH_CHECK(residual_stride >= 1 && residual_offset >= 0, kOp, ": residual_stride must be >= 1 and ",
                "residual_offset >= 0, got ", residual_stride, " and ", residual_offset);
    const int64_t rh = (residual->size(2) + residual_stride - 1) / residual_stride;
    const int64_t rw = (residual->size(3) + residual_stride - 1) / residual_stride;
    TORCH_CHECK(residual->size(0) == batch && rh == out_h && rw == out_w, kOp, ": residual of shape ",
                residual->sizes(), " read at stride ", residual_stride, " gives ", rh, "x", rw,
                " pixels; the output is ", batch, "x", out_channels, "x", out_h, "x", out_w);
    TORCH_CHECK(residual_offset + residual->size(1) <= out_channels, kOp, ": residual channels [", residual_offset,
                ", ", residual_offset + residual->size(1), ") fall outside the ", out_channels, " output channels");
  }

  // ---- merged projection shortcut
  TORCH_CHECK(shortcut_x.has_value() == shortcut_weight.has_value(), kOp,
              ": shortcut_x and shortcut_weight go together");
  if (shortcut_x) {
    check_activation(*shortcut_x, "shortcut_x", x, target);
    check_activation(*shortcut_weight, "shortcut_weight", x, target);
    TORCH_CHECK(shortcut_stride >= 1, kOp, ": shortcut_stride must be >= 1, got ", shortcut_stride);
    const int64_t sc_channels = shortcut_x->size(1);
    TORCH_CHECK(shortcut_weight->size(0) == out_channels && shortcut_weight->size(1) == sc_channels &&
                    shortcut_weight->size(2) == 1 && shortcut_weight->size(3) == 1,
                kOp, ": expected shortcut_weight of shape (", out_channels, ", ", sc_channels, ", 1, 1), got ",
                shortcut_weight->sizes());
    const int64_t sh = (shortcut_x->size(2) - 1) / shortcut_stride + 1;
    const int64_t sw = (shortcut_x->size(3) - 1) / shortcut_stride + 1;
    TORCH_CHECK(shortcut_x->size(0) == batch && shortcut_x->size(2) >= 1 && shortcut_x->size(3) >= 1 && sh == out_h &&
                    sw == out_w,
                kOp, ": shortcut_x of shape ", shortcut_x->sizes(), " at stride ", shortcut_stride, " gives ", sh, "x",
                sw, " pixels; the output is ", batch, "x", out_channels, "x", out_h, "x", out_w);
  }

  // ---- output
  if (out) {
    check_device(*out, "out", x, target);
    TORCH_CHECK(out->scalar_type() == x.scalar_type(), kOp, ": out has dtype ", out->scalar_type(), ", x has ",
                x.scalar_type());
    TORCH_CHECK(out->sizes() == at::IntArrayRef({batch, out_channels, out_h, out_w}), kOp, ": expected out of shape (",
                batch, ", ", out_channels, ", ", out_h, ", ", out_w, "), got ", out->sizes());
    TORCH_CHECK(out->is_non_overlapping_and_dense(), kOp, ": out must be non-overlapping and dense");
  } else {
    out = at::empty({batch, out_channels, out_h, out_w}, x.options().memory_format(memory_format_of(x)));
  }
  TORCH_CHECK(tile >= 0 && tile <= 3, kOp, ": tile must be 0 (auto), 1 (narrow), 2 (medium) or 3 (large)");
  TORCH_CHECK(pipeline >= 0 && pipeline <= 4, kOp,
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
  p.dtype = x.scalar_type() == at::kHalf ? fr::DType::kFloat16 : fr::DType::kBFloat16;
  p.x = x_nhwc.data_ptr();
  p.batch = checked_int(batch, "batch");
  p.in_h = checked_int(in_h, "input height");
  p.in_w = checked_int(in_w, "input width");
  p.in_channels = checked_int(in_channels, "input channels");
  p.weight = weight_krsc.data_ptr();
  p.out_channels = checked_int(out_channels, "output channels");
  p.kernel_h = checked_int(kernel_h, "kernel height");
  p.kernel_w = checked_int(kernel_w, "kernel width");
  p.groups = int(groups);
  p.stride_h = checked_int(stride_h, "stride");
  p.stride_w = checked_int(stride_w, "stride");
  p.pad_h = checked_int(pad_h, "padding");
  p.pad_w = checked_int(pad_w, "padding");
  p.dilation_h = checked_int(dilation_h, "dilation");
  p.dilation_w = checked_int(dilation_w, "dilation");
  if (bias) {
    const at::Tensor b = bias->contiguous();
    keep.push_back(b);
    p.bias = b.data_ptr<float>();
  }
  if (residual) {
    p.residual = residual->data_ptr();
    p.residual_strides = strides_of(*residual);
    p.residual_channels = checked_int(residual->size(1), "residual channels");
    p.residual_stride = checked_int(residual_stride, "residual_stride");
    p.residual_offset = checked_int(residual_offset, "residual_offset");
  }
  if (shortcut_x) {
    const at::Tensor sx = shortcut_x->contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor sw = shortcut_weight->contiguous();
    keep.push_back(sx);
    keep.push_back(sw);
    p.shortcut_x = sx.data_ptr();
    p.shortcut_weight = sw.data_ptr();
    p.shortcut_h = checked_int(sx.size(2), "shortcut height");
    p.shortcut_w = checked_int(sx.size(3), "shortcut width");
    p.shortcut_channels = checked_int(sx.size(1), "shortcut channels");
    p.shortcut_stride = checked_int(shortcut_stride, "shortcut_stride");
  }
  p.out = out->data_ptr();
  p.out_strides = strides_of(*out);
  p.out_h = int(out_h);
  p.out_w = int(out_w);
  p.relu = relu;
  p.tile = fr::TileShapeKind(int(tile));
  p.pipeline = fr::Pipeline(int(pipeline));
  TORCH_CHECK(p.pipeline != fr::Pipeline::kAsyncCopy || fr::async_copy_applies(p, fr::make_conv_gemm(p)), kOp,
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
      "register-staged 2-stage main loop; on sm_90, CUTLASS's TMA + wgmma implicit GEMM where it applies");
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
  m.def("kernel_image_error", &kernel_image_error,
        "'' when the device can load the kernels, else the CUDA error a launch would give.", py::arg("device"));
  m.def("build_info", &build_info, "How this extension was built: CUDA version, architectures, torch version.");
}
