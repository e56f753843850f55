"""Tile configuration for the Triton conv kernels, chosen once per shape.

Per (shape, dtype, GPU name, Triton version) the candidates are timed once on
the GPU and the winner is kept twice: in a process-wide dict (the launch path
does one lookup) and in a JSON file, so a second process pays no tuning.

* file: ``autotune.json`` in the cache directory (``cache_file``: atomic
  writes, merged with what other processes wrote meanwhile; a corrupt or
  foreign-format file is ignored with one warning and rewritten on the next
  save).
* no timing under Triton's interpreter (tiles as large as the problem keep
  CPU runs fast), while a CUDA graph is being captured (timing would
  synchronise), or when ``FUSED_RESBLOCK_AUTOTUNE=0``: a heuristic default is
  used instead.
* a key's candidates compile in parallel threads before they are timed one by
  one (``precompile``): Triton's compile (LLVM, ptxas) runs mostly outside the
  GIL, and compiling is most of a tuning's time (~1 s per candidate, ~210
  candidates for ResNet-50's inference convs, ~630 for its training step).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..._warnings import warn_once
from .. import FirstCallInCaptureError
from ..cache_file import cache_dir, measurements_enabled, merge_entry, read_entries, write_entries

FORMAT = "fused_resblock.autotune"
VERSION = 1

# Below this many input channels per group a multi-tap conv walks K flat
# (taps x channels together): a per-tap walk would leave most of each
# BLOCK_K slice masked off (the stem's 3 channels, ResNeXt's 4 or 8 per group).
FLAT_K_BELOW_CHANNELS = 16


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class Config:
    """One launch configuration: tile sizes, tile-order grouping, warps and pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        # type(v) is int: JSON's true is a Python int too; blocks are powers of two (tl.arange's rule)
        if set(d) != names or not all(type(v) is int and 0 < v <= 1024 for v in d.values()) or not all(
                d[b] & (d[b] - 1) == 0 for b in ("block_m", "block_n", "block_k")):
            raise ValueError(f"not a Config: {d!r}")
        return cls(**d)


class ShapeKey(NamedTuple):
    """Everything about a call that can change which config is fastest."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    shortcut_channels: int
    shortcut_stride: int
    channels_last: bool
    input_precision: str
    flat_k: bool
    fusion: str = ""  # extras compiled in: "bn" / "bn_relu" prologue, "stats" epilogue; "dgrad..."/"wgrad...": backward


# The interpreter pays ~ms of Python per program per K step whatever the tile
# size, so there the tiles are as large as the problem allows (up to a cap that
# keeps numpy's work small): a ResNet-18 layer4 conv at batch 1 takes ~150
# program-steps instead of ~9000. Tests that want many small tiles pass a config.
_INTERPRETER_CAPS = Config(block_m=64, block_n=128, block_k=128, group_m=4, num_warps=1, num_stages=1)

# Candidates timed on a GPU, in the spirit of Triton's matmul tutorial; they
# are clamped to the problem (see candidate_configs) and deduplicated.
_GPU_CANDIDATES = (
    Config(128, 128, 64, 8, 8, 3),
    Config(128, 128, 32, 8, 4, 4),
    Config(128, 64, 32, 8, 4, 4),
    Config(64, 128, 32, 8, 4, 4),
    Config(128, 256, 32, 8, 8, 3),
    Config(64, 64, 64, 8, 4, 3),
    Config(128, 32, 32, 8, 4, 4),
    Config(64, 32, 32, 8, 2, 5),
    Config(32, 64, 32, 8, 2, 5),
)


def _pow2_at_least(v: int, low: int = 16) -> int:
    return max(low, 1 << max(0, int(v) - 1).bit_length())


# The backward GEMMs (conv_bwd): their keys' ``fusion`` starts with one of these.
BACKWARD_KINDS = ("dgrad", "wgrad")


def backward_kind(key: ShapeKey) -> str:
    """"dgrad" or "wgrad" for a backward GEMM's key, "" for the forward conv."""
    kind = key.fusion.split("+", 1)[0]
    return kind if kind in BACKWARD_KINDS else ""


def _gemm_sizes(key: ShapeKey) -> Tuple[int, int, int]:
    """(M, N, longest contiguous K run a BLOCK_K slice walks) of the key's GEMM: tile bounds.

    Forward: output pixels x output channels per group x (channels per group, or
    taps x channels when flat). dgrad: one stride phase's input pixels x input
    channels per group x output channels per group (one tap at a time). wgrad:
    output channels per group x taps·input channels per group x output pixels.
    """
    oh = (key.height + 2 * key.padding[0] - key.dilation[0] * (key.kernel[0] - 1) - 1) // key.stride[0] + 1
    ow = (key.width + 2 * key.padding[1] - key.dilation[1] * (key.kernel[1] - 1) - 1) // key.stride[1] + 1
    pixels = key.batch * max(oh, 1) * max(ow, 1)
    c_in_g = key.in_channels // key.groups
    c_out_g = key.out_channels // key.groups
    kind = backward_kind(key)
    if kind == "dgrad":
        phase_pixels = key.batch * -(-key.height // key.stride[0]) * -(-key.width // key.stride[1])
        return phase_pixels, c_in_g, c_out_g
    if kind == "wgrad":
        return c_out_g, key.kernel[0] * key.kernel[1] * c_in_g, pixels
    k_len = key.kernel[0] * key.kernel[1] * c_in_g if key.flat_k else c_in_g
    k_len = max(k_len, key.shortcut_channels)
    return pixels, c_out_g, k_len


def _clamp(cfg: Config, key: ShapeKey) -> Config:
    """Shrink tiles that would be mostly masked off; fp32 tiles are twice the bytes.

    The backward kernels walk their tiles in row-major order: no group_m.
    """
    m, n, k = _gemm_sizes(key)
    stages = min(cfg.num_stages, 3) if key.dtype == torch.float32 else cfg.num_stages
    block_k = min(cfg.block_k, 32) if key.dtype == torch.float32 else cfg.block_k
    return Config(
        block_m=min(cfg.block_m, _pow2_at_least(m, 32)),
        block_n=min(cfg.block_n, _pow2_at_least(n)),
        block_k=min(block_k, _pow2_at_least(k)),
        group_m=1 if backward_kind(key) else cfg.group_m, num_warps=cfg.num_warps, num_stages=stages,
    )


def candidate_configs(key: ShapeKey) -> List[Config]:
    """The configs worth timing for ``key``, clamped and without duplicates."""
    seen: Dict[Config, None] = {}
    for cfg in _GPU_CANDIDATES:
        seen.setdefault(_clamp(cfg, key), None)
    return list(seen)


def interpreter_config(key: ShapeKey) -> Config:
    """Few, large programs: what is fast under Triton's interpreter (no timing there)."""
    m, n, k = _gemm_sizes(key)
    caps = _INTERPRETER_CAPS
    return replace(caps, block_m=min(caps.block_m, _pow2_at_least(m)),
                   block_n=min(caps.block_n, _pow2_at_least(n)), block_k=min(caps.block_k, _pow2_at_least(k)))


def default_config(key: ShapeKey) -> Config:
    """A reasonable config without timing (capture, tuning off, interpreter)."""
    if interpreter_requested() or key.device.type != "cuda":
        return interpreter_config(key)
    return gpu_default_config(key)


# The backward's 128x128x64 3-stage tiles need up to ~141 KB of shared memory (tests/
# triton_compile_only.py measures it): A100/H100 have 163/227 KB per block, GPUs of
# compute capability 8.6/8.9/12.x 99 KB, where the untimed config halves BLOCK_K.
_BACKWARD_WIDE_K_SHARED_BYTES = 160 * 1024


def _shared_bytes_per_block(device: torch.device) -> int:
    """Shared memory one block can opt into on ``device`` (48 KB if torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024))


def gpu_default_config(key: ShapeKey, shared_bytes: Optional[int] = None) -> Config:
    """The GPU's untimed config: what runs while capturing or with tuning off.

    ``shared_bytes``: the GPU's shared memory per block (default: ``key.device``'s).
    """
    m, _, _ = _gemm_sizes(key)
    if backward_kind(key):
        if shared_bytes is None:
            shared_bytes = _shared_bytes_per_block(key.device)
        wide = 64 if key.dtype == torch.float32 else 128
        block_k = 64 if shared_bytes >= _BACKWARD_WIDE_K_SHARED_BYTES else 32
        return _clamp(Config(128, wide, block_k, 1, 4, 3), key)
    return _clamp(Config(128 if m >= 4096 else 64, 128, 32, 8, 4, 3), key)


# --------------------------------------------------------------------------- the file
WHAT = "autotune cache"


def cache_path() -> Path:
    """Where the tuned configs live (see the module docstring)."""
    return cache_dir() / "autotune.json"


def load_cache_file(path: Path, warn: bool = True) -> Dict[str, Config]:
    """Entries of the cache file; {} when it is missing, and (with a warning) when unreadable."""
    return read_entries(path, FORMAT, VERSION, Config.from_dict, warn=warn, what=WHAT)


def save_cache_file(path: Path, entries: Dict[str, Config]) -> None:
    """Write ``entries`` atomically: readers see the old file or the new one, never half."""
    write_entries(path, FORMAT, VERSION, {k: asdict(v) for k, v in entries.items()})


# --------------------------------------------------------------------------- the tuner
_KERNEL_SOURCES = ("autotune.py", "conv_fwd.py", "conv_bwd.py", "bn_act.py", "bn_act_bwd.py", "precision.py")


@functools.lru_cache(maxsize=None)
def kernel_digest() -> str:
    """A digest of the Triton kernels' sources and their candidate tiles: a changed kernel may want
    other tiles, or no longer fit an old one (more shared memory), so its measurements start over."""
    digest = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def _file_key(key: ShapeKey, device_name: str) -> str:
    """Stable text key: the GPU model, Triton version and our kernels' digest take the device's place."""
    import triton

    shape = "|".join(str(v) for v in key[2:-1])
    if key.fusion:
        shape += f"|{key.fusion}"
    return (f"{device_name}|triton-{triton.__version__}|kernels-{kernel_digest()}|"
            f"{str(key.dtype).replace('torch.', '')}|{shape}")


# --------------------------------------------------------------------------- parallel compiles
_compiling = threading.local()
COMPILE_THREADS_ENV = "FUSED_RESBLOCK_COMPILE_THREADS"


def launch_kernel(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or only its compile while ``precompile`` runs this thread."""
    if compiling_only():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def compiling_only() -> bool:
    """True in ``precompile``'s threads: host code after a launch has nothing to work on."""
    return getattr(_compiling, "only", False)


def compile_threads() -> int:
    """Threads compiling a key's candidates: FUSED_RESBLOCK_COMPILE_THREADS, else the CPU count (at most 16)."""
    default = max(1, min(16, os.cpu_count() or 1))
    value = os.environ.get(COMPILE_THREADS_ENV, "").strip()
    if not value:
        return default
    reason = compile_threads_problem(value)
    if reason is not None:  # a speed knob: say so and go on (raising here took triton out of auto's race)
        warn_once(("compile threads", value), f"fused_resblock: {reason}; compiling in {default} threads")
        return default
    return int(value)


def compile_threads_problem(value: str) -> Optional[str]:
    """None when ``value`` is a valid FUSED_RESBLOCK_COMPILE_THREADS, else what is wrong (doctor says it too)."""
    value = value.strip()
    if not value or (value.isascii() and value.isdigit() and int(value) >= 1):
        return None
    return f"{COMPILE_THREADS_ENV}={value!r} is not a positive integer"


def precompile(key: ShapeKey, launch: Callable[[Config], None], configs: List[Config], threads: int) -> None:
    """Run ``launch(cfg)`` for every config in ``threads`` threads with kernel launches turned into
    compiles (``launch_kernel``), so the timing after it finds them compiled. A config that fails
    here fails again when timed, where the tuner drops it."""
    def compile_one(cfg: Config) -> None:
        _compiling.only = True
        on_gpu = key.device.type == "cuda" and torch.cuda.is_available()
        device = torch.cuda.device(key.device) if on_gpu else contextlib.nullcontext()
        try:
            with device:  # a new thread's current device is 0: Triton compiles for the current one
                launch(cfg)
        except Exception:
            pass
        finally:
            _compiling.only = False

    if threads <= 1 or len(configs) <= 1:
        return
    with ThreadPoolExecutor(min(threads, len(configs)), thread_name_prefix="fused_resblock-compile") as pool:
        list(pool.map(compile_one, configs))


def _benchmark_ms(run: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return float(do_bench(run, warmup=10, rep=40))


class Autotuner:
    """Chooses and remembers configs; one per process (``TUNER``), more in tests."""

    def __init__(self, path: Optional[Path] = None,
                 benchmark: Callable[[Callable[[], None]], float] = _benchmark_ms,
                 threads: Optional[int] = None):
        self._path = path
        self._benchmark = benchmark
        self._threads = threads  # None: compile_threads() when tuning
        self._memo: Dict[ShapeKey, Config] = {}
        # defaults handed out while tuning was off (FUSED_RESBLOCK_AUTOTUNE=0, the interpreter): apart
        # from _memo, so a shape first seen then is still tuned once tuning is switched on
        self._untuned: Dict[ShapeKey, Config] = {}
        self._disk: Optional[Dict[str, Config]] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_path()

    def _disk_entries(self) -> Dict[str, Config]:
        if self._disk is None:
            self._disk = load_cache_file(self.path)  # warns at most once: read once
        return self._disk

    def choose(self, key: ShapeKey, launch: Callable[[Config], None],
               device_name: Optional[str] = None, tune: Optional[bool] = None) -> Config:
        """The config for ``key``; times ``launch(cfg)`` per candidate on a miss.

        ``device_name``/``tune`` default to the real GPU's name and to "tune
        unless interpreting, capturing or disabled"; tests pass them.
        """
        cfg = self._memo.get(key)
        if cfg is not None:
            return cfg
        if tune is None:
            tune = _tuning_allowed(key)
            if tune is None and key in self._untuned:  # capturing: the default this shape ran with
                return self._untuned[key]
            if tune is None:  # capturing a CUDA graph: nothing can be timed, nor a kernel loaded
                raise FirstCallInCaptureError(
                    f"a convolution ({key.fusion or 'forward'}, {key.batch}x{key.in_channels}x{key.height}x"
                    f"{key.width} -> {key.out_channels} channels, {key.kernel[0]}x{key.kernel[1]} kernel)")
        if not tune:
            cfg = self._untuned.get(key)
            if cfg is None:
                cfg = self._untuned[key] = default_config(key)
            return cfg
        with self._lock:
            if device_name is None:
                device_name = torch.cuda.get_device_name(key.device)
            fkey = _file_key(key, device_name)
            cfg = self._disk_entries().get(fkey)
            if cfg is not None and cfg not in candidate_configs(key):
                cfg = None  # an entry edited by hand, or from candidates since changed: tuned again
            if cfg is None:
                cfg, lasting = self._tune(key, launch)
                if lasting:
                    self._disk_entries()[fkey] = cfg
                    self._save(fkey, cfg)
            self._memo[key] = cfg
            return cfg

    def _tune(self, key: ShapeKey, launch: Callable[[Config], None]) -> Tuple[Config, bool]:
        """(the fastest candidate, whether the verdict may be kept on disk). A candidate that cannot
        run on this GPU (too much shared memory, no compile) is dropped for good; one that failed for a passing
        reason (out of memory while the model holds its own, a CUDA error) leaves the verdict to a
        later process, and so does a tuning where no candidate ran (the untuned default then)."""
        configs = candidate_configs(key)
        precompile(key, launch, configs, self._threads if self._threads is not None else compile_threads())
        best, best_ms, lasting = None, float("inf"), True
        for cfg in configs:
            try:
                ms = self._benchmark(lambda cfg=cfg: launch(cfg))
            except Exception as exc:
                lasting = lasting and _does_not_fit(exc)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            return default_config(key), False
        return best, lasting

    def _save(self, fkey: str, cfg: Config) -> None:
        """Merge into what is on disk now (other processes may have added entries)."""
        merge_entry(self.path, FORMAT, VERSION, fkey, asdict(cfg), Config.from_dict, what=WHAT)


def _does_not_fit(exc: Exception) -> bool:
    """Whether a candidate's failure is a property of the GPU and the compiler, not of the moment:
    Triton's OutOfResources (the tile needs more shared memory than there is) or CompilationError."""
    return type(exc).__name__ in ("OutOfResources", "CompilationError")


def _tuning_allowed(key: ShapeKey) -> Optional[bool]:
    """True to time candidates, False for the default, None while capturing a CUDA graph."""
    if interpreter_requested() or key.device.type != "cuda":
        return False
    if not measurements_enabled():
        return False
    if torch.cuda.is_current_stream_capturing():
        return None
    return True


TUNER = Autotuner()


def choose_config(key: ShapeKey, launch: Callable[[Config], None]) -> Config:
    """The process-wide choice for ``key`` (see ``Autotuner.choose``)."""
    return TUNER.choose(key, launch)
