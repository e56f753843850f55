"""benchmarks/gpu_check.sh, the GPU session's one call, runs end to end here on the tiny matrix.

Without a GPU its build and test stages are skipped (CI builds and tests on its own),
memcheck skips itself (no GPU backend), and the benchmark runs the tiny preset: what
is checked is the script — its stages, time keeping, files and summary — so that a
GPU session never spends its call on a broken script.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from benchmarks import validate  # noqa: E402
from fused_resblock.backends import cuda as cuda_backend  # noqa: E402
from helpers import ON_GPU  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
MAX_FILES = 8  # what the device tool brings back from $OUT


@pytest.mark.skipif(ON_GPU, reason="on a GPU the session runs the script itself, with the full matrix")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_runs_end_to_end_on_the_tiny_matrix(tmp_path):
    out = tmp_path / "out"
    # The build stage runs when the extension here was built from these sources (CI's editable
    # install): it must recognise the build and take seconds, not rebuild. Otherwise it is skipped.
    built_here = cuda_backend.build_info()
    build_checked = built_here["built"] and built_here["stale"] is None
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SKIP="tests" if build_checked else "build,tests",
               BENCH_ARGS="--preset tiny", GPU_CHECK_TOTAL_S="300", BENCH_BUDGET_S="120")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert {"env.txt", "summary.txt", "bench.log", "bench.json", "bench.png"} <= set(files)

    summary = (out / "summary.txt").read_text()
    assert done.stdout.endswith(summary), "the summary is printed last"
    stages = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:] if line[:1].isalpha()}
    assert stages["tests"] == "skipped"
    if build_checked:
        assert stages["build"] == "ok", summary
        assert "already built from these sources" in (out / "build.log").read_text()
    else:
        assert stages["build"] == "skipped"
    assert stages["env"] == "ok" and stages["bench"] == "ok", summary
    assert stages["memcheck"] == "skipped", summary  # no compute-sanitizer, or no GPU backend

    result = json.loads((out / "bench.json").read_text())
    assert validate.errors(result, engine="hand") == []
    assert result["settings"]["preset"] == "tiny"
    assert any(row["status"] == "ok" for row in result["cases"])
