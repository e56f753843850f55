"""Whole fused blocks and a small model in eval mode on the triton backend (interpreter on CPU).

Every conv of a block is one Triton launch: BasicBlock 2, Bottleneck 3 with its
downsample merged into the last GEMM, and nothing else runs between them.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as torchvision_resnet

import fused_resblock as frb
from fused_resblock import models, ops
from fused_resblock.testing import assert_equivalent, check_rule
from helpers import check_eval_against_torch, freeze_norms, randomize_norms
from test_equivalence import BLOCKS, _check_bias_before_batch_norm

triton_backend = pytest.importorskip("fused_resblock.backends.triton")
if triton_backend.available() is not None:
    pytest.skip(f"triton backend unavailable: {triton_backend.available()}", allow_module_level=True)
from fused_resblock.backends.triton import conv_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EVAL_BLOCKS = ["basic", "basic-down", "basic-conv-bias", "bottleneck-down", "bottleneck-groups",
               "bottleneck-dilation", "cifar-A", "cifar-B", "cifar-C", "cifar-plain", "plain"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv_fwd, "POISON_OUTPUT", True)


def _eval_check(reference_model, x, dtype):
    """Fused (triton, forced) against float64 and against PyTorch at ``dtype``, by the rule."""
    return check_eval_against_torch(reference_model, x, dtype, "triton", DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", EVAL_BLOCKS)
def test_block_eval_on_triton(name, dtype):
    block = randomize_norms(BLOCKS[name]())
    x = torch.randn(2, block.conv1.in_channels, 7, 7)
    _eval_check(block, x, dtype)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_block_keeps_memory_format(fmt):
    block = randomize_norms(BLOCKS["bottleneck-down"]())
    x = torch.randn(3, 8, 13, 13).contiguous(memory_format=fmt)
    out = _eval_check(block, x, torch.float32)
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name, shape", [("cifar_resnet20", (2, 3, 16, 16)), ("resnet18", (1, 3, 32, 32)),
                                         ("resnext50_32x4d", (1, 3, 32, 32))])
def test_small_whole_model_eval_on_triton(name, shape):
    model = frb.revert(randomize_norms(getattr(models, name)(num_classes=10)))
    _eval_check(model, torch.randn(*shape), torch.float32)


class _OpLog(TorchDispatchMode):
    """The ops a forward dispatches, with our fused op as one entry: eager inference calls its
    function directly (no dispatcher), so what runs inside it is not logged, as inside a custom op."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops, self.inside = [], 0
        real = ops._conv_bias_act_impl

        def fused_op(*args):
            self.ops.append("fused_resblock.conv_bias_act.default")
            self.inside += 1
            try:
                return real(*args)
            finally:
                self.inside -= 1
        monkeypatch.setattr(ops, "_conv_bias_act_impl", fused_op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _LaunchCounter:
    """Stands in for the jitted kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("name, launches", [("basic", 2), ("basic-down", 2), ("bottleneck-down", 3), ("cifar-A", 2)])
def test_eval_block_launch_count(name, launches, monkeypatch):
    block = frb.convert(randomize_norms(BLOCKS[name]()).to(DEVICE), backend="triton").eval()
    x = torch.randn(2, block.conv1.in_channels, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        block(x)  # the first call folds BN (cached) and picks tile configs
        counter = _LaunchCounter(conv_fwd._conv_bias_act_kernel)
        monkeypatch.setattr(conv_fwd, "_conv_bias_act_kernel", counter)
        with _OpLog(monkeypatch) as log:
            block(x)
    assert counter.count == launches
    assert log.ops == ["fused_resblock.conv_bias_act.default"] * launches  # nothing else runs around them


# --------------------------------------------------------------------------- training
TRAIN_BLOCKS = ["basic", "basic-down", "bottleneck-down", "bottleneck-groups", "bottleneck-dilation", "cifar-A", "cifar-B",
                "cifar-C", "cifar-plain", "basic-conv-bias"]


def _triton_pair(name, dtype):
    reference = randomize_norms(BLOCKS[name]()).to(DEVICE, dtype)
    fused = frb.convert(copy.deepcopy(reference), backend="triton")
    return fused, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", TRAIN_BLOCKS)
def test_block_train_forward_backward_on_triton(name, dtype):
    """Output, input gradient, every parameter gradient and the BN buffers, by the rule."""
    fused, reference = _triton_pair(name, dtype)
    x = torch.randn(3, reference.conv1.in_channels, 7, 7, device=DEVICE, dtype=dtype)
    if name == "basic-conv-bias":  # conv biases before a train-mode BN: gradient exactly 0
        _check_bias_before_batch_norm(fused, reference, x)
    else:
        assert_equivalent(fused, reference, x, train=True)


def test_empty_batch_train_backward_on_triton():
    """Sums over no elements: every BN gradient is 0, as PyTorch's (the empty batch's NaN invstd
    must not reach them), and the buffers match."""
    fused, reference = _triton_pair("bottleneck-down", torch.float32)
    x = torch.randn(0, reference.conv1.in_channels, 7, 7, device=DEVICE, requires_grad=True)
    for m in (fused, reference):
        m.train()(x).sum().backward()
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for (name, a), b in zip(reference.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, equal_nan=True, msg=name)


def test_input_errors_on_triton_are_torchvision_errors():
    """An input smaller than the kernel, a shortcut of the wrong shape: a RuntimeError, as
    torchvision raises (InputShapeError is one), before any kernel launches."""
    too_small, _ = _triton_pair("basic", torch.float32)
    strided = frb.convert(torchvision_resnet.BasicBlock(8, 8, stride=2), backend="triton").to(DEVICE)
    for block, x, match in ((too_small, torch.randn(2, 8, 0, 4, device=DEVICE), "smaller than the"),
                            (strided, torch.randn(2, 8, 6, 6, device=DEVICE), "does not match")):
        for mode in (False, True):
            with pytest.raises(ops.InputShapeError, match=match):
                block.train(mode)(x)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_eval_train_switching_on_triton(momentum):
    fused, reference = _triton_pair("bottleneck-down", torch.float32)
    for m in (*fused.modules(), *reference.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    for _ in range(3):
        x = torch.randn(2, 8, 9, 9, device=DEVICE)
        assert_equivalent(fused, reference, x, train=True)
        fused.eval(), reference.eval()
        with torch.no_grad():
            report = check_rule("eval out", fused(x), copy.deepcopy(reference).double()(x.double()), reference(x))
        assert report.passed, str(report)
    assert int(fused.bn1.num_batches_tracked) == 3
    for (name, a), b in zip(fused.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name, shape", [("cifar_resnet20", (2, 3, 16, 16)), ("resnet18", (2, 3, 48, 48))])
def test_small_whole_model_train_on_triton(name, shape):
    fused = randomize_norms(getattr(models, name)(num_classes=10, backend="triton")).to(DEVICE)
    reference = frb.revert(copy.deepcopy(fused))
    assert_equivalent(fused, reference, torch.randn(*shape, device=DEVICE), train=True)


# --------------------------------------------------------------------------- eval-mode backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["basic", "bottleneck-down", "bottleneck-groups", "cifar-A", "cifar-B", "plain"])
def test_frozen_norm_eval_backward_on_triton(name, dtype, recwarn):
    """Fine-tuning convs through frozen, folded BN: forward and backward on triton kernels, no fallback."""
    reference = freeze_norms(randomize_norms(BLOCKS[name]())).to(DEVICE, dtype)
    fused = frb.convert(copy.deepcopy(reference), backend="triton")
    x = torch.randn(2, reference.conv1.in_channels, 7, 7, device=DEVICE, dtype=dtype)
    assert_equivalent(fused, reference, x, train=False)
    assert not [w for w in recwarn if issubclass(w.category, frb.FusedResblockFallbackWarning)]


# --------------------------------------------------------------------------- double backward
@pytest.mark.skipif(DEVICE != "cuda", reason="auto runs the Triton kernels on a GPU only (on the CPU: the reference)")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_double_backward_after_kernels_ran_the_forward(train):
    """auto on a GPU: Triton kernels run the forward; a create_graph=True backward recomputes each op
    with the reference ops, warns once, and matches float64 (a gradient penalty's gradients)."""
    from fused_resblock import _warnings
    from test_equivalence import _gradient_penalty_grads

    reference = randomize_norms(BLOCKS["basic-down"]()).to(DEVICE).train(train)
    fused = frb.convert(copy.deepcopy(reference))
    truth = copy.deepcopy(reference).double()
    x = torch.randn(2, reference.conv1.in_channels, 8, 8, device=DEVICE)
    _warnings.reset()
    with pytest.warns(frb.FusedResblockFallbackWarning, match="double backward"):
        ours = _gradient_penalty_grads(fused, x, list(fused.parameters()))
    expected = _gradient_penalty_grads(truth, x.double(), list(truth.parameters()))
    for a, b in zip(ours, expected):  # loose: a ReLU kink may flip between fp32 paths (TF32 in torch)
        scale = float(b.abs().max())
        assert float((a.double() - b).abs().max()) <= 0.05 * scale, (float((a.double() - b).abs().max()), scale)
