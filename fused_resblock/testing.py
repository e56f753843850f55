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
module's final ReLU sits on its kink, and the inner ReLU elements on their kink
are candidates whose flips may explain a gradient's difference: the flips that
do (fitted to the difference, ``explain_by_kink_flips``) are subtracted from it,
for the fused result and for torch's alike, and nothing else is forgiven. At
fp16 about one element in a hundred sits that close to 0: without this, 5 of 10
random seeds of tests/test_triton_blocks.py's fp16 tests failed one gradient
check on a flip.
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
    kink_flips: tuple = (0, 0)  # inner-kink flips subtracted from (the fused, torch's) difference

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
        flips = (f", after kink flips: fused {self.kink_flips[0]}, torch {self.kink_flips[1]}"
                 if any(self.kink_flips) else "")
        return (
            f"{self.name} [{str(self.dtype).replace('torch.', '')}]: err {self.err:.3e} "
            f"(torch {self.torch_err:.3e}, bound {self.bound:.3e}{flips}) {verdict}; worst at "
            f"{self.worst_index}: got {self.fused_value:.6g}, ref {self.ref_value:.6g}"
        )


def _max_abs_err(out: Tensor, ref: Tensor, explained: Optional[Tensor] = None):
    diff = out.detach().to("cpu", torch.float64) - ref
    if explained is not None:
        diff = diff - explained
    diff = diff.abs()
    # A NaN anywhere is an infinite error (an unwritten, poisoned element).
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return 0.0, ()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), index


def check_rule(name: str, out: Tensor, ref: Tensor, torch_out: Tensor,
               dtype: Optional[torch.dtype] = None, scale: Optional[float] = None,
               flips: Optional[KinkFlips] = None) -> RuleReport:
    """Measure ``out`` against ``ref`` (any dtype; compared in float64 on the CPU).

    ``torch_out`` is PyTorch's own result at the dtype under test, ``dtype`` that
    dtype (default ``out.dtype``), which picks the floor. The floor is relative to
    ``scale``, by default max|ref|; pass the magnitude of the data a result was
    computed from when that is larger (a mean near 0 of values near 1).
    ``flips`` (``explain_by_kink_flips``) holds the parts of the fused and of
    torch's difference that inner ReLU-kink flips explain: both are subtracted first.
    """
    if out.shape != ref.shape or torch_out.shape != ref.shape:
        raise ValueError(
            f"{name}: shapes differ: fused {tuple(out.shape)}, ref {tuple(ref.shape)}, "
            f"torch {tuple(torch_out.shape)}"
        )
    dtype = dtype or out.dtype
    ref64 = ref.detach().to("cpu", torch.float64)
    err, index = _max_abs_err(out, ref64, flips.fused if flips is not None else None)
    torch_err, _ = _max_abs_err(torch_out, ref64, flips.torch if flips is not None else None)
    if scale is None:
        scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    floor = FLOOR.get(dtype, 1e-6) * scale
    fused_value = float(out.detach().to("cpu", torch.float64)[index]) if index else 0.0
    ref_value = float(ref64[index]) if index else 0.0
    counts = (flips.fused_count, flips.torch_count) if flips is not None else (0, 0)
    return RuleReport(name, dtype, err, torch_err, floor, index, fused_value, ref_value, counts)


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


# Inner kinks fitted at most, the largest gradients first: each costs a row of the fit and, each
# round, one float64 backward through the graph below it (well under a millisecond for a block on
# the CPU), so a big graph gets fewer: ``KINK_ROW_BUDGET`` row elements in all, never under 64.
MAX_INNER_KINKS = 2048
KINK_ROW_BUDGET = 2 ** 25

# A row longer than this (a whole network's gradients) is fitted through a count sketch of this
# length (``_Sketch``): inner products keep their expectation and are off by ~1/sqrt(length) of
# the rows' norms, 0.2%, plenty to tell which flips happened; what is then subtracted for them is
# computed exactly (``_FlippedGraph``).
SKETCH_LENGTH = 2 ** 18

# A flip is fitted only where the difference's projection on its change is at least this share of
# that change: a flip that happened projects ~1 (plus rounding), a row that merely correlates with
# rounding noise projects far less, and subtracting it would move other gradients by its size.
FLIP_MATCH = 0.75

# The least-squares fit's ridge, on rows scaled to unit length: dependent rows (which the fit
# splits between them) stay bounded; the greedy pass that follows takes one of them.
FIT_RIDGE = 1e-9

# Rounds of the fit in ``explain_by_kink_flips`` at most (each: one float64 backward per kink left).
FIT_ROUNDS = 4


class _ReluCalls:
    """Every ``nn.ReLU`` call of a module, in call order: its input and its output. With
    ``in_graph`` the input stays in the autograd graph (the ReLU, in place or not, gets a copy)
    and the output's gradient is retained; without, a detached copy of the input is kept."""

    def __init__(self, module: torch.nn.Module, in_graph: bool = True):
        self.calls = []  # [pre-activation, output]
        self.in_graph = in_graph
        self.handles = []
        for m in module.modules():
            if isinstance(m, torch.nn.ReLU):
                self.handles.append(m.register_forward_pre_hook(self._before))
                self.handles.append(m.register_forward_hook(self._after))

    def _before(self, mod, inputs):
        if not self.in_graph:
            self.calls.append([inputs[0].detach().clone(), None])
            return None
        self.calls.append([inputs[0], None])
        return (inputs[0].clone(), *inputs[1:])

    def _after(self, mod, inputs, output):
        self.calls[-1][1] = output
        if self.in_graph and output.requires_grad:
            output.retain_grad()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def final_preactivation(self, out: Tensor) -> Optional[Tensor]:
        """The input of the ReLU call that produced ``out``, if one did."""
        if self.calls and self.calls[-1][1] is out:
            return self.calls[-1][0].detach()
        return None


@dataclass
class _Kink:
    """An inner ReLU element of the float64 run whose pre-activation lies within rounding of 0."""

    pre: Tensor  # the ReLU call's float64 pre-activation, in the retained graph
    post: Tensor  # its output
    index: int  # flat index of the element
    passes: bool  # float64's derivative there is 1 (a flip blocks the gradient g), else 0 (a flip passes g)


def _kink_width(pre64: Tensor, pre_torch: Optional[Tensor], dtype: torch.dtype) -> float:
    """How close to 0 a float64 pre-activation must lie for a result within the rule to sit on
    either side: twice torch's own error there plus the floor (the rule applied to the
    pre-activation), from torch's run at ``dtype``; ``KINK_WIDTH`` where torch's is not at hand."""
    scale = float(pre64.detach().abs().max())
    if pre_torch is None or pre_torch.shape != pre64.shape or dtype not in FLOOR:
        return KINK_WIDTH.get(dtype, 0.0) * scale
    torch_err = float((pre_torch.to("cpu", torch.float64) - pre64.detach().cpu()).abs().max())
    if dtype == torch.float64 or not math.isfinite(torch_err):
        return 0.0
    return 2.0 * torch_err + FLOOR[dtype] * scale


def _inner_kinks(calls: _ReluCalls, out: Tensor, torch_calls: Optional[_ReluCalls], dtype: torch.dtype) -> list:
    """The ``MAX_INNER_KINKS`` inner kinks (ReLU calls but the one that produced ``out``) with
    the largest gradient g at the ReLU's output.

    An element whose float64 pre-activation lies within ``_kink_width`` of 0 may go either way
    at ``dtype``: its value is ~0 on both sides, but the gradient it passes back is g or 0
    depending on the sign of a rounding error. Torch's calls pair with float64's in call order.
    """
    paired = torch_calls is not None and len(torch_calls.calls) == len(calls.calls)
    kinks = []  # (|g|, kink)
    for n, (pre, post) in enumerate(calls.calls):
        if post is out or post is None or post.grad is None or not pre.numel():
            continue
        width = _kink_width(pre, torch_calls.calls[n][0] if paired else None, dtype)
        if width == 0.0:
            continue
        values = pre.detach().reshape(-1)
        grad = post.grad.reshape(-1)
        for i in (values.abs() <= width).nonzero().flatten().tolist():
            g = float(grad[i])
            if g != 0:
                kinks.append((abs(g), _Kink(pre, post, i, bool(values[i] > 0))))
    kinks.sort(key=lambda kink: -kink[0])
    return [kink for _, kink in kinks[:MAX_INNER_KINKS]]


class _Sketch:
    """A count sketch of vectors of ``size`` elements (``SKETCH_LENGTH`` buckets; the identity for
    shorter ones): each element added, with a random sign, into one bucket. Drawn from its own
    generator, so the rows and differences of a fit share it and the global RNG is left alone."""

    def __init__(self, size: int):
        self.length = min(size, SKETCH_LENGTH)
        self.bucket = self.sign = None
        if size > SKETCH_LENGTH:
            generator = torch.Generator().manual_seed(size)
            self.bucket = torch.randint(SKETCH_LENGTH, (size,), generator=generator)
            self.sign = torch.randint(2, (size,), generator=generator).to(torch.float64) * 2 - 1

    def __call__(self, vector: Tensor) -> Tensor:
        if self.bucket is None:
            return vector
        return torch.zeros(self.length, dtype=vector.dtype).index_add_(0, self.bucket, vector * self.sign)


class _FlippedGraph:
    """The retained float64 graph with ``kinks``' ReLU derivatives flipped in every backward run
    through it (``grad``) until ``close``: at each, the gradient reaching the pre-activation
    becomes what the other derivative passes (g where float64's passes 0, 0 where it passes g),
    with g what reaches the ReLU's output in that backward, so a flip above another changes the g
    the other sees. The gradient reaching each of ``watched``' outputs is kept (``arriving``)."""

    def __init__(self, kinks: list, watched: list = ()):
        self.seen, self.handles = {}, []
        outputs = {id(kink.post): kink.post for kink in [*kinks, *watched]}
        for key, post in outputs.items():
            self.handles.append(post.register_hook(lambda grad, key=key: self.seen.__setitem__(key, grad)))
        by_call = {}
        for kink in kinks:
            by_call.setdefault(id(kink.pre), []).append(kink)
        for group in by_call.values():
            pre = group[0].pre
            index = torch.tensor([kink.index for kink in group], device=pre.device)
            passes = torch.tensor([kink.passes for kink in group], device=pre.device)
            self.handles.append(pre.register_hook(
                lambda grad, key=id(group[0].post), index=index, passes=passes: self._flip(grad, key, index, passes)))

    def _flip(self, grad: Tensor, key: int, index: Tensor, passes: Tensor) -> Optional[Tensor]:
        arriving = self.seen.get(key)
        if arriving is None:  # a backward that starts below the ReLU's output: nothing reached it
            return None
        g = arriving.reshape(-1)[index].to(grad.dtype)
        grad = grad.clone(memory_format=torch.contiguous_format)
        grad.view(-1)[index] += torch.where(passes, -g, g)
        return grad

    def grad(self, outputs: Tensor, inputs: list, grad_outputs: Tensor) -> list:
        self.seen.clear()
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)

    def arriving(self, kink: _Kink) -> float:
        """The gradient that reached ``kink``'s output in the last backward (0 if none did)."""
        grad = self.seen.get(id(kink.post))
        return 0.0 if grad is None else float(grad.reshape(-1)[kink.index])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _flip_rows(kinks: list, arriving: list, graph: _FlippedGraph, tensors: list, weights: list,
               sketch: _Sketch) -> Tensor:
    """Per kink, how flipping its derivative as well changes the target gradients: the change at
    its pre-activation (-g where it passes the ``arriving`` g, +g where not) carried back by
    ``graph`` (backward is linear in it), each target's part times sqrt(its weight), flattened,
    concatenated and sketched (float64, CPU; one row per kink)."""
    rows = torch.empty(len(kinks), sketch.length, dtype=torch.float64)
    for row, kink, g in zip(rows, kinks, arriving):
        seed = torch.zeros(kink.pre.shape, dtype=kink.pre.dtype, device=kink.pre.device)
        seed.view(-1)[kink.index] = -g if kink.passes else g
        changes = graph.grad(kink.pre, tensors, seed)
        row.copy_(sketch(torch.cat([(torch.zeros(t.numel(), dtype=torch.float64) if change is None
                                     else change.detach().cpu().reshape(-1)) * math.sqrt(weight)
                                    for t, change, weight in zip(tensors, changes, weights)])))
    return rows


def _least_squares(gram: Tensor, dot: Tensor) -> Tensor:
    """The coefficients c minimising |diff - c @ rows|^2, from ``gram`` = rows @ rows.T and
    ``dot`` = rows @ diff, solved on rows scaled to unit length with the ridge ``FIT_RIDGE``; a row
    of zeros gets 0."""
    norms = gram.diagonal().sqrt()
    live = norms > 0
    coef = torch.zeros_like(dot)
    if live.any():
        n = norms[live]
        unit = gram[live][:, live] / (n[:, None] * n[None, :])
        unit.diagonal().add_(FIT_RIDGE)
        coef[live] = torch.linalg.solve(unit, dot[live] / n) / n
    return coef


def _fit_flips(diff: Tensor, rows: Tensor) -> Tensor:
    """Which of the kinks (one row each) flipped in the result whose difference is ``diff``: a
    mask over the rows.

    A flip that happened enters the difference with coefficient 1. So all rows are fitted at once
    by least squares, which separates flips whose changes overlap (once another's change overlaps
    it, a flip's own projection on the difference can be anything), and the rows whose
    coefficient lies within 1 - ``FLIP_MATCH`` of 1 are taken, while taking them lowers the sum of
    squares; the others are fitted again to what those leave. A row fitting rounding noise gets a
    coefficient far from 1. Then greedily, best first, each row left whose projection on what is
    left is at least ``FLIP_MATCH`` of its length (dependent rows, which least squares splits)."""
    chosen = torch.zeros(len(rows), dtype=torch.bool)
    if not len(rows):
        return chosen
    gram, dot = rows @ rows.T, rows @ diff

    def squares(mask):  # |diff - the rows of mask|^2, less |diff|^2
        return float(gram[mask][:, mask].sum()) - 2 * float(dot[mask].sum())

    while not chosen.all():
        free = (~chosen).nonzero().flatten()
        coef = _least_squares(gram[free][:, free], dot[free] - gram[free][:, chosen].sum(1))
        trial = chosen.clone()
        trial[free[(coef - 1).abs() <= 1 - FLIP_MATCH]] = True
        if int(trial.sum()) == int(chosen.sum()) or not squares(trial) < squares(chosen):
            break
        chosen = trial
    left = dot - gram[:, chosen].sum(1)
    while True:
        norms = gram.diagonal()
        gain = (2 * left - norms).masked_fill(chosen | (left < FLIP_MATCH * norms), -math.inf)
        best = int(gain.argmax())
        if not gain[best] > 0:
            break
        chosen[best] = True
        left -= gram[:, best]
    return chosen


@dataclass
class KinkFlips:
    """The part of one gradient's difference from float64 that inner ReLU-kink flips explain, in
    the fused result and in torch's (``explain_by_kink_flips``), and how many flips each took."""

    fused: Tensor
    torch: Tensor
    fused_count: int
    torch_count: int


def explain_by_kink_flips(kinks: list, truth: "_Float64Run", reference: dict, fused: dict, torch_result: dict) -> dict:
    """{gradient name: KinkFlips}: which of the candidate kinks' flips explain each result's
    difference from the float64 ``reference`` gradients (``truth``'s), and what they change.

    The flips are fitted over all gradients at once (one flip changes every gradient below it),
    each gradient's squares weighted by 1/(scale^2 · its size), so that a small one (a BN bias)
    counts as much as the input's; the scale is max|reference| plus torch's error there (a
    gradient exactly 0 in float64, a conv bias before a train-mode BN, would otherwise weigh its
    rounding noise without bound). Only flips whose changes explain the difference, with the sign
    a flip has, are forgiven (``_fit_flips``), so a real error (a scaled or a missing gradient)
    stays. What is subtracted is truth's backward with them all flipped (``_FlippedGraph``), less
    ``reference``. A flip changes what reaches the kinks below it, so after flips are taken the
    rows of the others are computed again with those flipped and fitted to what is left, for up to
    ``FIT_ROUNDS`` rounds while a round takes a flip. Each of these backwards adds to the retained
    gradients of ``truth``'s inner tensors (its ReLU outputs', its norms'): read them before.
    """
    names = [name for name, ref in reference.items()
             if ref is not None and fused.get(name) is not None and torch_result.get(name) is not None
             and fused[name].shape == ref.shape == torch_result[name].shape]
    if not kinks or not names:
        return {}
    sketch = _Sketch(sum(reference[name].numel() for name in names))
    kinks = kinks[:max(64, KINK_ROW_BUDGET // sketch.length)]
    tensors = [truth.targets[name] for name in names]
    grad_out = truth.grad_out.to(truth.out.device, truth.out.dtype)
    weights = []
    for name in names:
        ref = reference[name].detach().cpu()
        scale = 0.0
        if ref.numel():
            torch_err = float((torch_result[name].detach().to("cpu", torch.float64) - ref).abs().max())
            scale = float(ref.abs().max()) + (torch_err if math.isfinite(torch_err) else 0.0)
        weights.append(1.0 / (scale ** 2 * ref.numel()) if scale > 0 else 1.0)

    def weighted(grads):
        return torch.cat([(grad.detach().to("cpu", torch.float64).reshape(-1) * math.sqrt(weight))
                          for grad, weight in zip(grads, weights)])

    def backward_with(taken: tuple, rows: bool):
        """Truth's gradients with the kinks ``taken`` flipped, the kinks left and (``rows``) their rows."""
        graph = _FlippedGraph([kinks[i] for i in taken], watched=kinks)
        try:
            flipped = [torch.zeros(t.shape, dtype=torch.float64) if grad is None else grad.detach().cpu()
                       for t, grad in zip(tensors, graph.grad(truth.out, tensors, grad_out))]
            left = [i for i in range(len(kinks)) if i not in taken]
            if rows:
                rows = _flip_rows([kinks[i] for i in left], [graph.arriving(kinks[i]) for i in left], graph,
                                  tensors, weights, sketch)
            return flipped, left, rows
        finally:
            graph.close()

    rounds = {}  # taken kinks -> backward_with(taken, rows=True); the first round serves both results
    explained = []
    for results in (fused, torch_result):
        target, taken = weighted([results[name] for name in names]), ()
        for _ in range(FIT_ROUNDS):
            if taken not in rounds:
                rounds[taken] = backward_with(taken, rows=True)
            flipped, left, rows = rounds[taken]
            new = [left[i] for i in _fit_flips(sketch(target - weighted(flipped)), rows).nonzero().flatten().tolist()]
            if not new:
                break
            taken = tuple(sorted(taken + tuple(new)))
        flipped = rounds[taken][0] if taken in rounds else backward_with(taken, rows=False)[0]
        explained.append(({name: grad - reference[name].detach().cpu() for name, grad in zip(names, flipped)},
                          len(taken)))
    (fused_parts, fused_count), (torch_parts, torch_count) = explained
    return {name: KinkFlips(fused_parts[name], torch_parts[name], fused_count, torch_count) for name in names}


class _NormSummands:
    """Every batch norm call of a module (float64, in the graph), to size its affine parameters'
    gradients: sums over N·H·W of g (bias) and g·x_hat (weight), with g the gradient at the
    norm's output. A sum's rounding grows with its summands, not with the (cancelled) result."""

    def __init__(self, module: torch.nn.Module):
        self.calls = []  # (parameter-name prefix, norm, input, output)
        self.handles = [m.register_forward_hook(self._after(name)) for name, m in module.named_modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine]

    def _after(self, name: str):
        def hook(mod, inputs, output):
            if output.requires_grad:
                output.retain_grad()
                self.calls.append((name, mod, inputs[0].detach(), output))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def gradient_scales(self) -> dict:
        """{parameter name: max over channels of the L2 norm of its gradient's summands}."""
        scales = {}
        for name, norm, x, out in self.calls:
            if out.grad is None:
                continue
            dims = [d for d in range(x.dim()) if d != 1]
            if norm.training or norm.running_mean is None:
                var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            else:
                shape = [1, -1] + [1] * (x.dim() - 2)
                mean, var = norm.running_mean.view(shape), norm.running_var.view(shape)
            x_hat = (x - mean) * torch.rsqrt(var + norm.eps)
            g = out.grad.detach()
            prefix = name + "." if name else ""
            for param, summands in (("bias", g), ("weight", g * x_hat)):
                size = float(summands.pow(2).sum(dims).sqrt().max()) if summands.numel() else 0.0
                scales[prefix + param] = max(scales.get(prefix + param, 0.0), size)
        return scales


class _Float64Run:
    """The ground truth's forward, then (``backward``) its backward from an output gradient drawn
    at random once the output shape is known, with what the checks need from both."""

    def __init__(self, module: torch.nn.Module, x: Tensor, backward: bool):
        self.module = module
        self.x = x.detach().clone().requires_grad_(backward)
        self.relus, norms = _ReluCalls(module), _NormSummands(module)
        try:
            self.out = module(self.x)
        finally:
            self.relus.remove()
            norms.remove()
        self.norms = norms
        self.grad_out = None
        self.targets = {}  # the gradients' tensors by name: "input" and parameter names
        self.grad_scales = {}  # {parameter name: the floor's scale where max|ref| understates it}

    def backward(self, dtype: torch.dtype, torch_calls: Optional[_ReluCalls] = None) -> Tensor:
        """Draw the output gradient (float64) and run the backward, graph retained (for
        ``explain_by_kink_flips``).

        Where the module's output is a ReLU's, the gradient is 0 on elements whose float64
        pre-activation lies within ``_kink_width`` of 0 (from torch's final ReLU call in
        ``torch_calls``, else ``KINK_WIDTH``): their ReLU derivative at ``dtype`` is decided by the
        sign of a rounding error, not by the code under test (any two correct implementations may
        disagree there). Inner ReLUs' kinks are fitted instead. A batch norm's weight and bias
        gradients are sums whose rounding follows their summands: their floor scales with those.
        """
        out = self.out
        grad_out = torch.randn(out.shape, dtype=torch.float64)
        preactivation = self.relus.final_preactivation(out)
        if preactivation is not None and preactivation.numel():
            torch_pre = None
            if torch_calls is not None and len(torch_calls.calls) == len(self.relus.calls):
                torch_pre = torch_calls.calls[-1][0]
            width = _kink_width(preactivation, torch_pre, dtype)
            grad_out = torch.where(preactivation.abs().cpu() <= width, torch.zeros_like(grad_out), grad_out)
        out.backward(grad_out.to(out.device, out.dtype), retain_graph=True)
        self.grad_out = grad_out
        self.targets = {"input": self.x, **{name: p for name, p in self.module.named_parameters() if p.requires_grad}}
        self.grad_scales = self.norms.gradient_scales()
        return grad_out


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
    truth = _Float64Run(ref64, x.to("cpu", torch.float64), backward)
    x_t = x.detach().clone().requires_grad_(backward)
    torch_calls = _ReluCalls(reference, in_graph=False)
    try:
        out_t = reference(x_t)
    finally:
        torch_calls.remove()
    grad_out = truth.backward(x.dtype, torch_calls) if backward else None
    if grad_out is not None:
        out_t.backward(grad_out.to(out_t.device, out_t.dtype))
    out64, x64 = truth.out, truth.x
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
        params64 = dict(ref64.named_parameters())
        kinks = _inner_kinks(truth.relus, out64, torch_calls, x.dtype)
        flips = explain_by_kink_flips(
            kinks, truth, {"input": x64.grad, **{name: p.grad for name, p in params64.items()}},
            {"input": x_f.grad, **{name: p_f.grad for name, (p_f, _) in params.items()}},
            {"input": x_t.grad, **{name: p_t.grad for name, (_, p_t) in params.items()}})
        _check_like(prefix + "grad input", x_f.grad, x_t.grad)
        reports.append(check_rule(prefix + "grad input", x_f.grad, x64.grad, x_t.grad, dtype,
                                  flips=flips.get("input")))
        for name, (p_f, p_t) in params.items():
            p64 = params64[name]
            if p64.grad is None:
                if p_f.grad is not None and p_f.grad.abs().max() > 0:
                    raise AssertionError(f"{prefix}grad {name}: the fused module produced a gradient torch does not")
                continue
            if p_f.grad is None:
                raise AssertionError(f"{prefix}grad {name}: the fused module produced no gradient")
            _check_like(f"{prefix}grad {name}", p_f.grad, p_t.grad)
            scale = max(float(p64.grad.abs().max()) if p64.grad.numel() else 0.0, truth.grad_scales.get(name, 0.0))
            reports.append(check_rule(f"{prefix}grad {name}", p_f.grad, p64.grad, p_t.grad, dtype, scale,
                                      flips=flips.get(name)))
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
