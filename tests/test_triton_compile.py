"""The Triton kernels compile for Hopper, Ampere and Ada without a GPU (see triton_compile_only.py).

The interpreter tests check what the kernels compute; this checks that the
compiler accepts every kernel flag set whole models launch, in fp16, bf16 and
fp32 (TF32 and IEEE), and that the untimed tile configs fit in the target's
shared memory. The targets compile at once, one process each.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ON_GPU

pytest.importorskip("triton")
from triton_compile_only import DTYPES, problems  # noqa: E402

SCRIPT = Path(__file__).with_name("triton_compile_only.py")
# The dtypes spread over the targets (CI's 2 cores compile ~4.5 CPU-minutes in ~2.5): sm_90 the
# 16-bit types and TF32; sm_80 bf16 and IEEE fp32 (FMA, not tensor-core dots); sm_89 (99 KB of
# shared memory per block, like sm_86 and sm_120) fp16, for the tile sizes.
TARGETS = {90: "fp16,bf16,fp32-tf32", 80: "bf16,fp32-ieee", 89: "fp16"}


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel test compiles its kernels for real")
def test_every_kernel_compiles_for_sm90_sm80_and_sm89(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for arch, dtypes in TARGETS.items():
        out = tmp_path / f"sm{arch}.json"
        run_env = dict(env, TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}"))  # compile, do not reuse
        runs[arch] = (out, subprocess.Popen(
            [sys.executable, str(SCRIPT), "--arch", str(arch), "--dtypes", dtypes, "--json", str(out)],
            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for arch, (out, proc) in runs.items():
        log, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, log[-6000:]
        result = json.loads(out.read_text())
        assert result["problems"] == [], result["problems"]
        compiled = [r for r in result["records"] if not r["error"]]
        # real compiles, not cache hits or no-ops: every GEMM kernel staged its tiles in shared memory
        gemms = [r for r in compiled if r["kernel"] in ("_conv_bias_act_kernel", "_dgrad_kernel", "_wgrad_kernel")]
        assert gemms and all(r["shared_bytes"] > 0 for r in gemms)
        assert {r["workload"].split("/")[0] for r in compiled} == set(TARGETS[arch].split(","))


def _record(**overrides):
    record = {"workload": "fp16/resnet50/eval/nhwc", "kernel": "_conv_bias_act_kernel",
              "constexprs": {"BLOCK_M": 128}, "shared_bytes": 65536, "seconds": 1.0, "error": None,
              "candidate": False}
    return {**record, **overrides}


def test_every_dtype_compiles_for_some_target():
    assert sorted({d for dtypes in TARGETS.values() for d in dtypes.split(",")}) == sorted(DTYPES)


def test_compile_problems_are_named():
    kernels = ["_conv_bias_act_kernel"]
    assert problems([_record()], 90, ["fp16"], kernels) == []
    found = problems([_record(error="CompilationError: at 12:4: bad dot"), _record(shared_bytes=240_000)],
                     90, ["fp16", "bf16"], kernels)
    assert len(found) == 3
    assert "bad dot" in found[0]
    assert "240000 B of shared memory, sm_90 has 232448" in found[1]
    assert found[2] == "bf16: never compiled: _conv_bias_act_kernel"
    # a candidate the tuner would time may not fit: it is skipped there, not a problem
    assert problems([_record(), _record(shared_bytes=240_000, candidate=True)], 90, ["fp16"], kernels) == []


@pytest.mark.skipif(ON_GPU, reason="on a GPU the tuner compiles for real whenever it tunes")
def test_tuner_candidates_compile_in_parallel_threads(tmp_path):
    """The tuner's precompile (threads, launches turned into compiles) through real Triton compiles."""
    out = tmp_path / "candidates.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), FUSED_RESBLOCK_COMPILE_THREADS="2")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--candidates", "--dtypes", "bf16",
         "--models", "cifar_resnet20", "--modes", "eval", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.read_text())
    candidates = [r for r in result["records"] if r["candidate"]]
    assert result["problems"] == [] and len(candidates) >= 10
    assert all(r["error"] is None and r["shared_bytes"] > 0 for r in candidates)
