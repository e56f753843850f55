"""The command line: doctor, verify, demo (tiny)."""
import pytest
import torch

from fused_resblock import backends
from fused_resblock.__main__ import main


def test_doctor_names_every_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in backends.NAMES:
        assert f"  {name} " in out
    assert "reference  available" in out
    assert "autotune.json" in out and "backends.json" in out and "FUSED_RESBLOCK_CUDA_PIPELINE" in out


def test_doctor_reports_an_invalid_backend_variable(capsys, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cudnn")
    assert main(["doctor"]) == 1  # the report still comes, and says what is wrong
    out = capsys.readouterr().out
    assert "-> invalid: unknown fused_resblock backend 'cudnn'" in out and "reference  available" in out


def test_doctor_reports_bad_settings_and_caches(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_RESBLOCK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSED_RESBLOCK_COMPILE_THREADS", "abc")
    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", " OFF ")
    (tmp_path / "autotune.json").write_bytes(b"\xff\xfe not text")
    (tmp_path / "backends.json").mkdir()
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "measurement: off" in out
    assert "FUSED_RESBLOCK_COMPILE_THREADS='abc'" in out and "invalid" in out
    assert "autotune.json: unusable, ignored" in out
    assert "backends.json: a directory, not a file" in out


def test_verify_draws_batch_norm_statistics():
    """With a builder's 0/1 defaults an eval fold that ignored the running statistics would pass."""
    from fused_resblock import verify

    fused, reference = verify.build_pair("cifar_resnet20")
    norm = fused.layer1[0].bn1
    assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    assert torch.equal(norm.running_mean, reference.layer1[0].bn1.running_mean)


def test_verify_one_model_float64(capsys):
    assert main(["verify", "cifar_resnet20", "--dtype", "float64", "--batch", "2", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "layer3.2" in out and "(whole model)" in out and "FAIL" not in out
    assert " eval " in out and " train " in out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_verify_below_float64_checks_the_whole_model_forward_and_says_so(capsys, dtype):
    assert main(["verify", "cifar_resnet20", "--dtype", dtype, "--whole", "--batch", "2", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "(whole model, fwd)" in out and "gradients block by block" in out


@pytest.mark.parametrize("argv", [
    ["verify", "resnet9000"], ["verify", "Tensor"],  # a name in fused_resblock.models is not a builder
    ["demo", "--models", "resnet9000"], ["verify", "cifar_resnet20", "--batch", "0"],
    ["verify", "cifar_resnet20", "--device", "meta"], ["verify", "cifar_resnet20", "--device", "nonsense"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    """Usage errors, not tracebacks (nor a silent default in place of --batch 0)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
    from fused_resblock import verify
    with pytest.raises(ValueError, match="unknown model"):
        verify.build_pair("Tensor")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs here")
def test_a_backend_that_cannot_run_here_is_a_message(capsys):
    assert main(["verify", "cifar_resnet20", "--device", "cpu", "--backend", "cuda", "--whole", "--eval",
                 "--batch", "2", "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert "verify:" in err and "cuda" in err and "Traceback" not in err
