"""The cuda backend's training-mode forward conv: ``conv_stats`` on the extension.

y = conv(relu?(BN_in(x))) + bias and the batch mean and variance of y: the forward's WMMA kernel with
the prologue in its operand gather and the statistics epilogue, then the finalize launch.

CPU side, run in CI: the binding through the extension's host emulation (``_emulate_conv_stats``:
the kernel's gathers with the prologue, its shared-memory tiles, the epilogue's stats tile, the
blocks' column parts and their merge, the finalize's per-thread runs and tree) on geometries that
take every path -- 16-byte chunks and element gathers, several row tiles with a partial last one,
several column tiles, groups, padding -- each prologue, with and without statistics, each tile
shape and main loop; y, mean and var by the rule against float64 and PyTorch at the same dtype
(conv_cases.check_conv_stats, the Triton backend's check too); y poisoned before the launch; the
bindings' checks. GPU side: the same on the device, ResNet-50's shapes, determinism, the current
stream and graph capture, the op layer forced to this backend.
"""
from __future__ import annotations

import pytest
import torch

from fused_resblock import ops
from fused_resblock.backends import cuda as cuda_backend, reference
from fused_resblock.testing import assert_rule
from conv_cases import PROLOGUES, ConvGeometry as Conv, check_conv_stats, conv_stats_inputs
from helpers import float64_cpu
from test_cuda_backward import run_cuda_backend_on_the_emulator
from test_cuda_ext import _CONFIG, DTYPES, EXT, LAYOUTS, TILES, _misalign, needs_ext, needs_gpu

CONVS = {
    # 8-aligned channels: 16-byte chunks; 300 output pixels: three row tiles, the last partial
    "3x3_c16_300px": Conv(3, 16, 10, 24),
    "1x1_c32_s2": Conv(2, 32, 11, 16, kernel=1, stride=2, padding=0, bias=False),
    # 5 input channels: the element gather, the prologue per element; padding taps stay zero
    "3x3_c5_s2": Conv(2, 5, 13, 12, stride=2),
    "7x7_stem_c3": Conv(1, 3, 17, 16, kernel=7, stride=2, padding=3),
    "3x3_dilation2": Conv(2, 8, 9, 8, padding=2, dilation=2),
    # 8 groups of 4 channels (the narrow tile, the group's channel base in the prologue)
    "3x3_groups8": Conv(2, 32, 7, 32, groups=8),
    # 144 output channels: two column tiles of the medium and large shapes, one partial
    "1x1_c144": Conv(2, 16, 9, 144, kernel=1, padding=0),
}


def _binding_args(args: dict, **extra) -> dict:
    return dict(args, stride=list(args["stride"]), padding=list(args["padding"]), dilation=list(args["dilation"]),
                **extra)


def _poisoned_y(args: dict) -> torch.Tensor:
    """NaN everywhere, shaped and laid out as y: an output the kernel does not write fails the rule."""
    x = args["x"]
    shape = ops._conv_out_shape(x, args["weight"], args["stride"], args["padding"], args["dilation"])
    y = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    return y.contiguous(memory_format=reference.memory_format_of(x))


def run_checked(run, args: dict, **kw):
    out = _poisoned_y(args)
    result = run(**_binding_args(args, out=out, **kw))
    assert result[0].data_ptr() == out.data_ptr()
    check_conv_stats(args, result)
    return result


# --------------------------------------------------------------------------- emulated (CI)
@needs_ext
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", list(CONVS))
def test_emulated_conv_stats_geometries(case_id, dtype, channels_last):
    run_checked(EXT._emulate_conv_stats, conv_stats_inputs(CONVS[case_id], dtype, channels_last, device="cpu"))


@needs_ext
@pytest.mark.parametrize("compute_stats", [True, False], ids=["stats", "no_stats"])
@pytest.mark.parametrize("prologue", list(PROLOGUES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", ["3x3_c16_300px", "3x3_c5_s2"])
def test_emulated_conv_stats_prologues(case_id, prologue, compute_stats, dtype):
    args = conv_stats_inputs(CONVS[case_id], dtype, True, prologue=prologue, compute_stats=compute_stats,
                             device="cpu")
    run_checked(EXT._emulate_conv_stats, args)


def prologue_vectors_off_alignment(run, prologue, device):
    """The 16-byte gather with the BN vectors (and the bias) 4 bytes past a 16-byte boundary: its
    prologue loads them a channel at a time (16-byte loads there would fault on the device)."""
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], torch.float16, True, prologue=prologue, device=device)
    args = _misalign(args, ranks=(1,))
    assert args["in_mean"].data_ptr() % 16 == 4
    run_checked(run, args)


@needs_ext
@pytest.mark.parametrize("prologue", ["bn_relu", "bn_weight_only"])
def test_emulated_conv_stats_prologue_vectors_off_alignment(prologue):
    prologue_vectors_off_alignment(EXT._emulate_conv_stats, prologue, "cpu")


@needs_ext
@pytest.mark.parametrize("pipeline", [pytest.param(1, id="registers"), pytest.param(4, id="wmma")])
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("case_id", ["3x3_c16_300px", "3x3_groups8", "1x1_c144"])
def test_emulated_conv_stats_tiles(case_id, tile, pipeline):
    """Each tile shape: its column parts (2, 4 or 16 per column) and their merge, partial tiles."""
    run_checked(EXT._emulate_conv_stats, conv_stats_inputs(CONVS[case_id], torch.float16, True, device="cpu"),
                tile=tile, pipeline=pipeline)


@needs_ext
def test_emulated_conv_stats_cp_async_without_a_prologue():
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], torch.bfloat16, True, prologue="none", device="cpu")
    run_checked(EXT._emulate_conv_stats, args, pipeline=2)
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], torch.bfloat16, True, device="cpu")
    with pytest.raises(RuntimeError, match="no prologue"):
        EXT._emulate_conv_stats(**_binding_args(args, pipeline=2))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_conv_stats_far_from_zero(dtype):
    """Outputs near 1000 with a spread near 1: the variance from per-part M2 about each part's mean, no
    sum-of-squares cancellation (which would lose it entirely in fp32)."""
    args = conv_stats_inputs(Conv(2, 16, 12, 16, kernel=1, padding=0), dtype, True, prologue="none",
                             bias_shift=1000.0, device="cpu")
    _, _, var = run_checked(EXT._emulate_conv_stats, args)
    assert float(var.min()) > 0.01


@needs_ext
def test_emulated_conv_stats_of_an_empty_batch():
    args = conv_stats_inputs(Conv(0, 8, 6, 8), torch.float16, True, device="cpu")
    y, mean, var = EXT._emulate_conv_stats(**_binding_args(args))
    assert y.shape == (0, 8, 6, 6)
    assert mean.shape == var.shape == (8,) and bool(mean.isnan().all()) and bool(var.isnan().all())


@needs_ext
def test_emulated_prologue_passes_nan_and_infinities_as_torch():
    """NaN stays NaN through the prologue and its ReLU, +inf stays +inf, -inf stops at the ReLU (0): the
    non-finite outputs where torch has them, the finite ones by the rule."""
    args = conv_stats_inputs(Conv(1, 8, 4, 8, kernel=1, padding=0, bias=False), torch.float16, True,
                             prologue="bn_relu", compute_stats=False, device="cpu")
    args["x"][0, 0, 0, 0] = float("nan")
    args["x"][0, 1, 1, 1] = float("inf")
    args["x"][0, 2, 2, 2] = float("-inf")
    y = EXT._emulate_conv_stats(**_binding_args(args, out=_poisoned_y(args)))[0]
    y_t = reference.conv_stats(**args)[0]
    assert torch.equal(y.isnan(), y_t.isnan()) and bool(y[0, :, 0, 0].isnan().all())
    assert torch.equal(y.isinf(), y_t.isinf()) and torch.equal(y[y.isinf()], y_t[y_t.isinf()])
    assert bool(y[0, :, 2, 2].isfinite().all())
    finite = y_t.isfinite()
    y64 = reference.conv_stats(**float64_cpu(args))[0]
    assert_rule("finite y", y[finite], y64[finite], y_t[finite], dtype=torch.float16)


@needs_ext
def test_conv_stats_binding_checks():
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], torch.float16, True, device="cpu")
    bad = [
        (dict(in_invstd=None), "in_mean and in_invstd go together"),
        (dict(in_mean=None, in_invstd=None), "in_weight and in_bias need in_mean"),
        (dict(in_mean=args["in_mean"].double()), "expected float32 for in_mean"),
        (dict(in_bias=args["in_bias"][:-1]), r"expected in_bias of shape \(16,\)"),
        (dict(pipeline=3), "pipeline 3"),
        (dict(x=args["x"].float()), "expected float16 or bfloat16"),
    ]
    for change, match in bad:
        with pytest.raises(RuntimeError, match=match):
            EXT._emulate_conv_stats(**_binding_args(dict(args, **change)))
    with pytest.raises(RuntimeError, match="expected CUDA tensor for x"):
        EXT.conv_stats(**_binding_args(args))


def test_backend_supports_conv_stats_with_its_prologue():
    config = dict(_CONFIG, prologue=True)
    assert cuda_backend.supports("conv_stats", config) == cuda_backend.available()
    assert "prologue" in cuda_backend.supports("conv_bias_act", config)


def emulated_stats(x, weight, bias, stride, padding, dilation, groups, *rest):
    return EXT._emulate_conv_stats(x, weight, bias, list(stride), list(padding), list(dilation), groups, *rest)


@pytest.fixture
def conv_stats_on_the_emulator(monkeypatch):
    """The cuda backend made to run conv_stats on CPU tensors through the emulator: the op layer's use of it."""
    yield from run_cuda_backend_on_the_emulator(monkeypatch, {"conv_stats": emulated_stats})


@needs_ext
@pytest.mark.usefixtures("conv_stats_on_the_emulator")
def test_op_layer_runs_conv_stats_forced_to_cuda():
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], torch.bfloat16, True, device="cpu")
    check_conv_stats(args, ops_conv_stats(args, backend="cuda"))


def ops_conv_stats(args: dict, backend: str):
    """The public op (``ops.conv_stats``: custom op, fake kernel, autograd) on the backend contract's arguments."""
    in_norm = None if args["in_mean"] is None else (args["in_mean"], args["in_invstd"], args["in_weight"],
                                                    args["in_bias"])
    return ops.conv_stats(args["x"], args["weight"], args["bias"], stride=args["stride"], padding=args["padding"],
                          dilation=args["dilation"], groups=args["groups"], in_norm=in_norm, in_relu=args["in_relu"],
                          compute_stats=args["compute_stats"], backend=backend)


# --------------------------------------------------------------------------- on the GPU
def device_conv_stats(**args):
    return EXT.conv_stats(**args)


RESNET50_CONVS = {  # batch 8: the float64 CPU reference stays quick
    "layer1.0_conv1_1x1": (Conv(8, 64, 56, 64, kernel=1, padding=0), "bn_relu"),
    "layer1.0_conv2_3x3": (Conv(8, 64, 56, 64), "bn_relu"),
    "layer2.0_conv2_s2": (Conv(8, 128, 56, 128, stride=2), "bn_relu"),
    "layer3.1_conv3_1x1": (Conv(8, 256, 14, 1024, kernel=1, padding=0), "bn_relu"),
    "layer4.0_conv1_1x1": (Conv(8, 1024, 14, 512, kernel=1, padding=0), "none"),
    "stem_7x7": (Conv(8, 3, 224, 64, kernel=7, stride=2, padding=3), "none"),
}


@needs_gpu
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", list(CONVS))
def test_cuda_conv_stats_geometries(case_id, dtype, channels_last):
    run_checked(device_conv_stats, conv_stats_inputs(CONVS[case_id], dtype, channels_last, device="cuda"))


@needs_gpu
@pytest.mark.parametrize("compute_stats", [True, False], ids=["stats", "no_stats"])
@pytest.mark.parametrize("prologue", list(PROLOGUES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_conv_stats_prologues(prologue, compute_stats, dtype):
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], dtype, True, prologue=prologue, compute_stats=compute_stats,
                             device="cuda")
    run_checked(device_conv_stats, args)


@needs_gpu
@pytest.mark.parametrize("prologue", ["bn_relu", "bn_weight_only"])
def test_cuda_conv_stats_prologue_vectors_off_alignment(prologue):
    prologue_vectors_off_alignment(device_conv_stats, prologue, "cuda")


@needs_gpu
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_id", list(RESNET50_CONVS))
def test_cuda_conv_stats_resnet50_shapes(shape_id, dtype, tile):
    case, prologue = RESNET50_CONVS[shape_id]
    run_checked(device_conv_stats, conv_stats_inputs(case, dtype, True, prologue=prologue, device="cuda"), tile=tile)


@needs_gpu
def test_cuda_conv_stats_is_deterministic_on_a_side_stream_and_in_a_graph():
    args = conv_stats_inputs(RESNET50_CONVS["layer1.0_conv2_3x3"][0], torch.bfloat16, True, device="cuda")
    first = EXT.conv_stats(**_binding_args(args))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = EXT.conv_stats(**_binding_args(args))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = EXT.conv_stats(**_binding_args(args))
    for t in captured:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b, c in zip(first, second, captured):
        assert torch.equal(a, b) and torch.equal(a, c), "conv_stats is not bitwise reproducible"


@needs_gpu
def test_op_layer_conv_stats_forced_to_cuda_on_the_gpu():
    args = conv_stats_inputs(CONVS["3x3_c16_300px"], torch.float16, True, device="cuda")
    check_conv_stats(args, ops_conv_stats(args, backend="cuda"))
