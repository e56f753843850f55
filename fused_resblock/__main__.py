"""Command line: ``python -m fused_resblock demo | verify MODEL | doctor | bench``."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from . import backends, models, verify


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _device(text: str) -> str:
    """cpu, cuda or cuda:N, and only a CUDA device that is there."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA device is visible here")
    return text


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _verify_one(name: str, dtype: torch.dtype, device: str, train_modes, per_block: bool, backend=None,
                batch=None, size=None) -> bool:
    torch.manual_seed(0)
    fused, reference = verify.build_pair(name, device, backend)
    fused, reference = fused.to(dtype), reference.to(dtype)
    x = verify.default_input(name, batch, size, dtype, device)
    results = verify.verify_model(fused, reference, x, train_modes=train_modes, per_block=per_block)
    title = f"\n== {name}  input {tuple(x.shape)}  {str(dtype).replace('torch.', '')} on {device}"
    print(verify.format_table(title, results), flush=True)
    return all(r.passed for r in results)


def _throughput(name: str, device: str, dtype: torch.dtype, batch: int = 64) -> None:
    """A short eval-mode images/s comparison against eager (a demo, not the benchmark suite)."""
    fused, reference = verify.build_pair(name, device)
    fused, reference = (m.to(dtype).eval().to(memory_format=torch.channels_last) for m in (fused, reference))
    x = verify.default_input(name, batch, 224 if not name.startswith("cifar") else 32, dtype, device)
    x = x.contiguous(memory_format=torch.channels_last)
    for label, model in (("eager (cuDNN)", reference), ("fused", fused)):
        with torch.no_grad():
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                model(x)
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / 10
        print(f"  {name:<16} {label:<14} {batch / elapsed:10.1f} images/s", flush=True)


def cmd_demo(args) -> int:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    print(f"fused_resblock demo on {device}: per-block errors against torchvision by the numerical rule")
    ok = True
    dtypes = [torch.float32, torch.float64] + ([torch.bfloat16, torch.float16] if cuda else [])
    for name in args.models:
        for dtype in dtypes:
            ok &= _verify_one(name, dtype, device, (False, True), per_block=True)
    if cuda:
        print("\nthroughput, eval, channels_last, bfloat16:")
        for name in args.models:
            _throughput(name, device, torch.bfloat16)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


def cmd_verify(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    modes = (True,) if args.train else (False,) if args.eval else (False, True)
    ok = _verify_one(args.model, DTYPES[args.dtype], device, modes, per_block=not args.whole,
                     backend=args.backend, batch=args.batch, size=args.size)
    return 0 if ok else 1


def cmd_doctor(args) -> int:
    import torchvision

    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"torchvision {torchvision.__version__}")
    try:
        import triton

        print(f"triton      {triton.__version__}")
    except ImportError:
        print("triton      not installed")
    if torch.cuda.is_available():
        print(f"GPU         {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("GPU         none visible")
    try:
        in_force = backends.resolve_name(None)
    except ValueError as exc:  # what a user runs doctor for: say so, and go on with the report
        in_force, status = f"invalid: {exc}", 1
    else:
        status = 0
    print(f"{backends.ENV_VAR}={os.environ.get(backends.ENV_VAR, '')!r} -> {in_force}")
    print("backends:")
    for name, reason in backends.availability().items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        from .backends import cuda as cuda_backend

        info = cuda_backend.build_info()
        print("CUDA extension: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    except (ImportError, AttributeError) as exc:
        print(f"CUDA extension: no build information ({exc})")
    from .backends import cache_file, choice
    from .backends import cuda as cuda_backend
    from .backends.triton import autotune

    tuning = "on" if cache_file.measurements_enabled() else "off"
    if tuning == "on" and autotune.interpreter_requested():
        tuning = "on for auto's measurement; tile tuning off under TRITON_INTERPRET"
    print(f"{cache_file.AUTOTUNE_ENV}={os.environ.get(cache_file.AUTOTUNE_ENV, '')!r} "
          f"(tile tuning and auto's backend measurement: {tuning})")
    print(f"{cuda_backend.PIPELINE_ENV}={os.environ.get(cuda_backend.PIPELINE_ENV, '')!r} "
          f"(the CUDA kernel and its main loop)")
    threads = os.environ.get(autotune.COMPILE_THREADS_ENV, "")
    problem = autotune.compile_threads_problem(threads)
    print(f"{autotune.COMPILE_THREADS_ENV}={threads!r} (threads compiling a shape's candidate tiles; default "
          f"the CPU count up to 16){'' if problem is None else ' -> invalid: ' + problem + ', the default is used'}")
    if problem is not None:
        status = 1
    for path, fmt, version, parse in (
            (autotune.cache_path(), autotune.FORMAT, autotune.VERSION, autotune.Config.from_dict),
            (choice.cache_path(), choice.FORMAT, choice.VERSION, choice.parse_entry)):
        print(f"cache       {path}: {cache_file.describe(path, fmt, version, parse)}")
    return status


def cmd_bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        print("the benchmark suite lives in the source checkout (benchmarks/run.py), not in an installed package",
              file=sys.stderr)
        return 2
    sys.path.insert(0, root)
    from benchmarks import run

    return run.main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_resblock", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert ResNet-18/50 and CIFAR ResNet-56 and check every block")
    demo.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "cifar_resnet56"],
                      choices=models.BUILDERS, metavar="MODEL")
    demo.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    demo.set_defaults(func=cmd_demo)

    ver = sub.add_parser("verify", help="check one model, block by block")
    ver.add_argument("model", choices=models.BUILDERS, metavar="MODEL", help=", ".join(models.BUILDERS))
    ver.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    group = ver.add_mutually_exclusive_group()
    group.add_argument("--train", action="store_true", help="train mode only")
    group.add_argument("--eval", action="store_true", help="eval mode only")
    ver.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    ver.add_argument("--backend", choices=["auto", *backends.NAMES])
    ver.add_argument("--batch", type=_positive_int)
    ver.add_argument("--size", type=_positive_int)
    ver.add_argument("--whole", action="store_true", help="whole model only, no per-block rows")
    ver.set_defaults(func=cmd_verify)

    doc = sub.add_parser("doctor", help="which backends work here, and why not")
    doc.set_defaults(func=cmd_doctor)

    bench = sub.add_parser("bench", help="run the benchmark suite (benchmarks/run.py) with the given arguments")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except backends.BackendUnsupportedError as exc:  # --backend triton on the CPU, say: a message, not a traceback
        print(f"python -m fused_resblock {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
