"""One benchmark case: what runs (kind, target, mode, dtype, memory format, batch) and who runs it (impl).

Modes: ``infer`` (eval forward, no grad), ``train`` (a training step: forward, backward, SGD step)
and ``finetune`` (the same step in eval mode with every BN frozen: the convs trained through
folded BN, as a detection backbone with FrozenBatchNorm2d is fine-tuned).

Cases that differ only in ``impl`` and ``memory_format`` form a *group*: the
ratios in the results compare ours with every peer of the same group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("model", "block", "layer")
MODES = ("infer", "train", "finetune")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
OURS_PREFIX = "ours:"


@dataclass(frozen=True)
class Case:
    kind: str
    target: str
    mode: str
    dtype: str
    memory_format: str
    batch: int
    impl: str

    @property
    def id(self) -> str:
        return (f"{self.kind}:{self.target}:{self.mode}:{self.dtype}:{self.memory_format}:"
                f"b{self.batch}:{self.impl}")

    @property
    def group(self) -> str:
        return f"{self.kind}:{self.target}:{self.mode}:{self.dtype}:b{self.batch}"

    @property
    def peer_key(self) -> str:
        """How a row is named in the ratios of the other rows of its group."""
        return f"{self.impl}@{self.memory_format}"

    @property
    def is_ours(self) -> bool:
        return self.impl.startswith(OURS_PREFIX)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_format(self) -> torch.memory_format:
        return FORMATS[self.memory_format]

    @property
    def has_backward(self) -> bool:
        """A step with a backward and an optimizer step (train, finetune), not a forward alone."""
        return self.mode != "infer"

    @property
    def reduced_precision(self) -> bool:
        return self.dtype in ("bf16", "fp16")
