"""The cuda backend's eval-mode backward (``conv_bias_act_backward``): the extension's dgrad and wgrad.

CPU side, run in CI: the whole backend function through the extension's host emulation of both
kernels (``_emulate_conv_dgrad``, ``_emulate_conv_wgrad``: their gathers, shared-memory tiles,
split-K workspace and fixed-order sum) on every forward configuration of test_cuda_ext.py, each
gradient by the rule against float64 and against PyTorch at the same dtype; each tile shape and
forced split counts; the ReLU mask's rule on the raw bit patterns (NaN passes, +-0 and negatives
stop); the bindings' checks. GPU side: the same on the device, ResNet layer shapes, determinism,
the current stream and graph capture, the op layer forced to this backend.

Every output is poisoned with NaN before the launch, so an element the kernels do not write fails.
"""
from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch

import fused_resblock as frb
from fused_resblock import backends
from fused_resblock.backends import cuda as cuda_backend, reference, triton as triton_backend
from fused_resblock.testing import assert_equivalent, assert_rule
from conv_cases import NEEDS_SUBSETS, ConvBiasActCase, backward_inputs, check_backward
from helpers import float64_cpu, freeze_norms, measure_backends_afresh, randomize_norms
from test_cuda_ext import (
    _CONFIG, CASES, DTYPES, EXT, LAYOUTS, RESNET_CASES, TILES, make_inputs, needs_ext, needs_gpu,
)
from test_equivalence import BLOCKS

ALL = [True] * 6


def emulated_backward(*args, **kwargs):
    return cuda_backend.backward_with(EXT._emulate_conv_dgrad, EXT._emulate_conv_wgrad, *args, **kwargs)


def _seed(case) -> int:
    return zlib.crc32(case.name.encode())


def device_backward(**args):
    return cuda_backend.conv_bias_act_backward(**args)


# Where the backward runs: the host emulation of the kernels (CI), or the kernels on a GPU.
TARGETS = [pytest.param(emulated_backward, "cpu", id="emulated", marks=needs_ext),
           pytest.param(device_backward, "cuda", id="cuda", marks=needs_gpu)]


@pytest.mark.parametrize("backward, device", TARGETS)
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case, dtype, channels_last, backward, device):
    check_backward(backward, make_inputs(case, dtype, device, channels_last, _seed(case)), ALL)


# --------------------------------------------------------------------------- emulated (CI)


@needs_ext
@pytest.mark.parametrize("needs", NEEDS_SUBSETS)
def test_emulated_backward_needs(needs):
    case = next(c for c in CASES if c.name == "projection_and_residual")
    fused = check_backward(emulated_backward, make_inputs(case, torch.float16, "cpu", True, 3), needs)
    assert [g is not None for g in fused] == needs


@needs_ext
def test_emulated_grouped_conv_with_a_projection():
    """A grouped conv's projection cannot join its GEMM (the rows are per group): a GEMM of its own."""
    case = ConvBiasActCase(2, 32, 6, 32, groups=4, shortcut_channels=16, residual="same", name="grouped_projection")
    check_backward(emulated_backward, make_inputs(case, torch.bfloat16, "cpu", True, 8), ALL)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _wgrad_args(case, dtype, seed, channels_last=True, masked=True):
    """Direct conv_wgrad arguments for ``case`` (poisoned outputs; the gradient masked by the kernel, or
    already masked: ``masked=False``) and the reference's gradients."""
    args = make_inputs(case, dtype, "cpu", channels_last, seed)
    bargs = dict(backward_inputs(args), needs=ALL)
    if not masked and case.relu:  # what the backend passes with an identity residual: g itself
        bargs["grad"] = torch.ops.aten.threshold_backward(bargs["grad"], bargs["out"], 0)
    ref64 = reference.conv_bias_act_backward(**float64_cpu(bargs))
    ref_t = reference.conv_bias_act_backward(**bargs)
    outputs = dict(
        grad_weight=_poisoned(args["weight"]),
        grad_shortcut_weight=_poisoned(args["shortcut_weight"]) if args["shortcut_x"] is not None else None,
        grad_bias=torch.full((case.out_channels,), float("nan")) if case.bias else None,
    )
    call = dict(grad=bargs["grad"], grad_mask=bargs["out"] if case.relu and masked else None, x=args["x"],
                kernel_size=[case.kernel] * 2, stride=list(args["stride"]), padding=list(args["padding"]),
                dilation=list(args["dilation"]), groups=case.groups, shortcut_x=args["shortcut_x"],
                shortcut_stride=case.shortcut_stride, **outputs)
    return call, outputs, ref_t, ref64


def _check_wgrad_outputs(outputs, ref_t, ref64, dtype):
    for name, index in (("grad_weight", 1), ("grad_bias", 2), ("grad_shortcut_weight", 5)):
        if outputs[name] is not None:
            assert_rule(name, outputs[name], ref64[index], ref_t[index], dtype=dtype)


WGRAD_PIPELINES = [pytest.param(1, id="registers"), pytest.param(2, id="cp_async")]


@needs_ext
@pytest.mark.parametrize("pipeline", WGRAD_PIPELINES)
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("case_name", ["3x3_stride2_13x13", "groups32x8", "merged_projection", "residual"])
def test_emulated_wgrad_tiles_splits_and_main_loops(case_name, tile, splits, pipeline):
    """Every tile shape at forced split counts (partial tiles, splits ending mid-batch, a split per tile),
    through both main loops: cp.async copies an unmasked gradient (a residual's), the registers a masked one."""
    case = next(c for c in CASES if c.name == case_name)
    call, outputs, ref_t, ref64 = _wgrad_args(case, torch.float16, splits, masked=pipeline == 1)
    EXT._emulate_conv_wgrad(**call, tile=tile, splits=splits, pipeline=pipeline)
    _check_wgrad_outputs(outputs, ref_t, ref64, torch.float16)


@needs_ext
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case_name", ["7x7_stem_3ch", "merged_projection_odd", "channels_20_to_36"])
def test_emulated_wgrad_element_wise_operands(case_name, splits):
    """Channel counts that are not multiples of 8: element-wise gathers, the ones row inside a chunk."""
    case = next(c for c in CASES if c.name == case_name)
    call, outputs, ref_t, ref64 = _wgrad_args(case, torch.bfloat16, splits)
    EXT._emulate_conv_wgrad(**call, splits=splits)
    _check_wgrad_outputs(outputs, ref_t, ref64, torch.bfloat16)


@needs_ext
def test_emulated_wgrad_cp_async_refuses_what_it_cannot_move():
    masked, _, _, _ = _wgrad_args(next(c for c in CASES if c.name == "residual"), torch.float16, 2)
    with pytest.raises(RuntimeError, match="no grad_mask"):
        EXT._emulate_conv_wgrad(**masked, pipeline=2)
    odd, _, _, _ = _wgrad_args(next(c for c in CASES if c.name == "7x7_stem_3ch"), torch.float16, 2, masked=False)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        EXT._emulate_conv_wgrad(**odd, pipeline=2)


@needs_ext
@pytest.mark.parametrize("pipeline", [1, 2, 4], ids=["registers", "cp_async", "wmma"])
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
def test_emulated_dgrad_pipelines_and_tiles(tile, pipeline):
    """The dgrad through each main loop and tile; cp.async only reads an unmasked gradient (a residual's)."""
    case = next(c for c in CASES if c.name == "3x3_stride2_13x13")
    args = make_inputs(case, torch.bfloat16, "cpu", True, 21)
    bargs = backward_inputs(args)
    g = torch.ops.aten.threshold_backward(bargs["grad"], bargs["out"], 0)
    gx = _poisoned(args["x"])
    for grad, mask in ((g, None),) if pipeline == 2 else ((g, None), (bargs["grad"], bargs["out"])):
        EXT._emulate_conv_dgrad(grad, mask, args["weight"], list(args["stride"]), list(args["padding"]),
                                list(args["dilation"]), case.groups, [case.size] * 2, gx, tile, pipeline)
        ref_t = reference.conv_bias_act_backward(**dict(bargs, needs=ALL))[0]
        ref64 = reference.conv_bias_act_backward(**float64_cpu(dict(bargs, needs=ALL)))[0]
        assert_rule("grad x", gx, ref64, ref_t, dtype=torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    ((3, 3), (3, 3), (1, 1), (2, 2), (11, 10)),   # gcd(stride, dilation) = 1: taps 3 apart per phase
    ((3, 3), (2, 2), (2, 2), (2, 2), (9, 9)),     # gcd 2: odd rows take no tap at all
    ((3, 3), (2, 1), (3, 0), (1, 1), (8, 7)),     # padding past the kernel's reach; unequal strides
    ((5, 2), (2, 3), (1, 1), (1, 1), (10, 9)),    # non-square kernel, a phase with one tap
    ((1, 1), (4, 4), (0, 0), (1, 1), (9, 9)),     # 1x1 at stride 4: 15 of 16 phases zero
])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "relu_mask"])
def test_emulated_dgrad_stride_phases(kernel, stride, padding, dilation, size, masked):
    """Every stride phase gets exactly its taps (or zeros): odd geometries against float64 by the rule."""
    gen = torch.Generator().manual_seed(sum(kernel + stride + padding + dilation + size))
    x = torch.randn(2, 16, *size, generator=gen).half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(24, 16, *kernel, generator=gen) / 6).half()
    out = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation).relu()
    grad = torch.randn(out.shape, generator=gen).half().contiguous(memory_format=torch.channels_last)
    args = dict(grad=grad, out=out, x=x, weight=w, has_bias=False, stride=stride, padding=padding,
                dilation=dilation, groups=1, residual=None, residual_stride=1, residual_offset=0, shortcut_x=None,
                shortcut_weight=None, shortcut_stride=1, relu=masked, needs=[True] + [False] * 5)
    gx = EXT._emulate_conv_dgrad(grad, out if masked else None, w, list(stride), list(padding), list(dilation), 1,
                                 list(size), _poisoned(x))
    ref_t = reference.conv_bias_act_backward(**args)[0]
    ref64 = reference.conv_bias_act_backward(**float64_cpu(args))[0]
    assert_rule("grad x", gx, ref64, ref_t, dtype=torch.float16)


@needs_ext
def test_emulated_dgrad_cp_async_refuses_a_mask():
    args = make_inputs(CASES[2], torch.float16, "cpu", True, 2)
    bargs = backward_inputs(args)
    with pytest.raises(RuntimeError, match="no grad_mask"):
        EXT._emulate_conv_dgrad(bargs["grad"], bargs["out"], args["weight"], [1, 1], [1, 1], [1, 1], 1, [8, 8],
                                pipeline=2)


# Raw values of the forward's output and whether torch's ReLU backward lets the gradient through.
_MASK_VALUES = [(0.0, False), (-0.0, False), (-1.5, False), (-1e-7, False), (float("-inf"), False),
                (2.0, True), (1e-7, True), (float("inf"), True), (float("nan"), True), (-float("nan"), True)]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_relu_mask_follows_torch(dtype):
    """Zero where the output is <= 0 (both zeros, negatives, -inf, subnormals), the gradient where it is
    positive or NaN (either sign): torch's threshold_backward, for dgrad and wgrad alike."""
    n = len(_MASK_VALUES)
    out = torch.tensor([v for v, _ in _MASK_VALUES], dtype=dtype).view(1, n, 1, 1).repeat(2, 1, 3, 3)
    out = out.contiguous(memory_format=torch.channels_last)
    if dtype == torch.float16:  # -1e-7 and 1e-7 are fp16 subnormals; bf16 keeps them normal
        assert out[0, 3, 0, 0].item() < 0 and out[0, 6, 0, 0].item() > 0
    grad = torch.rand(out.shape, dtype=torch.float32).add(0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, 8, 1, 1).to(dtype)
    passes = torch.tensor([p for _, p in _MASK_VALUES]).view(1, n, 1, 1)
    assert torch.equal(torch.ops.aten.threshold_backward(grad, out, 0).ne(0), passes.expand_as(grad))
    g = torch.where(passes, grad, torch.zeros_like(grad)).double()
    gx = EXT._emulate_conv_dgrad(grad, out, w, [1, 1], [0, 0], [1, 1], 1, [3, 3])
    expected_gx = torch.nn.functional.conv_transpose2d(g, w.double())
    torch.testing.assert_close(gx.double(), expected_gx, rtol=2e-2, atol=2e-2)
    gw, gb = _poisoned(w), torch.full((n,), float("nan"))
    EXT._emulate_conv_wgrad(grad, out, x, [1, 1], [1, 1], [0, 0], [1, 1], 1, None, 1, gw, None, gb)
    torch.testing.assert_close(gb.double(), g.sum((0, 2, 3)), rtol=1e-3, atol=1e-3)
    assert torch.equal(gb.ne(0), passes.view(-1)), "a stopped channel's bias gradient is exactly 0"
    assert torch.equal(gw.view(n, -1).ne(0).any(1), passes.view(-1))


def _dgrad_call(**change):
    args = make_inputs(CASES[2], torch.float16, "cpu", True, 4)
    bargs = backward_inputs(args)
    call = dict(grad=bargs["grad"], grad_mask=bargs["out"], weight=args["weight"], stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], groups=1, input_size=[8, 8])
    call.update(change)
    return call


def _wgrad_call(**change):
    case = next(c for c in CASES if c.name == "merged_projection")
    call, _, _, _ = _wgrad_args(case, torch.float16, 5)
    call.update(change)
    return call


@needs_ext
@pytest.mark.parametrize("change, message", [
    (dict(input_size=[9, 9]), "convolution of a 9x9 input gives"),
    (dict(grad_mask=torch.zeros(2, 64, 7, 7, dtype=torch.float16)), "grad_mask"),
    (dict(grad=torch.zeros(2, 64, 8, 8)), "float16 or bfloat16 for grad"),
    (dict(weight=torch.zeros(64, 32, 3, 3, dtype=torch.bfloat16)), "dtype"),
    (dict(weight=torch.zeros(48, 32, 3, 3, dtype=torch.float16)), "does not fit grad's 64 channels"),
    (dict(padding=[1]), "expected 2 values for padding"),
    (dict(out=torch.zeros(2, 32, 9, 9, dtype=torch.float16)), "expected out of shape"),
])
def test_emulated_dgrad_checks(change, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        EXT._emulate_conv_dgrad(**_dgrad_call(**change))


@needs_ext
@pytest.mark.parametrize("change, message", [
    (dict(kernel_size=[3, 3]), "padded input|gives"),
    (dict(grad_weight=torch.zeros(256, 64, 1, 1)), "expected c10::Half for grad_weight|Half"),
    (dict(grad_bias=torch.zeros(255)), "grad_bias of shape"),
    (dict(shortcut_x=None), "grad_shortcut_weight needs shortcut_x"),
    (dict(shortcut_stride=1), "does not give grad's"),
    (dict(groups=2), "merged projection shortcut comes with groups=1"),
    (dict(splits=-1), "splits must be >= 0"),
    (dict(splits=70000), "exceeds the grid's limit"),
    (dict(pipeline=3), "pipeline must be 0"),
])
def test_emulated_wgrad_checks(change, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        EXT._emulate_conv_wgrad(**_wgrad_call(**change))


@needs_ext
def test_emulated_wgrad_output_aliasing_an_input_is_refused():
    call = _wgrad_call()
    call["grad_bias"] = None
    flat = call["grad"].permute(0, 2, 3, 1).reshape(-1)  # a view: grad is channels_last
    assert flat.data_ptr() == call["grad"].data_ptr()
    call["grad_weight"] = flat[: call["grad_weight"].numel()].view(call["grad_weight"].shape)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        EXT._emulate_conv_wgrad(**call)


def emulated_forward(x, weight, bias, stride, padding, dilation, groups, *rest):
    return EXT._emulate_conv_bias_act(x, weight, bias, list(stride), list(padding), list(dilation), groups, *rest)


def run_cuda_backend_on_the_emulator(monkeypatch, ops: dict):
    """The cuda backend made to run CPU tensors, ``ops`` (name -> function) through the host emulation of
    its kernels, so that the module layer's use of it (folding, the op layer's autograd, the backward's
    composition) runs in CI. A generator: the fixtures yield from it."""
    monkeypatch.setattr(cuda_backend, "available", lambda: None)
    monkeypatch.setattr(cuda_backend, "supports",
                        lambda op, config: None if op in ops else f"cuda backend has no kernel for {op} here")
    for name, fn in ops.items():
        monkeypatch.setattr(cuda_backend, name, fn)
    backends.clear_caches()
    yield
    backends.clear_caches()


@pytest.fixture
def cuda_backend_on_the_emulator(monkeypatch):
    """The eval-mode ops on the emulator (see ``run_cuda_backend_on_the_emulator``)."""
    yield from run_cuda_backend_on_the_emulator(
        monkeypatch, {"conv_bias_act": emulated_forward, "conv_bias_act_backward": emulated_backward})


@needs_ext
@pytest.mark.usefixtures("cuda_backend_on_the_emulator")
@pytest.mark.parametrize("name", ["basic-down", "bottleneck-down", "bottleneck-groups", "cifar-A", "plain"])
def test_emulated_fine_tuning_through_frozen_norms(name, recwarn):
    """Blocks converted with backend="cuda" (forced: a missing kernel raises), BN frozen, fp16: output, input
    and every conv gradient by the module check, through the emulated dgrad and wgrad, no fallback."""
    reference = freeze_norms(randomize_norms(BLOCKS[name]())).to(torch.float16)
    fused = frb.convert(copy.deepcopy(reference), backend="cuda")
    x = torch.randn(2, reference.conv1.in_channels, 9, 9, dtype=torch.float16)
    assert_equivalent(fused, reference, x.contiguous(memory_format=torch.channels_last), train=False)
    assert not [w for w in recwarn if issubclass(w.category, frb.FusedResblockFallbackWarning)]


def test_backend_supports_the_eval_backward():
    assert cuda_backend.supports("conv_bias_act_backward", dict(_CONFIG)) == cuda_backend.available()
    reason = cuda_backend.supports("conv_bias_act_backward", dict(_CONFIG, dtype=torch.float32))
    assert reason is not None and "float32" in reason


# --------------------------------------------------------------------------- on the GPU
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RESNET_CASES, ids=str)
def test_cuda_backward_resnet_layers(case, dtype):
    check_backward(device_backward, make_inputs(case, dtype, "cuda", True, 12), ALL)


@needs_gpu
@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
def test_cuda_wgrad_tiles_and_splits(tile, splits):
    case = next(c for c in RESNET_CASES if c.name == "layer2.0_conv2_stride2")
    call, outputs, ref_t, ref64 = _wgrad_args(case, torch.bfloat16, 6)
    call = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
    EXT.conv_wgrad(**call, tile=tile, splits=splits)
    _check_wgrad_outputs({k: call[k] for k in outputs}, ref_t, ref64, torch.bfloat16)


@needs_gpu
def test_cuda_backward_is_deterministic():
    case = next(c for c in RESNET_CASES if c.name == "layer2.0_conv3_projection")
    bargs = dict(backward_inputs(make_inputs(case, torch.float16, "cuda", True, 9)), needs=ALL)
    first = device_backward(**bargs)
    again = device_backward(**bargs)
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_gpu
def test_cuda_backward_on_a_side_stream_and_in_a_graph():
    case = next(c for c in RESNET_CASES if c.name == "layer3_conv3_residual")
    bargs = dict(backward_inputs(make_inputs(case, torch.bfloat16, "cuda", True, 10)), needs=ALL)
    expected = device_backward(**bargs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = device_backward(**bargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = device_backward(**bargs)
    graph.replay()
    torch.cuda.synchronize()
    for e, s, c in zip(expected, on_stream, captured):
        assert (e is None) == (s is None) == (c is None)
        if e is not None:
            assert torch.equal(e, s) and torch.equal(e, c)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_layer_backward_forced_to_cuda(dtype):
    """frb.ops.conv_bias_act(backend="cuda") differentiates through this backend's kernels."""
    case = next(c for c in CASES if c.name == "projection_and_residual")
    inputs = make_inputs(case, dtype, "cuda", True, 17)
    leaves = {k: inputs[k].detach().requires_grad_() for k in ("x", "weight", "bias", "residual", "shortcut_x",
                                                               "shortcut_weight")}
    out = frb.ops.conv_bias_act(
        leaves["x"], leaves["weight"], leaves["bias"], stride=case.stride, padding=case.padding,
        residual=leaves["residual"], shortcut_x=leaves["shortcut_x"], shortcut_weight=leaves["shortcut_weight"],
        relu=True, backend="cuda")
    grad = torch.randn_like(out)
    out.backward(grad)
    bargs = dict(grad=grad, out=out.detach(), has_bias=True, needs=ALL,
                 **{k: v for k, v in inputs.items() if k != "bias"})
    ref_t = reference.conv_bias_act_backward(**bargs)
    ref64 = reference.conv_bias_act_backward(**float64_cpu(bargs))
    for name, index in (("x", 0), ("weight", 1), ("bias", 2), ("residual", 3), ("shortcut_x", 4),
                        ("shortcut_weight", 5)):
        assert_rule(f"grad {name}", leaves[name].grad, ref64[index], ref_t[index], dtype=dtype)


@needs_gpu
def test_auto_measures_the_backward_of_triton_against_cuda(tmp_path, monkeypatch):
    """Both backends capable of the eval backward: auto times them once per shape (after checking every
    gradient against the reference) and keeps the winner in the cache file."""
    if triton_backend.available() is not None:
        pytest.skip(f"needs the triton backend too: {triton_backend.available()}")
    cache_file = measure_backends_afresh(monkeypatch, tmp_path)
    case = next(c for c in CASES if c.name == "residual")
    inputs = make_inputs(case, torch.float16, "cuda", True, 18)
    x = inputs["x"].detach().requires_grad_()
    weight = inputs["weight"].detach().requires_grad_()
    for _ in range(2):  # measured on the first backward, remembered for the second
        out = frb.ops.conv_bias_act(x, weight, inputs["bias"], stride=case.stride, padding=case.padding,
                                    residual=inputs["residual"], relu=True, backend="auto")
        out.float().square().mean().backward()
    entries = json.loads(cache_file.read_text())["entries"]
    backward = {k: v for k, v in entries.items() if "conv_bias_act_backward" in k}
    assert len(backward) == 1 and set(backward.values()) <= {"triton", "cuda"}, entries
    backends.clear_caches()
