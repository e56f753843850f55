"""Timing one step: the first call apart, warm-up, then per-iteration times and their median.

On a GPU each iteration is bracketed by CUDA events, recorded back to back
without host syncs, so a launch-bound step (small batch) shows the time the
GPU waited for launches too. On the CPU ``time.perf_counter``. Inputs rotate
over several buffers (``rotation_count``) so an iteration does not find its
input in cache from the one before.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

SYNC_EVERY = 10  # a host sync every few GPU iterations keeps the wall-clock stop rule honest
CPU_CACHE_BYTES = 32 << 20  # a guess at a server's last-level cache; the CPU path is a smoke test


@dataclass(frozen=True)
class TimingPlan:
    warmup: int = 5
    min_iters: int = 10
    max_iters: int = 200
    min_time_s: float = 0.5   # keep iterating until this much time has passed (or max_iters)
    max_time_s: float = 5.0   # stop after this much time once min_iters are done


@dataclass
class Measurement:
    first_call_s: float
    timings_ms: list = field(default_factory=list)

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
    for i in range(1, plan.warmup):
        step(inputs[i % n])
    _synchronize(device)
    if device.type == "cuda":
        timings = _measure_cuda(step, inputs, device, plan)
    else:
        timings = _measure_host(step, inputs, plan)
    return Measurement(first_call_s, timings)


def _keep_going(i: int, started: float, plan: TimingPlan) -> bool:
    if i >= plan.max_iters:
        return False
    if i < plan.min_iters:
        return True
    elapsed = time.perf_counter() - started
    return elapsed < plan.min_time_s and elapsed < plan.max_time_s


def _measure_cuda(step, inputs, device, plan) -> list:
    events = []
    started = time.perf_counter()
    i = 0
    while _keep_going(i, started, plan):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step(inputs[i % len(inputs)])
        end.record()
        events.append((begin, end))
        i += 1
        if i % SYNC_EVERY == 0:
            torch.cuda.synchronize(device)
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) for begin, end in events]


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
