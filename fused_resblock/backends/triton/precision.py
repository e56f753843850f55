"""Which precision an fp32 convolution may use: PyTorch's own flag for cuDNN convolutions.

DESIGN's rule: an fp32 conv may run its products in TF32 exactly when PyTorch would
let cuDNN do so. Since torch 2.9 that flag has two spellings: the legacy
``torch.backends.cudnn.allow_tf32`` and the ``fp32_precision`` tree
(``torch.backends.cudnn.conv.fp32_precision``, inheriting from
``torch.backends.cudnn`` and ``torch.backends`` when it is "none"). Once a program
sets the new one, the legacy getter can raise, so the tree is read first.
"""
from __future__ import annotations

import torch


def conv_allows_tf32() -> bool:
    """True when PyTorch lets an fp32 convolution run in TF32 (cuDNN's conv flag)."""
    cudnn = torch.backends.cudnn
    for node in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        precision = getattr(node, "fp32_precision", "none") if node is not None else "none"
        if precision != "none":
            return precision == "tf32"
    return bool(cudnn.allow_tf32)  # torch before the fp32_precision API


def dot_input_precision(dtype: torch.dtype, interpreting: bool) -> str:
    """tl.dot's input_precision: TF32 for fp32 operands exactly when PyTorch's conv flag allows it.

    Only fp32 operands are affected; 16-bit operands get the compiler's default.
    The interpreter runs IEEE fp32 (numpy) whatever is asked.
    """
    if dtype != torch.float32:
        return "tf32"
    if interpreting or not conv_allows_tf32():
        return "ieee"
    return "tf32"
