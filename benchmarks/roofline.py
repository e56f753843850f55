"""The roofline: FLOPs and minimum bytes of a case, and the machine's measured peaks.

FLOPs count 2 per multiply-add of every conv and linear layer (BN, ReLU, adds
and pooling are noise next to them). Minimum bytes assume each fused conv
reads its input, weights, bias and residual (or shortcut input) once and
writes its output once, at the case's dtype: the floor for per-layer fusion.
A projection shortcut is merged into the block's last GEMM (its output is never
written, nor read back as the residual), and a 1x1 conv at stride s reads one
input pixel in s*s. A training or fine-tuning step counts 3x the forward's FLOPs (dgrad +
wgrad per conv) less the dgrad of the convs that read a model's or block's input (it
needs no gradient; a single layer's step computes it, as the layer would inside a net), and 3x the forward's bytes, the usual approximation. The
peaks are *measured* in the same run (a large matmul per dtype, a
device-to-device copy), not taken from a data sheet.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fused_resblock as frb

from . import shapes, workloads
from .cases import DTYPES, Case
from .shapes import ConvLayer
from .timing import TimingPlan, measure

TRAIN_FACTOR = 3
BIAS_BYTES = 4  # folded biases stay fp32
RESIDUAL_BLOCKS = (BasicBlock, Bottleneck, frb.CifarBasicBlock)


# --------------------------------------------------------------------------- one conv layer
def layer_macs(spec: ConvLayer, batch: int) -> int:
    pixels = batch * spec.out_height * spec.out_width
    macs = pixels * spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel * spec.kernel
    if spec.residual == "projection":
        macs += pixels * spec.out_channels * spec.shortcut_in_channels
    return macs


def layer_min_bytes(spec: ConvLayer, batch: int, element_bytes: int) -> int:
    out = batch * spec.out_channels * spec.out_height * spec.out_width
    elements = batch * spec.in_channels * spec.height * spec.width
    elements += spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel * spec.kernel
    elements += out
    if spec.residual == "identity":
        elements += out
    elif spec.residual == "projection":  # the 1x1 conv at shortcut_stride reads one pixel per output pixel
        elements += batch * spec.shortcut_in_channels * spec.out_height * spec.out_width
        elements += spec.out_channels * spec.shortcut_in_channels
    return elements * element_bytes + spec.out_channels * BIAS_BYTES


# --------------------------------------------------------------------------- whole modules
def _shortcut(block: nn.Module) -> Optional[nn.Module]:
    return block.shortcut if isinstance(block, frb.CifarBasicBlock) else block.downsample


def _is_projection(shortcut: Optional[nn.Module]) -> bool:
    """The Sequential(conv1x1, BN) that the fused blocks merge into their last conv's GEMM."""
    return (isinstance(shortcut, nn.Sequential) and len(shortcut) > 0 and isinstance(shortcut[0], nn.Conv2d)
            and shortcut[0].kernel_size == (1, 1))


def _count_hooks(module: nn.Module, totals: dict, step_input: torch.Tensor):
    merged = set()  # the projection convs: their output stays on chip
    blocks = [m for m in module.modules() if isinstance(m, RESIDUAL_BLOCKS)]
    for block in blocks:
        if _is_projection(_shortcut(block)):
            merged.add(_shortcut(block)[0])

    def conv(m, args, out):
        macs = out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        totals["macs"] += macs
        if args[0] is step_input:  # no gradient for the step's input: this conv's dgrad is not run
            totals["input_macs"] += macs
        if m.kernel_size == (1, 1) and m.padding == (0, 0):  # at stride s: one pixel in s*s is read
            totals["activations"] += out.numel() // m.out_channels * m.in_channels
        else:
            totals["activations"] += args[0].numel()
        if m not in merged:
            totals["activations"] += out.numel()
        totals["weights"] += m.weight.numel()

    def linear(m, args, out):
        totals["macs"] += out.numel() * m.in_features
        totals["activations"] += args[0].numel() + out.numel()
        totals["weights"] += m.weight.numel()

    def residual(m, args, out):
        shortcut = _shortcut(m)
        if isinstance(m, frb.CifarBasicBlock) and shortcut is None:
            return  # a plain block: no shortcut
        if not _is_projection(shortcut):  # the identity, or option A's subsampled input (its zeros are not read)
            x = args[0]
            totals["activations"] += x.shape[0] * x.shape[1] * out.shape[2] * out.shape[3]

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
    handles += [block.register_forward_hook(residual) for block in blocks]
    return handles


@functools.lru_cache(maxsize=None)
def module_cost(kind: str, target: str) -> tuple:
    """(MACs per image, activation elements moved per image, weight elements per pass, MACs per image
    of the convs that read the step's input) of one forward pass, counted on the meta device."""
    spec = shapes.target_spec(kind, target)
    module = workloads.build_plain(spec, "meta").eval()
    totals = {"macs": 0, "activations": 0, "weights": 0, "input_macs": 0}
    x = torch.empty((1,) + shapes.input_size(spec), device="meta")
    handles = _count_hooks(module, totals, x)
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return totals["macs"], totals["activations"], totals["weights"], totals["input_macs"]


def case_cost(case: Case) -> tuple:
    """(FLOPs, minimum bytes) of one step of ``case``."""
    element_bytes = DTYPES[case.dtype].itemsize
    spec = shapes.target_spec(case.kind, case.target)
    if isinstance(spec, ConvLayer):
        macs = layer_macs(spec, case.batch)  # one conv; its fine-tuning step takes its input's gradient too
        input_macs = 0
        min_bytes = layer_min_bytes(spec, case.batch, element_bytes)
    else:
        macs, activations, weights, input_macs = module_cost(case.kind, case.target)
        macs, input_macs = macs * case.batch, input_macs * case.batch
        min_bytes = (activations * case.batch + weights) * element_bytes
    if not case.has_backward:
        return 2 * macs, min_bytes
    return 2 * (TRAIN_FACTOR * macs - input_macs), TRAIN_FACTOR * min_bytes


def roofline_time_s(flops: float, min_bytes: float, peak_flops: float, peak_bytes_per_s: float) -> float:
    """The least time the machine needs: bound by compute or by memory traffic, whichever is slower."""
    return max(flops / peak_flops, min_bytes / peak_bytes_per_s)


def share_of_roofline(case: Case, median_ms: float, peaks: dict) -> Optional[float]:
    """Roofline time over measured time (1.0 = at the roofline); None without measured peaks."""
    tflops = (peaks.get("matmul_tflops") or {}).get(case.dtype)
    gbps = peaks.get("copy_gbps")
    if not tflops or not gbps:
        return None
    flops, min_bytes = case_cost(case)
    return roofline_time_s(flops, min_bytes, tflops * 1e12, gbps * 1e9) / (median_ms * 1e-3)


# --------------------------------------------------------------------------- measured peaks
PEAK_PLAN = TimingPlan(warmup=3, min_iters=10, max_iters=50, min_time_s=0.2, max_time_s=2.0)


def _peak_sizes(device: torch.device) -> tuple:
    """(matmul n, copy bytes): big enough to saturate a GPU, small on the CPU."""
    return (8192, 1 << 30) if device.type == "cuda" else (512, 32 << 20)


def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, plan: TimingPlan) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    median_ms = measure(lambda _: a @ b, [()], device, plan).median_ms
    return 2 * n ** 3 / (median_ms * 1e-3) / 1e12


def _copy_gbps(copy_bytes: int, device: torch.device, plan: TimingPlan) -> float:
    src = torch.empty(copy_bytes // 2, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    median_ms = measure(lambda _: dst.copy_(src), [()], device, plan).median_ms
    return copy_bytes / (median_ms * 1e-3) / 1e9


def measure_peaks(device: torch.device, dtypes, plan: TimingPlan = PEAK_PLAN) -> dict:
    """Matmul TFLOP/s per dtype (n x n x n, random data) and copy GB/s (bytes read + written)."""
    n, copy_bytes = _peak_sizes(device)
    return {
        "matmul_tflops": {name: _matmul_tflops(n, DTYPES[name], device, plan) for name in dtypes},
        "matmul_n": n,
        "copy_gbps": _copy_gbps(copy_bytes, device, plan),
        "copy_bytes": copy_bytes,
    }


# --------------------------------------------------------------------------- the predictions in NOTES.md
def layer_table(batch: int = 256, dtype: str = "bf16", tflops: float = 800.0, gbps: float = 3000.0) -> str:
    """Markdown: ResNet-50's fused convs at ``batch`` against a roofline of ``tflops`` and ``gbps``."""
    element_bytes = DTYPES[dtype].itemsize
    ridge = tflops * 1e12 / (gbps * 1e9)
    lines = [
        f"| layer | × | GFLOP | min MB ({dtype}) | FLOP/byte | bound (ridge {ridge:.0f}) | roofline µs | "
        f"× count µs |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    totals = [0.0, 0.0]
    for spec in shapes.RESNET50_LAYERS:
        flops = 2 * layer_macs(spec, batch)
        min_bytes = layer_min_bytes(spec, batch, element_bytes)
        seconds = roofline_time_s(flops, min_bytes, tflops * 1e12, gbps * 1e9)
        totals[0] += flops * spec.count
        totals[1] += seconds * spec.count
        bound = "memory" if flops / min_bytes < ridge else "compute"
        lines.append(f"| {spec.name} | {spec.count} | {flops / 1e9:.1f} | {min_bytes / 1e6:.1f} | "
                     f"{flops / min_bytes:.0f} | {bound} | {seconds * 1e6:.0f} | {seconds * spec.count * 1e6:.0f} |")
    lines.append(f"| **all convs** | | {totals[0] / 1e9:.0f} | | | | | {totals[1] * 1e6:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(layer_table())
