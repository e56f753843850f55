"""Build and install fused_resblock.

    pip install --no-build-isolation -e .     # torch must already be installed

The C++/CUDA extension (``fused_resblock._C``, sources in csrc/) is compiled with
ninja when nvcc and a CUDA build of torch are present, for sm_80 (Ampere) and
sm_90a (Hopper). Without them, or with ``FUSED_RESBLOCK_SKIP_CUDA_BUILD=1``, the
package installs without it (the Triton and reference backends still work) and
``python -m fused_resblock doctor`` says why. ``--no-build-isolation`` lets the
build see the installed torch instead of downloading another one.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_skip_reason():
    """None when the extension can be built here, else why not."""
    if os.environ.get("FUSED_RESBLOCK_SKIP_CUDA_BUILD", "0") == "1":
        return "FUSED_RESBLOCK_SKIP_CUDA_BUILD=1"
    sources = glob.glob(os.path.join(HERE, "csrc", "*.cu"))
    if not sources:
        return "no CUDA sources in csrc/"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def _build_helper(name):
    """A torch-free module of fused_resblock/backends/, loaded by path: the package is not importable yet."""
    import importlib.util

    path = os.path.join(HERE, "fused_resblock", "backends", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_fused_resblock_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    reason = _cuda_skip_reason()
    if reason is not None:
        print(f"fused_resblock: not building the CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources_helper = _build_helper("extension_sources")
    # the list the build really uses (a TORCH_CUDA_ARCH_LIST already set wins), recorded for build_info
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST",
                                      os.environ.get("FUSED_RESBLOCK_CUDA_ARCH", sources_helper.DEFAULT_ARCH_LIST))
    if "9.0a" not in arch_list:
        print(f"fused_resblock: TORCH_CUDA_ARCH_LIST={arch_list!r} has no 9.0a: the extension runs CUTLASS's "
              "Hopper kernel only with it (Hopper GPUs then run the WMMA kernel)", file=sys.stderr)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    include_dirs = [os.path.join(HERE, "csrc")]
    cutlass = _build_helper("cutlass_headers")
    cutlass_dirs = cutlass.include_dirs()
    nvcc_defines = list(cutlass.DEFINES) if cutlass_dirs else []
    if not cutlass_dirs:
        print("fused_resblock: no CUTLASS headers (pip install nvidia-cutlass): building without the sm_90 "
              "TMA + wgmma kernel", file=sys.stderr)
    include_dirs += cutlass_dirs
    extension = CUDAExtension(
        "fused_resblock._C",
        sources,
        include_dirs=include_dirs,
        # no -std for the host compiler: torch adds the C++ standard it needs (C++20 for torch >= 2.10)
        extra_compile_args={
            "cxx": ["-O3", "-DFUSED_RESBLOCK_CUDA_ARCHS=" + ",".join(arch_list.replace(";", " ").split()),
                    *sources_helper.define(os.path.join(HERE, "csrc"))],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *nvcc_defines],
        },
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_resblock",
    version="0.1.0",
    description="Fused conv + BN + ReLU + residual ResNet blocks for PyTorch (Triton and CUDA), a torchvision drop-in",
    packages=find_packages(include=["fused_resblock", "fused_resblock.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "torchvision>=0.20"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
