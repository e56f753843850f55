"""What the CUDA extension is built from: its sources' digest and its default architectures.

The digest tells a build apart from a stale one.

setup.py (which loads this file by path, before the package is importable) and
the just-in-time build compile the digest of csrc/ into the extension
(``build_info()["sources_digest"]``); ``cuda.build_info()`` compares it with
the checkout's csrc/ and says whether the binary was built from these sources.
A stale binary (a checkout updated without a rebuild, a build carried to
another machine) is how a fixed kernel keeps running its old code unnoticed.
Torch-free on purpose.
"""
import hashlib
import os
from typing import Optional

SUFFIXES = (".cpp", ".cu", ".cuh", ".h")

# Ampere's sm_80, and Hopper's sm_90a: the "a" is what lets CUTLASS's kernel use wgmma (built for
# plain sm_90 it compiles to a stub, which the extension then refuses to run). TORCH_CUDA_ARCH_LIST
# overrides it, for setup.py and the just-in-time build alike.
DEFAULT_ARCH_LIST = "8.0;9.0a"


def digest(csrc_dir: str) -> Optional[str]:
    """sha256 (16 hex digits) over the names and contents of csrc/'s sources; None without any."""
    try:
        names = sorted(n for n in os.listdir(csrc_dir) if n.endswith(SUFFIXES))
    except OSError:
        return None
    if not names:
        return None
    h = hashlib.sha256()
    for name in names:
        with open(os.path.join(csrc_dir, name), "rb") as f:
            content = f.read()
        h.update(name.encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
    return h.hexdigest()[:16]


def define(csrc_dir: str) -> list:
    """The host compiler flag that records the digest (none when there are no sources)."""
    value = digest(csrc_dir)
    return [f"-DFUSED_RESBLOCK_SOURCES_DIGEST={value}"] if value else []
