"""``auto``'s choice between backends that can all run a call: the faster one, per shape, measured.

When more than one backend supports an op for a configuration on a GPU, the
first call at each shape times each of them on the real arguments and keeps
the winner twice: in a process-wide dict and in ``backends.json`` beside the
autotune cache (``cache_file``), keyed by GPU model, software versions, op and
shape, so a second process measures nothing.

No measurement (the first capable backend of ``AUTO_ORDER`` runs instead)
when ``FUSED_RESBLOCK_AUTOTUNE=0``, and while a CUDA graph is being captured
(timing would synchronise; nothing is remembered then).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Hashable, Optional, Sequence

import torch

from .cache_file import cache_dir, merge_entry, read_entries

FORMAT = "fused_resblock.backend_choice"
VERSION = 1
WHAT = "backend choice cache"


def cache_path() -> Path:
    return cache_dir() / "backends.json"


def _time_ms(run: Callable[[], object], reps: int = 20) -> float:
    """Median of ``reps`` timed calls after warm-up (the first call may compile or tune)."""
    run()
    torch.cuda.synchronize()
    for _ in range(3):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _versions(by_name: dict, device: torch.device) -> str:
    """What decides a verdict besides the GPU's name: the libraries, the CUDA extension's build and
    kernel choice (a rebuilt kernel deserves a new measurement), the SM count (a MIG slice has the
    full GPU's name)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    parts = [f"torch-{torch.__version__}", f"triton-{triton_version}"]
    if "cuda" in by_name:
        info = by_name["cuda"].build_info()
        parts.append(f"cuda-ext-{info.get('sources_digest')}-pipeline{by_name['cuda'].PIPELINE}")
    if device.type == "cuda" and torch.cuda.is_available():
        parts.append(f"sms-{torch.cuda.get_device_properties(device).multi_processor_count}")
    return "|".join(parts)


def measurement_allowed() -> Optional[bool]:
    """True to measure, False to take the first candidate, None while capturing a CUDA graph."""
    if os.environ.get("FUSED_RESBLOCK_AUTOTUNE", "1") == "0":
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    return True


class BackendChooser:
    """Chooses and remembers backends; one per process (``CHOOSER``), more in tests."""

    def __init__(self, path: Optional[Path] = None, benchmark: Callable[[Callable[[], object]], float] = _time_ms,
                 device_name: Callable[[torch.device], str] = torch.cuda.get_device_name):
        self._path = path
        self._benchmark = benchmark
        self._device_name = device_name
        self._memo: Dict[Hashable, str] = {}
        self._disk: Optional[Dict[str, str]] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    def _disk_entries(self) -> Dict[str, str]:
        if self._disk is None:
            self._disk = read_entries(self.path, FORMAT, VERSION, _backend_name, what=WHAT)
        return self._disk

    def choose(self, op: str, shape_key: tuple, candidates: Sequence[ModuleType],
               run: Callable[[ModuleType], object], device: torch.device,
               allowed: Optional[bool] = None) -> ModuleType:
        """The candidate for (op, shape_key); on a miss times ``run(module)`` for each candidate."""
        by_name = {m.NAME: m for m in candidates}
        device = torch.device(device)
        memo_key = (op, shape_key, tuple(by_name), device)
        name = self._memo.get(memo_key)
        if name is not None:
            return by_name[name]
        if allowed is None:
            allowed = measurement_allowed()
            if allowed is None:  # capturing: answer now, remember nothing
                return candidates[0]
        if not allowed:
            self._memo[memo_key] = candidates[0].NAME
            return candidates[0]
        with self._lock:
            file_key = "|".join([self._device_name(device), _versions(by_name, device), op, "/".join(by_name),
                                 repr(shape_key)])
            name = self._disk_entries().get(file_key)
            if name not in by_name:
                # on the tensors' device: its events and its synchronisation, not the current one's
                on_device = (torch.cuda.device(device.index) if device.type == "cuda" and device.index is not None
                             else contextlib.nullcontext())
                with on_device:
                    name, lasting = self._measure(candidates, run)
                if lasting:  # a candidate that failed by chance (out of memory) may win in a later process
                    self._disk_entries()[file_key] = name
                    merge_entry(self.path, FORMAT, VERSION, file_key, name, _backend_name, what=WHAT)
            self._memo[memo_key] = name
            return by_name[name]

    def _measure(self, candidates: Sequence[ModuleType], run: Callable[[ModuleType], object]) -> tuple:
        """(the fastest candidate's name, whether every candidate ran)."""
        best, best_ms, every = candidates[0].NAME, float("inf"), True
        for module in candidates:
            try:
                ms = self._benchmark(lambda module=module: run(module))
            except Exception:  # a kernel that fails to launch here (resources) is not a candidate
                every = False
                continue
            if ms < best_ms:
                best, best_ms = module.NAME, ms
        return best, every


def _backend_name(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a backend name: {value!r}")
    return value


CHOOSER = BackendChooser()
