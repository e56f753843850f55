"""The CUDA backend: fused kernels of the compiled extension ``fused_resblock._C``.

Every op of the contract is implemented, fp16 and bf16 (see ``csrc/``): ``conv_bias_act``
(eval mode: one implicit-GEMM launch on the tensor cores per conv) and its backward
``conv_bias_act_backward`` (fine-tuning through frozen, folded BN: a dgrad and a split-K
wgrad launch per conv); in training, ``conv_stats`` (the conv with the previous BN + ReLU
as a prologue and the batch statistics as an epilogue, plus one small launch merging
them), ``bn_add_act`` (one elementwise launch) and the backward of both
(``bn_add_act_backward``: a per-channel pass per BN with a fixed-order finalize;
``conv_stats_backward``: that pass folding the statistics' gradients into y's, the dgrad
and the wgrad -- which applies the prologue as it loads x -- and the pass again for the
prologue's BN and ReLU).

Importing this module never imports the extension. The first ``available()``
or call loads it: ``fused_resblock._C`` as built by
``pip install --no-build-isolation -e .``, or, only when
``FUSED_RESBLOCK_JIT_BUILD=1``, a just-in-time build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (minutes, cached by torch afterwards).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import conv_geometry_reason, cutlass_headers, extension_sources
from .reference import memory_format_of, unmap_residual_grad, weight_grad_format

NAME = "cuda"

OPS = (
    "conv_bias_act", "conv_bias_act_backward",
    "conv_stats", "conv_stats_backward",
    "bn_add_act", "bn_add_act_backward",
)
SUPPORTED_OPS = OPS
# The ops whose kernels apply an input prologue (the previous BN + ReLU) as they load x.
PROLOGUE_OPS = ("conv_stats", "conv_stats_backward")
ELEMENTWISE_OPS = ("bn_add_act", "bn_add_act_backward")  # their config has no convolution
DTYPES = (torch.float16, torch.bfloat16)
JIT_ENV = "FUSED_RESBLOCK_JIT_BUILD"
# The kernel and its main loop (csrc/README.md): auto (on sm_90 CUTLASS's TMA + wgmma kernel where it
# applies, else WMMA with cp.async where operands allow, else WMMA register-staged), or forced for an
# A/B measurement with FUSED_RESBLOCK_CUDA_PIPELINE=registers|cp_async|tma_wgmma|wmma (a forced kernel
# that cannot run a call raises; "wmma" is auto without CUTLASS's kernel, as before sm_90).
# The binding's limit (csrc/bindings.cpp): 65535 grid rows of the narrowest, 16-channel tile.
MAX_OUT_CHANNELS_PER_GROUP = 65535 * 16
PIPELINES = {"auto": 0, "registers": 1, "cp_async": 2, "tma_wgmma": 3, "wmma": 4}
PIPELINE_ENV = "FUSED_RESBLOCK_CUDA_PIPELINE"


def _pipeline_number(name: str, source: str) -> int:
    name = name.strip().lower()
    if name not in PIPELINES:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(PIPELINES)}")
    return PIPELINES[name]


def _pipeline_from_env() -> int:
    return _pipeline_number(os.environ.get(PIPELINE_ENV, "auto"), PIPELINE_ENV)


PIPELINE = _pipeline_from_env()


@contextlib.contextmanager
def forced_pipeline(name: str):
    """Inside the block this backend's convs run kernel ``name`` (a PIPELINES key), as the
    environment variable does for a whole process: the benchmarks' A/B in one run. Not thread-safe."""
    global PIPELINE
    previous, PIPELINE = PIPELINE, _pipeline_number(name, "pipeline")
    try:
        yield
    finally:
        PIPELINE = previous


CSRC = Path(__file__).resolve().parents[2] / "csrc"
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (nvcc and a CUDA build of torch), " \
             f"or set {JIT_ENV}=1 to build it just in time"


# --------------------------------------------------------------------------- loading
def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cpp")) + sorted(str(p) for p in CSRC.glob("*.cu"))
    if not sources:
        raise ImportError(f"no extension sources in {CSRC} (JIT builds need a source checkout)")
    flags = ["-O3"]  # and torch's own -std (C++20 for torch's headers)
    # setup.py's architectures unless TORCH_CUDA_ARCH_LIST says otherwise (torch alone would build the
    # visible GPU's plain sm_90, without the "a" that CUTLASS's Hopper kernel needs)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or extension_sources.DEFAULT_ARCH_LIST
    # recorded for build_info, as a token list free of shell metacharacters
    cxx_flags = [*flags, "-DFUSED_RESBLOCK_CUDA_ARCHS=" + ",".join(re.split(r"[;\s]+", arch_list)),
                 *extension_sources.define(str(CSRC))]
    cutlass_dirs = cutlass_headers.include_dirs()
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # load() reads it from the environment
    try:
        return load(
            name="fused_resblock_cuda_jit",
            sources=sources,
            extra_include_paths=[str(CSRC), *cutlass_dirs],
            extra_cflags=cxx_flags,
            extra_cuda_cflags=flags + ["--expt-relaxed-constexpr", "-lineinfo"]
            + (list(cutlass_headers.DEFINES) if cutlass_dirs else []),
            verbose=os.environ.get("FUSED_RESBLOCK_JIT_VERBOSE", "0") == "1",
        )
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


@functools.lru_cache(maxsize=None)
def _extension() -> tuple[Optional[ModuleType], Optional[str]]:
    """(the compiled module, None), or (None, why it cannot be had). Loaded once."""
    try:
        from .. import _C

        _warn_if_stale(_C)
        return _C, None
    except Exception as exc:  # ImportError, or OSError/undefined symbols from a stale build
        import_error = f"{type(exc).__name__}: {exc}"
    if os.environ.get(JIT_ENV, "0") != "1":
        return None, f"extension not built: cannot import fused_resblock._C ({import_error}); {BUILD_HINT}"
    try:
        return _jit_build(), None
    except Exception as exc:
        return None, f"extension not built: the just-in-time build failed ({type(exc).__name__}: {exc})"


def _staleness(ext: ModuleType) -> Optional[str]:
    """Why ``ext`` does not match this checkout and this torch: built from other sources than the
    csrc/ beside the package (not checked without one: an installed package), or for another torch.
    None when it matches."""
    info = ext.build_info()
    reasons = []
    here = extension_sources.digest(str(CSRC))
    built = info.get("sources_digest")
    if here is not None and built != here:
        reasons.append(f"was built from other sources than {CSRC} (digest {built or 'not recorded'}, "
                       f"the sources' {here})")
    torch_release = torch.__version__.split("+")[0]
    if info.get("torch_version", torch_release) != torch_release:
        reasons.append(f"was built for torch {info['torch_version']}, this is torch {torch_release}")
    return "fused_resblock._C " + " and ".join(reasons) if reasons else None


def _warn_if_stale(ext: ModuleType) -> None:
    reason = _staleness(ext)
    if reason is not None:
        warnings.warn(f"{reason}: its kernels may not be the ones in the checkout; rebuild: {BUILD_HINT}",
                      stacklevel=4)


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> Optional[str]:
    """None when device ``index`` can run the kernels, else why not."""
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"the cuda backend needs compute capability 8.0 or newer; this GPU is {major}.{minor}"
    ext, _ = _extension()
    error = ext.kernel_image_error(index)
    if error:
        return (f"no kernel image for this GPU (sm_{major}{minor}); the extension was built for "
                f"{', '.join(build_info()['archs']) or 'unknown archs'}: {error}")
    return None


def available() -> Optional[str]:
    """None when usable here, else the reason it is not."""
    if torch.version.hip is not None:
        return "the cuda backend is not built for ROCm"
    ext, reason = _extension()
    if ext is None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    reasons = [_device_reason(index) for index in range(torch.cuda.device_count())]
    if None in reasons:  # usable on some GPU here; supports() judges the tensors' own (a mixed machine)
        return None
    return reasons[torch.cuda.current_device()]


def _require() -> ModuleType:
    ext, reason = _extension()
    if ext is None:
        raise RuntimeError(f"fused_resblock cuda backend: {reason}")
    return ext


# --------------------------------------------------------------------------- support
def supports(op: str, config: dict) -> Optional[str]:
    """None when ``op`` is supported for ``config``, else the reason it is not.

    The configuration is judged first (so the reasons are the same on every
    machine), then whether this machine can run the extension at all.
    """
    if op not in OPS:
        return f"unknown op {op!r}"
    if op not in SUPPORTED_OPS:
        return f"cuda backend has no kernel for {op} yet"
    device = torch.device(config["device"])
    if device.type != "cuda":
        return f"cuda backend runs CUDA tensors only, not {device.type}"
    dtype = config["dtype"]
    if dtype not in DTYPES:
        return (f"cuda backend has fp16/bf16 kernels only, not {str(dtype).replace('torch.', '')} "
                "(float32, with or without TF32, runs on the triton or reference backend)")
    if op in ELEMENTWISE_OPS:
        return _machine_reason(device)
    if config.get("prologue") and op not in PROLOGUE_OPS:
        return f"cuda backend has no input prologue (BN/ReLU as the input loads) for {op}"
    reason = conv_geometry_reason(config)
    if reason is not None:
        return reason
    if config["out_channels"] // config["groups"] > MAX_OUT_CHANNELS_PER_GROUP:
        return (f"{config['out_channels'] // config['groups']} output channels per group exceed the kernel's grid "
                f"limit of {MAX_OUT_CHANNELS_PER_GROUP}")
    return _machine_reason(device)


def _machine_reason(device: torch.device) -> Optional[str]:
    """None when this machine runs the extension's kernels on ``device``, else why not."""
    reason = available()
    if reason is None:
        reason = _device_reason(torch.cuda.current_device() if device.index is None else device.index)
    return reason


# --------------------------------------------------------------------------- ops
def conv_bias_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride, padding, dilation, groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, *, out: Optional[Tensor] = None,
) -> Tensor:
    """``reference.conv_bias_act`` as one fused CUDA launch (same contract).

    ``out``, when given, receives the result (any dense layout); tests pass a
    NaN-poisoned one. The launch goes on the current stream with no host sync.
    """
    return _require().conv_bias_act(
        x, weight, bias, list(stride), list(padding), list(dilation), groups,
        residual, residual_stride, residual_offset, shortcut_x, shortcut_weight, shortcut_stride,
        relu, out, 0, PIPELINE,
    )


def conv_stats(
    x: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride, padding, dilation, groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, compute_stats: bool, *, out: Optional[Tensor] = None,
):
    """``reference.conv_stats`` on the extension (same contract): the forward's WMMA kernel with the
    prologue BN_in + ReLU applied as x loads (register main loop) and a statistics epilogue (each
    block's per-channel mean and M2 of the outputs it stored), then one launch merging the blocks'
    moments in a fixed order (deterministic). ``out`` as in ``conv_bias_act``. Never CUTLASS's kernel:
    FUSED_RESBLOCK_CUDA_PIPELINE's "tma_wgmma" runs the WMMA kernel's own choice here."""
    pipeline = PIPELINES["wmma"] if PIPELINE == PIPELINES["tma_wgmma"] else PIPELINE
    return _require().conv_stats(x, weight, bias, list(stride), list(padding), list(dilation), groups, in_mean,
                                 in_invstd, in_weight, in_bias, in_relu, compute_stats, out, 0, pipeline)


def bn_add_act(
    y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], res_bias: Optional[Tensor],
    residual_stride: int, residual_offset: int, relu: bool,
) -> Tensor:
    """``reference.bn_add_act`` as one elementwise launch (same contract; NHWC inside, an NCHW y or
    residual costs a copy)."""
    return _require().bn_add_act(y, mean, invstd, weight, bias, residual, res_mean, res_invstd, res_weight,
                                 res_bias, residual_stride, residual_offset, relu)


def bn_add_act_backward(
    grad: Tensor, out: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    residual: Optional[Tensor], res_mean: Optional[Tensor], res_invstd: Optional[Tensor],
    res_weight: Optional[Tensor], residual_stride: int, residual_offset: int, relu: bool, needs: list,
):
    """``reference.bn_add_act_backward``: per BN (the block's, and the shortcut's or the identity
    residual's) one pass writing its input's gradient and its per-channel sums, one launch adding
    them up in a fixed order (deterministic)."""
    return tuple(_require().bn_add_act_backward(grad, out, y, mean, invstd, weight, residual, res_mean, res_invstd,
                                                res_weight, residual_stride, residual_offset, relu,
                                                [bool(n) for n in needs]))


def conv_stats_backward(
    grad_y: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor],
    x: Tensor, y: Tensor, mean: Tensor, weight: Tensor, has_bias: bool,
    stride, padding, dilation, groups: int,
    in_mean: Optional[Tensor], in_invstd: Optional[Tensor], in_weight: Optional[Tensor],
    in_bias: Optional[Tensor], in_relu: bool, needs: list,
):
    """``reference.conv_stats_backward`` on the extension's kernels (same contract), see
    ``stats_backward_with``."""
    ext = _require()
    return stats_backward_with(ext.channel_backward, ext.conv_dgrad, ext.conv_wgrad, grad_y, grad_mean, grad_var,
                               x, y, mean, weight, has_bias, stride, padding, dilation, groups, in_mean, in_invstd,
                               in_weight, in_bias, in_relu, needs)


def stats_backward_with(channel_backward, conv_dgrad, conv_wgrad, grad_y, grad_mean, grad_var, x, y, mean, weight,
                        has_bias, stride, padding, dilation, groups, in_mean, in_invstd, in_weight, in_bias, in_relu,
                        needs):
    """``conv_stats_backward`` through the given kernels: the extension's, or (tests) its host emulation.

    1. One pass over y folds the statistics' gradients into y's, g = grad_y + grad_mean / count +
       grad_var * 2 (y - mean) / count (fp32, stored in the dtype), and sums g for the bias gradient.
    2. dgrad of g (the gradient of the prologue's output a) and wgrad of g against a, which the wgrad
       recomputes from x as it loads it (the prologue in its gather: a is never stored).
    3. With a prologue, one pass over x: the ReLU mask recomputed from x, grad_x = g_a * in_weight *
       in_invstd, and the prologue BN's gradients from its per-channel sums.
    """
    needs = [bool(n) for n in needs]
    has_prologue = in_mean is not None
    need_ga = needs[0] or (has_prologue and any(needs[3:7]))
    need_g = need_ga or needs[1]
    want_bias = has_bias and needs[2]
    count = max(y.numel() // max(y.shape[1], 1), 1)
    shift = grad_mean / count if grad_mean is not None else None
    slope = grad_var * (2.0 / count) if grad_var is not None else None
    g = gb = None
    if need_g or want_bias:
        g, _, _, _, gb = channel_backward(grad_y, y, mean if slope is not None else None, None, None, None, shift,
                                          slope, False, [need_g, False, False, False, want_bias])
    ga = gw = None
    if need_ga:
        ga = torch.empty_like(x, memory_format=memory_format_of(x))
        conv_dgrad(g, None, weight, list(stride), list(padding), list(dilation), groups, [x.shape[2], x.shape[3]], ga)
    if needs[1]:
        gw = torch.empty_like(weight, memory_format=weight_grad_format(x, weight))
        conv_wgrad(g, None, x, list(weight.shape[2:]), list(stride), list(padding), list(dilation), groups, None, 1,
                   gw, None, None, in_mean=in_mean, in_invstd=in_invstd, in_weight=in_weight, in_bias=in_bias,
                   in_relu=in_relu)
    if not has_prologue:
        return ga if needs[0] else None, gw, gb, None, None, None, None
    prologue = (None,) * 5
    if need_ga:
        prologue = channel_backward(ga, x, in_mean, in_invstd, in_weight, in_bias, None, None, in_relu,
                                    [needs[0], needs[3], needs[4], needs[5] and in_weight is not None, needs[6]])
    return (prologue[0], gw, gb, *prologue[1:])


def conv_bias_act_backward(
    grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
    stride, padding, dilation, groups: int,
    residual: Optional[Tensor], residual_stride: int, residual_offset: int,
    shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor], shortcut_stride: int,
    relu: bool, needs: list,
):
    """``reference.conv_bias_act_backward`` on the extension's kernels (same contract).

    g = grad where ``out > 0`` (a ReLU ended the forward), else grad. With an identity residual g
    *is* the residual's gradient: it is computed once (torch's ReLU backward, one pass) and the
    kernels read it. Otherwise they apply the mask as they load grad and g is never stored. Per
    conv: a dgrad (the forward's WMMA kernel as a transposed convolution) and one wgrad (a split-K
    GEMM giving the weight, the merged projection's weight and the bias gradients together, its
    splits summed in a fixed order: deterministic). The launches go on the current stream with no
    host sync. FUSED_RESBLOCK_CUDA_PIPELINE picks the forward's kernel only; these choose their own.
    """
    ext = _require()
    return backward_with(ext.conv_dgrad, ext.conv_wgrad, grad, out, x, weight, has_bias, stride, padding, dilation,
                         groups, residual, residual_stride, residual_offset, shortcut_x, shortcut_weight,
                         shortcut_stride, relu, needs)


def backward_with(conv_dgrad, conv_wgrad, grad, out, x, weight, has_bias, stride, padding, dilation, groups,
                  residual, residual_stride, residual_offset, shortcut_x, shortcut_weight, shortcut_stride,
                  relu, needs):
    """``conv_bias_act_backward`` through the given kernels: the extension's, or (tests) its host
    emulation of them on CPU tensors (``_emulate_conv_dgrad``, ``_emulate_conv_wgrad``)."""
    needs = [bool(v) for v in needs]
    mask = out if relu else None
    gr = None
    if residual is not None and needs[3]:
        g = torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad
        if residual_stride == 1 and residual_offset == 0 and residual.shape == grad.shape:
            gr = g.clone(memory_format=memory_format_of(residual)) if g is grad else \
                g.contiguous(memory_format=memory_format_of(residual))
            grad, mask = g, None  # the kernels read the masked gradient already written
        else:  # the CIFAR option-A map: a strided, channel-shifted part of g
            gr = unmap_residual_grad(g, residual, residual_stride, residual_offset)

    gx = gsx = None
    if needs[0]:
        gx = torch.empty_like(x, memory_format=memory_format_of(x))
        conv_dgrad(grad, mask, weight, list(stride), list(padding), list(dilation), groups,
                   [x.shape[2], x.shape[3]], gx)
    if shortcut_x is not None and needs[4]:
        gsx = torch.empty_like(shortcut_x, memory_format=memory_format_of(shortcut_x))
        conv_dgrad(grad, mask, shortcut_weight, [shortcut_stride] * 2, [0, 0], [1, 1], 1,
                   [shortcut_x.shape[2], shortcut_x.shape[3]], gsx)

    gw = torch.empty_like(weight, memory_format=weight_grad_format(x, weight)) if needs[1] else None
    gb = torch.empty(weight.shape[0], dtype=torch.float32, device=grad.device) if has_bias and needs[2] else None
    gsw = None
    if shortcut_x is not None and needs[5]:
        gsw = torch.empty_like(shortcut_weight, memory_format=weight_grad_format(shortcut_x, shortcut_weight))
    merge = gsw is not None and groups == 1  # the projection's rows join the conv's GEMM
    if gw is not None or gb is not None or merge:
        conv_wgrad(grad, mask, x, list(weight.shape[2:]), list(stride), list(padding), list(dilation), groups,
                   shortcut_x if merge else None, shortcut_stride, gw, gsw if merge else None, gb)
    if gsw is not None and not merge:  # a grouped conv's projection: a GEMM of its own
        conv_wgrad(grad, mask, shortcut_x, [1, 1], [shortcut_stride] * 2, [0, 0], [1, 1], 1,
                   None, 1, gsw, None, None)
    return gx, gw, gb, gr, gsx, gsw


# --------------------------------------------------------------------------- build info
def _cuobjdump() -> Optional[str]:
    """A cuobjdump: the toolkit's, else the one Triton bundles, else None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [Path(home, "bin", "cuobjdump")]
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(Path(on_path))
    triton = importlib.util.find_spec("triton")  # located, not imported
    if triton is not None and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def _archs_in_binary(path: str) -> Tuple[list, Optional[str]]:
    """The SASS architectures (e.g. sm_80, sm_90a) embedded in ``path`` and the CUDA release of the
    cuobjdump that listed them; ([], None) if none is at hand."""
    tool = _cuobjdump()
    if tool is None:
        return [], None
    try:
        listing = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True, timeout=60).stdout
        version = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    release = re.search(r"release (\d+\.\d+)", version)
    return sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.", listing))), (release[1] if release else None)


def _restore_suffixes(archs: list, flag_archs: list) -> list:
    """cuobjdump before CUDA 13 lists an sm_90a cubin as sm_90: take the suffix from the build's flags."""
    return sorted(arch + "a" if arch + "a" in flag_archs and arch not in flag_archs else arch for arch in archs)


def _archs_from_flags(arch_flags: str) -> list:
    """TORCH_CUDA_ARCH_LIST style ("8.0;9.0a") -> ["sm_80", "sm_90a"]."""
    archs = []
    for item in re.split(r"[;\s,]+", arch_flags.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item)
        if match:
            archs.append(f"sm_{match[1]}{match[2]}{match[3]}")
    return archs


def sources_digest() -> Optional[str]:
    """The digest of the sources the extension was built from, for auto's cache key: cheap, unlike
    ``build_info`` (two cuobjdump runs, ~20 ms, on every newly measured shape)."""
    ext, _ = _extension()
    return None if ext is None else ext.build_info().get("sources_digest")


def build_info() -> dict:
    """How the extension was built, for ``python -m fused_resblock doctor``.

    ``archs`` comes from the binary itself when cuobjdump is at hand, else from
    the arch flags the build recorded, else from nvcc's ``__CUDA_ARCH_LIST__``
    (which cannot tell sm_90 from sm_90a); ``archs_source`` says which.
    """
    ext, reason = _extension()
    if ext is None:
        return {"built": False, "reason": reason, "archs": [], "archs_source": None,
                "cuda_version": None, "path": None, "stale": None}
    info = dict(ext.build_info())
    path = getattr(ext, "__file__", None)
    info["arch_flags"] = (info.get("arch_flags") or "").strip('"')
    flag_archs = _archs_from_flags(info["arch_flags"])
    archs, release = _archs_in_binary(path) if path else ([], None)
    source = "cuobjdump" if archs else None
    if archs and release is not None and int(release.split(".")[0]) < 13:
        restored = _restore_suffixes(archs, flag_archs)
        if restored != archs:
            archs, source = restored, f"cuobjdump {release} + build flags (it prints sm_90a as sm_90)"
    if not archs and flag_archs:
        archs, source = flag_archs, "build flags"
    if not archs and info.get("cuda_arch_list"):
        archs = [f"sm_{int(a) // 10}" for a in info["cuda_arch_list"].split(",") if a.strip().isdigit()]
        source = "__CUDA_ARCH_LIST__ (cannot tell sm_90 from sm_90a)"
    info.update(built=True, reason=None, archs=archs, archs_source=source, path=path, stale=_staleness(ext))
    return info
