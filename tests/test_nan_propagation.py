"""A NaN goes where PyTorch sends it: through every fused ReLU forward, and its gradient through the
ReLU backward (torch zeroes the gradient only where the output is <= 0).

An fp16 overflow upstream must show as NaN downstream, as in the unfused model: a ReLU that maps
NaN to 0 would hide it behind finite outputs and losses. Each backend against torch's own ReLU,
under the interpreter on the CPU (the comparison is of NaN positions, so fp32 is enough).
"""
import pytest
import torch

from fused_resblock import backends
from helpers import ON_GPU

DEVICE = "cuda" if ON_GPU else "cpu"
BACKENDS = ["reference", "triton"]


def _backend(name):
    reason = backends.get(name).available()
    if reason is not None:
        pytest.skip(reason)
    return backends.get(name)


def _with_nans(t: torch.Tensor, every: int = 7) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[::every] = float("nan")
    return t


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bias_act_relu_keeps_nan(backend):
    impl = _backend(backend)
    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 1, 1, device=DEVICE)  # 1x1: a NaN pixel stays one NaN pixel
    x[0, :, 2, 3] = float("nan")
    out = impl.conv_bias_act(x, w, torch.randn(8, device=DEVICE), (1, 1), (0, 0), (1, 1), 1,
                             None, 1, 0, None, None, 1, True)
    expected = torch.relu(torch.nn.functional.conv2d(x, w))
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_add_act_relu_keeps_nan(backend):
    impl = _backend(backend)
    y = _with_nans(torch.randn(2, 6, 4, 4, device=DEVICE))
    mean, invstd = torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    out = impl.bn_add_act(y, mean, invstd, None, None, None, None, None, None, None, 1, 0, True)
    assert torch.equal(out.isnan(), y.isnan()) and out.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_backward_passes_the_gradient_at_nan(backend):
    """Where the saved output is NaN, torch's ReLU backward passes the gradient; where <= 0, zero."""
    impl = _backend(backend)
    out = torch.randn(2, 8, 5, 5, device=DEVICE).relu().contiguous(memory_format=torch.channels_last)
    out[0, :, 1, 1] = float("nan")
    grad = torch.randn_like(out)
    y = out.clone()
    mean, invstd = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)  # out = relu(y) exactly
    gy = impl.bn_add_act_backward(grad, out, y, mean, invstd, None, None, None, None, None, 1, 0, True,
                                  [True] + [False] * 9)[0]
    expected = torch.where(out <= 0, torch.zeros_like(grad), grad)
    torch.testing.assert_close(gy, expected, equal_nan=True)
    assert gy[0, :, 1, 1].ne(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_relu_backward_passes_the_gradient_at_nan(backend):
    """The eval backward's ReLU mask (conv_bias_act_backward) follows torch's rule as well."""
    impl = _backend(backend)
    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 1, 1, device=DEVICE)
    out = torch.relu(torch.nn.functional.conv2d(x, w))
    out[1, :, 3, 0] = float("nan")
    grad = torch.randn_like(out)
    gx, gw = impl.conv_bias_act_backward(grad, out, x, w, False, (1, 1), (0, 0), (1, 1), 1,
                                         None, 1, 0, None, None, 1, True, [True, True] + [False] * 4)[:2]
    g = torch.where(out <= 0, torch.zeros_like(grad), grad)
    expected_gx, expected_gw, _ = torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    torch.testing.assert_close(gx, expected_gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, expected_gw, rtol=1e-4, atol=1e-4)
