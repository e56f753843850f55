"""CPU-side costs on the hot path, measured with pytest-benchmark.

No timing assertions: these record numbers (``pytest --benchmark-only`` or the
plain run's table) and prove the paths run. Few rounds keep them quick in CI;
with ``--benchmark-disable`` each body runs once.
"""
import pytest
import torch

import fused_resblock as frb

pytest.importorskip("pytest_benchmark")


def test_eval_block_dispatch_overhead(benchmark):
    """One eval FusedBasicBlock on the reference backend at a tiny shape: dispatch + launch, not math."""
    block = frb.set_backend(frb.FusedBasicBlock(8, 8).eval(), "reference")
    x = torch.randn(1, 8, 8, 8)

    def forward():
        with torch.no_grad():
            return block(x)

    out = benchmark.pedantic(forward, rounds=20, iterations=10, warmup_rounds=2)
    assert out.shape == x.shape


def test_fold_cache_hit(benchmark):
    """A folding-cache hit: unchanged parameters and buffers give back the cached (weight, bias)."""
    model = frb.models.resnet18().eval()
    block = model.layer1[0]
    assert isinstance(block, frb.FusedBasicBlock)

    def fold():
        with torch.no_grad():  # with grad enabled and trainable weights the fold is recomputed, by design
            return block.fold_cache.fold(block.conv1, block.bn1, torch.float32)

    first = fold()
    again = benchmark.pedantic(fold, rounds=20, iterations=50, warmup_rounds=1)
    assert again is first  # a hit, not a recomputation


def test_convert_resnet50(benchmark):
    """frb.convert() on a torchvision ResNet-50 (reverted before each round, so every round converts)."""
    import torchvision

    model = torchvision.models.resnet50()

    def unfused():
        return (frb.revert(model),), {}

    converted = benchmark.pedantic(frb.convert, setup=unfused, rounds=5, iterations=1)
    assert converted is model and isinstance(model.layer1[0], frb.FusedBottleneck)
