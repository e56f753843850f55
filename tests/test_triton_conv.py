"""The Triton backend's eval-mode op: fused conv + bias + shortcut + residual + ReLU.

Every output is checked with the numerical rule (``fused_resblock.testing``)
against the reference backend in float64 on the CPU and against the reference
at the dtype under test (PyTorch's own error). Outputs are poisoned with NaN
before each launch, so an element the kernel does not write fails.

Without CUDA the kernels run under Triton's interpreter on CPU tensors at tiny
shapes; bf16 GEMMs are then skipped (the 3.8 interpreter computes bf16 tl.dot
wrongly). With CUDA the same tests run on the GPU, plus real ResNet layer shapes.
"""
import os

import torch


import json  # noqa: E402
import threading  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402

from fused_resblock.backends import reference  # noqa: E402
from fused_resblock.backends import triton as triton_backend  # noqa: E402
from fused_resblock.backends.triton import autotune  # noqa: E402
from fused_resblock.testing import assert_rule  # noqa: E402

pytest.importorskip("triton")
from fused_resblock.backends.triton import bn_act_bwd, conv_bwd, conv_fwd  # noqa: E402

from conv_cases import (  # noqa: E402
    NEEDS_SUBSETS, ConvBiasActCase as Case, backward_inputs, check_backward, check_conv_bias_act,
    conv_bias_act_inputs,
)
from helpers import DEVICE, DTYPES, float64_cpu, needs_gpu  # noqa: E402
INTERPRETING = autotune.interpreter_requested()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """NaN in every fresh output before the launch: an unwritten element fails the rule.

    (Tuning is off and its cache file per test: conftest.py.)
    """
    monkeypatch.setattr(conv_fwd, "POISON_OUTPUT", True)


# --------------------------------------------------------------------------- cases
# Many tiles on every axis of the tiny shapes (the default config takes few, large ones).
SMALL_TILES = autotune.Config(16, 16, 16, group_m=3, num_warps=1, num_stages=1)


CASES = {
    "1x1_s1_res": Case(2, 24, 7, 12, kernel=1, padding=0, residual="same"),
    "1x1_s2_norelu": Case(3, 12, 13, 24, kernel=1, stride=2, padding=0, relu=False),
    "1x1_cout5_nobias": Case(1, 12, 7, 5, kernel=1, padding=0, bias=False),
    "3x3_s1_cin5_res": Case(1, 5, 13, 12, residual="same"),
    "3x3_s1_cin24": Case(2, 24, 7, 24, relu=False),
    "3x3_s2_cin24": Case(3, 24, 13, 12, stride=2),
    "3x3_s2_option_a": Case(2, 12, 13, 24, stride=2, residual="option_a"),
    "3x3_dil2": Case(2, 16, 7, 16, padding=2, dilation=2, residual="same"),
    "3x3_dil4": Case(1, 8, 13, 12, padding=4, dilation=4),
    "7x7_s2_stem": Case(2, 3, 13, 16, kernel=7, stride=2, padding=3),
    "3x3_groups4": Case(2, 16, 7, 16, groups=4, residual="same"),
    "3x3_s2_groups8": Case(1, 32, 13, 32, stride=2, groups=8),
    "1x1_projection_s2": Case(2, 12, 7, 24, kernel=1, padding=0, shortcut_channels=20, shortcut_stride=2,
                              shortcut_size=13),
    "1x1_projection_s1": Case(1, 16, 7, 24, kernel=1, padding=0, shortcut_channels=12, relu=False),
    "3x3_groups4_projection_res": Case(1, 16, 7, 16, groups=4, shortcut_channels=8, shortcut_stride=2,
                                       residual="same"),
}


def make_inputs(case: Case, dtype, device, channels_last: bool, residual_channels_last: Optional[bool] = None):
    """Fresh random arguments for ``conv_bias_act``; weights stay NCHW (the kernel reads them by strides)."""
    return conv_bias_act_inputs(case, dtype, device, channels_last, weight_channels_last=False,
                                residual_channels_last=residual_channels_last)


# --------------------------------------------------------------------------- the op
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_conv_bias_act_matches_reference(case_id, dtype, channels_last):
    args = make_inputs(CASES[case_id], dtype, DEVICE, channels_last)
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))


@pytest.mark.parametrize("x_channels_last", [False, True], ids=["x_nchw", "x_channels_last"])
def test_residual_in_the_other_layout(x_channels_last):
    args = make_inputs(CASES["3x3_dil2"], torch.float16, DEVICE, x_channels_last,
                       residual_channels_last=not x_channels_last)
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))


@pytest.mark.parametrize("channels_last_inside", [False, True], ids=["strided", "converted"])
def test_nchw_with_and_without_channels_last_inside(channels_last_inside, monkeypatch):
    """NCHW operands are either read through their strides or first copied to channels_last."""
    monkeypatch.setattr(conv_fwd, "CHANNELS_LAST_INSIDE", channels_last_inside)
    args = make_inputs(CASES["3x3_groups4_projection_res"], torch.float16, DEVICE, channels_last=False)
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))


def test_non_contiguous_input_view():
    """Strides are run-time arguments: a sliced view needs no copy."""
    args = make_inputs(Case(2, 12, 9, 12, residual="same"), torch.float32, DEVICE, channels_last=False)
    wide = torch.randn(2, 20, 9, 11, device=DEVICE)
    args["x"] = wide[:, 4:16, :, 1:10]
    assert not args["x"].is_contiguous()
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))


@pytest.mark.parametrize("flat_k", [False, True], ids=["per_tap", "flat"])
@pytest.mark.parametrize("case_id", ["3x3_s1_cin5_res", "3x3_s1_cin24", "3x3_groups4", "7x7_s2_stem"])
def test_both_k_walks(case_id, flat_k):
    """Small tiles: several channel blocks per tap, several taps per flat slice."""
    args = make_inputs(CASES[case_id], torch.float32, DEVICE, channels_last=True)
    out = conv_fwd.conv_bias_act_forward(**args, flat_k=flat_k, config=SMALL_TILES)
    check_conv_bias_act(args, out)


@pytest.mark.parametrize("config", [
    autotune.Config(16, 16, 16, group_m=1, num_warps=1, num_stages=1),
    SMALL_TILES,
    autotune.Config(64, 32, 32, group_m=8, num_warps=1, num_stages=1),
], ids=["16x16x16_g1", "16x16x16_g3", "64x32x32_g8"])
def test_tile_configs(config):
    """Many small tiles, a partial band of grouped tile order, and tiles larger than the problem."""
    args = make_inputs(Case(3, 24, 9, 40, residual="same", shortcut_channels=0), torch.float16, DEVICE, False)
    out = conv_fwd.conv_bias_act_forward(**args, config=config)
    check_conv_bias_act(args, out)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw_out", "channels_last_out"])
def test_out_argument_any_strides(channels_last):
    args = make_inputs(CASES["3x3_s2_cin24"], torch.float32, DEVICE, channels_last=not channels_last)
    c = CASES["3x3_s2_cin24"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((c.batch, c.out_channels, c.out_size, c.out_size), float("nan"), device=DEVICE)
    out = out.contiguous(memory_format=fmt)
    result = conv_fwd.conv_bias_act_forward(**args, out=out)
    assert result is out
    ref64 = reference.conv_bias_act(**float64_cpu(args))
    assert_rule("out", out, ref64, reference.conv_bias_act(**args))


def test_poisoning_catches_an_unwritten_output(monkeypatch):
    """With the launch skipped, the poisoned output must be all NaN and fail the rule."""

    class SkippedLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(conv_fwd, "_conv_bias_act_kernel", SkippedLaunch())
    args = make_inputs(CASES["1x1_s1_res"], torch.float32, DEVICE, False)
    out = conv_fwd.conv_bias_act_forward(**args, config=SMALL_TILES)
    assert torch.isnan(out).all()
    with pytest.raises(AssertionError):
        check_conv_bias_act(args, out)


def test_bf16_interpreter_upcast():
    """Under the interpreter bf16 tiles are upcast before tl.dot (its bf16 dot is wrong);
    this checks the bf16 loads, casts and stores. On a GPU the bf16 cases above cover it."""
    if not INTERPRETING:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    args = make_inputs(CASES["3x3_s2_option_a"], torch.bfloat16, DEVICE, channels_last=True)
    out = triton_backend.conv_bias_act(**args)
    ref64 = reference.conv_bias_act(**float64_cpu(args))
    # The interpreter's fp32 -> bf16 cast truncates: up to one bf16 ulp (2^-7 relative) per element,
    # where round-to-nearest (PyTorch, and the GPU) errs half as much. 2x PyTorch's max error usually
    # covers that but not for every draw, so this test bounds each element by its own ulp instead.
    err = (out.double() - ref64).abs()
    bound = ref64.abs() * 2.0 ** -7 + 1e-3 * ref64.abs().max()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"bf16 out: error {err.flatten()[worst]:.3e} over one ulp {bound.flatten()[worst]:.3e} "
        f"at flat index {worst}: got {out.flatten()[worst]}, ref {ref64.flatten()[worst]}")
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch():
    args = make_inputs(CASES["3x3_s1_cin24"], torch.float32, DEVICE, False)
    args["x"] = args["x"][:0]
    out = triton_backend.conv_bias_act(**args)
    assert out.shape == (0, 24, 7, 7)


def test_mismatched_shapes_raise():
    args = make_inputs(CASES["3x3_s1_cin24"], torch.float32, DEVICE, False)
    bad = dict(args, residual=torch.randn(2, 24, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        triton_backend.conv_bias_act(**bad)
    bad = dict(args, weight=args["weight"][:, :7])
    with pytest.raises(ValueError, match="groups"):
        triton_backend.conv_bias_act(**bad)
    bad = dict(args, bias=args["bias"][:5])
    with pytest.raises(ValueError, match="bias"):
        triton_backend.conv_bias_act(**bad)


# --------------------------------------------------------------------------- the backward
def run_backward(args: dict, needs: list, **kw) -> list:
    """The triton backward against the reference at the same dtype and in float64, gradient by gradient."""
    return check_backward(conv_bwd.conv_bias_act_backward, args, needs, **kw)


@pytest.fixture
def poison_gradients(monkeypatch):
    monkeypatch.setattr(bn_act_bwd, "POISON_OUTPUT", True)


@pytest.mark.usefixtures("poison_gradients")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_conv_bias_act_backward_matches_reference(case_id, dtype, channels_last):
    run_backward(make_inputs(CASES[case_id], dtype, DEVICE, channels_last), [True] * 6)


@pytest.mark.usefixtures("poison_gradients")
@pytest.mark.parametrize("needs", NEEDS_SUBSETS)
def test_conv_bias_act_backward_needs(needs):
    fused = run_backward(make_inputs(CASES["3x3_groups4_projection_res"], torch.float32, DEVICE, True), needs)
    assert [g is not None for g in fused] == needs


@pytest.mark.usefixtures("poison_gradients")
def test_conv_bias_act_backward_option_a_residual():
    """The CIFAR option-A residual (the block input, subsampled and channel-shifted): its gradient is scattered back."""
    fused = run_backward(make_inputs(CASES["3x3_s2_option_a"], torch.float32, DEVICE, False), [True] * 6)
    grad_residual = fused[3]
    assert torch.all(grad_residual[:, :, 1::2] == 0) and torch.all(grad_residual[:, :, :, 1::2] == 0)


@pytest.mark.usefixtures("poison_gradients")
def test_conv_bias_act_backward_tilings(monkeypatch):
    """Many small tiles and wgrad's split-K (the GPU tilings) under the interpreter."""
    monkeypatch.setattr(conv_bwd, "_config_for", lambda key, launch: SMALL_TILES)
    for case_id in ("3x3_s2_cin24", "1x1_projection_s2"):
        run_backward(make_inputs(CASES[case_id], torch.float32, DEVICE, True), [True] * 6, split_k=3)


def test_conv_bias_act_backward_deterministic():
    bargs = dict(backward_inputs(make_inputs(CASES["1x1_projection_s2"], torch.float32, DEVICE, True)),
                 needs=[True] * 6)
    first = conv_bwd.conv_bias_act_backward(**bargs, split_k=2)
    again = conv_bwd.conv_bias_act_backward(**bargs, split_k=2)
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------- GPU only
RESNET50_SHAPES = {
    # batch 8 (4 for the stem), channels_last, the block's real channel counts and map sizes
    "stem_7x7_s2": Case(4, 3, 224, 64, kernel=7, stride=2, padding=3),
    "layer1_conv1": Case(8, 64, 56, 64, kernel=1, padding=0),
    "layer1_conv2": Case(8, 64, 56, 64),
    "layer1_conv3_projection": Case(8, 64, 56, 256, kernel=1, padding=0, shortcut_channels=64),
    "layer1_conv3_residual": Case(8, 64, 56, 256, kernel=1, padding=0, residual="same"),
    "layer2_conv2_s2": Case(8, 128, 56, 128, stride=2),
    "layer2_conv3_projection_s2": Case(8, 128, 28, 512, kernel=1, padding=0, shortcut_channels=256,
                                       shortcut_stride=2),
    "layer3_conv2": Case(8, 256, 14, 256),
    "layer4_conv2_s2": Case(8, 512, 14, 512, stride=2),
    "layer4_conv3_residual": Case(8, 512, 7, 2048, kernel=1, padding=0, residual="same"),
    "resnext32x4d_layer1_conv2": Case(8, 128, 56, 128, groups=32),
    "resnext32x8d_layer2_conv2_s2": Case(8, 512, 56, 512, stride=2, groups=32),
}


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_id", list(RESNET50_SHAPES))
def test_resnet50_layer_shapes_on_gpu(shape_id, dtype):
    args = make_inputs(RESNET50_SHAPES[shape_id], dtype, DEVICE, channels_last=True)
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))


@needs_gpu
@pytest.mark.usefixtures("poison_gradients")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_id", ["layer1_conv3_residual", "layer2_conv2_s2", "layer2_conv3_projection_s2",
                                      "resnext32x4d_layer1_conv2"])
def test_conv_bias_act_backward_resnet50_shapes_on_gpu(shape_id, dtype):
    run_backward(make_inputs(RESNET50_SHAPES[shape_id], dtype, DEVICE, channels_last=True), [True] * 6)


@pytest.fixture
def restore_fp32_precision():
    """PyTorch's TF32 flags as they were (both spellings; setting either moves the other)."""
    saved = [(node, node.fp32_precision) for node in (torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv)
             if hasattr(node, "fp32_precision")]
    legacy = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = legacy
    for node, value in saved:
        node.fp32_precision = value


# (how the flag is set, what conv_allows_tf32 must say)
TF32_SETTINGS = [
    (lambda: setattr(torch.backends.cudnn, "allow_tf32", False), False),
    (lambda: setattr(torch.backends.cudnn, "allow_tf32", True), True),
    (lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee"), False),
    (lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "tf32"), True),
    # "none" inherits: from cudnn, then from torch.backends
    (lambda: (setattr(torch.backends.cudnn.conv, "fp32_precision", "none"),
              setattr(torch.backends, "fp32_precision", "ieee")), False),
]


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch before the fp32_precision API")
@pytest.mark.parametrize("setting, tf32", TF32_SETTINGS, ids=["legacy-off", "legacy-on", "conv-ieee", "conv-tf32",
                                                                "inherited-ieee"])
def test_the_tf32_rule_reads_either_spelling(setting, tf32, restore_fp32_precision):
    """Once a program uses the fp32_precision API, torch's legacy getter can raise: the rule must not."""
    from fused_resblock.backends.triton.precision import conv_allows_tf32, dot_input_precision

    setting()
    assert conv_allows_tf32() is tf32
    assert dot_input_precision(torch.float32, interpreting=False) == ("tf32" if tf32 else "ieee")
    assert dot_input_precision(torch.float32, interpreting=True) == "ieee"


@needs_gpu
@pytest.mark.parametrize("setting, tf32", TF32_SETTINGS[2:4], ids=["ieee", "tf32"])
def test_fp32_follows_cudnn_tf32_flag(setting, tf32, restore_fp32_precision):
    setting()  # the new API, the one that makes torch's legacy getter raise
    args = make_inputs(RESNET50_SHAPES["layer3_conv2"], torch.float32, DEVICE, channels_last=True)
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))


def test_kernels_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on the current device: each entry point makes its first tensor's device current."""
    import types

    entered = []

    class Device:
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(None)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    on_device = triton_backend._entry_point()(lambda x, y=None: (list(entered), y))
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=1))
    on_gpu0 = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0))
    assert on_device(on_gpu1, y=2) == ([1], 2) and entered == [1, None]
    entered.clear()
    assert on_device(x=on_gpu1) == ([1], None)  # a keyword first argument too
    entered.clear()
    assert on_device(on_gpu0) == ([], None) and entered == []  # already current: no switch
    assert on_device(torch.zeros(1)) == ([], None)  # CPU tensors (the interpreter): nothing to switch

    def load_in_capture(x):
        raise RuntimeError("Triton Error [CUDA]: operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(autotune.FirstCallInCaptureError, match="warm-up"):
        triton_backend._entry_point()(load_in_capture)(on_gpu0)


@needs_gpu
def test_cuda_graph_capture_and_replay():
    args = make_inputs(RESNET50_SHAPES["layer1_conv3_projection"], torch.float16, DEVICE, channels_last=True)
    triton_backend.conv_bias_act(**args)  # compile (and tune) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_backend.conv_bias_act(**args)
    for t in ("x", "shortcut_x"):
        args[t].copy_(torch.randn_like(args[t]))
    graph.replay()
    torch.cuda.synchronize()
    check_conv_bias_act(args, out)


@needs_gpu
def test_gpu_tuning_writes_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", "1")
    tuner = autotune.Autotuner(tmp_path / "autotune.json")
    monkeypatch.setattr(autotune, "TUNER", tuner)
    args = make_inputs(RESNET50_SHAPES["layer3_conv2"], torch.float16, DEVICE, channels_last=True)
    check_conv_bias_act(args, triton_backend.conv_bias_act(**args))
    assert len(autotune.load_cache_file(tmp_path / "autotune.json")) == 1


# --------------------------------------------------------------------------- autotune cache
KEY = autotune.ShapeKey(
    device=torch.device("cuda", 0), dtype=torch.float16, batch=8, in_channels=64, height=56, width=56,
    out_channels=64, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
    shortcut_channels=0, shortcut_stride=0, channels_last=True, input_precision="tf32", flat_k=False,
)


class FakeBench:
    """Times by formula (bigger tiles are faster) and counts calls; runs nothing on a GPU."""

    def __init__(self):
        self.calls = 0

    def __call__(self, run):
        self.calls += 1
        run()
        return 1.0 / (self._cfg.block_m * self._cfg.block_n)

    def launcher(self):
        def launch(cfg):
            self._cfg = cfg
        return launch


def never_bench(run):
    raise AssertionError("a cached config must not be re-tuned")


def test_cache_round_trip(tmp_path):
    path = tmp_path / "tuned" / "autotune.json"  # the directory is created on the first save
    bench = FakeBench()
    first = autotune.Autotuner(path, benchmark=bench)
    cfg = first.choose(KEY, bench.launcher(), device_name="Fake GPU", tune=True)
    assert bench.calls == len(autotune.candidate_configs(KEY)) > 1
    assert cfg == max(autotune.candidate_configs(KEY), key=lambda c: c.block_m * c.block_n)
    assert first.choose(KEY, bench.launcher(), device_name="Fake GPU", tune=True) is cfg
    assert bench.calls == len(autotune.candidate_configs(KEY)), "memoised in the process"
    data = json.loads(path.read_text())
    assert data["format"] == autotune.FORMAT and len(data["entries"]) == 1
    assert [p.name for p in path.parent.iterdir()] == ["autotune.json"], "no temporary file left behind"

    second = autotune.Autotuner(path, benchmark=never_bench)  # a fresh process's view
    assert second.choose(KEY, lambda c: None, device_name="Fake GPU", tune=True) == cfg
    other_bench = FakeBench()
    other_gpu = autotune.Autotuner(path, benchmark=other_bench)
    other_gpu.choose(KEY, other_bench.launcher(), device_name="Other GPU", tune=True)
    assert len(autotune.load_cache_file(path)) == 2, "entries merge, keyed by GPU name"


def test_a_first_call_inside_capture_says_to_warm_up(tmp_path, monkeypatch):
    """CUDA forbids loading a kernel while a stream captures: a shape's first call there is a clear
    error (not a silently untuned default, nor Triton's bare 'operation not permitted')."""
    tuner = autotune.Autotuner(tmp_path / "autotune.json", benchmark=never_bench)
    monkeypatch.setattr(autotune, "_tuning_allowed", lambda key: None)  # as while a stream captures
    with pytest.raises(autotune.FirstCallInCaptureError, match="warm-up"):
        tuner.choose(KEY, lambda c: None, device_name="Fake GPU")
    monkeypatch.setattr(autotune, "_tuning_allowed", lambda key: True)
    bench = FakeBench()
    cfg = tuner.choose(KEY, bench.launcher(), device_name="Fake GPU")  # the warm-up, outside capture
    monkeypatch.setattr(autotune, "_tuning_allowed", lambda key: None)
    assert tuner.choose(KEY, lambda c: None, device_name="Fake GPU") is cfg  # then capture finds it


def test_a_shape_seen_while_tuning_was_off_is_tuned_once_it_is_on(tmp_path, monkeypatch):
    """FUSED_RESBLOCK_AUTOTUNE=0 then 1 in one process (a notebook): the default a shape ran with
    while tuning was off is not kept as its verdict; a capture in between still finds it."""
    bench = FakeBench()
    tuner = autotune.Autotuner(tmp_path / "autotune.json", benchmark=bench)
    monkeypatch.setattr(autotune, "_tuning_allowed", lambda key: False)
    default = tuner.choose(KEY, bench.launcher(), device_name="Fake GPU")
    assert default == autotune.default_config(KEY) and bench.calls == 0
    monkeypatch.setattr(autotune, "_tuning_allowed", lambda key: None)  # capturing: the default it ran with
    assert tuner.choose(KEY, lambda c: None, device_name="Fake GPU") is default
    monkeypatch.setattr(autotune, "_tuning_allowed", lambda key: True)
    tuned = tuner.choose(KEY, bench.launcher(), device_name="Fake GPU")
    assert bench.calls == len(autotune.candidate_configs(KEY))
    assert tuned == max(autotune.candidate_configs(KEY), key=lambda c: c.block_m * c.block_n) != default


class OutOfResources(Exception):
    """Named as Triton's: a tile that does not fit this GPU."""


@pytest.mark.parametrize("failure, kept", [
    (OutOfResources, True),            # a property of the GPU: the verdict stands
    (torch.cuda.OutOfMemoryError, False),  # of the moment (the model's own memory): tune again later
    (RuntimeError, False),
])
def test_a_verdict_is_kept_on_disk_only_when_no_candidate_failed_by_chance(tmp_path, failure, kept):
    path = tmp_path / "autotune.json"
    bench = FakeBench()
    smallest = min(autotune.candidate_configs(KEY), key=lambda c: c.block_m * c.block_n)

    def launch(cfg):
        if cfg == smallest:
            raise failure("candidate failed")
        bench.launcher()(cfg)
    cfg = autotune.Autotuner(path, benchmark=bench).choose(KEY, launch, device_name="Fake GPU", tune=True)
    assert cfg != smallest
    assert (len(autotune.load_cache_file(path)) == 1) is kept


def test_no_candidate_ran_gives_the_default_unsaved(tmp_path):
    def launch(cfg):
        raise torch.cuda.OutOfMemoryError("no memory left")
    tuner = autotune.Autotuner(tmp_path / "autotune.json", benchmark=lambda run: run() or 1.0, threads=1)
    assert tuner.choose(KEY, launch, device_name="Fake GPU", tune=True) == autotune.default_config(KEY)
    assert not (tmp_path / "autotune.json").exists()


def test_cache_read_by_a_fresh_process(tmp_path):
    path = tmp_path / "autotune.json"
    bench = FakeBench()
    cfg = autotune.Autotuner(path, benchmark=bench).choose(KEY, bench.launcher(), device_name="Fake GPU", tune=True)
    code = (
        "from pathlib import Path\n"
        "import torch\n"
        "from fused_resblock.backends.triton import autotune\n"
        "def never(run): raise SystemExit('re-tuned')\n"
        f"key = autotune.ShapeKey(torch.device('cuda', 0), torch.float16, *{tuple(KEY)[2:]!r})\n"
        f"cfg = autotune.Autotuner(Path({str(path)!r}), benchmark=never)"
        ".choose(key, lambda c: None, device_name='Fake GPU', tune=True)\n"
        "print(cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(v) for v in (cfg.block_m, cfg.block_n, cfg.block_k,
                                                      cfg.group_m, cfg.num_warps, cfg.num_stages)]


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"format": "someone-else", "version": 1, "entries": {}}),
    json.dumps({"format": autotune.FORMAT, "version": 1, "entries": {"k": {"block_m": "big"}}}),
    json.dumps([1, 2, 3]),
    b"\xff\xfe\x00 not UTF-8",
    "[" * 100_000,  # nested past the JSON parser's recursion limit
    json.dumps({"format": autotune.FORMAT, "version": 1,
                "entries": {"k": dict(block_m=48, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)}}),
    json.dumps({"format": autotune.FORMAT, "version": 1,
                "entries": {"k": dict(block_m=True, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)}}),
], ids=["corrupt", "foreign_format", "bad_entry", "not_an_object", "not_utf8", "too_deep", "block_not_pow2",
        "json_true"])
def test_bad_cache_file_is_ignored_with_one_warning(tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    bench = FakeBench()
    tuner = autotune.Autotuner(path, benchmark=bench)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner.choose(KEY, bench.launcher(), device_name="Fake GPU", tune=True)
        tuner.choose(replace_key(batch=16), bench.launcher(), device_name="Fake GPU", tune=True)
    messages = [str(w.message) for w in caught if "autotune cache" in str(w.message)]
    assert len(messages) == 1, messages
    assert bench.calls > 0, "ignored file: tuned anyway"
    assert len(autotune.load_cache_file(path)) == 2, "the bad file is replaced by a good one"


def test_a_stored_config_that_is_no_candidate_is_tuned_again(tmp_path):
    """An entry edited by hand, or from a version whose candidates differ: launching it could fail
    on every forward (or not fit the kernel's shared memory), so it is tuned again."""
    path = tmp_path / "autotune.json"
    stranger = autotune.Config(1024, 16, 16)
    assert stranger not in autotune.candidate_configs(KEY)
    autotune.save_cache_file(path, {autotune._file_key(KEY, "Fake GPU"): stranger})
    bench = FakeBench()
    cfg = autotune.Autotuner(path, benchmark=bench).choose(KEY, bench.launcher(), device_name="Fake GPU", tune=True)
    assert bench.calls > 0 and cfg in autotune.candidate_configs(KEY)


def test_the_cache_key_follows_the_kernels(monkeypatch):
    """A changed kernel may want other tiles: the digest of the kernels' sources is in the key."""
    before = autotune._file_key(KEY, "Fake GPU")
    assert f"kernels-{autotune.kernel_digest()}" in before
    monkeypatch.setattr(autotune, "kernel_digest", lambda: "another")
    assert autotune._file_key(KEY, "Fake GPU") != before


def test_an_unwritable_cache_warns_once(tmp_path):
    path = tmp_path / "autotune.json"
    path.mkdir()  # os.replace onto a directory fails, also for root (a read-only mount would too)
    bench = FakeBench()
    tuner = autotune.Autotuner(path, benchmark=bench)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (8, 16, 32):
            tuner.choose(replace_key(batch=batch), bench.launcher(), device_name="Fake GPU", tune=True)
    writes = [str(w.message) for w in caught if "cannot write" in str(w.message)]
    assert len(writes) == 1, writes


def test_cache_files_follow_the_umask(tmp_path):
    """Not mkstemp's 0600: a second user of a shared cache directory must be able to read the file."""
    from fused_resblock.backends import cache_file

    previous = os.umask(0o002)
    try:
        cache_file.write_entries(tmp_path / "autotune.json", autotune.FORMAT, autotune.VERSION, {})
    finally:
        os.umask(previous)
    assert (tmp_path / "autotune.json").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize("value, enabled", [("0", False), (" off ", False), ("False", False), ("no", False),
                                            ("1", True), ("", True), ("yes", True)])
def test_autotune_switch_values(monkeypatch, value, enabled):
    from fused_resblock.backends import cache_file

    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", value)
    assert cache_file.measurements_enabled() is enabled


def replace_key(**changes) -> autotune.ShapeKey:
    return KEY._replace(**changes)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RESBLOCK_CACHE_DIR", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "autotune.json"
    monkeypatch.setenv("FUSED_RESBLOCK_CACHE_DIR", "~/frb-cache")
    assert autotune.cache_path() == Path.home() / "frb-cache" / "autotune.json"
    monkeypatch.delenv("FUSED_RESBLOCK_CACHE_DIR")
    assert autotune.cache_path().parts[-2:] == ("fused_resblock", "autotune.json")


def test_candidates_are_clamped_to_the_problem():
    grouped = replace_key(in_channels=128, out_channels=128, groups=32, flat_k=True)  # 4 channels per group
    assert {c.block_n for c in autotune.candidate_configs(grouped)} == {16}
    fp32 = autotune.candidate_configs(replace_key(dtype=torch.float32))
    assert all(c.block_k <= 32 and c.num_stages <= 3 for c in fp32)
    for key in (KEY, grouped):
        configs = autotune.candidate_configs(key)
        assert len(configs) == len(set(configs))


def test_tuner_compiles_candidates_in_threads_before_timing_them(tmp_path):
    calls = []  # (config, thread name, compile only?) per launch

    def launch(cfg):
        calls.append((cfg, threading.current_thread().name, getattr(autotune._compiling, "only", False)))
        if cfg.block_m == 32:
            raise RuntimeError("does not compile")  # dropped by the timing, not by the compile threads

    tuner = autotune.Autotuner(tmp_path / "autotune.json", benchmark=lambda run: run() or 1.0, threads=3)
    tuner.choose(KEY, launch, device_name="Fake GPU", tune=True)
    candidates = autotune.candidate_configs(KEY)
    compiled = [c for c in calls if c[2]]
    timed = [c for c in calls if not c[2]]
    assert sorted(map(repr, (c[0] for c in compiled))) == sorted(map(repr, candidates))
    assert all(name.startswith("fused_resblock-compile") for _, name, _ in compiled)
    assert calls[:len(compiled)] == compiled, "every compile before the first timing"
    assert [c[0] for c in timed] == candidates and all(c[1] == threading.current_thread().name for c in timed)
    assert not getattr(autotune._compiling, "only", False)


def test_launch_kernel_compiles_only_inside_precompile():
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(("launch", grid, args, kwargs))

        def warmup(self, *args, grid, **kwargs):
            seen.append(("compile", grid, args, kwargs))

    autotune.launch_kernel(Kernel(), (4, 1), 1, 2, BLOCK=3)
    autotune.precompile(KEY, lambda cfg: autotune.launch_kernel(Kernel(), (cfg.block_m,), 5), [
        autotune.Config(64, 64, 32), autotune.Config(128, 64, 32)], threads=2)
    assert seen[0] == ("launch", (4, 1), (1, 2), {"BLOCK": 3})
    assert sorted(seen[1:]) == [("compile", (64,), (5,), {}), ("compile", (128,), (5,), {})]


def test_compile_threads_from_environment(monkeypatch):
    monkeypatch.setenv(autotune.COMPILE_THREADS_ENV, "3")
    assert autotune.compile_threads() == 3
    monkeypatch.delenv(autotune.COMPILE_THREADS_ENV)
    default = autotune.compile_threads()
    assert 1 <= default <= 16
    # a bad value of a speed knob warns once and takes the default: raising inside the first tuning
    # took triton out of auto's race without a word
    for bad in ("0", "-1", "abc", "\u00b2"):
        monkeypatch.setenv(autotune.COMPILE_THREADS_ENV, bad)
        with pytest.warns(UserWarning, match="not a positive integer"):
            assert autotune.compile_threads() == default
        assert autotune.compile_threads_problem(bad) is not None


def test_untimed_backward_config_fits_the_gpus_shared_memory():
    """128x128x64 backward tiles need ~141 KB: on 99 KB GPUs (sm_86/89/120) BLOCK_K halves.

    tests/test_triton_compile.py compiles these for sm_89 and checks the bytes."""
    dgrad = replace_key(fusion="dgrad", in_channels=256, out_channels=256, height=28, width=28, batch=8)
    assert autotune.gpu_default_config(dgrad, shared_bytes=227 * 1024).block_k == 64
    assert autotune.gpu_default_config(dgrad, shared_bytes=99 * 1024).block_k == 32
    forward = replace_key(in_channels=256, out_channels=256, height=28, width=28, batch=8)
    assert autotune.gpu_default_config(forward, shared_bytes=99 * 1024) == \
        autotune.gpu_default_config(forward, shared_bytes=227 * 1024)


def test_no_tuning_under_the_interpreter():
    if not INTERPRETING:
        pytest.skip("interpreter only")
    key = replace_key(device=torch.device("cpu"))
    tuner = autotune.Autotuner(Path("/nonexistent/never-written.json"), benchmark=never_bench)
    config = tuner.choose(key, lambda c: None)
    assert config == autotune.interpreter_config(key) == autotune.default_config(key)
    assert (config.block_m, config.block_n, config.block_k) == (64, 64, 64), "as large as the problem"


# --------------------------------------------------------------------------- the backend interface
def conv_config(**changes) -> dict:
    config = dict(device=DEVICE, dtype=torch.float32, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                  dilation=(1, 1), groups=1, in_channels=16, out_channels=16, merged_shortcut=False)
    config.update(changes)
    return config


def test_supports_reasons(monkeypatch):
    assert triton_backend.NAME == "triton"
    assert triton_backend.available() is None
    assert triton_backend.supports("conv_bias_act", conv_config()) is None
    assert triton_backend.supports("conv_bias_act", conv_config(groups=4, merged_shortcut=True)) is None
    assert "float64" in triton_backend.supports("conv_bias_act", conv_config(dtype=torch.float64))
    assert "int32" in triton_backend.supports("conv_bias_act", conv_config(dtype=torch.int32))
    assert "groups" in triton_backend.supports("conv_bias_act", conv_config(groups=3))
    for op in ("conv_bias_act_backward", "conv_stats_backward", "bn_add_act_backward"):
        if op not in triton_backend.SUPPORTED_OPS:
            assert f"no kernel for {op}" in triton_backend.supports(op, conv_config())
    assert "unknown op" in triton_backend.supports("conv_transpose", conv_config())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        assert "CUDA" in triton_backend.available()
    assert "TRITON_INTERPRET" in triton_backend.supports("conv_bias_act", conv_config(device=torch.device("cpu")))


def test_import_without_triton_reports_instead_of_crashing():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "from fused_resblock.backends import triton as b\n"
        "reason = b.available()\n"
        "assert reason and 'triton is not importable' in reason, reason\n"
        "assert 'not importable' in b.supports('conv_bias_act', {})\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------- per-channel vectors as views
def test_strided_and_expanded_per_channel_vectors():
    """Biases, BN vectors and statistics' gradients may be views (bias[::2], an expanded scalar, a
    gradient through torch.stack): every op reads them by their strides, as the reference does."""
    from fused_resblock import ops

    def strided(c, requires_grad=False):
        return torch.randn(2 * c, device=DEVICE)[::2].requires_grad_(requires_grad)

    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE) * 0.3
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(7)
        bias, in_norm = strided(6), (strided(4), strided(4).abs() + 0.5, strided(4), strided(4))
        expanded_bias = torch.full((1,), 3.0, device=DEVICE).expand(6)
        out = ops.conv_bias_act(x, w, bias, padding=1, relu=True, backend=backend)
        out_expanded = ops.conv_bias_act(x, w, expanded_bias, padding=1, backend=backend)
        norm = (strided(6), strided(6).abs() + 0.5, torch.ones(1, device=DEVICE).expand(6), strided(6))
        bn = ops.bn_add_act(out, norm, relu=True, backend=backend)
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y, mean, var = ops.conv_stats(xg, wg, bias, padding=1, in_norm=in_norm, in_relu=True, backend=backend)
        mix = torch.linspace(-1, 1, 12, device=DEVICE).view(6, 2)
        loss = y.square().mean() + (torch.stack([mean, var], 1) * mix).sum()  # stride-2 grads of mean, var
        loss.backward()
        results[backend] = [out, out_expanded, bn, y, mean, var, xg.grad, wg.grad]
    names = ["conv_bias_act", "expanded bias", "bn_add_act", "conv_stats y", "mean", "var", "grad x", "grad w"]
    for name, got, expected in zip(names, results["triton"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=name)
