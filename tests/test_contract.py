"""The torchvision contract: classes, constructors, init, state_dicts, builders, convert/revert."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import fused_resblock as frb
from fused_resblock import models

# builder name -> torchvision builder (same architecture)
TV_BUILDERS = {name: getattr(tv, name) for name in models.IMAGENET_BUILDERS}
SMALL_BUILDERS = ["resnet18", "resnet50", "resnext50_32x4d"]


def _seeded(builder, seed=1234, **kwargs):
    torch.manual_seed(seed)
    return builder(**kwargs)


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_blocks_subclass_torchvision():
    assert issubclass(frb.FusedBasicBlock, tv.BasicBlock)
    assert issubclass(frb.FusedBottleneck, tv.Bottleneck)
    assert frb.FusedBasicBlock.expansion == 1 and frb.FusedBottleneck.expansion == 4


@pytest.mark.parametrize("kwargs, error", [
    (dict(groups=2), ValueError), (dict(base_width=32), ValueError), (dict(dilation=2), NotImplementedError)])
def test_basic_block_errors_match_torchvision(kwargs, error):
    with pytest.raises(error) as theirs:
        tv.BasicBlock(8, 8, **kwargs)
    with pytest.raises(error) as ours:
        frb.FusedBasicBlock(8, 8, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_block_attributes_and_keys():
    ds = nn.Sequential(tv.conv1x1(16, 32, 2), nn.BatchNorm2d(32))
    theirs = tv.Bottleneck(16, 8, 2, ds)
    ours = frb.FusedBottleneck(16, 8, 2, copy.deepcopy(ds))
    for attr in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample", "stride"):
        assert hasattr(ours, attr)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "downsample.1.num_batches_tracked" in ours.state_dict()


@pytest.mark.parametrize("name", models.IMAGENET_BUILDERS)
def test_seeded_builders_equal_torchvision_and_load_strictly(name):
    ours = _seeded(getattr(models, name), num_classes=10)
    theirs = _seeded(TV_BUILDERS[name], num_classes=10)
    _assert_same_state(ours, theirs)
    # strict round trips both ways
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("block, tv_block", [(frb.FusedBottleneck, tv.Bottleneck), (frb.FusedBasicBlock, tv.BasicBlock)])
def test_resnet_built_from_our_blocks(block, tv_block):
    ours = _seeded(tv.ResNet, block=block, layers=[3, 4, 6, 3], zero_init_residual=True)
    theirs = _seeded(tv.ResNet, block=tv_block, layers=[3, 4, 6, 3], zero_init_residual=True)
    _assert_same_state(ours, theirs)
    last_bn = "bn3" if block is frb.FusedBottleneck else "bn2"
    for m in ours.modules():
        if isinstance(m, block):
            assert torch.count_nonzero(getattr(m, last_bn).weight) == 0  # zero_init_residual reached us


def test_replace_stride_with_dilation_bottleneck():
    ours = _seeded(models.resnet50, replace_stride_with_dilation=[False, True, True])
    theirs = frb.revert(copy.deepcopy(ours))
    assert ours.layer4[1].conv2.dilation == (4, 4)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_builders_accept_torchvision_weights(monkeypatch):
    source = tv.resnet18()
    monkeypatch.setattr(tv.ResNet18_Weights, "get_state_dict", lambda self, *a, **k: source.state_dict())
    model = models.resnet18(weights="IMAGENET1K_V1")
    _assert_same_state(model, source)
    model = models.resnet18(weights=tv.ResNet18_Weights.DEFAULT)
    assert model.fc.out_features == 1000
    with pytest.raises(TypeError, match="ResNet18_Weights"):  # torchvision's own check
        models.resnet18(weights=tv.ResNet50_Weights.DEFAULT)


def test_builder_fixed_arguments_rejected():
    for build in (models.resnext50_32x4d, tv.resnext50_32x4d):  # torchvision's error, word for word
        with pytest.raises(ValueError, match="The parameter 'groups' expected value 32 but got 8"):
            build(groups=8)


def test_weights_with_another_num_classes_is_an_error_as_in_torchvision(monkeypatch):
    """A 10-class model asked with ImageNet weights: torchvision refuses; a silent 1000-class model
    would surprise whoever fine-tunes it."""
    monkeypatch.setattr(tv.ResNet18_Weights, "get_state_dict", lambda self, *a, **k: tv.resnet18().state_dict())
    for build in (models.resnet18, tv.resnet18):
        with pytest.raises(ValueError, match="'num_classes' expected value 1000 but got 10"):
            build(weights="DEFAULT", num_classes=10)


def test_weights_enums_are_torchvisions_and_the_plain_nets_take_none():
    assert models.ResNet50_Weights is tv.ResNet50_Weights and "Wide_ResNet101_2_Weights" in models.__all__
    with torch.device("meta"):
        assert models.plain18(weights=None, progress=False, num_classes=7).fc.out_features == 7
    with pytest.raises(ValueError, match="no pretrained weights"):
        models.plain34(weights="DEFAULT")


def test_builders_take_torchvisions_legacy_calls():
    """pretrained=..., weights and progress positionally: deprecated in torchvision, still accepted."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for call in (lambda b: b(pretrained=False), lambda b: b(None, True),
                     lambda b: b(pretrained=False, num_classes=10)):
            ours, theirs = call(models.wide_resnet50_2), call(tv.wide_resnet50_2)
            assert isinstance(ours, models.FusedResNet) and ours.fc.out_features == theirs.fc.out_features


# --------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7), (1202, 19.4)])
def test_cifar_parameter_counts_match_the_paper(depth, millions):
    model = getattr(models, f"cifar_resnet{depth}")()
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2 if millions < 1 else 1) == millions
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) + 1 == depth  # + the FC layer


def test_cifar_shortcut_options_and_plain():
    a, b, c = (models.cifar_resnet20(shortcut=s) for s in "ABC")
    assert isinstance(a.layer2[0].shortcut, frb.ZeroPadShortcut)
    assert isinstance(b.layer2[0].shortcut, nn.Sequential) and isinstance(b.layer1[0].shortcut, nn.Identity)
    assert isinstance(c.layer1[0].shortcut, nn.Sequential)
    plain = models.cifar_plain20()
    assert all(blk.shortcut is None for blk in plain.modules() if isinstance(blk, frb.CifarBasicBlock))
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in a.parameters())
    with pytest.raises(ValueError):
        models.cifar_resnet20(shortcut="D")
    with pytest.raises(TypeError):
        models.cifar_plain20(shortcut="A")


def test_plain_imagenet_nets():
    for builder, blocks in ((models.plain18, 8), (models.plain34, 16)):
        model = builder(num_classes=10)
        found = [m for m in model.modules() if isinstance(m, frb.PlainBasicBlock)]
        assert len(found) == blocks
        assert not any(isinstance(m, tv.BasicBlock) for m in model.modules())


# --------------------------------------------------------------------------- convert / revert
@pytest.mark.parametrize("name", models.IMAGENET_BUILDERS)
def test_convert_revert_every_torchvision_builder(name):
    model = TV_BUILDERS[name](num_classes=10)
    params = {k: id(v) for k, v in model.named_parameters()}
    buffers = {k: id(v) for k, v in model.named_buffers()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = frb.convert(model)
    assert out is model and isinstance(model, frb.FusedResNet)
    assert all(type(m) is not tv.BasicBlock and type(m) is not tv.Bottleneck for m in model.modules())
    assert {k: id(v) for k, v in model.named_parameters()} == params
    assert {k: id(v) for k, v in model.named_buffers()} == buffers
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    frb.convert(model)  # idempotent
    assert {k: id(v) for k, v in model.named_parameters()} == params
    frb.revert(model)
    assert type(model) is tv.ResNet
    assert not any(isinstance(m, frb.blocks.FusedModule) for m in model.modules())
    assert {k: id(v) for k, v in model.named_parameters()} == params


def test_convert_nested_model_and_optimizer_keeps_working():
    backbone = tv.resnet18(num_classes=4)
    model = nn.Sequential(backbone, nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    frb.convert(model)
    assert isinstance(model[0], frb.FusedResNet) and isinstance(model[0].layer1[0], frb.FusedBasicBlock)
    w = model[0].layer1[0].conv1.weight
    before = w.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, w.detach())


def test_convert_leaves_user_subclasses_alone():
    class MyBlock(tv.BasicBlock):
        pass

    blk = MyBlock(4, 4)
    frb.convert(blk)
    assert type(blk) is MyBlock


def test_backend_names_are_checked(monkeypatch):
    from fused_resblock import backends
    with pytest.raises(ValueError, match="must be a string"):
        backends.resolve_name(3)
    monkeypatch.setenv(backends.ENV_VAR, "  ")  # blank is unset, as empty is
    assert backends.resolve_name(None) == "auto"
    monkeypatch.setenv(backends.ENV_VAR, " Triton ")
    assert backends.resolve_name(None) == "triton"


def test_convert_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown fused_resblock backend"):
        frb.convert(tv.resnet18(), backend="tpu")


def test_convert_sets_backend():
    model = frb.convert(tv.resnet18(), backend="reference")
    assert all(m.backend == "reference" for m in model.modules() if isinstance(m, frb.blocks.FusedModule))
