"""What a result was measured on: device, driver, library versions, git commit.

The lent GPU machine gets a copy of the working tree without ``.git``: before the
call, ``python -m benchmarks.environment --write-source-state`` (prebuild_for_gpu.sh
runs it) records the commit, whether the tree was dirty, and a digest of the code
in ``.source_state.json``, carried with the call. A result there takes its commit
from that file when the digest still matches the tree it runs on.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import getpass
import platform
import subprocess
import tempfile
from typing import Optional

import torch
import torchvision

from fused_resblock import backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_STATE = ".source_state.json"
_CODE_DIRS = ("fused_resblock", "csrc", "benchmarks", "tests")
_CODE_SUFFIXES = (".py", ".cu", ".cuh", ".h", ".cpp", ".sh", ".json")


def _command(args, cwd: Optional[str] = None) -> Optional[str]:
    """stdout of ``args``, stripped; None if the command is missing or fails."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tree_digest(repo: str = REPO) -> str:
    """sha256 (16 hex digits) of the code: paths and contents under the code folders (results aside)."""
    h = hashlib.sha256()
    for top in _CODE_DIRS:
        for root, dirs, files in os.walk(os.path.join(repo, top)):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "results"))
            for name in sorted(files):
                if name.endswith(_CODE_SUFFIXES):
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        content = f.read()
                    h.update(os.path.relpath(path, repo).encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
    return h.hexdigest()[:16]


def _git(repo: str) -> tuple:
    commit = _command(["git", "rev-parse", "HEAD"], cwd=repo)
    if not commit:
        return None, None
    status = _command(["git", "status", "--porcelain"], cwd=repo)
    return commit, (None if status is None else bool(status))


def write_source_state(repo: str = REPO) -> dict:
    """Record the commit, dirtiness and code digest for a copy of the tree that has no .git."""
    commit, dirty = _git(repo)
    state = {"commit": commit or "unknown", "dirty": dirty, "tree_digest": tree_digest(repo), "written": timestamp()}
    with open(os.path.join(repo, SOURCE_STATE), "w") as f:
        json.dump(state, f, indent=1)
    return state


def git_state(repo: str = REPO) -> tuple:
    """(commit or "unknown", dirty flag or None when unknown, where they come from or None)."""
    commit, dirty = _git(repo)
    if commit:
        return commit, dirty, "git"
    try:
        with open(os.path.join(repo, SOURCE_STATE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return "unknown", None, None
    if not isinstance(state, dict) or state.get("tree_digest") != tree_digest(repo):
        return "unknown", None, f"{SOURCE_STATE} does not match this tree (written for other code)"
    return str(state.get("commit", "unknown")), state.get("dirty"), f"{SOURCE_STATE} written {state.get('written')}"


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
    commit, dirty, source = git_state()
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
        "git_source": source,
        "caches": cache_state(),
        "backends": backends.availability(),
        "env_vars": {name: os.environ.get(name) for name in (
            "FUSED_RESBLOCK_BACKEND", "FUSED_RESBLOCK_CUDA_PIPELINE", "FUSED_RESBLOCK_AUTOTUNE", "FUSED_RESBLOCK_COMPILE_THREADS",
            "TRITON_INTERPRET")},
    }


def cache_state() -> dict:
    """What the disk caches held when the run began: first-call times depend on them."""
    from fused_resblock.backends.cache_file import cache_dir

    def entries(path: str) -> Optional[int]:
        try:
            return len(os.listdir(path))
        except OSError:
            return None
    triton_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{user}")
    ours = cache_dir()
    return {
        "triton_kernels": entries(triton_dir),
        "inductor_entries": entries(inductor_dir),
        "fused_resblock_files": sorted(p.name for p in ours.glob("*.json")) if ours.is_dir() else [],
    }


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.environment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-source-state", action="store_true",
                        help=f"write {SOURCE_STATE} (commit, dirty, code digest) for a copy of the tree without .git")
    args = parser.parse_args(argv)
    if args.write_source_state:
        print(json.dumps(write_source_state()))
    else:
        print(json.dumps(dict(zip(("git_commit", "git_dirty", "git_source"), git_state()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
