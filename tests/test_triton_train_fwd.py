"""The Triton backend's train-mode forward ops: ``conv_stats`` and ``bn_add_act``.

Every result (y, the batch mean and variance, the block output, running
statistics) is checked with the numerical rule against the reference backend
in float64 on the CPU and against the reference at the dtype under test.
Outputs are poisoned with NaN before each launch, so an element a kernel does
not write fails.

Without CUDA the kernels run under Triton's interpreter on CPU tensors at tiny
shapes (bf16 is then skipped: the 3.8 interpreter computes bf16 tl.dot
wrongly); with CUDA the same tests run compiled, plus real ResNet-50 shapes.
"""
import copy

import torch



import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("torchvision")
import torchvision.models.resnet as tv  # noqa: E402
from torch import nn  # noqa: E402

import fused_resblock as frb  # noqa: E402
from fused_resblock.backends import reference  # noqa: E402
from fused_resblock.backends import triton as triton_backend  # noqa: E402
from fused_resblock.backends.triton import autotune, bn_act, conv_fwd  # noqa: E402
from fused_resblock.testing import assert_rule, check_rule  # noqa: E402
from helpers import randomize_norms  # noqa: E402

from conv_cases import ConvGeometry as Conv  # noqa: E402
from conv_cases import PROLOGUES, bn_vectors, check_conv_stats, conv_stats_inputs as conv_args  # noqa: E402
from helpers import DEVICE, DTYPES, float64_cpu, needs_gpu  # noqa: E402
INTERPRETING = autotune.interpreter_requested()
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]
SMALL_TILES = autotune.Config(16, 16, 16, group_m=3, num_warps=1, num_stages=1)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(conv_fwd, "POISON_OUTPUT", True)


def fmt(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def rand(*shape, dtype=torch.float32, scale=1.0, shift=0.0, channels_last=False):
    t = torch.randn(*shape, device=DEVICE) * scale + shift
    return t.to(dtype).contiguous(memory_format=fmt(channels_last))


# --------------------------------------------------------------------------- conv_stats
CONVS = {
    "1x1_s1": Conv(3, 12, 7, 20, kernel=1, padding=0),
    "1x1_s2_nobias": Conv(1, 20, 13, 12, kernel=1, stride=2, padding=0, bias=False),
    "3x3_s1": Conv(3, 12, 7, 12),
    "3x3_s2_cin5": Conv(1, 5, 13, 24, stride=2),
    "3x3_dil2": Conv(3, 12, 7, 12, padding=2, dilation=2, bias=False),
    "3x3_groups4": Conv(3, 16, 7, 16, groups=4),  # 4 channels per group: the flat K walk
    "7x7_s2_stem": Conv(1, 3, 13, 16, kernel=7, stride=2, padding=3),
}


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", list(CONVS))
def test_conv_stats_geometries(case_id, dtype, channels_last):
    args = conv_args(CONVS[case_id], dtype, channels_last)
    check_conv_stats(args, triton_backend.conv_stats(**args))


@pytest.mark.parametrize("compute_stats", [True, False], ids=["stats", "no_stats"])
@pytest.mark.parametrize("prologue", list(PROLOGUES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_stats_prologues(prologue, compute_stats, dtype):
    """Small tiles: several channel blocks per tap, the prologue on every one of them."""
    args = conv_args(Conv(3, 20, 7, 12, padding=1), dtype, channels_last=False, prologue=prologue,
                     compute_stats=compute_stats)
    check_conv_stats(args, conv_fwd.conv_stats_forward(**args, config=SMALL_TILES))


@pytest.mark.parametrize("flat_k", [False, True], ids=["per_tap", "flat"])
def test_conv_stats_padding_is_zero_after_the_prologue(flat_k):
    """BN + ReLU would turn a zero read from the padding into relu(b - mean*scale) != 0:
    padding must be applied after the prologue. A bias far from mean*scale makes it visible."""
    args = conv_args(Conv(1, 8, 5, 8, kernel=3, padding=2), torch.float32, channels_last=True)
    args["in_bias"] = torch.full_like(args["in_bias"], 3.0)
    args["in_mean"] = torch.full_like(args["in_mean"], -2.0)
    check_conv_stats(args, conv_fwd.conv_stats_forward(**args, flat_k=flat_k, config=SMALL_TILES))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_conv_stats_large_mean(dtype, monkeypatch):
    """|mean| ~ 1000 std: sum(y) and sum(y^2) in fp32 would lose the variance to cancellation.

    Many row tiles (16 rows each) merged in chunks of 4 (several chunks, a partial one)
    exercise both levels of the merge.
    """
    monkeypatch.setattr(conv_fwd, "_FINALIZE_BLOCK_T", 4)
    case = Conv(3, 12, 7, 20, kernel=1, padding=0)
    args = conv_args(case, dtype, channels_last=True, prologue="none", bias_shift=1000.0)
    y, mean, var = conv_fwd.conv_stats_forward(**args, config=SMALL_TILES)
    check_conv_stats(args, (y, mean, var))
    assert float(mean.abs().min()) > 200 * float(var.max()) ** 0.5, "the case really has |mean| >> std"
    if dtype != torch.float32:
        return  # fp16 rounding of y (ulp 0.5 at 1000) dominates; the naive comparison says nothing there
    # the naive fp32 formula on the same y is far worse: the test can tell the difference
    y32 = y.float()
    naive = (y32 * y32).mean((0, 2, 3)) - y32.mean((0, 2, 3)) ** 2
    var64 = reference.conv_stats(**float64_cpu(args))[2]
    assert float((var.double().cpu() - var64).abs().max()) < 0.1 * float((naive.double().cpu() - var64).abs().max())


def test_batch_mean_near_zero_keeps_fp32_precision():
    """|mean| << std (no bias, zero-centred data): the mean must be as precise as an fp32 sum,
    within half a rounding step of the spread. A sample of y as each tile's shift (before v0.8)
    rounded the mean at ulp(|sample|) ~ ulp(std): 5-50x fp32's sum."""
    torch.manual_seed(0)
    c = 8
    x = torch.randn(3, c, 9, 9, dtype=torch.float64, device=DEVICE) * 100
    x = (x - x.mean((0, 2, 3), keepdim=True) + 1e-3 * torch.randn(1, c, 1, 1, dtype=torch.float64, device=DEVICE))
    args = dict(x=x.float(), weight=torch.eye(c, device=DEVICE).view(c, c, 1, 1), bias=None, stride=(1, 1),
                padding=(0, 0), dilation=(1, 1), groups=1, in_mean=None, in_invstd=None, in_weight=None,
                in_bias=None, in_relu=False, compute_stats=True)
    y, mean, _ = conv_fwd.conv_stats_forward(**args, config=SMALL_TILES)
    mean64 = y.double().mean((0, 2, 3))
    err = float((mean.double() - mean64).abs().max())
    assert err <= 0.5 * torch.finfo(torch.float32).eps * float(y.double().std()), err


def _tile_partials(y: torch.Tensor, tile_m: int):
    """Per-tile (shift, mean - shift, M2) of y's rows, as the conv epilogue writes them (fp32)."""
    shifts, means, m2s = [], [], []
    for start in range(0, y.shape[0], tile_m):
        tile = y[start:start + tile_m]
        shift = tile.float().mean(0).to(tile.dtype)  # the tile's plain fp32 mean
        shifts.append(shift)
        means.append(tile.mean(0) - shift)
        m2s.append(((tile - tile.mean(0)) ** 2).sum(0))
    return [torch.stack(v).float().contiguous() for v in (shifts, means, m2s)]


def test_finalize_merges_many_tiles_in_two_levels(monkeypatch):
    """Over _FINALIZE_ONE_LEVEL_TILES tiles the merge runs in two launches (ranges of tiles in
    parallel, then the ranges): as accurate as one, deterministic, the last tile and range partial."""
    tile_m, channels = 16, 8
    rows = (conv_fwd._FINALIZE_ONE_LEVEL_TILES * 2 + 3) * tile_m - 5
    y = torch.randn(rows, channels, dtype=torch.float64) * 0.5 + 300.0  # |mean| >> std
    partials = _tile_partials(y, tile_m)
    launches = []
    real_kernel = conv_fwd._finalize_stats_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_kernel[grid]
    monkeypatch.setattr(conv_fwd, "_finalize_stats_kernel", Counting())
    mean, var = conv_fwd.finalize_stats(*partials, rows, tile_m)
    assert len(launches) == 2 and launches[0][1] > 1 and launches[1][1] == 1, launches
    torch.testing.assert_close(mean.double(), y.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), y.var(0, unbiased=False), rtol=1e-4, atol=0)
    again = conv_fwd.finalize_stats(*partials, rows, tile_m)
    assert torch.equal(mean, again[0]) and torch.equal(var, again[1])
    monkeypatch.setattr(conv_fwd, "_FINALIZE_ONE_LEVEL_TILES", 10 ** 9)
    launches.clear()
    one_level = conv_fwd.finalize_stats(*partials, rows, tile_m)
    assert len(launches) == 1
    torch.testing.assert_close(one_level[0], mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(one_level[1], var, rtol=1e-4, atol=0)


def test_conv_stats_tile_configs_and_empty_batch():
    args = conv_args(Conv(3, 24, 9, 40), torch.float16, channels_last=False)
    for config in (autotune.Config(16, 16, 16, group_m=1, num_warps=1, num_stages=1),
                   autotune.Config(64, 32, 32, group_m=8, num_warps=1, num_stages=1)):
        check_conv_stats(args, conv_fwd.conv_stats_forward(**args, config=config))
    args["x"] = args["x"][:0]
    y, mean, var = triton_backend.conv_stats(**args)
    assert y.shape == (0, 40, 9, 9) and torch.isnan(mean).all() and torch.isnan(var).all()


def test_poisoned_stats_catch_a_skipped_finalize(monkeypatch):
    class SkippedLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(conv_fwd, "_finalize_stats_kernel", SkippedLaunch())
    args = conv_args(CONVS["1x1_s1"], torch.float32, channels_last=False)
    _, mean, var = triton_backend.conv_stats(**args)
    assert torch.isnan(mean).all() and torch.isnan(var).all()


def test_conv_stats_is_deterministic():
    args = conv_args(Conv(3, 12, 9, 20), torch.float32, channels_last=True)
    first = conv_fwd.conv_stats_forward(**args, config=SMALL_TILES)
    second = conv_fwd.conv_stats_forward(**args, config=SMALL_TILES)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- bn_add_act
RESIDUALS = ["identity", "option_a", "projection", "projection_noaffine", "none"]


def bn_add_act_args(kind: str, dtype, channels_last: bool, residual_channels_last: bool, relu: bool,
                    c=16, batch=3, size=7) -> dict:
    y = rand(batch, c, size, size, dtype=dtype, scale=2.0, shift=0.5, channels_last=channels_last)
    mean, invstd, weight, bias = bn_vectors(c)
    residual, res_vectors, stride, offset = None, (None,) * 4, 1, 0
    if kind == "identity":
        residual = rand(batch, c, size, size, dtype=dtype, channels_last=residual_channels_last)
    elif kind == "option_a":  # CIFAR option A: the block input at stride 2, C//4 zero channels before it
        residual = rand(batch, c // 2, 2 * size, 2 * size, dtype=dtype, channels_last=residual_channels_last)
        stride, offset = 2, c // 4
    elif kind.startswith("projection"):  # the downsample conv's raw output and its BN
        residual = rand(batch, c, size, size, dtype=dtype, scale=3.0, shift=-1.0,
                        channels_last=residual_channels_last)
        res_vectors = bn_vectors(c, affine=kind == "projection")
    return dict(y=y, mean=mean, invstd=invstd, weight=weight, bias=bias, residual=residual,
                res_mean=res_vectors[0], res_invstd=res_vectors[1], res_weight=res_vectors[2],
                res_bias=res_vectors[3], residual_stride=stride, residual_offset=offset, relu=relu)


def check_bn_add_act(args: dict, out) -> None:
    dtype = args["y"].dtype
    assert out.dtype == dtype
    assert reference.memory_format_of(out) == reference.memory_format_of(args["y"]), "output memory format"
    assert_rule("out", out, reference.bn_add_act(**float64_cpu(args)), reference.bn_add_act(**args), dtype=dtype)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", RESIDUALS)
def test_bn_add_act(kind, dtype, channels_last, relu):
    args = bn_add_act_args(kind, dtype, channels_last, residual_channels_last=not channels_last, relu=relu)
    check_bn_add_act(args, triton_backend.bn_add_act(**args))


@pytest.mark.parametrize("kind", ["option_a", "projection"])
def test_bn_add_act_small_tiles_odd_channels(kind):
    """Many tiles on both axes, channels not a multiple of the tile, no BN affine."""
    args = bn_add_act_args(kind, torch.float32, True, True, relu=True, c=20, batch=1, size=13)
    args["weight"] = args["bias"] = None
    check_bn_add_act(args, bn_act.bn_add_act_forward(**args, tile=(16, 8, 1)))


# --------------------------------------------------------------------------- the backend interface
def test_supports_train_forward_ops():
    conv = dict(device=DEVICE, dtype=torch.float32, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, in_channels=16, out_channels=16, merged_shortcut=False,
                prologue=True)
    assert triton_backend.supports("conv_stats", conv) is None
    assert "float64" in triton_backend.supports("conv_stats", dict(conv, dtype=torch.float64))
    assert "groups" in triton_backend.supports("conv_stats", dict(conv, groups=3))
    assert triton_backend.supports("bn_add_act", dict(device=DEVICE, dtype=torch.float16)) is None
    assert "float64" in triton_backend.supports("bn_add_act", dict(device=DEVICE, dtype=torch.float64))


# --------------------------------------------------------------------------- whole blocks, train forward
def _downsample(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


BLOCKS = {
    "basic-down": lambda: tv.BasicBlock(6, 10, 2, _downsample(6, 10, 2)),
    "bottleneck-down": lambda: tv.Bottleneck(8, 4, 2, _downsample(8, 16, 2)),
    "cifar-A": lambda: frb.CifarBasicBlock(8, 16, 2, "A"),
}


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_train_forward(name, dtype, channels_last, monkeypatch):
    """Train-mode forward (no grad): output and every buffer after the step, against the same block
    converted with the reference backend (PyTorch at this dtype) and against float64."""
    calls = []
    for module, fn in ((conv_fwd, "conv_stats_forward"), (bn_act, "bn_add_act_forward")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, real=real, fn=fn, **k: calls.append(fn) or real(*a, **k))
    block = randomize_norms(BLOCKS[name]()).train()
    ref64 = copy.deepcopy(block).double()
    on_triton = frb.convert(copy.deepcopy(block).to(DEVICE, dtype), backend="triton").train()
    on_reference = frb.convert(copy.deepcopy(block).to(DEVICE, dtype), backend="reference").train()
    x = torch.randn(3, block.conv1.in_channels, 9, 9).contiguous(memory_format=fmt(channels_last))
    with torch.no_grad():
        out64 = ref64(x.double())
        out_t = on_reference(x.to(DEVICE, dtype))
        out = on_triton(x.to(DEVICE, dtype))
    assert out.is_contiguous(memory_format=fmt(channels_last))
    convs = sum(isinstance(m, nn.Conv2d) for m in block.modules())
    assert sorted(calls) == ["bn_add_act_forward"] + ["conv_stats_forward"] * convs, "all on the triton kernels"
    reports = [check_rule("out", out, out64, out_t, dtype)]
    for (name_b, b), b_t, b64 in zip(on_triton.named_buffers(), on_reference.buffers(), ref64.buffers()):
        if b.is_floating_point():
            reports.append(check_rule(f"buffer {name_b}", b, b64, b_t, b.dtype))
        else:
            assert torch.equal(b.cpu(), b64.cpu()), f"buffer {name_b}"
    assert [str(r) for r in reports if not r.passed] == []


# --------------------------------------------------------------------------- GPU only
RESNET50_CONVS = {
    "stem_7x7_s2": (Conv(8, 3, 224, 64, kernel=7, stride=2, padding=3, bias=False), "none"),
    "layer1_conv1": (Conv(32, 64, 56, 64, kernel=1, padding=0, bias=False), "bn_relu"),
    "layer1_conv2": (Conv(32, 64, 56, 64, bias=False), "bn_relu"),
    "layer1_conv3": (Conv(32, 64, 56, 256, kernel=1, padding=0, bias=False), "bn_relu"),
    "layer2_conv2_s2": (Conv(32, 128, 56, 128, stride=2, bias=False), "bn_relu"),
    "layer3_conv2": (Conv(32, 256, 14, 256, bias=False), "bn_relu"),
    "layer4_conv3": (Conv(32, 512, 7, 2048, kernel=1, padding=0, bias=False), "bn_relu"),
    "resnext_layer1_conv2_g32": (Conv(32, 128, 56, 128, groups=32, bias=False), "bn_relu"),
}


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_id", list(RESNET50_CONVS))
def test_conv_stats_resnet50_shapes_on_gpu(shape_id, dtype):
    case, prologue = RESNET50_CONVS[shape_id]
    args = conv_args(case, dtype, channels_last=True, prologue=prologue)
    check_conv_stats(args, triton_backend.conv_stats(**args))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["identity", "projection"])
def test_bn_add_act_resnet50_shapes_on_gpu(kind, dtype):
    args = bn_add_act_args(kind, dtype, True, True, relu=True, c=256, batch=32, size=56)
    check_bn_add_act(args, triton_backend.bn_add_act(**args))


@needs_gpu
def test_conv_stats_large_mean_on_gpu():
    """Many real tiles (M = 32*56*56) and several finalisation chunks, with |mean| ~ 1000 std."""
    args = conv_args(Conv(32, 64, 56, 64, kernel=1, padding=0), torch.float32, True, prologue="none",
                     bias_shift=1000.0)
    check_conv_stats(args, triton_backend.conv_stats(**args))
