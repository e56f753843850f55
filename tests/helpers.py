"""Helpers shared by the tests."""
import os

import pytest
import torch

from fused_resblock.testing import randomize_norms  # noqa: F401  (one implementation, re-exported for the tests)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def freeze_norms(model: torch.nn.Module) -> torch.nn.Module:
    """BN parameters frozen (no gradient): an eval-mode forward then folds them (fine-tuning convs)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- Triton test settings
# conftest.py sets TRITON_INTERPRET=1 without a GPU before any kernel module is imported.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not TRITON_INTERPRETING
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton, not the interpreter)")
BF16 = pytest.param(
    torch.bfloat16, id="bf16",
    marks=pytest.mark.skipif(
        not ON_GPU, reason="Triton 3.8's interpreter computes bf16 tl.dot wrongly and rounds fp32->bf16 "
                           "casts toward zero; bf16 is checked on a GPU"),
)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16]


# --------------------------------------------------------------------------- backward checks
def float64_cpu(values):
    """float64 CPU copies of every tensor in a list or dict (memory formats kept, the rest as is)."""
    def convert(v):
        return v.detach().to("cpu", torch.float64) if isinstance(v, torch.Tensor) else v
    if isinstance(values, dict):
        return {k: convert(v) for k, v in values.items()}
    return [convert(v) for v in values]


def check_grads(names, fused, ref_t, ref64, dtype):
    """Same presence, dtype, shape and memory format as the reference at ``dtype``; values by the rule."""
    from fused_resblock.backends.reference import memory_format_of
    from fused_resblock.testing import assert_rule

    assert len(fused) == len(ref_t) == len(names)
    for name, f, t, r in zip(names, fused, ref_t, ref64):
        assert (f is None) == (t is None), f"{name}: fused {'absent' if f is None else 'present'}, reference not"
        if f is None:
            continue
        assert f.dtype == t.dtype and f.shape == t.shape and f.device == t.device, (
            f"{name}: fused {f.dtype} {tuple(f.shape)}, reference {t.dtype} {tuple(t.shape)}")
        assert memory_format_of(f) == memory_format_of(t), f"{name}: memory format {f.stride()} vs {t.stride()}"
        assert_rule(name, f, r, t, dtype)


# --------------------------------------------------------------------------- eval-mode module checks
def check_eval_against_torch(reference_model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype,
                             backend: str, device) -> torch.Tensor:
    """A converted copy of ``reference_model`` forced onto ``backend``, in eval mode without grad, against
    float64 and against PyTorch at ``dtype``, by the rule. Returns the fused output."""
    import copy

    import fused_resblock as frb
    from fused_resblock.testing import check_rule

    reference_model = reference_model.eval()
    fused = frb.convert(copy.deepcopy(reference_model).to(device, dtype), backend=backend).eval()
    torch_model = copy.deepcopy(reference_model).to(device, dtype)
    ref64 = copy.deepcopy(reference_model).double()
    x_fused = x.to(device, dtype)
    with torch.no_grad():
        out = fused(x_fused)
        report = check_rule("out", out, ref64(x.double()), torch_model(x_fused), dtype)
    assert report.passed, str(report)
    if out.dim() == 4:
        from fused_resblock.backends.reference import memory_format_of

        assert memory_format_of(out) == memory_format_of(x_fused), "the output keeps the input's memory format"
    return out


def measure_backends_afresh(monkeypatch, tmp_path):
    """auto's per-shape choice made afresh (measurement on, an empty cache file under ``tmp_path``);
    returns the file's path. The caller clears the backends' selection caches when done."""
    from fused_resblock import backends
    from fused_resblock.backends import choice

    monkeypatch.setenv("FUSED_RESBLOCK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", "1")
    monkeypatch.setattr(choice, "CHOOSER", choice.BackendChooser(tmp_path / "backends.json"))
    backends.clear_caches()
    return tmp_path / "backends.json"

