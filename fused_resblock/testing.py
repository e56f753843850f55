"""The numerical rule, as a helper for your own equivalence tests.

A fused result passes when its error against a float64 reference is at most
twice PyTorch's own error at the same dtype plus a small floor:

    err(fused) <= 2 * err(torch) + floor,   err = max |out - ref|

with ``floor = rtol_floor[dtype] * max|ref|`` (1e-6 for float32, 1e-3 for
float16/bfloat16, 1e-12 for float64). This is flash-attention's rule: it
scales with the precision actually at hand and no real bug slips under it.

    from fused_resblock.testing import assert_rule
    assert_rule("out", fused_out, ref_out_float64, torch_out_same_dtype)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
}


@dataclass
class RuleReport:
    """What one check found: both errors, the bound and where the worst error sits."""

    name: str
    dtype: torch.dtype
    err: float
    torch_err: float
    floor: float
    worst_index: tuple
    fused_value: float
    ref_value: float

    @property
    def bound(self) -> float:
        return 2.0 * self.torch_err + self.floor

    @property
    def passed(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.name} [{str(self.dtype).replace('torch.', '')}]: err {self.err:.3e} "
            f"(torch {self.torch_err:.3e}, bound {self.bound:.3e}) {verdict}; worst at "
            f"{self.worst_index}: got {self.fused_value:.6g}, ref {self.ref_value:.6g}"
        )


def _max_abs_err(out: Tensor, ref: Tensor):
    diff = (out.detach().to("cpu", torch.float64) - ref).abs()
    # A NaN anywhere is an infinite error (an unwritten, poisoned element).
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return 0.0, ()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), index


def check_rule(name: str, out: Tensor, ref: Tensor, torch_out: Tensor,
               dtype: Optional[torch.dtype] = None) -> RuleReport:
    """Measure ``out`` against ``ref`` (any dtype; compared in float64 on the CPU).

    ``torch_out`` is PyTorch's own result at the dtype under test, ``dtype`` that
    dtype (default ``out.dtype``), which picks the floor.
    """
    if out.shape != ref.shape or torch_out.shape != ref.shape:
        raise ValueError(
            f"{name}: shapes differ: fused {tuple(out.shape)}, ref {tuple(ref.shape)}, "
            f"torch {tuple(torch_out.shape)}"
        )
    dtype = dtype or out.dtype
    ref64 = ref.detach().to("cpu", torch.float64)
    err, index = _max_abs_err(out, ref64)
    torch_err, _ = _max_abs_err(torch_out, ref64)
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    floor = FLOOR.get(dtype, 1e-6) * scale
    fused_value = float(out.detach().to("cpu", torch.float64)[index]) if index else 0.0
    ref_value = float(ref64[index]) if index else 0.0
    return RuleReport(name, dtype, err, torch_err, floor, index, fused_value, ref_value)


def assert_rule(name: str, out: Tensor, ref: Tensor, torch_out: Tensor,
                dtype: Optional[torch.dtype] = None) -> RuleReport:
    """``check_rule`` that raises AssertionError (with both errors and the worst index) on failure."""
    report = check_rule(name, out, ref, torch_out, dtype)
    if not report.passed:
        raise AssertionError(str(report))
    return report
