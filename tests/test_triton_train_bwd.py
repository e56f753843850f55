"""The Triton backend's train-mode backward ops: ``bn_add_act_backward`` and ``conv_stats_backward``.

Every gradient is checked with the numerical rule (``fused_resblock.testing``)
against the reference backward run on float64 CPU copies and against the
reference at the dtype under test (PyTorch's own error); dtypes, shapes,
memory formats and which gradients exist (``needs``) must match the reference
exactly. Outputs are poisoned with NaN before each launch.

Without CUDA the kernels run under Triton's interpreter on CPU tensors at tiny
shapes (bf16 skipped: the 3.8 interpreter computes bf16 tl.dot wrongly). With
CUDA the same tests run on the GPU, plus ResNet-50 layer shapes.
"""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from fused_resblock.backends import reference
from fused_resblock.backends import triton as triton_backend
from helpers import DEVICE, DTYPES, check_grads, float64_cpu, needs_gpu

pytest.importorskip("triton")
from fused_resblock.backends.triton import autotune, bn_act_bwd, conv_bwd  # noqa: E402

SMALL_TILES = autotune.Config(16, 16, 16, group_m=1, num_warps=1, num_stages=1)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(bn_act_bwd, "POISON_OUTPUT", True)


# --------------------------------------------------------------------------- helpers
def _randn(shape, dtype, channels_last=False, scale=1.0, shift=0.0):
    t = (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _vec(c, low=None):
    """A random per-channel float32 vector (positive when ``low`` is given)."""
    if low is not None:
        return torch.rand(c, device=DEVICE) + low
    return torch.randn(c, device=DEVICE)


# --------------------------------------------------------------------------- bn_add_act_backward
BN_NAMES = ["grad y", "grad mean", "grad invstd", "grad weight", "grad bias",
            "grad residual", "grad res_mean", "grad res_invstd", "grad res_weight", "grad res_bias"]


def _bn_case(dtype, residual, relu, channels_last=False, affine=True, shape=(2, 12, 5, 7), shift=0.0):
    n, c, h, w = shape
    y = _randn(shape, dtype, channels_last, shift=shift)
    mean = y.float().mean((0, 2, 3)) + 0.1 * _vec(c)
    invstd = _vec(c, 0.5)
    weight, bias = (_vec(c), _vec(c)) if affine else (None, None)
    res = rm = ri = rw = rb = None
    rs, ro = 1, 0
    if residual == "identity":
        res = _randn(shape, dtype, channels_last)
    elif residual == "mapped":  # CIFAR option A: stride 2, channels offset by C // 4
        res = _randn((n, c // 2, 2 * h - 1, 2 * w), dtype, channels_last)
        rs, ro = 2, c // 4
    elif residual == "bn":  # projection shortcut's BN
        res = _randn(shape, dtype, channels_last, shift=shift)
        rm = res.float().mean((0, 2, 3)) + 0.1 * _vec(c)
        ri = _vec(c, 0.5)
        rw, rb = (_vec(c), _vec(c)) if affine else (None, None)
    out = reference.bn_add_act(y, mean, invstd, weight, bias, res, rm, ri, rw, rb, rs, ro, relu)
    grad = _randn(shape, dtype, channels_last)
    return [grad, out, y, mean, invstd, weight, res, rm, ri, rw, rs, ro, relu]


def _run_bn(args, needs, dtype):
    args = list(args) + [list(needs)]
    fused = bn_act_bwd.bn_add_act_backward(*args)
    ref_t = reference.bn_add_act_backward(*args)
    ref64 = reference.bn_add_act_backward(*float64_cpu(args))
    check_grads(BN_NAMES, fused, ref_t, ref64, dtype)
    return fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [None, "identity", "mapped", "bn"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bn_add_act_backward(dtype, residual, relu, channels_last):
    args = _bn_case(dtype, residual, relu, channels_last)
    _run_bn(args, [True] * 10, dtype)


@pytest.mark.parametrize("residual", [None, "identity", "mapped", "bn"])
def test_bn_add_act_backward_no_affine_batch1(residual):
    args = _bn_case(torch.float32, residual, True, affine=False, shape=(1, 20, 3, 5))
    _run_bn(args, [True] * 10, torch.float32)


BN_NEEDS = [pytest.param(needs, id=name) for name, needs in (  # BN_NAMES' order
    ("y", [True] + [False] * 9),
    ("w_b", [False, False, False, True, True] + [False] * 5),
    ("mean_invstd", [False, True, True, False, False] + [False] * 5),
    ("res", [False] * 5 + [True] + [False] * 4),
    ("res_params", [False] * 6 + [False, False, True, True]),
    ("mixed", [True, False, False, False, False, True, True, False, False, False]),
)]


@pytest.mark.parametrize("needs", BN_NEEDS)
@pytest.mark.parametrize("residual", ["bn", "mapped"])
def test_bn_add_act_backward_needs(needs, residual):
    args = _bn_case(torch.float32, residual, True)
    fused = _run_bn(args, needs, torch.float32)
    if not any(needs[5:]):
        assert fused[5:] == (None,) * 5


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_bn_add_act_backward_large_mean(dtype):
    """|mean| >> std: the sums must use centred values, not Σg·y − mean·Σg."""
    args = _bn_case(dtype, "bn", True, shift=200.0 if dtype == torch.float32 else 60.0)
    _run_bn(args, [True] * 10, dtype)


def test_bn_add_act_backward_many_programs(monkeypatch):
    """Several row blocks per program and several programs per channel block (the GPU tiling)."""
    monkeypatch.setattr(bn_act_bwd, "_row_tiling", lambda m, c, dev: (16, 16, 3, -(-m // 48)))
    args = _bn_case(torch.float32, "mapped", True, shape=(3, 20, 7, 9))
    _run_bn(args, [True] * 10, torch.float32)
    args = _bn_case(torch.float32, "bn", False, shape=(3, 20, 7, 9), channels_last=True)
    _run_bn(args, [True] * 10, torch.float32)


def test_bn_add_act_backward_deterministic():
    args = _bn_case(torch.float32, "bn", True, shape=(2, 12, 9, 9))
    a = bn_act_bwd.bn_add_act_backward(*args, [True] * 10)
    b = bn_act_bwd.bn_add_act_backward(*args, [True] * 10)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


# --------------------------------------------------------------------------- conv_stats_backward
CONV_NAMES = ["grad x", "grad weight", "grad bias", "grad in_mean", "grad in_invstd",
              "grad in_weight", "grad in_bias"]


@dataclass(frozen=True)
class ConvCase:
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    prologue: bool = True
    in_relu: bool = True
    affine: bool = True
    stats_grads: bool = True   # grad_mean / grad_var given
    shift: float = 0.0         # |mean| of x and y

    def __str__(self):
        return (f"{self.batch}x{self.in_channels}x{self.height}x{self.width}-{self.out_channels}"
                f"-k{self.kernel}s{self.stride}p{self.padding}d{self.dilation}g{self.groups}"
                f"{'-pro' if self.prologue else ''}{'' if self.in_relu else '-norelu'}"
                f"{'' if self.affine else '-noaff'}{'' if self.stats_grads else '-nostats'}")


CONV_CASES = [
    ConvCase(2, 8, 7, 7, 12),                                           # 3x3
    ConvCase(1, 6, 9, 9, 10, stride=2, stats_grads=False),              # 3x3 stride 2, odd size
    ConvCase(3, 5, 6, 5, 7, kernel=1, padding=0, in_relu=False),        # 1x1, batch 3
    ConvCase(2, 12, 8, 7, 12, kernel=1, stride=2, padding=0, affine=False),  # 1x1 stride 2 (downsample)
    ConvCase(1, 3, 13, 13, 8, kernel=7, stride=2, padding=3, prologue=False),  # the stem
    ConvCase(2, 8, 9, 9, 8, padding=2, dilation=2, stats_grads=False),  # dilation 2
    ConvCase(2, 8, 7, 7, 12, stride=2, groups=4),                       # groups 4, stride 2
    ConvCase(1, 12, 5, 6, 20, groups=4, in_relu=False, affine=False),   # groups 4, 20 channels
]


def _conv_inputs(case: ConvCase, dtype, channels_last=False):
    c = case
    x = _randn((c.batch, c.in_channels, c.height, c.width), dtype, channels_last, shift=c.shift)
    weight = (torch.randn(c.out_channels, c.in_channels // c.groups, c.kernel, c.kernel, device=DEVICE)
              / (c.in_channels // c.groups * c.kernel ** 2) ** 0.5).to(dtype)
    bias = _vec(c.out_channels) + c.shift
    im = ii = iw = ib = None
    if c.prologue:
        im = x.float().mean((0, 2, 3)) + 0.2 * _vec(c.in_channels)
        ii = _vec(c.in_channels, 0.5)
        if c.affine:
            iw, ib = _vec(c.in_channels), _vec(c.in_channels)
    geo = ((c.stride,) * 2, (c.padding,) * 2, (c.dilation,) * 2, c.groups)
    y, mean, _ = reference.conv_stats(x, weight, bias, *geo, im, ii, iw, ib, c.in_relu, True)
    grad_y = _randn(y.shape, dtype, channels_last)
    gm = gv = None
    if c.stats_grads:
        gm, gv = _vec(c.out_channels), _vec(c.out_channels)
    return [grad_y, gm, gv, x, y, mean, weight, True, *geo, im, ii, iw, ib, c.in_relu]


def _bf16_wide(case: ConvCase) -> ConvCase:
    """The case with at least 64 input channels, for a bf16 check of the prologue BN's gradients. A bf16
    rounding step is above the rule's floor, and each of those gradients is a sum over pixels of values
    rounded to bf16 (g, and the dgrad's output), so torch's error is a random draw that can be lucky:
    measured on the cuda backend's emulated kernels (their dgrad output is the correctly rounded exact one)
    with 2x C x7x7 3x3 convs, fresh inputs per trial, a check failed in 4 of 420 at C = 8, 1 of 1050 at
    16, 4 of 4200 at 32 and 0 of 4200 at 64 -- with the exact dgrad, unrounded, failing the same checks
    (seed 41's in_mean: exact 0.076 and torch 0.026 against a bound of 0.062). The max over more
    channels is not lucky everywhere at once (NOTES v0.10: bf16 gradient checks want wide tensors). Without a prologue: the case itself."""
    return dataclasses.replace(case, in_channels=max(case.in_channels, 64)) if case.prologue else case


def _run_conv(args, needs, dtype, **kw):
    args = list(args) + [list(needs)]
    fused = conv_bwd.conv_stats_backward(*args, **kw)
    ref_t = reference.conv_stats_backward(*args)
    ref64 = reference.conv_stats_backward(*float64_cpu(args))
    check_grads(CONV_NAMES, fused, ref_t, ref64, dtype)
    return fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_stats_backward(case, dtype, channels_last):
    if dtype == torch.bfloat16:
        case = _bf16_wide(case)
    _run_conv(_conv_inputs(case, dtype, channels_last), [True] * 7, dtype)


# (prologue, in_relu, affine) of conv_stats_backward's cases, and ``needs`` subsets (CONV_NAMES' order)
PROLOGUE_VARIANTS = [pytest.param(*v, id=name) for name, v in (
    ("none", (False, False, False)), ("bn", (True, False, False)), ("bn_relu", (True, True, False)),
    ("bn_affine", (True, False, True)), ("bn_affine_relu", (True, True, True)),
)]
CONV_NEEDS = [pytest.param(needs, id=name) for name, needs in (
    ("w", [False, True, False, False, False, False, False]),         # only weight
    ("x", [True, False, False, False, False, False, False]),         # only x
    ("b", [False, False, True, False, False, False, False]),         # only the conv bias
    ("prologue", [False, False, False, True, True, True, True]),     # only the prologue's parameters
    ("in_w", [False, False, False, False, False, True, False]),      # only the prologue's weight
    ("x_w", [True, True, False, False, False, False, False]),        # x and weight
    ("mixed", [True, False, True, True, False, False, True]),
)]


@pytest.mark.parametrize("prologue,in_relu,affine", PROLOGUE_VARIANTS)
@pytest.mark.parametrize("stats_grads", [False, True], ids=["nostats", "stats"])
def test_conv_stats_backward_prologue(prologue, in_relu, affine, stats_grads):
    case = ConvCase(2, 6, 6, 7, 9, stride=2, prologue=prologue, in_relu=in_relu, affine=affine,
                    stats_grads=stats_grads)
    _run_conv(_conv_inputs(case, torch.float32), [True] * 7, torch.float32)


@pytest.mark.parametrize("needs", CONV_NEEDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_stats_backward_needs(needs, channels_last):
    case = ConvCase(2, 8, 7, 7, 12, stride=2, groups=2)
    _run_conv(_conv_inputs(case, torch.float32, channels_last), needs, torch.float32)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_conv_stats_backward_large_mean(dtype):
    """|mean| >> std for x and y: the prologue's and the statistics' gradients use centred values."""
    case = ConvCase(2, 8, 7, 7, 12, shift=100.0 if dtype == torch.float32 else 30.0)
    _run_conv(_conv_inputs(case, dtype), [True] * 7, dtype)


@pytest.mark.parametrize("split_k", [2, 3])
def test_conv_stats_backward_split_k(split_k):
    """wgrad's split-K (the GPU path for few output tiles): fixed-order sum of fp32 partials."""
    case = ConvCase(3, 8, 7, 7, 12, stride=2)
    _run_conv(_conv_inputs(case, torch.float32, True), [True] * 7, torch.float32, split_k=split_k)
    _run_conv(_conv_inputs(case, torch.float16), [True] * 7, torch.float16, split_k=split_k)


def test_conv_stats_backward_many_tiles(monkeypatch):
    """Small tiles: many row blocks and stride phases per dgrad, several K steps and columns in wgrad."""
    monkeypatch.setattr(conv_bwd, "_config_for", lambda key, launch: SMALL_TILES)
    for case in (ConvCase(2, 20, 9, 8, 24, stride=2), ConvCase(1, 18, 7, 7, 20, kernel=1, padding=0, groups=2)):
        _run_conv(_conv_inputs(case, torch.float32), [True] * 7, torch.float32)


def test_backward_tiles_are_tuned_per_gemm(tmp_path, monkeypatch):
    """dgrad and wgrad each time their candidate tiles once per shape (fake timing here), then reuse them."""
    timed = []

    def fake_bench(run):
        run()  # every candidate really launches (under the interpreter here)
        timed.append(1)
        return float(len(timed))  # the first candidate of each GEMM wins

    tuner = autotune.Autotuner(tmp_path / "autotune.json", benchmark=fake_bench)
    keys = []

    def choose(key, launch):
        keys.append(key)
        return tuner.choose(key, launch, device_name="Fake GPU", tune=True)

    monkeypatch.setattr(conv_bwd, "_config_for", choose)
    case = ConvCase(2, 8, 7, 7, 12, stride=2)
    args = _conv_inputs(case, torch.float32)
    _run_conv(args, [True] * 7, torch.float32)
    assert [k.fusion for k in keys] == ["dgrad+bn+stats+gx+sums", "wgrad+bn+stats+gw+gb"]  # what each fuses and writes
    assert all(autotune.backward_kind(k) for k in keys)
    first = len(timed)
    assert first >= 2
    _run_conv(args, [True] * 7, torch.float32)
    assert len(timed) == first, "tuned once per shape"
    dgrad, wgrad = keys[:2]
    assert autotune._gemm_sizes(dgrad) == (2 * 4 * 4, 8, 12)   # phase pixels, C_in, C_out
    assert autotune._gemm_sizes(wgrad) == (12, 9 * 8, 2 * 4 * 4)  # C_out, taps*C_in, output pixels
    assert all(c.group_m == 1 for c in autotune.candidate_configs(wgrad))


def test_tuning_allocates_each_gradient_once(tmp_path, monkeypatch):
    """The tuner's candidates (compiled in threads, then timed) write into one gx / gw / gb each,
    not into full-size tensors of their own: at batch 256 those were gigabytes per candidate."""
    tuner = autotune.Autotuner(tmp_path / "autotune.json", benchmark=lambda run: (run(), 1.0)[1], threads=2)
    monkeypatch.setattr(conv_bwd, "_config_for",
                        lambda key, launch: tuner.choose(key, launch, device_name="Fake GPU", tune=True))
    allocated = []
    real_new_output = conv_bwd.new_output

    def counting(shape, *args, **kwargs):
        allocated.append(tuple(shape))
        return real_new_output(shape, *args, **kwargs)
    monkeypatch.setattr(conv_bwd, "new_output", counting)
    case = ConvCase(2, 8, 7, 7, 12, stride=2)
    args = _conv_inputs(case, torch.float32)
    _run_conv(args, [True] * 7, torch.float32)
    x_shape, w_shape = tuple(args[3].shape), tuple(args[6].shape)
    assert allocated.count(x_shape) == 1 and allocated.count(w_shape) == 1, allocated


def test_conv_stats_backward_deterministic():
    args = _conv_inputs(ConvCase(2, 8, 7, 7, 12, stride=2), torch.float32) + [[True] * 7]
    a = conv_bwd.conv_stats_backward(*args, split_k=2)
    b = conv_bwd.conv_stats_backward(*args, split_k=2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- backend registration
def test_backend_supports_backward_ops():
    base = {"device": DEVICE, "dtype": torch.float32}
    conv = dict(base, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
                in_channels=8, out_channels=8, merged_shortcut=False, prologue=True)
    assert triton_backend.supports("bn_add_act_backward", base) is None
    assert triton_backend.supports("conv_stats_backward", conv) is None
    assert "float64" in triton_backend.supports("conv_stats_backward", dict(conv, dtype=torch.float64))
    assert "float64" in triton_backend.supports("bn_add_act_backward", dict(base, dtype=torch.float64))


def test_gradient_formats_of_non_dense_inputs_follow_the_inputs():
    """A channel slice of a channels_last tensor is neither format: every backend's gradients are
    NCHW for it, as the ops' fake kernels say (torch.compile plans strides from those), not the
    format of a dense copy made inside (the reference's prologue output, its fp32 residual)."""
    big = torch.randn(2, 7, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x = big[:, 2:6]
    assert reference.memory_format_of(x) == torch.contiguous_format
    weight = torch.randn(3, 4, 3, 3, device=DEVICE) * 0.2
    im, ii = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    geo = ((1, 1), (1, 1), (1, 1), 1)
    y, mean, _ = reference.conv_stats(x, weight, None, *geo, im, ii, None, None, True, True)
    conv_args = [torch.randn(y.shape, device=DEVICE), None, None, x, y, mean, weight, False, *geo, im, ii, None,
                 None, True, [True, True] + [False] * 5]
    rbig = torch.randn(2, 7, 6, 5, device=DEVICE).half().contiguous(memory_format=torch.channels_last)
    residual = rbig[:, 1:5]
    yb = torch.randn(2, 4, 6, 5, device=DEVICE).half()
    m, inv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    out = reference.bn_add_act(yb, m, inv, None, None, residual, None, None, None, None, 1, 0, True)
    bn_args = [torch.randn(yb.shape, device=DEVICE).half(), out, yb, m, inv, None, residual, None, None, None,
               1, 0, True, [False] * 5 + [True] + [False] * 4]
    for backend in (reference, triton_backend):
        gx, gw = backend.conv_stats_backward(*conv_args)[:2]
        assert gx.is_contiguous() and gw.is_contiguous(), backend.__name__
        assert backend.bn_add_act_backward(*bn_args)[5].is_contiguous(), backend.__name__


def test_backend_functions_match_module():
    case = ConvCase(1, 4, 5, 5, 4)
    args = _conv_inputs(case, torch.float32) + [[True] * 7]
    fused = triton_backend.conv_stats_backward(*args)
    ref = conv_bwd.conv_stats_backward(*args)
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
    bn_args = _bn_case(torch.float32, "bn", True) + [[True] * 10]
    for a, b in zip(triton_backend.bn_add_act_backward(*bn_args), bn_act_bwd.bn_add_act_backward(*bn_args)):
        assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------- GPU: ResNet-50 shapes
RESNET50_CONVS = [  # batch 8 keeps the float64 CPU reference quick
    ConvCase(8, 64, 56, 56, 64, kernel=1, padding=0),          # layer1 conv1
    ConvCase(8, 64, 56, 56, 64),                               # layer1 conv2
    ConvCase(8, 128, 56, 56, 128, stride=2),                   # layer2.0 conv2 (stride 2)
    ConvCase(8, 256, 56, 56, 512, kernel=1, stride=2, padding=0, prologue=False),  # downsample
    ConvCase(8, 512, 7, 7, 2048, kernel=1, padding=0),         # layer4 conv3
    ConvCase(8, 3, 224, 224, 64, kernel=7, stride=2, padding=3, prologue=False),  # stem
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RESNET50_CONVS, ids=str)
def test_conv_stats_backward_resnet50_gpu(case, dtype):
    _run_conv(_conv_inputs(case, dtype, channels_last=True), [True] * 7, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual,shape", [
    ("identity", (32, 256, 56, 56)), ("bn", (32, 512, 28, 28)), (None, (32, 64, 56, 56)),
    ("mapped", (32, 64, 16, 16)),
])
def test_bn_add_act_backward_resnet50_gpu(dtype, residual, shape):
    _run_bn(_bn_case(dtype, residual, True, channels_last=True, shape=shape), [True] * 10, dtype)
