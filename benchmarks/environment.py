"""What a result was measured on: device, driver, library versions, git commit."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Optional

import torch
import torchvision

from fused_resblock import backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(args, cwd: Optional[str] = None) -> Optional[str]:
    """stdout of ``args``, stripped; None if the command is missing or fails."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(repo: str = REPO) -> tuple:
    """(commit or "unknown", dirty flag or None when unknown)."""
    commit = _command(["git", "rev-parse", "HEAD"], cwd=repo)
    if not commit:
        return "unknown", None
    status = _command(["git", "status", "--porcelain"], cwd=repo)
    return commit, (None if status is None else bool(status))


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # not installed, or a broken install: record that there is none
        return None
    return getattr(triton, "__version__", "unknown")


def _device_fields(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device_name": platform.processor() or platform.machine() or "CPU", "driver": None,
                "compute_capability": None, "sm_count": None, "memory_bytes": None, "l2_bytes": None}
    props = torch.cuda.get_device_properties(device)
    driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "device_name": props.name,
        "driver": driver.splitlines()[0] if driver else None,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", None),
    }


def collect(device: torch.device) -> dict:
    commit, dirty = git_state()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": device.type,
        **_device_fields(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "backends": backends.availability(),
        "env_vars": {name: os.environ.get(name) for name in (
            "FUSED_RESBLOCK_BACKEND", "FUSED_RESBLOCK_CUDA_PIPELINE", "FUSED_RESBLOCK_AUTOTUNE", "FUSED_RESBLOCK_COMPILE_THREADS",
            "TRITON_INTERPRET")},
    }


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
