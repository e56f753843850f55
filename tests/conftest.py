"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: the
variable must be set before any kernel module is imported, hence here.
Every test gets its own seed, derived from a per-run seed (printed in the
header; set FUSED_RESBLOCK_TEST_SEED to replay a run), so inputs are fresh on
every run yet a failure can be reproduced.
Measurements that tune (Triton tile configs, auto's backend choice) are off
unless a test turns them on, and every cache file goes to a per-test
directory, never the user's.
"""
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_resblock  # noqa: E402
from fused_resblock import _warnings, backends  # noqa: E402

# Exported, so pytest-xdist's workers (started after this file loads) share the run's seed.
os.environ.setdefault("FUSED_RESBLOCK_TEST_SEED", str(random.SystemRandom().randrange(2**31)))
RUN_SEED = int(os.environ["FUSED_RESBLOCK_TEST_SEED"])


def pytest_report_header(config):
    return f"fused_resblock test seed: FUSED_RESBLOCK_TEST_SEED={RUN_SEED}"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fused_resblock test seed: FUSED_RESBLOCK_TEST_SEED={RUN_SEED} (to replay this run)")


@pytest.fixture(autouse=True)
def _fresh_state(request, monkeypatch, tmp_path):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", "0")
    monkeypatch.setenv("FUSED_RESBLOCK_CACHE_DIR", str(tmp_path / "fused_resblock_cache"))
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    _warnings.reset()
    backends.clear_caches()
    yield
    _warnings.reset()
    backends.clear_caches()
