"""Run one case and describe it as one result row; a failure becomes a row too.

A case builds its module and inputs fresh, so a crash, an OOM or a
``BackendUnsupportedError`` stays inside its row: an error is recorded with
its message and the tail of its traceback, an unsupported configuration as
skipped with the library's reason, and the driver moves on.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import threading
import time
import traceback
import warnings
from typing import Optional

import torch

from fused_resblock import BackendUnsupportedError
from fused_resblock import _warnings as frb_warnings

from . import peers, roofline, shapes, timing, workloads
from .cases import Case

TRACEBACK_LINES = 25
MAX_WARNINGS = 10
INJECTED = "injected failure (--inject-failure): this case fails on purpose"


class CaseTimeLimit(BaseException):
    """A case ran past its time limit. A BaseException, as KeyboardInterrupt is: the library's and
    the tuners' ``except Exception`` (a failing tile config, say) must not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise CaseTimeLimit in the main thread after ``seconds`` (SIGALRM); elsewhere, or None: no limit.
    It fires between Python bytecodes, so a kernel that hangs the GPU is left to gpu_check's kill."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeLimit(f"over its time limit of {seconds:.0f} s; the run went on without it")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def base_row(case: Case, status: str) -> dict:
    flops, min_bytes = roofline.case_cost(case)
    return {
        "id": case.id, "group": case.group, "kind": case.kind, "target": case.target, "mode": case.mode,
        "dtype": case.dtype, "memory_format": case.memory_format, "batch": case.batch, "impl": case.impl,
        "status": status, "reason": None, "error": None,
        "timings_ms": [], "median_ms": None, "images_per_s": None, "iterations": 0, "rotation_buffers": 0,
        "first_call_s": None, "peak_memory_bytes": None, "first_call_peak_memory_bytes": None, "resident_bytes": None,
        "flops": flops, "min_bytes": min_bytes, "achieved_tflops": None, "roofline_share": None,
        "ratio_to_peers": {}, "warnings": [], "wall_s": 0.0, "output_abs_mean": None,
    }


def skipped_row(case: Case, reason: str) -> dict:
    row = base_row(case, "skipped")
    row["reason"] = reason
    return row


def error_row(case: Case, exc: BaseException) -> dict:
    row = base_row(case, "error")
    row["error"] = _error(exc)
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device: torch.device, peak: bool) -> Optional[int]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def _failing(step):
    def fail(inputs):
        raise RuntimeError(INJECTED)
    return fail


def _measure(case: Case, device: torch.device, plan: timing.TimingPlan, rotation_cap: int,
             impl, inject_failure: bool) -> dict:
    spec = shapes.target_spec(case.kind, case.target)
    precision = impl.precision(case)
    module = workloads.prepare(workloads.build_plain(spec, device), case, precision)
    example = workloads.make_input(spec, case, precision.input_dtype, device)
    count = timing.rotation_count(workloads.input_bytes(example), device, rotation_cap)
    inputs = [example] + [workloads.make_input(spec, case, precision.input_dtype, device) for _ in range(count - 1)]
    step = impl.build(module, spec, case, device)
    if inject_failure:
        step = _failing(step)
    resident = _memory(device, peak=False)
    measured = timing.measure(step, inputs, device, plan)
    peak = _memory(device, peak=True)
    # once more, untimed: a fast wrong answer must not read as a speedup (run.check_agreement)
    output_abs_mean = _output_abs_mean(step(inputs[0]))
    timings = [round(t, 6) for t in measured.timings_ms]  # ns resolution is plenty; the median is of these
    median = statistics.median(timings)
    return {
        "status": "ok", "timings_ms": timings, "median_ms": median,
        "images_per_s": case.batch / (median * 1e-3), "iterations": len(timings),
        "rotation_buffers": count, "first_call_s": measured.first_call_s,
        # the steady state's peak (after the warm-up); the first call's own holds tuning buffers
        # (Triton's cache flush, cuDNN's benchmark workspaces) that a model in use does not
        "peak_memory_bytes": peak, "first_call_peak_memory_bytes": measured.first_call_peak,
        "resident_bytes": resident, "output_abs_mean": output_abs_mean,
    }


class NonFiniteOutput(RuntimeError):
    """A step whose output (or loss) holds NaN or infinity: a broken kernel, not a result."""


def _output_abs_mean(output) -> float:
    """mean |output| (a forward's output, a training step's loss) in float64, after checking that
    every element is finite."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    output = output.detach()
    finite = torch.isfinite(output)
    if not bool(finite.all()):
        raise NonFiniteOutput(f"{int(finite.numel() - finite.sum())} of {finite.numel()} output elements "
                              "are NaN or infinite")
    return float(output.abs().sum(dtype=torch.float64)) / max(output.numel(), 1)


def _error(exc: BaseException) -> dict:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(lines).rstrip().splitlines()[-TRACEBACK_LINES:]
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback_tail": "\n".join(tail)}


def _unique_messages(caught) -> list:
    messages = []
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message)[:300]}"
        if text not in messages:
            messages.append(text)
    return messages[:MAX_WARNINGS]


def run_case(case: Case, device: torch.device, plan: timing.TimingPlan, rotation_cap: int,
             inject_failure: bool = False, time_limit_s: Optional[float] = None) -> dict:
    """Build, warm up and time ``case``; the row says ok, skipped (unsupported) or error (one that
    ran past ``time_limit_s`` too: a case is not allowed to spend the run's budget on its own)."""
    impl = peers.by_name()[case.impl]
    row = base_row(case, "ok")
    started = time.perf_counter()
    _release(device)
    frb_warnings.reset()  # each case reports its own fallback warnings
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught, impl.context(case), time_limit(time_limit_s):
            warnings.simplefilter("always")
            row.update(_measure(case, device, plan, rotation_cap, impl, inject_failure))
    except CaseTimeLimit as exc:
        row.update(status="error", error=_error(exc))
    except BackendUnsupportedError as exc:
        row.update(status="skipped", reason=f"unsupported: {exc}")
    except Exception as exc:  # any failure is this case's result, not the run's end
        row.update(status="error", error=_error(exc))
    finally:
        # after a sticky CUDA error the cleanup raises the same error: record it, keep the row
        for cleanup in (impl.cleanup, lambda: _release(device)):
            try:
                cleanup()
            except Exception as exc:
                if row["status"] == "ok":  # an asynchronous failure of the timed work, likely: drop it
                    row.clear()
                    row.update(base_row(case, "error"), error=_error(exc))
    row["warnings"] = _unique_messages(caught)
    row["wall_s"] = time.perf_counter() - started
    if row["status"] == "ok":
        row["achieved_tflops"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e12
    return row


def device_unusable(device: torch.device) -> Optional[str]:
    """None while ``device`` still works; after a sticky CUDA error, why it does not."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as exc:  # e.g. an illegal memory access poisons the context for good
        return f"{type(exc).__name__}: {exc}"
    return None
