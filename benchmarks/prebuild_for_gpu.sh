#!/usr/bin/env bash
# Prepare a GPU call here, on the CPU machine: build the CUDA extension for the GPU image's stack
# (python 3.12, torch 2.11.0+cu130), so that the GPU's few device-minutes are not spent compiling
# it, and record the source state (the copy the device gets has no .git: its results would say
# "commit unknown"). Run it last, after the final edit: both are checked against the tree there.
#
#   bash benchmarks/prebuild_for_gpu.sh          # ~5 min the first time (a 3 GB venv), ~2 min after
#
# Leaves fused_resblock/_C.cpython-312-x86_64-linux-gnu.so beside the sources, CUTLASS's wheel in
# .wheels/ and .source_state.json (all git-ignored). The device call carries them:
#   carry: [".wheels", "fused_resblock/_C.cpython-312-x86_64-linux-gnu.so", ".source_state.json"]
# gpu_check.sh's build stage then uses the binary when it was built from the same csrc/ (its
# recorded digest, fused_resblock/backends/extension_sources.py) for the same torch, and builds
# there otherwise (an edit after this script, another torch, a library the image lacks).
# Knobs: PY312 (a python 3.12), VENV (default /tmp/fused_resblock_gpu_stack), CUDA_HOME.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

# The GPU image's versions (device KINDS.md; recorded again in each run's env.txt).
TORCH=torch==2.11.0
TORCHVISION=torchvision==0.26.0
TRITON=triton==3.6.0
CUTLASS=nvidia-cutlass==4.2.0.0

# The first candidate that runs as 3.12: a pyenv shim is on PATH even when its version is not selected.
is_py312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
if [ -z "${PY312:-}" ]; then
    for candidate in "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python3 /usr/bin/python3.12; do
        if is_py312 "$candidate"; then PY312=$candidate; break; fi
    done
fi
is_py312 "${PY312:-}" || { echo "no python 3.12 found: set PY312" >&2; exit 2; }
VENV=${VENV:-/tmp/fused_resblock_gpu_stack}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "$TORCH" "$TORCHVISION" "$TRITON" ninja setuptools wheel
mkdir -p .wheels
ls .wheels/nvidia_cutlass-*.whl >/dev/null 2>&1 || "$VENV/bin/python" -m pip download -q --no-deps "$CUTLASS" -d .wheels
"$VENV/bin/python" -m pip install -q --no-deps .wheels/nvidia_cutlass-*.whl

MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" -W ignore - <<'EOF'
from fused_resblock.backends import cuda
info = cuda.build_info()
assert info["built"] and info["stale"] is None, info
print(f"built {info['path']}: digest {info['sources_digest']}, torch {info['torch_version']}, "
      f"{' '.join(info['archs'])}, {info['tma_wgmma']}")
EOF
"$VENV/bin/python" -m benchmarks.environment --write-source-state
