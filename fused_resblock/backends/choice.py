"""``auto``'s choice between backends that can all run a call: the faster one, per shape, measured.

When more than one backend supports an op for a configuration on a GPU, the
first call at each shape times each of them on the real arguments and keeps
the winner twice: in a process-wide dict and in ``backends.json`` beside the
autotune cache (``cache_file``), keyed by GPU model, software versions, op and
shape, so a second process measures nothing.

No measurement (the first capable backend of ``AUTO_ORDER`` runs instead)
when ``FUSED_RESBLOCK_AUTOTUNE=0``, and while a CUDA graph is being captured
(timing would synchronise; nothing is remembered then).

The measurement also checks: each candidate's first output (every gradient of a
backward op, each against its own scale) is compared with the
reference backend's on the same arguments, and a candidate that disagrees beyond
its dtype's rounding (garbage, NaN, a missing term: a kernel broken on a GPU or
build nobody tested) is not chosen, with a warning; when none agrees, the
reference runs. Such verdicts are not saved, so every process checks again.
"""
from __future__ import annotations

import contextlib
import statistics
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Hashable, Optional, Sequence

import torch

from .._warnings import warn_once
from .cache_file import cache_dir, measurements_enabled, merge_entry, read_entries

# A candidate agrees with the reference when no element differs by more than this many rounding
# steps of the dtype times max|reference|: generous for a correct kernel (fp32 accumulation both
# sides, one rounding of the output), tight for a wrong one.
AGREEMENT_STEPS = 16
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
    if "triton" in by_name:  # a changed Triton kernel deserves a new check and measurement too
        parts.append(f"kernels-{by_name['triton'].kernel_digest()}")
    if "cuda" in by_name:
        parts.append(f"cuda-ext-{by_name['cuda'].sources_digest()}-pipeline{by_name['cuda'].PIPELINE}")
    if device.type == "cuda" and torch.cuda.is_available():
        parts.append(f"sms-{torch.cuda.get_device_properties(device).multi_processor_count}")
    return "|".join(parts)


def disagreement(out, expected) -> Optional[str]:
    """None when a candidate's output matches the reference's within ``AGREEMENT_STEPS`` rounding
    steps (relative to max|reference|; NaN where the reference has NaN), else what differs. A
    tuple of outputs (a backward's gradients, None where not computed) agrees when each does,
    each relative to its own scale: a bias gradient's error is not hidden by a larger weight's."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(expected):
            count = len(out) if isinstance(out, (tuple, list)) else f"a {type(out).__name__}, not"
            return f"{count} outputs, the reference's {len(expected)}"
        for index, (o, e) in enumerate(zip(out, expected)):
            if (o is None) != (e is None):
                return f"output {index} {'absent' if o is None else 'present'}, the reference's not"
            why = disagreement(o, e)
            if why is not None:
                return f"output {index}: {why}"
        return None
    if not isinstance(out, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return None
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return f"output {tuple(out.shape)} {out.dtype}, the reference's {tuple(expected.shape)} {expected.dtype}"
    a, b = out.detach().double(), expected.detach().double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=float("inf"))
    if not diff.numel():
        return None
    scale = float(b.abs().nan_to_num(nan=0.0, posinf=0.0).max())
    step = max(torch.finfo(expected.dtype).eps, 2.0 ** -10)  # fp32 convs may run in TF32
    err = float(diff.max())
    if err <= AGREEMENT_STEPS * step * scale:
        return None
    return f"max |difference| {err:.3g} where max |reference| is {scale:.3g}"


def measurement_allowed() -> Optional[bool]:
    """True to measure, False to take the first candidate, None while capturing a CUDA graph."""
    if not measurements_enabled():
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
        self._memo: Dict[Hashable, str] = {}  # measured verdicts; with measurement off, nothing is kept
        self._disk: Optional[Dict[str, str]] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    def _disk_entries(self) -> Dict[str, str]:
        if self._disk is None:
            self._disk = read_entries(self.path, FORMAT, VERSION, parse_entry, what=WHAT)
        return self._disk

    def choose(self, op: str, shape_key: tuple, candidates: Sequence[ModuleType],
               run: Callable[[ModuleType], object], device: torch.device,
               allowed: Optional[bool] = None, reference: Optional[ModuleType] = None) -> ModuleType:
        """The candidate for (op, shape_key); on a miss times ``run(module)`` for each candidate,
        after checking its output against ``run(reference)`` when a reference is given."""
        by_name = {m.NAME: m for m in candidates}
        device = torch.device(device)
        memo_key = (op, shape_key, tuple(by_name), device)
        name = self._memo.get(memo_key)
        if name is not None:
            return by_name[name] if name in by_name else reference
        if allowed is None:
            allowed = measurement_allowed()
            if allowed is None:  # capturing: answer now, remember nothing
                return candidates[0]
        if not allowed:  # not remembered: once measurement is switched on, this shape is measured
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
                    name, lasting = self._measure(op, shape_key, candidates, run, reference)
                if lasting:  # a candidate that failed by chance (out of memory) may win in a later process
                    self._disk_entries()[file_key] = name
                    merge_entry(self.path, FORMAT, VERSION, file_key, name, parse_entry, what=WHAT)
            self._memo[memo_key] = name
            return by_name[name] if name in by_name else reference

    def _measure(self, op: str, shape_key: tuple, candidates: Sequence[ModuleType],
                 run: Callable[[ModuleType], object], reference: Optional[ModuleType]) -> tuple:
        """(the fastest agreeing candidate's name, whether the verdict may be kept: every candidate
        ran and agreed). With none agreeing, the reference's name."""
        best, best_ms, lasting, disagreed = None, float("inf"), True, False
        expected = None
        if reference is not None:
            try:
                expected = run(reference)
            except Exception:  # out of memory, say: measure unchecked, keep nothing
                lasting = False
            else:
                # all zeros, one value or no finite one (a warm-up call on torch.zeros): agreeing
                # there proves little, so the verdict is used now but not kept for other processes
                lasting = _informative(expected)
        for module in candidates:
            try:
                if expected is not None:
                    why = disagreement(run(module), expected)
                    if why is not None:
                        warn_once(("disagrees", op, module.NAME, shape_key),
                                  f"fused_resblock: backend {module.NAME!r} disagrees with the reference for "
                                  f"{op} at {shape_key}: {why}; not used (please report it with the output "
                                  "of `python -m fused_resblock doctor`)", stacklevel=5)
                        lasting, disagreed = False, True
                        continue
                ms = self._benchmark(lambda module=module: run(module))
            except Exception:  # a kernel that fails to launch here (resources) is not a candidate
                lasting = False
                continue
            if ms < best_ms:
                best, best_ms = module.NAME, ms
        if best is None:  # none ran: the first one raises its own error when called; none agreed: reference
            best = reference.NAME if disagreed else candidates[0].NAME
        return best, lasting


def _informative(expected) -> bool:
    """Whether an output can tell a broken kernel from a correct one: two finite values at least
    (in every output of a tuple)."""
    if isinstance(expected, (tuple, list)):
        return all(_informative(e) for e in expected if e is not None)
    if not isinstance(expected, torch.Tensor):
        return True
    finite = expected[torch.isfinite(expected)]
    return finite.numel() > 1 and bool(finite.amax() != finite.amin())


def parse_entry(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a backend name: {value!r}")
    return value


CHOOSER = BackendChooser()
