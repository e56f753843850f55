"""Per-block equivalence reports of a fused model against its torchvision original.

Used by ``python -m fused_resblock demo`` and ``verify``: each block (and the
whole model) is run fused and unfused on the input it sees inside the network,
and checked by the numerical rule (``testing.py``) against a float64 copy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .blocks import FusedModule
from .convert import revert
from .testing import WELL_SCALED_SPREAD, equivalence_report, randomize_norms

# The input a builder is checked with: (batch, spatial size). Big enough that no BN in train
# mode normalises over a handful of values (ill-conditioned), small enough for a CPU.
DEFAULT_INPUT = {"cifar": (4, 32), "imagenet": (4, 64)}


@dataclass
class BlockResult:
    name: str
    mode: str
    dtype: torch.dtype
    out_err: float
    out_bound: float
    worst_ratio: float      # max over every check of err / bound
    worst_check: str
    passed: bool


def build_pair(name: str, device: str = "cpu", backend=None):
    """(fused model, torchvision-equivalent unfused model) with identical parameters; random BN
    statistics and affine parameters (with a builder's 0/1 defaults, eval mode could not tell a
    fold that ignores them from a correct one)."""
    if name not in models.BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(models.BUILDERS)}")
    fused = randomize_norms(getattr(models, name)(backend=backend), WELL_SCALED_SPREAD).to(device)
    reference = revert(copy.deepcopy(fused))
    return fused, reference


def default_input(name: str, batch=None, size=None, dtype=torch.float32, device="cpu"):
    b, s = DEFAULT_INPUT["cifar" if name.startswith("cifar") else "imagenet"]
    b, s = b if batch is None else batch, s if size is None else size
    return torch.randn(b, 3, s, s, dtype=dtype, device=device)


def _block_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    """{block name: its input} captured from one eval-mode forward of ``model``."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if name and isinstance(module, FusedModule):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.__setitem__(name, args[0].detach().clone())))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return inputs


def _summarise(name: str, mode: str, dtype, reports) -> BlockResult:
    worst = max(reports, key=lambda r: r.err / r.bound if r.bound > 0 else (0.0 if r.err == 0 else float("inf")))
    ratio = worst.err / worst.bound if worst.bound > 0 else (0.0 if worst.err == 0 else float("inf"))
    out = reports[0]
    return BlockResult(name, mode, dtype, out.err, out.bound, ratio, worst.name,
                       all(r.passed for r in reports))


# Below float64 a whole network's gradients are decided by its ReLU kinks (pre-activations within
# rounding of 0). At 16 bits: in cifar_resnet20 ~2% (fp16) and ~17% (bf16) of the inner ReLU
# elements, thousands of flips, far more than the rule's fit follows (testing.MAX_INNER_KINKS,
# KINK_ROW_BUDGET), and torchvision's own model run channels_last fails that check too. At fp32 a
# deep one flips a few, which the fit now finds (torch's own channels_last run's, read from its
# pre-activations: exactly, 25 of 25 cifar_resnet56 draws); but with ~170 gradients each held to
# twice torch's error, a correct fused model still fails one now and then where no flip is left
# (4 of 41 draws, 1.0-1.8x the bound: benchmarks/NOTES.md v0.15). The whole model's row is then its
# forward (and buffers); every block's row checks gradients.
WHOLE_MODEL_GRADIENTS = (torch.float64,)
FORWARD_ONLY = "(whole model, fwd)"
FORWARD_ONLY_NOTE = (f"{FORWARD_ONLY}: below float64 the whole network's gradients hinge on ReLU kinks "
                     "(within rounding of 0; thousands at 16 bits); its forward is checked here, gradients block by block")


def verify_model(fused: nn.Module, reference: nn.Module, x: torch.Tensor, *, train_modes=(False, True),
                 per_block: bool = True) -> list:
    """BlockResults for the whole model and (optionally) each fused block, in eval and/or train mode
    (the whole model's gradients at float64 only: ``WHOLE_MODEL_GRADIENTS``)."""
    results = []
    blocks = _block_inputs(fused, x) if per_block else {}
    fused_modules = dict(fused.named_modules())
    ref_modules = dict(reference.named_modules())
    for train in train_modes:
        mode = "train" if train else "eval"
        for name, block_x in blocks.items():
            f, r = copy.deepcopy(fused_modules[name]), copy.deepcopy(ref_modules[name])
            reports = equivalence_report(f, r, block_x, train=train)
            results.append(_summarise(name, mode, x.dtype, reports))
        f, r = copy.deepcopy(fused), copy.deepcopy(reference)
        backward = x.dtype in WHOLE_MODEL_GRADIENTS
        reports = equivalence_report(f, r, x, train=train, backward=backward)
        results.append(_summarise("(whole model)" if backward else FORWARD_ONLY, mode, x.dtype, reports))
    return results


def format_table(title: str, results: list) -> str:
    lines = [title, f"{'block':<22} {'mode':<5} {'dtype':<9} {'out err':>10} {'bound':>10} "
                    f"{'worst/bound':>11}  worst check{'':<22} verdict"]
    for r in results:
        dtype = str(r.dtype).replace("torch.", "")
        lines.append(f"{r.name:<22} {r.mode:<5} {dtype:<9} {r.out_err:>10.2e} {r.out_bound:>10.2e} "
                     f"{r.worst_ratio:>11.3f}  {r.worst_check[:32]:<33} {'ok' if r.passed else 'FAIL'}")
    if any(r.name == FORWARD_ONLY for r in results):
        lines.append(FORWARD_ONLY_NOTE)
    return "\n".join(lines)
