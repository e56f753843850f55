"""Where CUTLASS's headers are: the ``nvidia-cutlass`` wheel's copy.

The CUDA extension's Hopper kernel (csrc/conv_bias_act_sm90.cu) is built on
CUTLASS 3; without its headers the extension builds without that kernel and
the WMMA kernel runs everything. setup.py (which loads this file by path,
before the package is importable) and the just-in-time build share this.
Torch-free on purpose.
"""
import importlib.util
import os
from typing import List

# nvcc defines for a build with CUTLASS (include_dirs() on the include path): the first turns
# the kernel on; NDEBUG drops CUTLASS's device asserts, whose calls inside the mainloop make
# ptxas serialize the wgmma pipeline (warning C7510; our own .cu files have no assert()).
DEFINES = ("-DFUSED_RESBLOCK_WITH_CUTLASS=1", "-DNDEBUG")


def include_dirs() -> List[str]:
    """CUTLASS's include/ and tools/util/include/ from the installed wheel, or [] when it is absent."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.origin:
        return []
    source = os.path.join(os.path.dirname(spec.origin), "source")
    dirs = [os.path.join(source, "include"), os.path.join(source, "tools", "util", "include")]
    if not all(os.path.isfile(os.path.join(d, "cutlass", name)) for d, name in zip(dirs, ("cutlass.h", "util/packed_stride.hpp"))):
        return []
    return dirs
