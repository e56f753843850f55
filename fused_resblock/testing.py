"""The numerical rule, as a helper for your own equivalence tests.

A fused result passes when its error against a float64 reference is at most
twice PyTorch's own error at the same dtype plus a small floor:

    err(fused) <= 2 * err(torch) + floor,   err = max |out - ref|

with ``floor = FLOOR[dtype] * max|ref|`` (1e-6 for float32, 1e-3 for
float16/bfloat16). This is flash-attention's rule: it scales with the
precision actually at hand and no real bug slips under it. At float64 the
reference *is* PyTorch, so PyTorch's own error is 0 and the floor alone bounds
the result: 1e-10 leaves room for another summation order through a deep
network (BN backward amplifies it) and none for a bug.

    from fused_resblock.testing import assert_rule
    assert_rule("out", fused_out, ref_out_float64, torch_out_same_dtype)

Module comparisons (``equivalence_report``) handle ReLU kinks, where the
derivative follows the sign of a rounding error and two correct implementations
may disagree: the output gradient is drawn at random but zeroed where the
module's final ReLU sits on its kink, and for every inner ReLU element on its
kink the gradients get an allowance, elementwise, of what flipping its
derivative would change (``_inner_kink_allowance``). At fp16 about one element
in a hundred sits that close to 0: without the allowance, 5 of 10 random seeds
of tests/test_triton_blocks.py's fp16 tests failed one gradient check on a flip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .backends.reference import memory_format_of

FLOOR = {
    torch.float64: 1e-10,
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
    kink_allowance: float = 0.0  # the largest inner-kink allowance subtracted from an element's error

    @property
    def bound(self) -> float:
        return 2.0 * self.torch_err + self.floor

    @property
    def passed(self) -> bool:
        # torch's own inf or NaN (an fp16 overflow) would make the bound infinite: nothing checked
        return math.isfinite(self.torch_err) and self.err <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.passed else ("FAIL" if math.isfinite(self.torch_err) else
                                            "FAIL (torch's own result is not finite: nothing to compare)")
        allowance = f", inner-kink allowance up to {self.kink_allowance:.3e}" if self.kink_allowance else ""
        return (
            f"{self.name} [{str(self.dtype).replace('torch.', '')}]: err {self.err:.3e} "
            f"(torch {self.torch_err:.3e}, bound {self.bound:.3e}{allowance}) {verdict}; worst at "
            f"{self.worst_index}: got {self.fused_value:.6g}, ref {self.ref_value:.6g}"
        )


def _max_abs_err(out: Tensor, ref: Tensor, allowance: Optional[Tensor] = None):
    diff = (out.detach().to("cpu", torch.float64) - ref).abs()
    if allowance is not None:
        diff = (diff - allowance).clamp_min(0)
    # A NaN anywhere is an infinite error (an unwritten, poisoned element).
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return 0.0, ()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), index


def check_rule(name: str, out: Tensor, ref: Tensor, torch_out: Tensor,
               dtype: Optional[torch.dtype] = None, scale: Optional[float] = None,
               allowance: Optional[Tensor] = None) -> RuleReport:
    """Measure ``out`` against ``ref`` (any dtype; compared in float64 on the CPU).

    ``torch_out`` is PyTorch's own result at the dtype under test, ``dtype`` that
    dtype (default ``out.dtype``), which picks the floor. The floor is relative to
    ``scale``, by default max|ref|; pass the magnitude of the data a result was
    computed from when that is larger (a mean near 0 of values near 1).
    ``allowance`` (float64, ``ref``'s shape) is subtracted from each element's
    error first: what an inner ReLU kink may change there (``equivalence_report``).
    """
    if out.shape != ref.shape or torch_out.shape != ref.shape:
        raise ValueError(
            f"{name}: shapes differ: fused {tuple(out.shape)}, ref {tuple(ref.shape)}, "
            f"torch {tuple(torch_out.shape)}"
        )
    dtype = dtype or out.dtype
    ref64 = ref.detach().to("cpu", torch.float64)
    err, index = _max_abs_err(out, ref64, allowance)
    torch_err, _ = _max_abs_err(torch_out, ref64)
    if scale is None:
        scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    floor = FLOOR.get(dtype, 1e-6) * scale
    fused_value = float(out.detach().to("cpu", torch.float64)[index]) if index else 0.0
    ref_value = float(ref64[index]) if index else 0.0
    most = float(allowance.max()) if allowance is not None and allowance.numel() else 0.0
    return RuleReport(name, dtype, err, torch_err, floor, index, fused_value, ref_value, most)


def assert_rule(name: str, out: Tensor, ref: Tensor, torch_out: Tensor,
                dtype: Optional[torch.dtype] = None) -> RuleReport:
    """``check_rule`` that raises AssertionError (with both errors and the worst index) on failure."""
    report = check_rule(name, out, ref, torch_out, dtype)
    if not report.passed:
        raise AssertionError(str(report))
    return report


# --------------------------------------------------------------------------- module equivalence
# A spread of random BN statistics that keeps a deep net's activations well scaled (benchmarks, verify);
# the tests' blocks take the default, wider one.
WELL_SCALED_SPREAD = 0.1


def randomize_norms(model: torch.nn.Module, spread: float = 0.5) -> torch.nn.Module:
    """Random BN statistics and affine parameters, never the 0/1 defaults (with those, a fold that
    ignores the running mean or variance passes every check): running mean and bias ~ N(0, spread),
    running variance ~ U(0.5, 2), weight ~ U(0.5, 1.5). Batch norms and FrozenBatchNorm2d; in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.normal_(0, spread)
                    m.running_var.uniform_(0.5, 2.0)
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, spread)
    return model


def _float64_cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to("cpu", torch.float64)


def _run(module, x: Tensor, grad_out: Optional[Tensor]):
    x = x.detach().clone().requires_grad_(grad_out is not None)
    out = module(x)
    if grad_out is not None:
        out.backward(grad_out.to(out.device, out.dtype))
    return out, x


# Half-width of a final ReLU's kink, relative to max|pre-activation|: four rounding steps of
# the dtype under test (its machine epsilon).
KINK_WIDTH = {
    torch.float64: 0.0,
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
}


# Inner kinks given an allowance, the largest gradients first: each costs one float64 backward
# through the graph below it (about one element in a hundred sits on its kink at fp16).
MAX_INNER_KINKS = 64


class _ReluCalls:
    """Every ``nn.ReLU`` call of a module: its input, kept in the autograd graph (the ReLU, in
    place or not, gets a copy), and its output, whose gradient is retained."""

    def __init__(self, module: torch.nn.Module):
        self.calls = []  # [pre-activation, output]
        self.handles = []
        for m in module.modules():
            if isinstance(m, torch.nn.ReLU):
                self.handles.append(m.register_forward_pre_hook(self._before))
                self.handles.append(m.register_forward_hook(self._after))

    def _before(self, mod, inputs):
        self.calls.append([inputs[0], None])
        return (inputs[0].clone(), *inputs[1:])

    def _after(self, mod, inputs, output):
        self.calls[-1][1] = output
        if output.requires_grad:
            output.retain_grad()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def final_preactivation(self, out: Tensor) -> Optional[Tensor]:
        """The input of the ReLU call that produced ``out``, if one did."""
        if self.calls and self.calls[-1][1] is out:
            return self.calls[-1][0].detach()
        return None

    def inner(self, out: Tensor) -> list:
        """(pre-activation, output) of every call but the one that produced ``out``."""
        return [call for call in self.calls if call[1] is not out]


def _inner_kink_allowance(calls, targets: dict, dtype: torch.dtype) -> dict:
    """{target name: per element, how much flipping the ReLU derivative at inner kinks may change
    that gradient}, from a float64 forward and backward (graph retained).

    An inner element whose float64 pre-activation lies within ``KINK_WIDTH[dtype]`` of 0 may go
    either way at ``dtype``: its value is ~0 on both sides, but the gradient it passes back, g
    (the gradient at the ReLU's output), is there or not. Flipping it changes each target's
    gradient by g times the pre-activation's Jacobian row: the allowance is the sum of those rows'
    magnitudes, over the ``MAX_INNER_KINKS`` kinks with the largest |g|.
    """
    kinks = []  # (|g|, pre-activation, flat index, g)
    for pre, post in calls:
        if post is None or post.grad is None or not pre.numel():
            continue
        magnitude = pre.detach().abs().reshape(-1)
        width = KINK_WIDTH.get(dtype, 0.0) * float(magnitude.max())
        if width == 0.0:
            continue
        grad = post.grad.reshape(-1)
        for i in (magnitude <= width).nonzero().flatten().tolist():
            if grad[i] != 0:
                kinks.append((abs(float(grad[i])), pre, i, float(grad[i])))
    kinks.sort(key=lambda kink: -kink[0])
    names, tensors = list(targets), list(targets.values())
    allowance = {}
    for _, pre, i, g in kinks[:MAX_INNER_KINKS]:
        seed = torch.zeros(pre.shape, dtype=pre.dtype, device=pre.device)
        seed.view(-1)[i] = g
        rows = torch.autograd.grad(pre, tensors, seed, retain_graph=True, allow_unused=True)
        for name, row in zip(names, rows):
            if row is not None:
                allowance[name] = allowance.get(name, 0.0) + row.abs().cpu()
    return allowance


def _run_first(module, x: Tensor, backward: bool, dtype: torch.dtype):
    """Like ``_run``, drawing the output gradient (random, float64) once the output shape is known;
    (out, x, output gradient, inner-kink allowances by gradient name: "input" and parameter names).

    Where the module's output is a ReLU's, the gradient is 0 on elements whose
    float64 pre-activation lies within ``KINK_WIDTH[dtype]`` of 0: their ReLU
    derivative at ``dtype`` is decided by the sign of a rounding error, not by
    the code under test (any two correct implementations may disagree there).
    Inner ReLUs' kinks get an allowance instead (``_inner_kink_allowance``).
    """
    x = x.detach().clone().requires_grad_(backward)
    calls = _ReluCalls(module)
    try:
        out = module(x)
    finally:
        calls.remove()
    preactivation = calls.final_preactivation(out)
    grad_out, allowance = None, {}
    if backward:
        grad_out = torch.randn(out.shape, dtype=torch.float64)
        if preactivation is not None and preactivation.numel():
            width = KINK_WIDTH.get(dtype, 0.0) * float(preactivation.abs().max())
            grad_out = torch.where(preactivation.abs().cpu() < width, torch.zeros_like(grad_out), grad_out)
        out.backward(grad_out.to(out.device, out.dtype), retain_graph=True)
        targets = {"input": x, **{name: p for name, p in module.named_parameters() if p.requires_grad}}
        allowance = _inner_kink_allowance(calls.inner(out), targets, dtype)
    return out, x, grad_out, allowance


def equivalence_report(fused: torch.nn.Module, reference: torch.nn.Module, x: Tensor, *,
                       train: bool, backward: bool = True, prefix: str = "") -> list:
    """Rule reports for one forward (and backward) of ``fused`` against ``reference``.

    ``fused`` and ``reference`` hold the same parameters and buffers at the dtype
    and device of ``x``; the ground truth is a float64 CPU copy of ``reference``.
    Reports cover the output, the input's gradient, every parameter's gradient
    and, in train mode, every buffer after the step (running statistics,
    num_batches_tracked). In eval mode the output is also checked from a
    ``torch.no_grad()`` forward: inference takes the BN-folded path, a forward
    that needs BN-weight gradients does not. Gradients are left on the modules.
    """
    ref64 = _float64_cpu_copy(reference)
    for m in (fused, reference, ref64):
        m.train(train)
        m.zero_grad(set_to_none=True)
    params = _same_names(prefix + "parameters", fused.named_parameters(), reference.named_parameters())
    buffers = _same_names(prefix + "buffers", fused.named_buffers(), reference.named_buffers())
    before = {name: b.detach().clone() for name, (b, _) in buffers.items()}
    out64, x64, grad_out, allowance = _run_first(ref64, x.to("cpu", torch.float64), backward, x.dtype)
    out_t, x_t = _run(reference, x, grad_out)
    out_f, x_f = _run(fused, x, grad_out)
    dtype = x.dtype
    _check_like(prefix + "out", out_f, out_t, layout=True)
    reports = [check_rule(prefix + "out", out_f, out64, out_t, dtype)]
    if not train:
        with torch.no_grad():
            out_inference = fused(x)
        _check_like(prefix + "out (no_grad)", out_inference, out_t, layout=True)
        reports.append(check_rule(prefix + "out (no_grad)", out_inference, out64, out_t, dtype))
    if backward:
        _check_like(prefix + "grad input", x_f.grad, x_t.grad)
        reports.append(check_rule(prefix + "grad input", x_f.grad, x64.grad, x_t.grad, dtype,
                                  allowance=allowance.get("input")))
        params64 = dict(ref64.named_parameters())
        for name, (p_f, p_t) in params.items():
            p64 = params64[name]
            if p64.grad is None:
                if p_f.grad is not None and p_f.grad.abs().max() > 0:
                    raise AssertionError(f"{prefix}grad {name}: the fused module produced a gradient torch does not")
                continue
            if p_f.grad is None:
                raise AssertionError(f"{prefix}grad {name}: the fused module produced no gradient")
            _check_like(f"{prefix}grad {name}", p_f.grad, p_t.grad)
            reports.append(check_rule(f"{prefix}grad {name}", p_f.grad, p64.grad, p_t.grad, dtype,
                                      allowance=allowance.get(name)))
    buffers64 = dict(ref64.named_buffers())
    for name, (b_f, b_t) in buffers.items():
        b64 = buffers64[name]
        if not train:  # an eval forward changes no running statistic and counts no batch
            if not torch.equal(b_f, before[name]):
                raise AssertionError(f"{prefix}buffer {name}: changed by an eval-mode forward")
        elif b_f.is_floating_point():
            _check_like(f"{prefix}buffer {name}", b_f, b_t)
            reports.append(check_rule(f"{prefix}buffer {name}", b_f, b64, b_t, b_t.dtype,
                                      _buffer_scale(name, b64, buffers64)))
        elif not torch.equal(b_f.cpu(), b64.cpu()):
            raise AssertionError(f"{prefix}buffer {name}: {b_f.tolist()} != {b64.tolist()}")
    return reports


def _same_names(what: str, fused_items, reference_items) -> dict:
    """{name: (fused tensor, reference tensor)}; the two modules must hold the same names (a tensor
    missing on one side, not registered, would otherwise go unchecked)."""
    fused, reference = dict(fused_items), dict(reference_items)
    if set(fused) != set(reference):
        raise AssertionError(f"{what} differ: only fused {sorted(set(fused) - set(reference))}, "
                             f"only reference {sorted(set(reference) - set(fused))}")
    return {name: (fused[name], reference[name]) for name in reference}


def _check_like(name: str, got: Tensor, expected: Tensor, layout: bool = False) -> None:
    """The dtype and device torch gives (and for an output, its memory format): a result in another
    dtype or layout is not a drop-in, however close its values."""
    problems = []
    if got.dtype != expected.dtype:
        problems.append(f"dtype {got.dtype}, torch's {expected.dtype}")
    if got.device != expected.device:
        problems.append(f"device {got.device}, torch's {expected.device}")
    if layout and memory_format_of(got) != memory_format_of(expected):
        problems.append(f"memory format {memory_format_of(got)}, torch's {memory_format_of(expected)}")
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))


def _buffer_scale(name: str, value: Tensor, buffers: dict) -> float:
    """A running mean is an average of values spread by the running std: its rounding scales with both."""
    scale = float(value.abs().max()) if value.numel() else 0.0
    if name.endswith("running_mean"):
        var = buffers.get(name[: -len("running_mean")] + "running_var")
        if var is not None and var.numel():
            scale += float(var.max().sqrt())
    return scale


def assert_equivalent(fused, reference, x, *, train: bool, backward: bool = True) -> list:
    """``equivalence_report`` that raises on the first failing check (all failures listed)."""
    reports = equivalence_report(fused, reference, x, train=train, backward=backward)
    failed = [str(r) for r in reports if not r.passed]
    if failed:
        raise AssertionError("\n".join(failed))
    return reports
