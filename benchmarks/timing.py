"""Timing one step: the first call apart, warm-up, then per-iteration times and their median.

On a GPU each iteration is bracketed by CUDA events, recorded back to back
in chunks of SYNC_EVERY with a host sync between chunks (each chunk's first
sample, which starts on an empty queue, is dropped), so a launch-bound step
(small batch) shows the time the GPU waited for launches too. On the CPU
``time.perf_counter``. Inputs rotate
over several buffers (``rotation_count``) so an iteration does not find its
input in cache from the one before.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

# A host sync every few GPU iterations keeps the wall-clock stop rule honest; the sample after each
# sync starts on an empty queue (its launch latency shows) and is dropped.
SYNC_EVERY = 10
CPU_CACHE_BYTES = 32 << 20  # a guess at a server's last-level cache; the CPU path is a smoke test


@dataclass(frozen=True)
class TimingPlan:
    warmup: int = 5
    min_warmup_s: float = 0.05  # and at least this long: clocks ramp up from idle (345 MHz idle on an H200)
    min_iters: int = 10
    max_iters: int = 2000  # high enough that min_time_s decides for fast cases
    min_time_s: float = 0.5   # keep iterating until this much time has passed (or max_iters)
    max_time_s: float = 5.0   # stop after this much time once min_iters are done


@dataclass
class Measurement:
    first_call_s: float
    timings_ms: list = field(default_factory=list)
    first_call_peak: Optional[int] = None  # bytes allocated at most by the first call and warm-up (GPU)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.timings_ms)


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return CPU_CACHE_BYTES


def rotation_count(bytes_per_input: int, device: torch.device, cap: int) -> int:
    """Input buffers to cycle through: together at least twice the cache, at least 2, at most ``cap``."""
    wanted = math.ceil(2 * cache_bytes(device) / max(bytes_per_input, 1))
    return max(2, min(cap, wanted))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable, inputs: Sequence, device: torch.device, plan: TimingPlan) -> Measurement:
    """Time ``step(inputs[i % len(inputs)])``: the first call (compile, autotune, capture) apart."""
    n = len(inputs)
    start = time.perf_counter()
    step(inputs[0])
    _synchronize(device)
    first_call_s = time.perf_counter() - start
    i = 1
    while i < plan.warmup or time.perf_counter() - start - first_call_s < plan.min_warmup_s:
        step(inputs[i % n])
        i += 1
        if i % SYNC_EVERY == 0:
            _synchronize(device)
    _synchronize(device)
    first_call_peak = None
    if device.type == "cuda":  # the timed steps' own peak from here; the first call's apart
        first_call_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        timings = _measure_cuda(step, inputs, device, plan)
    else:
        timings = _measure_host(step, inputs, plan)
    return Measurement(first_call_s, timings, first_call_peak)


def _keep_going(i: int, started: float, plan: TimingPlan) -> bool:
    if i >= plan.max_iters:
        return False
    if i < plan.min_iters:
        return True
    elapsed = time.perf_counter() - started
    return elapsed < plan.min_time_s and elapsed < plan.max_time_s


def _measure_cuda(step, inputs, device, plan) -> list:
    timings = []
    started = time.perf_counter()
    i = 0
    while _keep_going(i, started, plan):
        # events made before the chunk, so creating them stays out of the timed steps
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(min(SYNC_EVERY, plan.max_iters - i))]
        for begin, end in events:
            begin.record()
            step(inputs[i % len(inputs)])
            end.record()
            i += 1
        torch.cuda.synchronize(device)
        timings.extend(begin.elapsed_time(end) for begin, end in events[1:])
    return timings


def _measure_host(step, inputs, plan) -> list:
    timings = []
    started = time.perf_counter()
    i = 0
    while _keep_going(i, started, plan):
        t0 = time.perf_counter()
        step(inputs[i % len(inputs)])
        timings.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return timings
