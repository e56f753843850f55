"""The CUDA extension (``fused_resblock._C``) and the cuda backend's eval-mode op.

CPU side, run in CI: the extension was built (``FUSED_RESBLOCK_EXPECT_CUDA_EXT=1``
turns a missing build into a failure), for sm_80 and sm_90a; ``supports()``
gives its reasons; the binding rejects CPU tensors and bad inputs clearly; and
the kernel's index math -- its operand gathers, shared-memory tiles, merged
projection segment and epilogue -- runs on the CPU through the extension's host
emulator on every configuration below, with the numerical rule.

GPU side, skipped without CUDA: the same configurations and real ResNet layer
shapes on the GPU, each tile shape, unaligned inputs, the current stream, CUDA
graph capture, the op layer forced to this backend, and ``auto`` measuring it
against triton.

Every output is poisoned with NaN before the launch, so an element the kernel
does not write fails the rule.
"""
from __future__ import annotations

import os
import re
import sys
import zlib

import pytest
import torch

import fused_resblock
from fused_resblock.backends import cuda as cuda_backend, extension_sources
from fused_resblock.backends.reference import memory_format_of
from conv_cases import ConvBiasActCase, check_conv_bias_act, conv_bias_act_inputs, poisoned_output

EXT, EXT_REASON = cuda_backend._extension()
GPU_REASON = cuda_backend.available()
ON_GPU = GPU_REASON is None

needs_ext = pytest.mark.skipif(EXT is None, reason=f"{EXT_REASON}")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason=f"needs the extension and a CUDA GPU: {GPU_REASON}")

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="nhwc")]
TILES = {"narrow": 1, "medium": 2, "large": 3}
# Main loops: auto (cp.async where every operand is 16-byte loadable, else registers), or forced.
PIPELINES = [pytest.param(0, id="auto"), pytest.param(1, id="registers")]
CP_ASYNC = 2
TMA_WGMMA = 3
WMMA = 4  # auto without the TMA + wgmma kernel
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs an sm_90 GPU (the TMA + wgmma kernel)")


# --------------------------------------------------------------------------- cases
def Case(name: str, *geometry, **options) -> ConvBiasActCase:
    return ConvBiasActCase(*geometry, name=name, **options)


CASES = [
    Case("1x1", 2, 64, 8, 256, kernel=1, padding=0),
    Case("1x1_stride2", 2, 64, 9, 128, kernel=1, stride=2, padding=0),
    Case("3x3", 2, 32, 8, 64),
    Case("3x3_stride2_13x13", 3, 32, 13, 64, stride=2),
    Case("7x7_stem_3ch", 1, 3, 13, 16, kernel=7, stride=2, padding=3),
    Case("3x3_dilation2", 1, 16, 7, 24, padding=2, dilation=2),
    Case("groups32x4", 2, 128, 7, 128, groups=32),
    Case("groups32x4_stride2", 1, 128, 9, 128, stride=2, groups=32),
    Case("groups32x8", 1, 256, 7, 256, groups=32),
    Case("channels_20_to_36", 3, 20, 7, 36),
    Case("residual", 2, 64, 7, 64, residual="same"),
    Case("option_a_residual", 2, 32, 7, 32, residual="option_a"),
    Case("merged_projection", 2, 64, 7, 256, kernel=1, padding=0, shortcut_channels=128, shortcut_stride=2),
    Case("merged_projection_odd", 1, 24, 5, 40, kernel=1, padding=0, shortcut_channels=20, shortcut_stride=2),
    Case("projection_and_residual", 1, 16, 6, 48, shortcut_channels=16, residual="same"),
    Case("no_bias_no_relu", 2, 16, 6, 16, bias=False, relu=False),
    Case("13x13_batch1", 1, 64, 13, 64),
    # ResNet-50's layer4 at a 32-pixel input: 1x1 maps, whose tensors torch strides as NCHW
    Case("3x3_on_1x1_map", 2, 64, 1, 64),
    Case("1x1_on_1x1_map_residual", 2, 64, 1, 128, kernel=1, padding=0, residual="same"),
]

# Real layer shapes (ResNet-50 and ResNeXt-50 32x4d at 224x224), GPU only.
RESNET_CASES = [
    Case("stem_7x7", 2, 3, 224, 64, kernel=7, stride=2, padding=3),
    Case("layer1_conv1", 2, 64, 56, 64, kernel=1, padding=0),
    Case("layer1_conv2", 2, 64, 56, 64),
    Case("layer1.0_conv3_projection", 2, 64, 56, 256, kernel=1, padding=0, shortcut_channels=64),
    Case("layer1.1_conv3_residual", 2, 64, 56, 256, kernel=1, padding=0, residual="same"),
    Case("layer2.0_conv2_stride2", 2, 128, 56, 128, stride=2),
    Case("layer2.0_conv3_projection", 2, 128, 28, 512, kernel=1, padding=0, shortcut_channels=256,
         shortcut_stride=2),
    Case("layer3_conv2", 2, 256, 14, 256),
    Case("layer3_conv3_residual", 2, 256, 14, 1024, kernel=1, padding=0, residual="same"),
    Case("layer4.0_conv3_projection", 1, 512, 7, 2048, kernel=1, padding=0, shortcut_channels=1024,
         shortcut_stride=2),
    Case("resnext_layer1_conv2", 2, 128, 56, 128, groups=32),
    Case("resnext_layer4_conv2", 1, 1024, 7, 1024, groups=32),
]


def make_inputs(case: ConvBiasActCase, dtype: torch.dtype, device, channels_last: bool, seed: int) -> dict:
    """Reproducible random arguments (keyword names of the reference contract)."""
    return conv_bias_act_inputs(case, dtype, device, channels_last, generator=torch.Generator().manual_seed(seed))


def check_case(run, case: ConvBiasActCase, dtype: torch.dtype, device, channels_last: bool, seed: int,
               tile: int = 0, pipeline: int = 0, prepare=None):
    """``run(**args, out=, tile=, pipeline=)`` into a poisoned ``out``, by the rule (``prepare`` may
    rewrite the arguments first)."""
    args = make_inputs(case, dtype, device, channels_last, seed)
    if prepare is not None:
        args = prepare(args)
    out = poisoned_output(case, args)
    result = run(**args, out=out, tile=tile, pipeline=pipeline)
    assert result.data_ptr() == out.data_ptr()
    check_conv_bias_act(args, result, f"{case.name} out")


# --------------------------------------------------------------------------- the build
def test_extension_built():
    if os.environ.get("FUSED_RESBLOCK_EXPECT_CUDA_EXT") == "1":
        import fused_resblock._C  # noqa: F401  (raises, with the real import error, if missing)

        assert EXT is not None, EXT_REASON
        assert (EXT.build_info()["tma_wgmma"] or "").startswith("CUTLASS "), "built without CUTLASS's headers"
    elif EXT is None:
        pytest.skip(cuda_backend.build_info()["reason"])
    info = cuda_backend.build_info()
    assert info["built"] and info["reason"] is None
    assert info["path"] and os.path.exists(info["path"])
    assert info["cuda_version"] and info["cuda_version"].split(".")[0].isdigit()
    assert info["sources_digest"] == extension_sources.digest(str(cuda_backend.CSRC)), "built from other sources"
    assert info["stale"] is None


def test_sources_digest_follows_the_sources(tmp_path):
    assert extension_sources.digest(str(tmp_path)) is None  # nothing to digest: no flag either
    assert extension_sources.define(str(tmp_path)) == []
    (tmp_path / "kernel.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "notes.md").write_text("not a source")
    first = extension_sources.digest(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert extension_sources.define(str(tmp_path)) == [f"-DFUSED_RESBLOCK_SOURCES_DIGEST={first}"]
    (tmp_path / "notes.md").write_text("edited, still not a source")
    assert extension_sources.digest(str(tmp_path)) == first
    (tmp_path / "kernel.cu").write_text("__global__ void k() { }\n")
    second = extension_sources.digest(str(tmp_path))
    assert second != first
    (tmp_path / "kernel.cu").rename(tmp_path / "other.cu")  # same content, another name
    assert extension_sources.digest(str(tmp_path)) not in (first, second)


def test_a_stale_extension_says_so(monkeypatch, tmp_path):
    """A binary built from other sources than the checkout's csrc/ is reported and warned about once."""
    (tmp_path / "kernel.cu").write_text("__global__ void k() {}\n")
    monkeypatch.setattr(cuda_backend, "CSRC", tmp_path)
    here = extension_sources.digest(str(tmp_path))

    class FakeExtension:
        def __init__(self, digest):
            self.digest = digest

        def build_info(self):
            return {"sources_digest": self.digest}

    assert cuda_backend._staleness(FakeExtension(here)) is None
    for built in ("0123456789abcdef", None):
        reason = cuda_backend._staleness(FakeExtension(built))
        assert reason.startswith("fused_resblock._C was built from other sources") and here in reason, reason
        assert (built or "not recorded") in reason
    other_torch = FakeExtension(here)
    other_torch.build_info = lambda: {"sources_digest": here, "torch_version": "1.0.0"}
    reason = cuda_backend._staleness(other_torch)
    assert reason == f"fused_resblock._C was built for torch 1.0.0, this is torch {torch.__version__.split('+')[0]}"
    with pytest.warns(UserWarning, match="rebuild"):
        cuda_backend._warn_if_stale(FakeExtension("0123456789abcdef"))
    monkeypatch.setattr(cuda_backend, "CSRC", tmp_path / "absent")  # an installed package: nothing to compare
    assert cuda_backend._staleness(FakeExtension("0123456789abcdef")) is None


@needs_ext
def test_build_info_archs():
    info = cuda_backend.build_info()
    archs = info["archs"]
    assert "sm_80" in archs, info
    if info["archs_source"].startswith("__CUDA_ARCH_LIST__"):
        assert "sm_90" in archs, info
        pytest.skip("neither cuobjdump nor the build's arch flags are at hand: sm_90 and sm_90a look alike")
    assert "sm_90a" in archs, info


def test_arch_suffix_from_flags_when_cuobjdump_predates_it():
    """Before CUDA 13, cuobjdump lists an sm_90a cubin as sm_90 (Triton 3.6 bundles 12.8's)."""
    assert cuda_backend._restore_suffixes(["sm_80", "sm_90"], ["sm_80", "sm_90a"]) == ["sm_80", "sm_90a"]
    assert cuda_backend._restore_suffixes(["sm_80", "sm_90"], ["sm_80", "sm_90"]) == ["sm_80", "sm_90"]
    assert cuda_backend._restore_suffixes(["sm_90"], ["sm_90", "sm_90a"]) == ["sm_90"]  # both built: keep


@pytest.mark.parametrize("preset", [None, "9.0"])
def test_jit_build_flags(monkeypatch, preset):
    """The just-in-time build takes setup.py's architectures (sm_90a included) unless TORCH_CUDA_ARCH_LIST
    is set, records the list and the sources' digest, and leaves the environment as it found it."""
    import torch.utils.cpp_extension

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return "built"
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    if preset is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", preset)
    assert cuda_backend._jit_build() == "built"
    expected = preset or extension_sources.DEFAULT_ARCH_LIST
    assert seen["arch_list"] == expected
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == preset
    assert "-DFUSED_RESBLOCK_CUDA_ARCHS=" + expected.replace(";", ",") in seen["extra_cflags"]
    assert extension_sources.define(str(cuda_backend.CSRC))[0] in seen["extra_cflags"]


def test_build_info_without_extension(monkeypatch):
    """A machine without the extension: import works, the reasons say why, calls raise clearly."""
    monkeypatch.delenv(cuda_backend.JIT_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "fused_resblock._C", None)  # makes the import fail
    monkeypatch.delattr(fused_resblock, "_C", raising=False)
    cuda_backend._extension.cache_clear()
    try:
        reason = cuda_backend.available()
        assert reason.startswith("extension not built"), reason
        info = cuda_backend.build_info()
        assert info["built"] is False and info["reason"].startswith("extension not built")
        config = dict(_CONFIG, device=torch.device("cuda", 0))
        assert cuda_backend.supports("conv_bias_act", config).startswith("extension not built")
        x = torch.zeros(1, 8, 4, 4, dtype=torch.float16)
        with pytest.raises(RuntimeError, match="extension not built"):
            cuda_backend.conv_bias_act(x, torch.zeros(8, 8, 1, 1, dtype=torch.float16), None, (1, 1), (0, 0),
                                       (1, 1), 1, None, 1, 0, None, None, 1, False)
    finally:
        cuda_backend._extension.cache_clear()


def test_available_reason_here():
    reason = cuda_backend.available()
    if EXT is None:
        assert reason.startswith("extension not built"), reason
    elif not torch.cuda.is_available():
        assert reason == "no CUDA device"
    else:
        assert reason is None or "compute capability" in reason or "kernel image" in reason


# --------------------------------------------------------------------------- supports()
_CONFIG = dict(device=torch.device("cuda"), dtype=torch.float16, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
               dilation=(1, 1), groups=1, in_channels=64, out_channels=64, merged_shortcut=False, prologue=False)


@pytest.mark.parametrize("op, change, expected", [
    ("conv_stats", {"dtype": torch.float32}, "float32"),
    ("conv_stats_backward", {"device": torch.device("cpu")}, "CUDA tensors only"),
    ("bn_add_act", {"dtype": torch.float64}, "fp16/bf16"),
    ("no_such_op", {}, "unknown op"),
    ("conv_bias_act", {"device": torch.device("cpu")}, "CUDA tensors only"),
    ("conv_bias_act", {"dtype": torch.float32}, "float32"),
    ("conv_bias_act", {"dtype": torch.float64}, "fp16/bf16"),
    ("conv_bias_act", {"prologue": True}, "prologue"),
    ("conv_bias_act", {"groups": 3}, "does not divide"),
    ("conv_bias_act", {"stride": (0, 1)}, "not a valid convolution"),
    ("conv_bias_act", {"in_channels": 1, "out_channels": 65535 * 16 + 1}, "output channels per group"),
    ("conv_bias_act", {"indexing": "2147483648 output pixels: beyond 32-bit indexing"}, "32-bit"),
])
def test_supports_reasons(op, change, expected):
    reason = cuda_backend.supports(op, dict(_CONFIG, **change))
    assert reason is not None and expected in reason, reason


@pytest.mark.parametrize("change", [
    {}, {"dtype": torch.bfloat16}, {"groups": 32, "in_channels": 128, "out_channels": 128},
    {"kernel": (7, 7), "stride": (2, 2), "padding": (3, 3), "in_channels": 3},
    {"kernel": (1, 1), "padding": (0, 0), "merged_shortcut": True}, {"dilation": (2, 2), "padding": (2, 2)},
])
def test_supports_accepts(change):
    """Configurations the kernel handles are refused only for want of a GPU or build here."""
    assert cuda_backend.supports("conv_bias_act", dict(_CONFIG, **change)) == cuda_backend.available()


def test_supports_judges_the_tensors_gpu_not_the_current_one(monkeypatch):
    """A machine with an sm_70 and an sm_90 GPU: x on the sm_90 runs whichever device is current,
    x on the sm_70 is refused (the binding would raise); availability says usable on some GPU."""
    old_gpu = "the cuda backend needs compute capability 8.0 or newer; this GPU is 7.0"
    monkeypatch.setattr(cuda_backend, "_extension", lambda: (object(), None))
    monkeypatch.setattr(cuda_backend, "_device_reason", lambda index: old_gpu if index == 0 else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for current in (0, 1):
        monkeypatch.setattr(torch.cuda, "current_device", lambda current=current: current)
        assert cuda_backend.available() is None
        assert cuda_backend.supports("conv_bias_act", dict(_CONFIG, device=torch.device("cuda", 1))) is None
        assert cuda_backend.supports("conv_bias_act", dict(_CONFIG, device=torch.device("cuda", 0))) == old_gpu
        on_current = cuda_backend.supports("conv_bias_act", dict(_CONFIG, device=torch.device("cuda")))
        assert on_current == (old_gpu if current == 0 else None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cuda_backend.available() == old_gpu


# --------------------------------------------------------------------------- binding checks
@needs_ext
def test_binding_rejects_cpu_tensors():
    case = CASES[2]
    inputs = make_inputs(case, torch.float16, "cpu", False, seed=0)
    with pytest.raises(RuntimeError, match="expected CUDA tensor for x"):
        EXT.conv_bias_act(**inputs)
    with pytest.raises(RuntimeError, match="expected CUDA tensor for x"):
        cuda_backend.conv_bias_act(**inputs)


def _bad_inputs(device):
    """(case, base arguments, [(name, argument changes, expected message)]) for the binding's input checks."""
    case = Case("base", 2, 16, 6, 32, residual="same", shortcut_channels=8)
    base = make_inputs(case, torch.float16, device, False, seed=1)
    return case, base, [
        ("fp32", {"x": base["x"].float(), "weight": base["weight"].float()}, "expected float16 or bfloat16"),
        ("weight_dtype", {"weight": base["weight"].bfloat16()}, "weight has dtype"),
        ("channels", {"weight": base["weight"][:, :8]}, "expects 8 input channels"),
        ("weight_rank", {"weight": base["weight"][:, :, 0]}, "expected a 4-D tensor for weight"),
        ("bias_dtype", {"bias": base["bias"].half()}, "expected float32 bias"),
        ("bias_shape", {"bias": base["bias"][:16]}, "expected bias of shape"),
        ("residual_size", {"residual": base["residual"][:, :, :5]}, "residual of shape"),
        ("residual_channels", {"residual": torch.cat([base["residual"], base["residual"]], 1)}, "fall outside"),
        ("shortcut_pair", {"shortcut_weight": None}, "go together"),
        ("shortcut_weight", {"shortcut_weight": base["shortcut_weight"][:16]}, "expected shortcut_weight of shape"),
        ("shortcut_size", {"shortcut_x": base["shortcut_x"][:, :, :4]}, "shortcut_x of shape"),
    ]


@needs_ext
@pytest.mark.parametrize("index", range(11))
def test_emulator_input_checks(index):
    """The binding's checks, through the host emulator (same checks, CPU tensors)."""
    case, base, bad = _bad_inputs("cpu")
    name, change, expected = bad[index]
    with pytest.raises(RuntimeError, match=expected):
        EXT._emulate_conv_bias_act(**dict(base, **change))


@needs_ext
def test_emulator_kernel_larger_than_input():
    x = torch.zeros(1, 8, 3, 3, dtype=torch.float16)
    weight = torch.zeros(8, 8, 4, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        EXT._emulate_conv_bias_act(x, weight, None, (2, 2), (0, 0), (1, 1), 1, None, 1, 0, None, None, 1, False)


@needs_ext
def test_emulator_output_checks():
    case = CASES[2]
    inputs = make_inputs(case, torch.float16, "cpu", False, seed=2)
    wrong_shape = torch.empty(case.batch, case.out_channels, 3, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="expected out of shape"):
        EXT._emulate_conv_bias_act(**inputs, out=wrong_shape)
    with pytest.raises(RuntimeError, match="out has dtype"):
        EXT._emulate_conv_bias_act(**inputs, out=poisoned_output(case, inputs).bfloat16())


# --------------------------------------------------------------------------- host emulation of the kernel
def _emulate(**args):
    return EXT._emulate_conv_bias_act(**args)


@needs_ext
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_kernel_matches_reference(case, dtype, channels_last, pipeline):
    check_case(_emulate, case, dtype, "cpu", channels_last, seed=zlib.crc32(case.name.encode()), pipeline=pipeline)


@needs_ext
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[11], CASES[13]], ids=str)
def test_emulated_tile_shapes(case, tile, pipeline):
    check_case(_emulate, case, torch.float16, "cpu", True, seed=7, tile=tile, pipeline=pipeline)


ASYNC_CASES = [c for c in CASES if c.in_channels % (8 * c.groups) == 0 and c.shortcut_channels % 8 == 0]


def test_cp_async_covers_most_cases():
    """The auto pipeline takes cp.async for these (16-byte operands); the rest run the register loop."""
    assert {c.name for c in CASES} - {c.name for c in ASYNC_CASES} == {
        "7x7_stem_3ch", "groups32x4", "groups32x4_stride2", "channels_20_to_36", "merged_projection_odd"}


@needs_ext
@pytest.mark.parametrize("case", ASYNC_CASES, ids=str)
def test_emulated_cp_async_forced(case):
    check_case(_emulate, case, torch.bfloat16, "cpu", True, seed=17, pipeline=CP_ASYNC)


@needs_ext
@pytest.mark.parametrize("case", [CASES[4], CASES[9], CASES[13]], ids=str)
def test_cp_async_refuses_operands_it_cannot_move(case):
    inputs = make_inputs(case, torch.float16, "cpu", True, seed=18)
    with pytest.raises(RuntimeError, match="pipeline 2 .cp.async. moves 16-byte chunks only"):
        EXT._emulate_conv_bias_act(**inputs, pipeline=CP_ASYNC)
    with pytest.raises(RuntimeError, match="pipeline must be"):
        EXT._emulate_conv_bias_act(**inputs, pipeline=5)


@needs_ext
@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=str)
def test_emulated_wmma_pipeline_picks_its_main_loop(case):
    """pipeline 4 runs where cp.async cannot (CASES[4]) as well as where it can."""
    check_case(_emulate, case, torch.float16, "cpu", True, seed=27, pipeline=WMMA)


# --------------------------------------------------------------------------- which kernel: TMA + wgmma on sm_90
def _cutlass_built() -> bool:
    return EXT is not None and EXT.build_info()["tma_wgmma"] is not None


def _refusal(case, channels_last=True, compute_capability=90, sm90a_image=True, **change) -> str:
    args = dict(make_inputs(case, torch.float16, "cpu", channels_last, seed=21), **change)
    return EXT._tma_wgmma_refusal(**args, compute_capability=compute_capability, sm90a_image=sm90a_image)


# What the CUTLASS kernel runs on Hopper (auto picks it there); the GPU tests force it on these.
TMA_CASES = [c for c in CASES + RESNET_CASES if c.name in {
    "1x1", "1x1_stride2", "3x3", "3x3_stride2_13x13", "3x3_dilation2", "residual", "13x13_batch1",
    "3x3_on_1x1_map", "1x1_on_1x1_map_residual",
    "layer1_conv1", "layer1_conv2", "layer1.1_conv3_residual", "layer2.0_conv2_stride2", "layer3_conv2",
    "layer3_conv3_residual"}]


@needs_ext
def test_tma_wgmma_takes_the_hot_path():
    """Exactly these cases (1x1/3x3, groups 1, bias + ReLU, identity residual or none) go to the CUTLASS kernel."""
    if not _cutlass_built():
        pytest.skip("built without CUTLASS headers")
    accepted = {c.name for c in CASES + RESNET_CASES if _refusal(c) == ""}
    assert accepted == {c.name for c in TMA_CASES}


@needs_ext
@pytest.mark.parametrize("name, kwargs, expected", [
    ("hopper", {}, ""),
    ("ampere", {"compute_capability": 80}, "needs an sm_90 GPU"),
    ("blackwell", {"compute_capability": 100}, "needs an sm_90 GPU"),
    # built for plain sm_90 (no "a"), CUTLASS's kernel body is a printf: it must never be chosen
    ("plain_sm90_build", {"sm90a_image": False}, "no sm_90a image"),
    ("stride_9", {"stride": [9, 9]}, "strides of at most 8"),  # TMA im2col's traversal stride limit
    ("nchw", {"channels_last": False}, "output must be dense channels_last"),
    ("groups", {"case": "groups32x8"}, "grouped convolutions"),
    ("projection", {"case": "merged_projection"}, "merged projection"),
    ("option_a", {"case": "option_a_residual"}, "residual must be a dense channels_last"),
    ("no_relu", {"case": "no_bias_no_relu"}, "ends in a ReLU"),
    ("no_bias", {"bias": None}, "needs a bias"),
    ("channels", {"case": "channels_20_to_36"}, "multiples of 8"),
    ("nchw_residual", {"case": "residual", "residual_layout": torch.contiguous_format},
     "residual must be a dense channels_last"),
])
def test_tma_wgmma_refusals(name, kwargs, expected):
    """The choice is host code: tested here in words, on CPU tensors."""
    if not _cutlass_built():
        assert "without CUTLASS" in _refusal(CASES[2])
        pytest.skip("built without CUTLASS headers")
    by_name = {c.name: c for c in CASES}
    case = by_name[kwargs.pop("case", "3x3")]
    layout = kwargs.pop("residual_layout", None)
    change = {}
    for name in ("bias", "stride"):
        if name in kwargs:
            change[name] = kwargs.pop(name)
    if layout is not None:
        residual = make_inputs(case, torch.float16, "cpu", True, seed=21)["residual"]
        change["residual"] = residual.contiguous(memory_format=layout)
    refusal = _refusal(case, **kwargs, **change)
    assert (refusal == "") if expected == "" else (expected in refusal), refusal


def _views_of_one_buffer(*likes, shift: int = 0):
    """Tensors shaped, typed and laid out like ``likes``, all over one byte buffer (the later ones
    ``shift`` bytes further in): memory that a kernel's input and its output would share."""
    nbytes = max(t.numel() * t.element_size() for t in likes) + shift * len(likes) + 16
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    views = []
    for index, like in enumerate(likes):
        start = shift * index
        flat = buffer[start:start + like.numel() * like.element_size()].view(like.dtype)
        if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
            view = flat.view(like.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2)
        else:
            view = flat.view(like.shape)
        views.append(view)
    return views


@needs_ext
@pytest.mark.parametrize("aliased", ["x", "weight", "bias", "shortcut_x", "shortcut_weight", "residual"])
def test_an_output_sharing_memory_with_an_input_is_refused(aliased):
    """Blocks read inputs while others write `out`: an `out` over an input would race on a GPU (the
    emulator, one block at a time, could not show it), so the binding refuses it on every target.
    The residual may only be `out` exactly (see below): shifted by one element it is refused too."""
    name = {"shortcut_x": "merged_projection", "shortcut_weight": "merged_projection",
            "residual": "residual"}.get(aliased, "1x1")
    case = next(c for c in CASES if c.name == name)
    args = make_inputs(case, torch.float16, "cpu", True, seed=23)
    out_like = poisoned_output(case, args)
    shift = args[aliased].element_size() if aliased == "residual" else 0
    out, args[aliased] = _views_of_one_buffer(out_like, args[aliased], shift=shift)
    with pytest.raises(RuntimeError, match="single memory location|shares memory with the residual"):
        _emulate(**args, out=out)


@needs_ext
@pytest.mark.parametrize("view", ["gapped_residual", "channel_slice_of_out"])
def test_an_output_over_a_residual_view_with_gaps_is_refused(view):
    """ATen cannot decide overlap for a residual with gaps ("too hard"): one that shares out's
    storage without being out itself is refused (it read channels other blocks had written)."""
    x = torch.randn(2, 16, 4, 4, dtype=torch.float16)
    weight = torch.randn(16, 16, 3, 3, dtype=torch.float16)
    bias = torch.randn(16)
    if view == "gapped_residual":  # every 8th column skipped, read at stride 2; out inside the same bytes
        buf = torch.randn(2 * 16 * 8 * 8, dtype=torch.float16)
        residual, residual_stride, offset = buf.view(2, 16, 8, 8)[:, :, :, :7], 2, 0
        out = buf[: 2 * 16 * 4 * 4].view(2, 16, 4, 4)
    else:  # the residual is the first 8 channels of out, mapped 4 channels up (option A's layout)
        out = torch.randn(2, 16, 4, 4, dtype=torch.float16)
        residual, residual_stride, offset = out[:, :8], 1, 4
    with pytest.raises(RuntimeError, match="shares memory with the residual"):
        EXT._emulate_conv_bias_act(x, weight, bias, (1, 1), (1, 1), (1, 1), 1, residual, residual_stride, offset,
                                   None, None, 1, False, out=out)


@needs_ext
def test_the_residual_may_be_the_output_itself():
    """Full overlap is fine: each element of the residual is read before that same element is written."""
    case = next(c for c in CASES if c.name == "residual")
    args = make_inputs(case, torch.float16, "cpu", True, seed=24)
    out = args["residual"].clone()  # the same values and layout, written in place
    result = _emulate(**dict(args, residual=out), out=out)
    assert result.data_ptr() == out.data_ptr()
    check_conv_bias_act(args, result)


@needs_ext
def test_tma_wgmma_refuses_unaligned_operands():
    if not _cutlass_built():
        pytest.skip("built without CUTLASS headers")
    args = make_inputs(CASES[2], torch.float16, "cpu", True, seed=22)
    assert "16-byte aligned" in EXT._tma_wgmma_refusal(**_misalign(args), compute_capability=90)
    offset_bias = torch.randn(args["bias"].numel() + 1)[1:]  # 4 bytes past an aligned start
    assert "16-byte aligned" in EXT._tma_wgmma_refusal(**dict(args, bias=offset_bias), compute_capability=90)


@needs_ext
def test_emulator_has_no_tma_wgmma():
    """Forced where it applies: no host emulation; forced where it does not: the reason, in words."""
    inputs = make_inputs(CASES[2], torch.float16, "cpu", True, seed=23)
    expected = "no host emulation" if _cutlass_built() else "built without CUTLASS"
    with pytest.raises(RuntimeError, match=expected):
        EXT._emulate_conv_bias_act(**inputs, pipeline=TMA_WGMMA)
    inputs = make_inputs(CASES[11], torch.float16, "cpu", True, seed=24)
    with pytest.raises(RuntimeError, match="cannot run this call: .*(residual must be|without CUTLASS)"):
        EXT._emulate_conv_bias_act(**inputs, pipeline=TMA_WGMMA)


@needs_ext
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[12]], ids=str)
def test_emulated_unaligned_inputs(case):
    """Inputs 2 bytes off 16-byte alignment take the element-wise gathers."""
    check_case(_emulate, case, torch.float16, "cpu", True, seed=3, prepare=_misalign)


def _misalign(args, ranks=(4,)):
    """The same values one element past a 16-byte boundary (2 bytes for 16-bit activations, 4 for
    fp32 vectors), layouts kept, for the tensors of the ranks given (activations by default)."""
    def shift(t):
        if not isinstance(t, torch.Tensor) or t.dim() not in ranks:
            return t
        channels_last = t.dim() == 4 and memory_format_of(t) == torch.channels_last
        perm = (0, 2, 3, 1) if channels_last else tuple(range(t.dim()))
        dense = t.permute(*perm).contiguous()
        flat = torch.empty(dense.numel() + 1, dtype=t.dtype, device=t.device)[1:]
        flat.copy_(dense.reshape(-1))
        inverse = [perm.index(i) for i in range(t.dim())]
        return flat.view(dense.shape).permute(*inverse)
    return {name: shift(value) for name, value in args.items()}


def _residual_views(inputs: dict, skip: int) -> list:
    """The residual as channel slices of wider tensors (strided views), both layouts."""
    r = inputs["residual"]
    views = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        wide = torch.randn(r.shape[0], r.shape[1] + skip + 1, *r.shape[2:]).to(r.dtype)
        wide = wide.to(r.device).contiguous(memory_format=fmt)
        view = wide[:, skip:skip + r.shape[1]]
        view.copy_(r)
        views.append(view)
    return views


def check_residual_views(run, device, skip: int):
    """Strided residual views: 8-channel vectors where aligned (skip 8), element-wise otherwise."""
    for case in (CASES[10], CASES[11]):
        inputs = make_inputs(case, torch.float16, device, True, seed=16)
        for view in _residual_views(inputs, skip):
            viewed = dict(inputs, residual=view)
            out = poisoned_output(case, viewed)
            run(**viewed, out=out)
            check_conv_bias_act(viewed, out, f"{case.name} out")


@needs_ext
@pytest.mark.parametrize("skip", [3, 8])
def test_emulated_residual_views(skip):
    check_residual_views(_emulate, "cpu", skip)


@needs_ext
def test_emulated_output_memory_format():
    for channels_last in (False, True):
        case = CASES[2]
        inputs = make_inputs(case, torch.float16, "cpu", channels_last, seed=4)
        result = EXT._emulate_conv_bias_act(**inputs)
        check_conv_bias_act(inputs, result)  # the output's memory format is x's


# --------------------------------------------------------------------------- on the GPU
def _launch(**args):
    return EXT.conv_bias_act(**args)


@needs_gpu
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_reference(case, dtype, channels_last, pipeline):
    check_case(_launch, case, dtype, "cuda", channels_last, seed=zlib.crc32(case.name.encode()), pipeline=pipeline)


@needs_gpu
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RESNET_CASES, ids=str)
def test_cuda_resnet_layers(case, dtype, pipeline):
    check_case(_launch, case, dtype, "cuda", True, seed=11, pipeline=pipeline)


@needs_gpu
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))
@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[11], CASES[12], RESNET_CASES[9]], ids=str)
def test_cuda_tile_shapes(case, tile, pipeline):
    check_case(_launch, case, torch.bfloat16, "cuda", True, seed=5, tile=tile, pipeline=pipeline)


@needs_gpu
@pytest.mark.parametrize("case", ASYNC_CASES, ids=str)
def test_cuda_cp_async_forced(case):
    check_case(_launch, case, torch.float16, "cuda", True, seed=19, pipeline=CP_ASYNC)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_cuda_wmma_pipeline_on_the_tma_cases(case, dtype):
    """The benchmarks' A/B partner of the TMA + wgmma kernel, on the cases that kernel takes on sm_90."""
    check_case(_launch, case, dtype, "cuda", True, seed=28, pipeline=WMMA)


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_cuda_tma_wgmma_forced(case, dtype):
    check_case(_launch, case, dtype, "cuda", True, seed=25, pipeline=TMA_WGMMA)


@needs_hopper
def test_cuda_tma_wgmma_forced_where_it_cannot_run():
    inputs = make_inputs(CASES[6], torch.float16, "cuda", True, seed=26)
    with pytest.raises(RuntimeError, match="cannot run this call: grouped"):
        EXT.conv_bias_act(**inputs, pipeline=TMA_WGMMA)


@needs_hopper
def test_cuda_tma_wgmma_graph_capture():
    """The CUTLASS launch (TMA descriptors built on the host, passed by value) replays in a graph."""
    case = next(c for c in TMA_CASES if c.name == "residual")
    inputs = make_inputs(case, torch.bfloat16, "cuda", True, seed=27)
    out = poisoned_output(case, inputs)
    EXT.conv_bias_act(**inputs, out=out, pipeline=TMA_WGMMA)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        EXT.conv_bias_act(**inputs, out=out, pipeline=TMA_WGMMA)
    fresh = make_inputs(case, torch.bfloat16, "cuda", True, seed=28)
    for name in ("x", "weight", "bias", "residual"):
        inputs[name].copy_(fresh[name])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_conv_bias_act(fresh, out, "graph out")


@needs_gpu
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[12]], ids=str)
def test_cuda_unaligned_inputs(case):
    check_case(_launch, case, torch.float16, "cuda", True, seed=6, prepare=_misalign)


@needs_gpu
@pytest.mark.parametrize("skip", [3, 8])
def test_cuda_residual_views(skip):
    check_residual_views(_launch, "cuda", skip)


@needs_gpu
def test_cuda_mixed_layouts():
    """channels_last x with an NCHW residual and NCHW weights: residual and output go by strides."""
    case = CASES[10]
    inputs = make_inputs(case, torch.float16, "cuda", True, seed=8)
    inputs = dict(inputs, residual=inputs["residual"].contiguous(), weight=inputs["weight"].contiguous())
    result = EXT.conv_bias_act(**inputs)
    assert memory_format_of(result) == torch.channels_last
    check_conv_bias_act(inputs, result)


@needs_gpu
@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_cuda_output_memory_format(channels_last):
    case = CASES[2]
    inputs = make_inputs(case, torch.float16, "cuda", channels_last, seed=9)
    result = cuda_backend.conv_bias_act(**inputs)
    assert result.is_cuda and result.dtype == torch.float16
    assert memory_format_of(result) == memory_format_of(inputs["x"])


@needs_gpu
@pytest.mark.parametrize("index", range(11))
def test_cuda_input_checks(index):
    case, base, bad = _bad_inputs("cuda")
    name, change, expected = bad[index]
    with pytest.raises(RuntimeError, match=expected):
        EXT.conv_bias_act(**dict(base, **change))


@needs_gpu
def test_cuda_rejects_mixed_devices():
    case = CASES[2]
    inputs = make_inputs(case, torch.float16, "cuda", False, seed=10)
    with pytest.raises(RuntimeError, match="expected CUDA tensor for weight"):
        EXT.conv_bias_act(**dict(inputs, weight=inputs["weight"].cpu()))


@needs_gpu
def test_cuda_current_stream():
    """The launch goes on the caller's current stream."""
    case = RESNET_CASES[2]
    inputs = make_inputs(case, torch.float16, "cuda", True, seed=12)
    expected = EXT.conv_bias_act(**inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = poisoned_output(case, inputs)
        result = EXT.conv_bias_act(**inputs, out=out)
    stream.synchronize()
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("tile", [0, TILES["large"]], ids=["auto", "large"])
def test_cuda_graph_capture(tile):
    """Capturable: the captured launch replays with new inputs written in place. The large tile's
    cp.async loop opts in to 60 KB of shared memory on every launch, inside the capture too."""
    case = CASES[12]
    inputs = make_inputs(case, torch.float16, "cuda", True, seed=13)
    out = poisoned_output(case, inputs)
    EXT.conv_bias_act(**inputs, out=out, tile=tile)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        EXT.conv_bias_act(**inputs, out=out, tile=tile)
    fresh = make_inputs(case, torch.float16, "cuda", True, seed=14)
    for name in ("x", "weight", "bias", "shortcut_x", "shortcut_weight"):
        inputs[name].copy_(fresh[name])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_conv_bias_act(fresh, out, "graph out")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_layer_forced_to_cuda(dtype):
    """fused_resblock.ops.conv_bias_act(backend="cuda") runs this backend end to end."""
    case = CASES[11]
    inputs = make_inputs(case, dtype, "cuda", True, seed=15)
    result = fused_resblock.ops.conv_bias_act(
        inputs["x"], inputs["weight"], inputs["bias"], stride=case.stride, padding=case.padding,
        residual=inputs["residual"], residual_stride=inputs["residual_stride"],
        residual_offset=inputs["residual_offset"], relu=case.relu, backend="cuda")
    check_conv_bias_act(inputs, result, "op out")


@needs_gpu
def test_auto_measures_triton_against_cuda(tmp_path, monkeypatch):
    """Both backends capable: auto times them once for the shape, keeps the winner in the cache file."""
    import json

    from fused_resblock import backends
    from fused_resblock.backends import triton as triton_backend
    from helpers import measure_backends_afresh

    if triton_backend.available() is not None:
        pytest.skip(f"needs the triton backend too: {triton_backend.available()}")
    cache_file = measure_backends_afresh(monkeypatch, tmp_path)
    case = CASES[11]
    inputs = make_inputs(case, torch.float16, "cuda", True, seed=16)
    for _ in range(2):  # measured on the first call, remembered for the second
        result = fused_resblock.ops.conv_bias_act(
            inputs["x"], inputs["weight"], inputs["bias"], stride=case.stride, padding=case.padding,
            residual=inputs["residual"], residual_stride=inputs["residual_stride"],
            residual_offset=inputs["residual_offset"], relu=case.relu, backend="auto")
        check_conv_bias_act(inputs, result, "auto out")
    entries = json.loads(cache_file.read_text())["entries"]
    assert len(entries) == 1 and set(entries.values()) <= {"triton", "cuda"}, entries
    backends.clear_caches()


def test_pipeline_from_environment(monkeypatch):
    for name, value in cuda_backend.PIPELINES.items():
        monkeypatch.setenv(cuda_backend.PIPELINE_ENV, name)
        assert cuda_backend._pipeline_from_env() == value
    monkeypatch.setenv(cuda_backend.PIPELINE_ENV, "wgmma")
    with pytest.raises(ValueError, match="FUSED_RESBLOCK_CUDA_PIPELINE"):
        cuda_backend._pipeline_from_env()


def test_forced_pipeline_is_scoped():
    before = cuda_backend.PIPELINE
    with cuda_backend.forced_pipeline("wmma"):
        assert cuda_backend.PIPELINE == WMMA
        with pytest.raises(ValueError, match="expected one of auto, registers"):
            with cuda_backend.forced_pipeline("wgmma"):
                pass
        assert cuda_backend.PIPELINE == WMMA
    assert cuda_backend.PIPELINE == before


@needs_gpu
@pytest.mark.parametrize("name", ["registers", "cp_async"])
def test_backend_forced_pipeline(name, monkeypatch):
    """The backend's module-level knob reaches the kernel: both loops give the same answer class."""
    monkeypatch.setattr(cuda_backend, "PIPELINE", cuda_backend.PIPELINES[name])
    case = RESNET_CASES[7]
    inputs = make_inputs(case, torch.bfloat16, "cuda", True, seed=20)
    check_conv_bias_act(inputs, cuda_backend.conv_bias_act(**inputs), f"{name} out")
