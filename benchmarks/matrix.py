"""Which cases run, in which order, within a time budget.

A preset lists the axes; ``plan`` expands them into cases, keeps the ones an
implementation is defined for, marks the ones that cannot run here as skipped
(with the reason), ranks the rest by how much they tell (ResNet-50 bf16
channels_last inference against eager and torch.compile first, then training,
ResNet-50's layers, other models, other dtypes, formats and backends), and
under ``budget_s`` keeps the best-ranked cases whose estimated costs fit. The
rest are spares: the driver runs them, best first, while time is left, and
records the others as skipped "over budget", never dropped. The run order
keeps a group's members together so ours and its peers run back to back.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import peers, shapes
from .cases import Case
from .timing import TimingPlan


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple
    blocks: tuple
    layers: tuple
    infer_batches: dict   # kind -> batches
    train_batches: dict   # kind -> batches (a kind absent: no training cases)
    finetune_batches: dict  # kind -> batches of the fine-tuning step (eval mode, BN frozen)
    dtypes: tuple
    formats: tuple
    impls: tuple
    timing: TimingPlan
    rotation_cap: int
    budget_s: Optional[float] = None


FULL = Preset(
    name="full",
    models=tuple(m.name for m in shapes.MODELS),
    blocks=tuple(b.name for b in shapes.BLOCKS),
    layers=tuple(layer.name for layer in shapes.RESNET50_LAYERS),
    infer_batches={"model": (1, 8, 64, 256), "block": (64, 256), "layer": (256,)},
    train_batches={"model": (64, 256), "block": (64, 256)},
    finetune_batches={"model": (64,), "layer": (256,)},
    dtypes=("bf16", "fp16", "fp32"),
    formats=("channels_last", "nchw"),
    impls=tuple(impl.name for impl in peers.all_impls()),
    timing=TimingPlan(),
    rotation_cap=64,
    budget_s=480.0,
)

# The CI smoke run on the CPU: one tiny model, one block and one layer, one batch, few iterations.
TINY = Preset(
    name="tiny",
    models=(shapes.TINY_MODEL.name,),
    blocks=("cifar.layer3.1",),
    layers=("layer4.1-2.conv2",),
    infer_batches={"model": (2,), "block": (2,), "layer": (1,)},
    train_batches={"model": (2,)},
    finetune_batches={"model": (2,), "layer": (1,)},
    dtypes=("fp32",),
    formats=("channels_last",),
    impls=tuple(impl.name for impl in peers.all_impls()),
    timing=TimingPlan(warmup=1, min_warmup_s=0.0, min_iters=3, max_iters=3, min_time_s=0.0, max_time_s=1.0),
    rotation_cap=2,
)

PRESETS = {p.name: p for p in (FULL, TINY)}
TINY_BACKENDS = ("ours:auto", "ours:reference")  # Triton's interpreter is far too slow for a smoke run


def expand(preset: Preset) -> list:
    """Every case of the preset that some implementation is defined for."""
    impls = peers.by_name()
    targets = [("model", t) for t in preset.models] + [("block", t) for t in preset.blocks] \
        + [("layer", t) for t in preset.layers]
    cases = []
    for kind, target in targets:
        for mode, batches in (("infer", preset.infer_batches), ("train", preset.train_batches),
                              ("finetune", preset.finetune_batches)):
            for batch in batches.get(kind, ()):
                for dtype in preset.dtypes:
                    for memory_format in preset.formats:
                        for name in preset.impls:
                            case = Case(kind, target, mode, dtype, memory_format, batch, name)
                            if impls[name].applies(case):
                                cases.append(case)
    return cases


# --------------------------------------------------------------------------- ranking (lower runs first)
_KIND = {"model": 0, "layer": 1, "block": 4}
_TARGET = {"resnet50": 0, "resnet18": 3, "cifar_resnet56": 3, "resnext50_32x4d": 3, "resnet101": 4}
_DTYPE = {"bf16": 0, "fp32": 2, "fp16": 3}
_FORMAT = {"channels_last": 0, "nchw": 2}
_BATCH = {256: 0, 1: 0, 64: 2, 8: 2}
_MODE = {"infer": 0, "train": 1, "finetune": 2}
_IMPL = {"ours:auto": 0, "eager": 0, "eager-folded": 1, "compile-default": 1, "ours:auto+cudagraph": 1,
         "ours:triton": 2, "ours:cuda": 2, "ours:cuda[wmma]": 3, "compile-reduce-overhead": 3, "eager-amp": 3,
         "ours:reference": 4, "compile-max-autotune": 4}


def _target_rank(case: Case) -> int:
    if case.kind == "layer":
        return _TARGET["resnet50"]  # the layers are ResNet-50's: the per-layer comparison of the headline model
    return _TARGET.get(case.target, 1)


def rank(case: Case) -> int:
    score = _KIND[case.kind] + _target_rank(case) + _DTYPE[case.dtype] + _FORMAT[case.memory_format]
    score += _BATCH.get(case.batch, 1) + _IMPL.get(case.impl, 2) + _MODE[case.mode]
    if case.impl == "compile-default" and (case.has_backward or case.batch <= peers.SMALL_BATCH):
        score += 2  # a second full compile of the same model tells less than the first
    if case.kind == "layer" and case.impl == "eager-folded":
        score -= 1  # a conv layer's fair peer is a folded conv: it must come with the layer's row of ours
    return score


# --------------------------------------------------------------------------- estimated costs (H100, rough)
_BASE_S = {"model": 4.0, "block": 2.0, "layer": 2.0}  # build + warm-up + timing
_FIRST_CALL_S = {  # compile / autotune / capture, by implementation family and kind (model, block, layer)
    "ours": (45.0, 10.0, 5.0),  # tuning compiles ~9 candidates per conv shape, in parallel (NOTES v0.4)
    "compile-default": (60.0, 20.0, 15.0),
    "compile-reduce-overhead": (70.0, 25.0, 20.0),
    "compile-max-autotune": (300.0, 90.0, 60.0),
}


# A case that runs far past its estimate (a tuner or compiler much slower than guessed) is cut
# off rather than allowed to spend the budget of the cases after it.
CASE_LIMIT_FACTOR = 3.0
CASE_LIMIT_FLOOR_S = 60.0


def case_time_limit_s(estimate_s: float, budget_left_s: Optional[float]) -> Optional[float]:
    """CASE_LIMIT_FACTOR x the estimate, at least CASE_LIMIT_FLOOR_S, at most the budget left; no budget: none."""
    if budget_left_s is None:
        return None
    return min(max(CASE_LIMIT_FACTOR * estimate_s, CASE_LIMIT_FLOOR_S), max(budget_left_s, 1.0))


def _family(impl: str) -> str:
    """Our fused backends share one autotune cache per process: they are one family for first-call costs."""
    return "ours" if impl.startswith("ours:") and impl != "ours:reference" else impl


class Estimator:
    """Rough seconds per case on an H100. Our first call tunes each shape once per process, so only
    the first fused case of a (target, mode, dtype, format, batch) is charged for it; ``commit`` records that."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tuned: set = set()

    def _tuning_key(self, case: Case) -> tuple:
        return (case.kind, case.target, case.mode, case.dtype, case.memory_format, case.batch)

    def cost_s(self, case: Case) -> float:
        if self.device.type != "cuda":
            return 1.0
        train = case.has_backward
        base = _BASE_S[case.kind] * (2 if train else 1)
        family = _family(case.impl)
        if family == "ours" and self._tuning_key(case) in self.tuned:
            return base
        first = _FIRST_CALL_S.get(family, (0.0, 0.0, 0.0))[("model", "block", "layer").index(case.kind)]
        return base + first * (2 if train else 1)

    def commit(self, case: Case) -> None:
        if _family(case.impl) == "ours":
            self.tuned.add(self._tuning_key(case))


# --------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    run: list = field(default_factory=list)       # cases to run, in order
    spare: list = field(default_factory=list)     # runnable but over budget, best first: run if time is left
    skipped: list = field(default_factory=list)   # (case, reason): cannot run here
    estimated_s: float = 0.0


def matches(case_id: str, patterns) -> bool:
    """Whether a glob (or the exact id: ``ours:cuda[wmma]`` would be read as a character class) names it."""
    return any(case_id == p or fnmatch.fnmatchcase(case_id, p) for p in patterns)


def _matches(case: Case, patterns) -> bool:
    return matches(case.id, patterns)


def unmatched(preset: Preset, patterns) -> list:
    """The patterns that name no case of ``preset``: a typo would otherwise run nothing, successfully."""
    ids = [case.id for case in expand(preset)]
    return [p for p in patterns if not any(matches(case_id, [p]) for case_id in ids)]


def _skip_reason(preset: Preset, case: Case, device: torch.device, impls: dict) -> Optional[str]:
    reason = impls[case.impl].unavailable(case, device)
    if reason is None and preset.name == "tiny" and case.is_ours and case.impl not in TINY_BACKENDS:
        reason = "the tiny preset runs the reference backend only (Triton's interpreter is too slow for it)"
    return reason


def plan(preset: Preset, device: torch.device, only=(), budget_s: Optional[float] = None) -> Plan:
    """Expand, filter by ``only`` (globs on case ids), mark unrunnable cases, rank, fit the budget."""
    impls = peers.by_name()
    result = Plan()
    runnable = []
    for case in expand(preset):
        if only and not _matches(case, only):
            continue
        reason = _skip_reason(preset, case, device, impls)
        if reason is None:
            runnable.append(case)
        else:
            result.skipped.append((case, reason))
    ranked = sorted(runnable, key=rank)  # stable: ties keep the preset's order
    chosen = []
    estimator = Estimator(device)

    def take(case: Case) -> None:
        cost = estimator.cost_s(case)
        if budget_s is not None and result.estimated_s + cost > budget_s:
            result.spare.append(case)
            return
        estimator.commit(case)
        chosen.append(case)
        result.estimated_s += cost

    # A peer is a comparison: in a group where one of ours can run, it waits until one of ours is
    # taken (a cheap eager row must not fill the budget beside no row of ours).
    with_ours = {c.group for c in runnable if c.is_ours}
    ours_taken: set = set()
    waiting: dict = {}  # group -> its peers, in rank order
    for case in ranked:
        if not case.is_ours and case.group in with_ours and case.group not in ours_taken:
            waiting.setdefault(case.group, []).append(case)
            continue
        taken_before = len(chosen)
        take(case)
        if case.is_ours and len(chosen) > taken_before and case.group not in ours_taken:
            ours_taken.add(case.group)
            for peer in waiting.pop(case.group, []):
                take(peer)
    for peers_left in waiting.values():
        result.spare.extend(peers_left)
    result.run = _by_group(chosen)
    result.spare = _by_group(sorted(result.spare, key=rank))
    return result


def _by_group(cases: list) -> list:
    """Group by group (ours next to its peers), groups in the order of their best-ranked case,
    ours first in each: the run skips a peer when none of ours ran before it in its group."""
    first_seen = {}
    for position, case in enumerate(cases):
        first_seen.setdefault(case.group, position)
    order = sorted(range(len(cases)), key=lambda i: (first_seen[cases[i].group], not cases[i].is_ours, i))
    return [cases[i] for i in order]
