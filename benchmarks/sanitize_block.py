"""A small workload for compute-sanitizer: fused blocks on one GPU backend, eval (with and without
gradients) and train.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 FUSED_RESBLOCK_AUTOTUNE=0 \\
        compute-sanitizer --tool memcheck python -m benchmarks.sanitize_block --backend cuda

Without PyTorch's caching allocator every tensor is its own allocation, so an
access past a tensor's end is caught instead of landing in a pooled
neighbour; without autotuning the sanitizer does not time dozens of configs.
Shapes are small and odd (13x13, 20 channels, batch 3) so edge tiles are exercised.
A configuration the backend does not support is reported and skipped.
"""
from __future__ import annotations

import argparse
import sys

import torch

import fused_resblock as frb
from fused_resblock import BackendUnsupportedError

CASES = (  # (name, block factory, input channels)
    ("basic 20->32 s2 projection", lambda: _basic(20, 32, 2), 20),
    ("basic 32 identity", lambda: _basic(32, 32, 1), 32),
    ("bottleneck 24->16x4 s2 projection", lambda: _bottleneck(24, 16, 2), 24),
    ("cifar 16->32 option A", lambda: frb.FusedCifarBasicBlock(16, 32, 2, "A"), 16),
)


def _basic(inplanes: int, planes: int, stride: int):
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                         torch.nn.BatchNorm2d(planes))
    return frb.FusedBasicBlock(inplanes, planes, stride, downsample)


def _bottleneck(inplanes: int, planes: int, stride: int):
    downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                     torch.nn.BatchNorm2d(planes * 4))
    return frb.FusedBottleneck(inplanes, planes, stride, downsample)


MODES = ("eval", "eval-backward", "train")  # no grad; frozen BN with gradients (fine-tuning); training


def _run(block, channels: int, dtype: torch.dtype, mode: str, backend: str, device: str) -> str:
    block = frb.set_backend(block.to(device).train(mode == "train"), backend)
    x = torch.randn(3, channels, 13, 13, device=device).to(memory_format=torch.channels_last)
    if mode == "train":
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = block(x.requires_grad_())
        out.float().square().mean().backward()
    elif mode == "eval-backward":
        out = block.to(dtype)(x.to(dtype).requires_grad_())
        out.float().square().mean().backward()
    else:
        with torch.no_grad():
            out = block.to(dtype)(x.to(dtype))
    if device == "cuda":
        torch.cuda.synchronize()
    return f"ok, output {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda", help="the fused_resblock backend to exercise")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for name, factory, channels in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for mode in MODES:
                label = f"{args.backend} {name} {dtype} {mode}"
                try:
                    print(f"{label}: {_run(factory(), channels, dtype, mode, args.backend, args.device)}", flush=True)
                except BackendUnsupportedError as exc:
                    print(f"{label}: unsupported ({exc})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
