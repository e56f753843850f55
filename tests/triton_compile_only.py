"""Compile the Triton kernels that whole models launch, for a GPU this machine does not have.

Triton's interpreter (how CI runs our kernels) never lowers them: a kernel the
interpreter runs but the compiler rejects (an op or dtype the target lacks, a
tile too big for shared memory) would first fail in a GPU session. Here each
launch compiles instead of running: Triton's driver is replaced by one that
names the target GPU (``--arch 80`` or ``90``) and every launch becomes a
warm-up. The host code runs its GPU path on CPU tensors whose contents are
never computed, so nothing here checks values (the interpreter tests do that).

The models run in eval mode, eval mode with frozen norms (backward through the
folded convs) and train mode (forward + backward), in fp16, bf16, fp32 with
TF32 and fp32 without. Each conv compiles the tile config a GPU uses untimed
(``autotune.gpu_default_config``), with ``--candidates`` also every config the
tuner would time.

Runs in a process of its own without TRITON_INTERPRET (kernel decorators read
it at import)::

    python tests/triton_compile_only.py --arch 90 --json compiled.json

Exit status 1 when a compile failed or a config overflows the target's shared
memory; the JSON lists every compiled specialization.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from fused_resblock import models
from helpers import freeze_norms  # tests/, beside this script
from fused_resblock.backends import triton as triton_backend
from fused_resblock.backends.triton import autotune, bn_act, bn_act_bwd, conv_bwd, conv_fwd

KERNEL_MODULES = (conv_fwd, conv_bwd, bn_act, bn_act_bwd)
# Small models here: let every statistics merge take its two-launch form (real shapes of >512 row
# tiles do), so both of its kernel variants compile; nothing is computed, so the answer is moot.
conv_fwd._FINALIZE_ONE_LEVEL_TILES = 1

# Shared memory a block may opt into (CUDA programming guide, compute capabilities table).
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}

# (model, input shape): every conv kind a ResNet has — the 7x7 stem (3 channels, flat K),
# 3x3/1x1 at stride 1 and 2, merged 1x1 projections, ResNeXt's groups, the option-A shortcut.
WORKLOADS = (
    ("resnet50", (2, 3, 64, 64)),
    ("resnext50_32x4d", (2, 3, 64, 64)),
    ("resnet18", (2, 3, 64, 64)),
    ("cifar_resnet20", (2, 3, 32, 32)),
)
MODES = ("eval", "eval-backward", "train")
DTYPES = {  # name: (dtype, TF32 allowed)
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}


class CompileOnlyDriver:
    """The part of Triton's driver a launch asks for before compiling: device, stream, target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def launched_kernels() -> dict:
    """{name: JITFunction} of every kernel the backend launches (helpers are called, not launched)."""
    found = {}
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                found[name] = value
    return found


# Constexprs that only size the tiles: without --all-specializations one tile config per flag set compiles.
TILE_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "BLOCK_P", "BLOCK_T", "GROUP_M", "M_ITERS",
                   "num_warps", "num_stages")


class Recorder:
    """Turns launches into compiles and keeps what each compile produced.

    Triton compiles a kernel once per constexpr set and per integer
    specialization (each int argument equal to 1 or divisible by 16): a
    ResNet-50 train step alone is ~150 compiles per dtype. By default one
    compile per (kernel, constexprs other than tile sizes) per dtype stands for
    the rest (with ``candidates``, per tile config too); ``all_specializations``
    compiles every launch's own. Launches may come from the tuner's compile threads.
    """

    def __init__(self, arch: int, all_specializations: bool, candidates: bool = False):
        self.arch = arch
        self.all_specializations = all_specializations
        self.candidates = candidates
        self.label = ""
        self.timing_candidate = False  # set while the tuner's other candidates compile
        self.records: list = []
        self._seen: set = set()
        self._lock = threading.Lock()

    def _key(self, fn, args, constexprs: dict) -> tuple:
        dtype_name = self.label.split("/")[0]
        if not self.all_specializations:
            flags = {k: v for k, v in constexprs.items() if self.candidates or k not in TILE_CONSTEXPRS}
            return dtype_name, fn.__name__, repr(sorted(flags.items()))
        ints = tuple(a for a in args if isinstance(a, int) and not isinstance(a, bool))
        tensors = tuple((t.data_ptr() % 16 == 0, t.stride()) for t in args if isinstance(t, torch.Tensor))
        return dtype_name, fn.__name__, repr(sorted(constexprs.items())), ints, tensors

    def run(self, original, fn, args, grid, kwargs):
        constexprs = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, str))}
        key = self._key(fn, args, constexprs)
        with self._lock:
            if key in self._seen:
                return None  # the host code ignores what a launch returns
            self._seen.add(key)
        start = time.perf_counter()
        try:
            kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            error = None
        except Exception as e:  # recorded; the host code goes on to its next launch
            kernel, error = None, f"{type(e).__name__}: {e}".splitlines()[0][:500]
        self.records.append({
            "workload": self.label, "kernel": fn.__name__, "constexprs": constexprs,
            "shared_bytes": int(kernel.metadata.shared) if kernel is not None else None,
            "seconds": round(time.perf_counter() - start, 3), "error": error,
            "candidate": self.timing_candidate,
        })
        return kernel


def _install(recorder: Recorder, candidates: bool) -> None:
    driver.set_active(CompileOnlyDriver(recorder.arch))
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return recorder.run(original, self, args, grid, kwargs)

    JITFunction.run = run
    # The backend accepts these CPU tensors as if they were on the GPU.
    triton_backend.available = lambda: None
    triton_backend.interpreter_requested = lambda: True

    def choose_config(key, launch):
        chosen = autotune.gpu_default_config(key, shared_bytes=MAX_SHARED_BYTES[recorder.arch])
        if candidates:  # compiled as the tuner does before timing them: in parallel threads
            recorder.timing_candidate = True
            try:
                others = [cfg for cfg in autotune.candidate_configs(key) if cfg != chosen]
                autotune.precompile(key, launch, others, autotune.compile_threads())
            finally:
                recorder.timing_candidate = False
        return chosen  # the host code launches it

    autotune.choose_config = choose_config


def _run(name: str, shape: tuple, mode: str, dtype: torch.dtype, channels_last: bool) -> None:
    model = getattr(models, name)(num_classes=10, backend="triton").to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=fmt)
    if mode == "eval":
        with torch.no_grad():
            model.eval()(x)
        return
    if mode == "eval-backward":
        model = freeze_norms(model).eval()
    else:
        model.train()
    model(x.requires_grad_()).float().sum().backward()


def compile_all(arch: int, candidates: bool, all_specializations: bool, dtypes,
                workloads=WORKLOADS, modes=MODES) -> list:
    recorder = Recorder(arch, all_specializations, candidates)
    _install(recorder, candidates)
    for dtype_name in dtypes:
        dtype, tf32 = DTYPES[dtype_name]
        torch.backends.cudnn.allow_tf32 = tf32
        for name, shape in workloads:
            for mode in modes:
                for channels_last in (True, False) if mode == "eval" else (True,):
                    recorder.label = f"{dtype_name}/{name}/{mode}/{'nhwc' if channels_last else 'nchw'}"
                    try:
                        _run(name, shape, mode, dtype, channels_last)
                    except Exception:  # a host-side failure: recorded, the others still run
                        recorder.records.append({"workload": recorder.label, "kernel": None,
                                                 "error": traceback.format_exc(limit=3)[-1500:]})
                    print(f"  {recorder.label}: {len(recorder.records)} compiled so far", flush=True)
    return recorder.records


def problems(records: list, arch: int, dtypes, kernels=None) -> list:
    """What is wrong with a compile run, in words (empty when nothing is).

    ``kernels``: the names every dtype must have compiled (default: ``launched_kernels()``).
    """
    found = [f"{r['workload']}: {r['kernel']}: {r['error']}" for r in records if r["error"]]
    limit = MAX_SHARED_BYTES.get(arch)
    for r in records:  # a candidate too big is skipped by the tuner; an untimed default would fail
        if limit and r.get("shared_bytes") and r["shared_bytes"] > limit and not r.get("candidate"):
            found.append(f"{r['workload']}: {r['kernel']} {r['constexprs']} needs {r['shared_bytes']} B "
                         f"of shared memory, sm_{arch} has {limit}")
    for dtype_name in dtypes:
        compiled = {r["kernel"] for r in records if r["workload"].startswith(dtype_name + "/") and not r["error"]}
        missing = sorted(set(kernels if kernels is not None else launched_kernels()) - compiled)
        if missing:
            found.append(f"{dtype_name}: never compiled: {', '.join(missing)}")
    return found


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("triton_compile_only: unset TRITON_INTERPRET (it makes Triton interpret instead of compile)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES),
                        help="compute capability x10")
    parser.add_argument("--candidates", action="store_true", help="also every config the tuner would time")
    parser.add_argument("--all-specializations", action="store_true",
                        help="compile every launch's specialization, not one per kernel flag set")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    parser.add_argument("--models", default=",".join(name for name, _ in WORKLOADS),
                        help="comma-separated subset of the workloads' models")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--json", type=Path, help="write every compiled specialization here")
    args = parser.parse_args(argv)
    dtypes, models, modes = ([v for v in text.split(",") if v] for text in (args.dtypes, args.models, args.modes))
    for what, chosen, known in (("dtypes", dtypes, DTYPES), ("models", models, dict(WORKLOADS)), ("modes", modes, MODES)):
        if not chosen or set(chosen) - set(known):
            parser.error(f"{what}: expected a subset of {','.join(known)}")
    workloads = [(name, shape) for name, shape in WORKLOADS if name in models]
    start = time.perf_counter()
    records = compile_all(args.arch, args.candidates, args.all_specializations, dtypes, workloads, modes)
    every_mode = set(modes) == set(MODES)  # a subset of modes launches a subset of the kernels
    found = problems(records, args.arch, dtypes, kernels=None if every_mode else ())
    summary = {
        "arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
        "candidates": args.candidates, "all_specializations": args.all_specializations, "dtypes": dtypes,
        "models": models, "modes": modes, "compiled": sum(1 for r in records if not r["error"]),
        "seconds": round(time.perf_counter() - start, 1), "problems": found, "records": records,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(f"sm_{args.arch}, triton {triton.__version__}: {summary['compiled']} specializations compiled "
          f"in {summary['seconds']} s; {len(found)} problems")
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
