"""Eval-mode blocks and whole models on the cuda backend (forced), on a GPU.

The triton backend's eval block and model tests (test_triton_blocks.py), again
through the CUDA extension's kernels: every block kind, fp16 and bf16, both
memory formats, realistic map sizes, and whole torchvision-shaped models at
224×224 (32×32 for CIFAR), each against float64 and PyTorch at the same dtype
by the numerical rule; and fine-tuning through frozen BN (the eval backward's
dgrad and wgrad kernels). Skipped where the extension cannot run (no GPU, no build).
"""
import copy

import pytest
import torch

from fused_resblock import models
from fused_resblock.backends import cuda as cuda_backend
from fused_resblock.testing import assert_equivalent
from helpers import check_eval_against_torch, freeze_norms, randomize_norms
from test_equivalence import BLOCKS

import fused_resblock as frb

REASON = cuda_backend.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"cuda backend unavailable: {REASON}")

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
LAYOUTS = [pytest.param(torch.channels_last, id="channels_last"), pytest.param(torch.contiguous_format, id="nchw")]
EVAL_BLOCKS = ["basic", "basic-down", "basic-conv-bias", "bottleneck-down", "bottleneck-groups",
               "bottleneck-dilation", "cifar-A", "cifar-B", "cifar-C", "cifar-plain", "plain"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", EVAL_BLOCKS)
def test_block_eval_on_cuda(name, dtype, layout):
    block = randomize_norms(BLOCKS[name]())
    x = torch.randn(4, block.conv1.in_channels, 28, 28).contiguous(memory_format=layout)
    check_eval_against_torch(block, x, dtype, "cuda", "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, size", [("resnet18", 224), ("resnet50", 224), ("resnext50_32x4d", 224),
                                        ("wide_resnet50_2", 224), ("cifar_resnet56", 32)])
def test_whole_model_eval_on_cuda(name, size, dtype):
    model = frb.revert(randomize_norms(getattr(models, name)(num_classes=10)))
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    check_eval_against_torch(model, x, dtype, "cuda", "cuda")


@pytest.mark.parametrize("name", ["basic", "basic-down", "bottleneck-down", "bottleneck-groups", "cifar-A", "cifar-B",
                                  "plain"])
def test_frozen_norm_eval_backward_on_cuda(name, recwarn):
    """Fine-tuning convs through frozen, folded BN in fp16: forward and backward on the extension's
    kernels (forced: a missing kernel raises), every gradient by the module check."""
    reference = freeze_norms(randomize_norms(BLOCKS[name]())).to("cuda", torch.float16)
    fused = frb.convert(copy.deepcopy(reference), backend="cuda")
    x = torch.randn(4, reference.conv1.in_channels, 14, 14, device="cuda", dtype=torch.float16)
    assert_equivalent(fused, reference, x.contiguous(memory_format=torch.channels_last), train=False)
    assert not [w for w in recwarn if issubclass(w.category, frb.FusedResblockFallbackWarning)]
