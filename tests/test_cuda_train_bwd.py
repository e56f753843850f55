"""The cuda backend's training-mode BN ops and backward: ``bn_add_act``, ``bn_add_act_backward`` and
``conv_stats_backward`` on the extension.

CPU side, run in CI: the backend's functions through the extension's host emulation of every launch
they make (``_emulate_bn_add_act``, ``_emulate_bn_add_act_backward``, and for conv_stats_backward
``_emulate_channel_backward`` -- the fold of the statistics' gradients, the prologue's backward --
with ``_emulate_conv_dgrad`` and ``_emulate_conv_wgrad``, the wgrad applying the prologue as it
loads x), on the Triton backend's cases (test_triton_train_fwd.py, test_triton_train_bwd.py), each
result by the rule against float64 and PyTorch at the same dtype. GPU side: the same on the device,
ResNet-50's shapes, determinism, and whole blocks trained on the cuda backend alone.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fused_resblock as frb
from fused_resblock.backends import cuda as cuda_backend, reference
from fused_resblock.testing import assert_equivalent
from helpers import check_grads, float64_cpu, randomize_norms
from test_cuda_backward import emulated_backward, emulated_forward, run_cuda_backend_on_the_emulator
from test_cuda_ext import DTYPES, EXT, _misalign, needs_ext, needs_gpu
from test_cuda_train import emulated_stats
from test_equivalence import BLOCKS
from test_triton_train_bwd import (
    BN_NAMES, BN_NEEDS, CONV_CASES, CONV_NAMES, CONV_NEEDS, PROLOGUE_VARIANTS, RESNET50_CONVS, ConvCase, _bf16_wide,
    _bn_case, _conv_inputs,
)
from test_triton_train_fwd import RESIDUALS, bn_add_act_args, check_bn_add_act

LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]


def _on(args, device):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def emulated_bn_add_act(**args):
    return EXT._emulate_bn_add_act(*args.values())


def emulated_bn_add_act_backward(*args):
    return tuple(EXT._emulate_bn_add_act_backward(*args))


def emulated_conv_stats_backward(*args):
    return cuda_backend.stats_backward_with(EXT._emulate_channel_backward, EXT._emulate_conv_dgrad,
                                            EXT._emulate_conv_wgrad, *args)


def _check_backward(backward, args, needs, dtype):
    """``backward(*args, needs)`` gradient by gradient against the reference at the same dtype and in
    float64: bn_add_act_backward's (10 arguments before needs) or conv_stats_backward's."""
    args = list(args) + [list(needs)]
    op, names = ("bn_add_act_backward", BN_NAMES) if len(args) == 14 else ("conv_stats_backward", CONV_NAMES)
    fused = backward(*args)
    check_grads(names, fused, getattr(reference, op)(*args), getattr(reference, op)(*float64_cpu(args)), dtype)
    return fused


# --------------------------------------------------------------------------- emulated (CI)
@needs_ext
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", RESIDUALS)
def test_emulated_bn_add_act(kind, dtype, channels_last, relu):
    args = bn_add_act_args(kind, dtype, channels_last, residual_channels_last=not channels_last, relu=relu)
    args = dict(zip(args, _on(args.values(), "cpu")))
    check_bn_add_act(args, emulated_bn_add_act(**args))


# bn_add_act's chunks of 8 channels that are not 16-byte vectors (the tests above take them at 16
# channels, whole chunks, except option A's residual from channel 4), and the vectors' alignment
CHUNKINGS = {
    "c12_short_last_chunk": dict(kind="projection", c=12),
    "c12_no_residual": dict(kind="none", c=12),
    "option_a_c32_whole_chunks": dict(kind="option_a", c=32),  # the residual's 16 channels from channel 8
    "activations_off_alignment": dict(kind="projection", c=16, misalign=(4,)),  # element by element
    "vectors_off_alignment": dict(kind="projection", c=16, misalign=(1,)),  # 16-byte data, scalar vectors
    "identity_vectors_off_alignment": dict(kind="identity", c=24, misalign=(1,)),
}


def bn_add_act_chunking(run, name, dtype, device, **size):
    spec = dict(CHUNKINGS[name])
    misalign = spec.pop("misalign", None)
    c = spec.pop("c")
    args = bn_add_act_args(spec["kind"], dtype, True, residual_channels_last=True, relu=True, c=c, **size)
    args = dict(zip(args, _on(args.values(), device)))
    if misalign:
        args = _misalign(args, ranks=misalign)
        assert args["y" if misalign == (4,) else "mean"].data_ptr() % 16 != 0
    check_bn_add_act(args, run(**args))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_emulated_bn_add_act_chunking(name, dtype):
    bn_add_act_chunking(emulated_bn_add_act, name, dtype, "cpu")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [None, "identity", "mapped", "bn"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_bn_add_act_backward(dtype, residual, relu, channels_last):
    args = _on(_bn_case(dtype, residual, relu, channels_last, shape=(3, 40, 9, 11)), "cpu")
    _check_backward(emulated_bn_add_act_backward, args, [True] * 10, dtype)


@needs_ext
@pytest.mark.parametrize("needs", BN_NEEDS)
@pytest.mark.parametrize("residual", ["bn", "mapped"])
def test_emulated_bn_add_act_backward_needs(needs, residual):
    fused = _check_backward(emulated_bn_add_act_backward, _on(_bn_case(torch.float16, residual, True), "cpu"),
                               needs, torch.float16)
    assert [g is not None for g in fused[:5]] == needs[:5]


@needs_ext
def test_emulated_bn_add_act_backward_far_from_zero_and_no_affine():
    """|mean| >> std (centred sums), no affine, and more row blocks than a block's 256 rows."""
    args = _on(_bn_case(torch.float16, "bn", True, affine=False, shape=(2, 12, 17, 19), shift=60.0), "cpu")
    _check_backward(emulated_bn_add_act_backward, args, [True] * 10, torch.float16)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_emulated_conv_stats_backward(case, dtype, channels_last):
    if dtype == torch.bfloat16:  # the prologue BN's gradients: see _bf16_wide
        case = _bf16_wide(case)
    args = _on(_conv_inputs(case, dtype, channels_last), "cpu")
    _check_backward(emulated_conv_stats_backward, args, [True] * 7, dtype)


@needs_ext
@pytest.mark.parametrize("prologue,in_relu,affine", PROLOGUE_VARIANTS)
@pytest.mark.parametrize("stats_grads", [False, True], ids=["nostats", "stats"])
def test_emulated_conv_stats_backward_prologue(prologue, in_relu, affine, stats_grads):
    case = _bf16_wide(ConvCase(2, 16, 6, 7, 24, stride=2, prologue=prologue, in_relu=in_relu, affine=affine,
                               stats_grads=stats_grads))
    _check_backward(emulated_conv_stats_backward, _on(_conv_inputs(case, torch.bfloat16, True), "cpu"),
                         [True] * 7, torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("needs", CONV_NEEDS)
def test_emulated_conv_stats_backward_needs(needs):
    case = ConvCase(2, 8, 7, 7, 12, stride=2, groups=2)
    fused = _check_backward(emulated_conv_stats_backward, _on(_conv_inputs(case, torch.float16, True), "cpu"),
                                 needs, torch.float16)
    assert [g is not None for g in fused] == needs


@needs_ext
def test_emulated_conv_stats_backward_far_from_zero():
    case = ConvCase(2, 8, 7, 7, 12, shift=30.0)
    _check_backward(emulated_conv_stats_backward, _on(_conv_inputs(case, torch.float16), "cpu"), [True] * 7,
                         torch.float16)


@needs_ext
def test_emulated_wgrad_applies_the_prologue_on_both_gathers():
    """8-aligned channels (16-byte chunks) and 5 (element gathers), padding taps zero after the prologue."""
    for case in (ConvCase(2, 16, 9, 9, 16), ConvCase(2, 5, 9, 9, 8)):
        args = _on(_conv_inputs(case, torch.float16, True), "cpu")
        _check_backward(emulated_conv_stats_backward, args, [False, True] + [False] * 5, torch.float16)


@needs_ext
def test_channel_backward_binding_checks():
    args = _on(_bn_case(torch.float16, "bn", True), "cpu")
    grad, out, y = args[:3]
    with pytest.raises(RuntimeError, match="expected 10 needs"):
        EXT._emulate_bn_add_act_backward(*args, [True] * 9)
    with pytest.raises(RuntimeError, match="must have one shape"):
        EXT._emulate_bn_add_act_backward(grad[:1], *args[1:], [True] * 10)
    with pytest.raises(RuntimeError, match="expected float32 for mean"):
        EXT._emulate_bn_add_act(y, args[3].double(), *args[4:6], None, None, None, None, None, None, 1, 0, True)
    with pytest.raises(RuntimeError, match="the prologue's ReLU mask needs mean"):
        EXT._emulate_channel_backward(grad, y, None, None, None, None, None, None, True, [True] * 5)
    with pytest.raises(RuntimeError, match="expected CUDA tensor"):
        EXT.bn_add_act(y, *args[3:5], None, None, None, None, None, None, None, 1, 0, True)


def test_backend_supports_every_training_op():
    conv = dict(device=torch.device("cuda"), dtype=torch.float16, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, in_channels=16, out_channels=16, merged_shortcut=False, prologue=True)
    elementwise = dict(device=torch.device("cuda"), dtype=torch.bfloat16)
    for op, config in (("conv_stats", conv), ("conv_stats_backward", conv), ("bn_add_act", elementwise),
                       ("bn_add_act_backward", elementwise)):
        assert cuda_backend.supports(op, config) == cuda_backend.available(), op
        assert "float32" in cuda_backend.supports(op, dict(config, dtype=torch.float32)), op
        assert "CUDA tensors only" in cuda_backend.supports(op, dict(config, device=torch.device("cpu"))), op


@pytest.fixture
def cuda_training_on_the_emulator(monkeypatch):
    """Every op of the cuda backend on CPU tensors through the emulator: blocks trained with backend="cuda"
    (forced: a missing kernel raises) run the module layer's whole training path in CI."""
    yield from run_cuda_backend_on_the_emulator(monkeypatch, {
        "conv_bias_act": emulated_forward, "conv_bias_act_backward": emulated_backward,
        "conv_stats": emulated_stats, "conv_stats_backward": emulated_conv_stats_backward,
        "bn_add_act": lambda *a: EXT._emulate_bn_add_act(*a), "bn_add_act_backward": emulated_bn_add_act_backward,
    })


@needs_ext
@pytest.mark.usefixtures("cuda_training_on_the_emulator")
@pytest.mark.parametrize("name", ["basic-down", "bottleneck-down", "bottleneck-groups", "cifar-A", "plain"])
def test_emulated_training_step_of_blocks(name, recwarn):
    """A block converted with backend="cuda", fp16, train mode: output, input and parameter gradients, BN
    running statistics and num_batches_tracked by the module check, every op on the emulated kernels."""
    reference_block = randomize_norms(BLOCKS[name]()).to(torch.float16)
    fused = frb.convert(copy.deepcopy(reference_block), backend="cuda")
    x = torch.randn(2, reference_block.conv1.in_channels, 9, 9, dtype=torch.float16)
    assert_equivalent(fused, reference_block, x.contiguous(memory_format=torch.channels_last), train=True)
    assert not [w for w in recwarn if issubclass(w.category, frb.FusedResblockFallbackWarning)]


# --------------------------------------------------------------------------- on the GPU
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", RESIDUALS)
def test_cuda_bn_add_act(kind, dtype):
    args = bn_add_act_args(kind, dtype, True, residual_channels_last=True, relu=True, c=64, batch=8, size=28)
    args = dict(zip(args, _on(args.values(), "cuda")))
    check_bn_add_act(args, cuda_backend.bn_add_act(**args))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_cuda_bn_add_act_chunking(name, dtype):
    bn_add_act_chunking(cuda_backend.bn_add_act, name, dtype, "cuda", batch=8, size=28)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual,shape", [
    ("identity", (32, 256, 56, 56)), ("bn", (32, 512, 28, 28)), (None, (32, 64, 56, 56)), ("mapped", (32, 64, 16, 16)),
])
def test_cuda_bn_add_act_backward_resnet50_shapes(dtype, residual, shape):
    args = _on(_bn_case(dtype, residual, True, channels_last=True, shape=shape), "cuda")
    _check_backward(cuda_backend.bn_add_act_backward, args, [True] * 10, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RESNET50_CONVS, ids=str)
def test_cuda_conv_stats_backward_resnet50_shapes(case, dtype):
    args = _on(_conv_inputs(case, dtype, channels_last=True), "cuda")
    _check_backward(cuda_backend.conv_stats_backward, args, [True] * 7, dtype)


@needs_gpu
def test_cuda_training_backward_is_deterministic():
    args = _on(_conv_inputs(ConvCase(8, 64, 28, 28, 64), torch.bfloat16, True), "cuda") + [[True] * 7]
    first, second = cuda_backend.conv_stats_backward(*args), cuda_backend.conv_stats_backward(*args)
    bn = _on(_bn_case(torch.bfloat16, "bn", True, True, shape=(8, 64, 28, 28)), "cuda") + [[True] * 10]
    for a, b in zip((*first, *cuda_backend.bn_add_act_backward(*bn)), (*second, *cuda_backend.bn_add_act_backward(*bn))):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["basic-down", "bottleneck-down", "bottleneck-groups", "cifar-A", "plain"])
def test_cuda_training_step_of_blocks(name, dtype, recwarn):
    reference_block = randomize_norms(BLOCKS[name]()).cuda().to(dtype)
    fused = frb.convert(copy.deepcopy(reference_block), backend="cuda")
    x = torch.randn(4, reference_block.conv1.in_channels, 14, 14, device="cuda", dtype=dtype)
    assert_equivalent(fused, reference_block, x.contiguous(memory_format=torch.channels_last), train=True)
    assert not [w for w in recwarn if issubclass(w.category, frb.FusedResblockFallbackWarning)]
