#!/usr/bin/env bash
# The one entry point of a GPU session: everything the GPU can check, in one call.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Stages, in order; none aborts the script, each one's status goes into the summary:
#   env       nvidia-smi, nvcc, compute-sanitizer, python and library versions, backend availability
#   build     the CUDA extension, when csrc/ has CUDA sources: nothing when the one present was built
#             from these sources for this torch (benchmarks/prebuild_for_gpu.sh builds it on the CPU
#             machine, the call carries it), else setup.py build_ext --inplace, then pip install
#             --no-deps --no-build-isolation -e . if that fails; no downloads: CUTLASS's headers come
#             from .wheels/nvidia_cutlass-*.whl when the image lacks them (carry .wheels)
#   tests     python -m pytest on the GPU (TRITON_INTERPRET unset), the GPU kernels' test files first,
#             over TEST_WORKERS processes when pytest-xdist is installed, --durations 30
#   memcheck  compute-sanitizer memcheck of small fused blocks on each GPU backend that is available
#   bench     python -m benchmarks.run: the matrix within a budget, JSON + plot
#   summary   a short table, printed last
#
# OUTDIR gets at most 8 files (what the device tool brings back):
#   env.txt build.log pytest.log memcheck.log bench.log bench.json bench.png summary.txt
#
# Time: the whole script keeps within GPU_CHECK_TOTAL_S (default 585 s, under a 10-minute device call);
# the benchmark gets BENCH_BUDGET_S (default 480) or what is left after the stages before it: with a
# carried build, 10 + 180 (tests) + 2 x 45 (memcheck) leave it ~300 s, of which the cases get
# ~300 - 45 (start-up and JSON) - 30 (the kill grace) - 15 (the summary) = ~210 s. A session's 15 device-minutes
# hold the machine's start, this call and a warm follow-up of ~150 s (benchmarks/NOTES.md, Running).
# Knobs (environment variables):
#   PYTHON (default python3)          GPU_CHECK_TOTAL_S (585)       BENCH_BUDGET_S (480)
#   BUILD_TIMEOUT_S (240)             TEST_TIMEOUT_S (180)          MEMCHECK_TIMEOUT_S (45 per backend)
#   TEST_WORKERS (8; 1 = no xdist)    TEST_CASE_TIMEOUT_S (120, with pytest-timeout)
#   GPU_CHECK_SKIP  comma list of stages to skip: build,tests,memcheck,bench
#   BENCH_ARGS      extra arguments for python -m benchmarks.run (e.g. "--only 'model:resnet50:*'")
#   TEST_ARGS       extra arguments for pytest (e.g. "-k 'cuda and bf16'")
# Needs python 3.10+, torch, and no network.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-585}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-480}
SKIP=",${GPU_CHECK_SKIP:-},"
BENCH_RESERVE_S=45   # the benchmark's start-up, peak measurement and JSON beyond its case budget
KILL_GRACE_S=30      # run_stage's SIGINT-to-SIGKILL grace (timeout -k)
SUMMARY_RESERVE_S=15 # the summary after the benchmark (it imports torch)
MIN_BENCH_S=120      # earlier stages leave the benchmark at least this much when they can
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
STAGES=$(mktemp)     # the stage lines, outside OUT: a killed script leaves no ninth file there
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
: >"$STAGES"

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( TOTAL_S - $(elapsed) )); }
skipped() { [[ "$SKIP" == *",$1,"* ]]; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# record STAGE STATUS SECONDS DETAIL
record() { printf '%-17s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$STAGES"; }

# run_stage STAGE TIMEOUT LOG COMMAND...: run with a time limit (callers pass > 30 s: timeout 0 would
# mean none), log everything, record the outcome
run_stage() {
    local stage=$1 limit=$2 log=$3; shift 3
    local t0 rc status
    t0=$(date +%s)
    echo "== $stage (limit ${limit}s): $*" | tee -a "$log"
    timeout -s INT -k 30 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|130|137) status=timeout ;;
        *) status="rc=$rc" ;;
    esac
    if [ "$rc" -ne 0 ] && grep -q "Device not supported" "$log" 2>/dev/null; then
        status=unsupported  # compute-sanitizer on a runtime that hides the device (gVisor): no finding
    fi
    record "$stage" "$status" $(( $(date +%s) - t0 )) "$(tail -n 1 "$log" | cut -c1-150)"
    echo "== $stage: $status" | tee -a "$log"
    return $rc
}

# ---------------------------------------------------------------------------- env
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "repo: $REPO"
    echo "source: $("$PY" -m benchmarks.environment 2>&1 | tail -n 1)"  # git, or the carried .source_state.json
    echo "uname: $(uname -a)"
    echo; echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi failed"
    echo; echo "== nvcc"; nvcc --version 2>&1 || echo "no nvcc"
    echo; echo "== compute-sanitizer"; compute-sanitizer --version 2>&1 || echo "no compute-sanitizer"
    echo; echo "== python"
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("torchvision", "triton", "matplotlib", "jsonschema", "pytest", "pytest_benchmark", "cutlass_library"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "installed"))
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
from fused_resblock import backends
print("backends:", backends.availability())
EOF
} >"$OUT/env.txt" 2>&1
record env ok "$(elapsed)" "$(grep -m1 '^python' "$OUT/env.txt" | cut -c1-150)"

# ---------------------------------------------------------------------------- build
if skipped build; then
    record build skipped 0 "GPU_CHECK_SKIP"
elif ! ls csrc/*.cu >/dev/null 2>&1; then
    echo "no CUDA sources in csrc/: nothing to build" >"$OUT/build.log"
    record build skipped 0 "no CUDA sources in csrc/"
else
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # CUTLASS's headers (the sm_90 TMA + wgmma kernel): the GPU image has no network, so the
    # nvidia-cutlass wheel travels with the working tree (run's carry: [".wheels"]).
    if ! "$PY" -c "import cutlass_library" 2>/dev/null && ls .wheels/nvidia_cutlass-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install --no-deps --no-index .wheels/nvidia_cutlass-*.whl >"$OUT/build.log" 2>&1 \
            && record cutlass ok "$(elapsed)" "nvidia-cutlass installed from .wheels/" \
            || record cutlass failed "$(elapsed)" "pip install .wheels/nvidia_cutlass-*.whl (see build.log)"
    fi
    # An extension already built from these very sources for this torch (built ahead on another
    # machine and carried, or by an earlier call on this one) saves minutes of the device's time.
    t0=$(date +%s)
    current=$("$PY" -W ignore - <<'EOF' 2>&1
import torch
from fused_resblock.backends import cuda
info = cuda.build_info()
problem = info["reason"] or info["stale"] or (torch.cuda.is_available() and cuda.available())
print(f"not usable as built: {problem}" if problem else
      f"already built from these sources: {info['path']} (digest {info['sources_digest']}, "
      f"torch {info['torch_version']}, {' '.join(info['archs'])})")
EOF
    )
    echo "$current" >>"$OUT/build.log"
    limit=$(min "${BUILD_TIMEOUT_S:-240}" $(( $(remaining) - MIN_BENCH_S - 60 )))
    if [[ "$current" == "already built"* ]]; then
        record build ok $(( $(date +%s) - t0 )) "$(echo "$current" | tail -n 1 | cut -c1-150)"
    elif [ "$limit" -le 30 ]; then
        record build skipped 0 "no time left"
    elif ! run_stage build "$limit" "$OUT/build.log" "$PY" setup.py build_ext --inplace; then
        limit=$(min "${BUILD_TIMEOUT_S:-240}" $(( $(remaining) - MIN_BENCH_S - 60 )))
        if [ "$limit" -gt 30 ]; then
            run_stage build-pip "$limit" "$OUT/build.log" "$PY" -m pip install --no-deps --no-build-isolation \
                --no-index -e .
        fi
    fi
fi

# ---------------------------------------------------------------------------- tests
GPU_TEST_FILES=(tests/test_cuda_ext.py tests/test_cuda_backward.py tests/test_cuda_train.py tests/test_cuda_train_bwd.py
                tests/test_cuda_blocks.py tests/test_triton_conv.py tests/test_triton_blocks.py tests/test_triton_train_fwd.py
                tests/test_triton_train_bwd.py
                tests/test_equivalence.py tests/test_ops.py tests/test_backend_choice.py)
if skipped tests; then
    record tests skipped 0 "GPU_CHECK_SKIP"
else
    limit=$(min "${TEST_TIMEOUT_S:-180}" $(( $(remaining) - MIN_BENCH_S - 30 )))
    if [ "$limit" -gt 30 ]; then
        # pytest-xdist (in the GPU image) spreads Triton's compiles and the float64 CPU references
        # over the cores; every worker shares the one GPU and the run's seed (tests/conftest.py)
        # (each worker's float64 references on its share of the cores, not all of them: 8 workers
        # with 16 threads each would thrash); the GPU kernels' files first, so that a stage cut short
        # by its limit has checked them (xdist hands tests out in collection order; pytest drops the
        # duplicates of "tests"); per-test durations in the log for the next session's plan
        workers=()
        n_workers=${TEST_WORKERS:-8}
        threads=${OMP_NUM_THREADS:-}
        if "$PY" -c "import xdist" >/dev/null 2>&1 && [ "$n_workers" -gt 1 ]; then
            workers=(-n "$n_workers")
            threads=${threads:-$(( $(nproc) / n_workers > 0 ? $(nproc) / n_workers : 1 ))}
        fi
        if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
            workers+=(--timeout "${TEST_CASE_TIMEOUT_S:-120}")  # one hung test must not take the stage
        fi
        # shellcheck disable=SC2086  # TEST_ARGS is split on purpose
        eval "set -- ${TEST_ARGS:-}"
        run_stage tests "$limit" "$OUT/pytest.log" env ${threads:+OMP_NUM_THREADS=$threads} \
            "$PY" -m pytest "${GPU_TEST_FILES[@]}" tests -q -rs \
            -p no:cacheprovider --durations 30 ${workers[@]+"${workers[@]}"} "$@"
    else
        record tests skipped 0 "no time left"
    fi
fi

# ---------------------------------------------------------------------------- memcheck
gpu_backends=$("$PY" -c '
from fused_resblock import backends
print(" ".join(n for n, why in backends.availability().items() if why is None and n != "reference"))' 2>/dev/null)
if skipped memcheck; then
    record memcheck skipped 0 "GPU_CHECK_SKIP"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "compute-sanitizer not found" >"$OUT/memcheck.log"
    record memcheck skipped 0 "compute-sanitizer not found"
elif [ -z "$gpu_backends" ]; then
    echo "no GPU backend is available (see env.txt): nothing to check" >"$OUT/memcheck.log"
    record memcheck skipped 0 "no GPU backend available"
else
    for backend in $gpu_backends; do
        limit=$(min "${MEMCHECK_TIMEOUT_S:-45}" $(( $(remaining) - MIN_BENCH_S )))
        if [ "$limit" -lt 30 ]; then
            record "memcheck-$backend" skipped 0 "no time left"
            continue
        fi
        run_stage "memcheck-$backend" "$limit" "$OUT/memcheck.log" \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 FUSED_RESBLOCK_AUTOTUNE=0 \
            compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 50 \
            "$PY" -m benchmarks.sanitize_block --backend "$backend"
    done
fi

# ---------------------------------------------------------------------------- bench
if skipped bench; then
    record bench skipped 0 "GPU_CHECK_SKIP"
else
    # the stage's limit is budget + reserve; its kill grace and the summary must still fit after it
    budget=$(min "$BENCH_BUDGET_S" $(( $(remaining) - BENCH_RESERVE_S - KILL_GRACE_S - SUMMARY_RESERVE_S )))
    if [ "$budget" -lt 30 ]; then
        record bench skipped 0 "no time left (budget ${budget}s)"
    else
        # shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
        eval "set -- ${BENCH_ARGS:-}"
        run_stage bench $(( budget + BENCH_RESERVE_S )) "$OUT/bench.log" \
            "$PY" -m benchmarks.run --budget-s "$budget" --out "$OUT/bench.json" --plot "$OUT/bench.png" "$@"
    fi
fi

# ---------------------------------------------------------------------------- summary
{
    echo "== gpu_check summary ($(elapsed) s of ${TOTAL_S} s), files in $OUT"
    printf '%-17s %-8s %6s  %s\n' stage status time "last line of its log"
    cat "$STAGES"
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" 2>/dev/null | head -n 15
    grep -E 'ERROR SUMMARY|Invalid|out of bounds' "$OUT/memcheck.log" 2>/dev/null | sort | uniq -c | head -n 10
    if [ -s "$OUT/bench.json" ]; then
        "$PY" -m benchmarks.report "$OUT/bench.json" 2>&1 | head -n 40
    fi
} >"$SUMMARY" 2>&1
rm -f "$STAGES"
cat "$SUMMARY"
