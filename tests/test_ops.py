"""The custom ops: opcheck, gradcheck, input errors, backend selection, folding cache, torch.compile."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import fused_resblock as frb
from fused_resblock import backends, models, ops
from fused_resblock import folding
from fused_resblock.folding import fold_uncached
from fused_resblock.backends import reference
from helpers import TRITON_INTERPRETING, randomize_norms

F64 = torch.float64


def _rand(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def _bn(c, dtype=F64, requires_grad=False):
    """(mean, invstd, weight, bias) of a random BN."""
    return (_rand(c, dtype=dtype, requires_grad=requires_grad),
            (torch.rand(c, dtype=dtype) + 0.5).requires_grad_(requires_grad),
            _rand(c, dtype=dtype, requires_grad=requires_grad),
            _rand(c, dtype=dtype, requires_grad=requires_grad))


# (op, args, kwargs) samples covering every optional input
def _conv_bias_act_samples(requires_grad=False):
    rg = requires_grad
    return [
        (ops._conv_bias_act, (_rand(2, 4, 5, 5, requires_grad=rg), _rand(6, 4, 3, 3, requires_grad=rg),
                              _rand(6, requires_grad=rg), [1, 1], [1, 1], [1, 1], 1,
                              None, 1, 0, None, None, 1, True, "reference")),
        (ops._conv_bias_act, (_rand(2, 4, 6, 6, requires_grad=rg), _rand(8, 2, 3, 3, requires_grad=rg),
                              None, [2, 2], [2, 2], [2, 2], 2,
                              _rand(2, 4, 6, 6, requires_grad=rg), 2, 2,
                              _rand(2, 3, 6, 6, requires_grad=rg), _rand(8, 3, 1, 1, requires_grad=rg), 2,
                              True, "reference")),
    ]


def _mixed_layouts(samples):
    """Each sample again with x channels_last and the weight not, and the other way round: a user who
    converts only the input (or only the model) to channels_last; the weight's gradient then follows
    the contract's rule (reference.weight_grad_format), which the fake kernels must state exactly."""
    mixed = []
    for op, args in samples:
        x, weight = args[0], args[1]
        for cl_x, cl_w in ((True, False), (False, True)):
            if weight.shape[2:] == (1, 1) and cl_w:
                continue  # a 1x1 weight is both formats at once
            nx = x.detach().contiguous(memory_format=torch.channels_last if cl_x else torch.contiguous_format)
            nw = weight.detach().contiguous(memory_format=torch.channels_last if cl_w else torch.contiguous_format)
            mixed.append((op, (nx.requires_grad_(x.requires_grad), nw.requires_grad_(weight.requires_grad),
                               *args[2:])))
    return mixed


def _conv_stats_samples(requires_grad=False):
    rg = requires_grad
    return [
        (ops._conv_stats, (_rand(2, 4, 5, 5, requires_grad=rg), _rand(6, 4, 3, 3, requires_grad=rg), None,
                           [1, 1], [1, 1], [1, 1], 1, None, None, None, None, False, True, "reference")),
        (ops._conv_stats, (_rand(3, 4, 5, 5, requires_grad=rg), _rand(6, 2, 1, 1, requires_grad=rg),
                           _rand(6, requires_grad=rg), [2, 2], [0, 0], [1, 1], 2,
                           *_bn(4, requires_grad=rg), True, True, "reference")),
        (ops._conv_stats, (_rand(2, 4, 5, 5, requires_grad=rg), _rand(6, 4, 3, 3, requires_grad=rg), None,
                           [1, 1], [1, 1], [1, 1], 1, *_bn(4, requires_grad=rg)[:2], None, None, True, False,
                           "reference")),
    ]


def _bn_add_act_samples(requires_grad=False):
    rg = requires_grad
    return [
        (ops._bn_add_act, (_rand(2, 6, 4, 4, requires_grad=rg), *_bn(6, requires_grad=rg),
                           _rand(2, 6, 4, 4, requires_grad=rg), None, None, None, None, 1, 0, True, "reference")),
        (ops._bn_add_act, (_rand(2, 6, 4, 4, requires_grad=rg), *_bn(6, requires_grad=rg),
                           _rand(2, 5, 4, 4, requires_grad=rg), *_bn(5, requires_grad=rg), 1, 0, True, "reference")),
        (ops._bn_add_act, (_rand(2, 8, 3, 3, requires_grad=rg), *_bn(8, requires_grad=rg)[:2], None, None,
                           _rand(2, 4, 6, 6, requires_grad=rg), None, None, None, None, 2, 2, False, "reference")),
    ]


ALL_SAMPLES = {
    "conv_bias_act": _conv_bias_act_samples,
    "conv_bias_act_mixed_layouts": lambda requires_grad=False: _mixed_layouts(_conv_bias_act_samples(requires_grad)),
    "conv_stats": _conv_stats_samples,
    "conv_stats_mixed_layouts": lambda requires_grad=False: _mixed_layouts(_conv_stats_samples(requires_grad)),
    "bn_add_act": _bn_add_act_samples,
}


@pytest.mark.parametrize("name", list(ALL_SAMPLES))
def test_opcheck(name):
    for op, args in ALL_SAMPLES[name](requires_grad=True):
        torch.library.opcheck(op, args)
    for op, args in ALL_SAMPLES[name](requires_grad=False):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", list(ALL_SAMPLES))
def test_gradcheck(name):
    for op, args in ALL_SAMPLES[name](requires_grad=True):
        fn, inputs = _differentiable_inputs(op, args)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _differentiable_inputs(op, args):
    """(fn of the tensors that require grad, those tensors): what gradcheck and gradgradcheck take."""
    def fn(*tensors):
        it = iter(tensors)
        full = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]
        out = op(*full)
        return out if isinstance(out, torch.Tensor) else tuple(o for o in out if o.numel())
    return fn, tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)


@pytest.mark.parametrize("name", ["conv_bias_act", "conv_stats", "bn_add_act"])
def test_gradgradcheck(name):
    """Double backward (create_graph=True: gradient penalties, Hessian-vector products) is exact.
    fast_mode checks random projections of the Jacobians (the full ones take minutes here)."""
    for op, args in ALL_SAMPLES[name](requires_grad=True):
        fn, inputs = _differentiable_inputs(op, args)
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("name", ["conv_bias_act", "conv_stats", "bn_add_act"])
def test_vmap_over_an_op_calls_it_per_element(name):
    for op, args in ALL_SAMPLES[name]():
        batched = torch.stack([args[0], torch.randn_like(args[0])])
        got = torch.func.vmap(lambda first: op(first, *args[1:]))(batched)
        expected = [op(first, *args[1:]) for first in batched]
        if isinstance(got, torch.Tensor):
            got, expected = (got,), (torch.stack(expected),)
        else:
            expected = [torch.stack(parts) for parts in zip(*expected)]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batched_gradients_through_a_model(train):
    """is_grads_batched=True (legacy vmap over the backward ops) and jacobian(vectorize=True)."""
    reference = randomize_norms(tv.BasicBlock(4, 6, 2, nn.Sequential(tv.conv1x1(4, 6, 2), nn.BatchNorm2d(6))))
    reference = reference.double().train(train)
    fused = frb.convert(copy.deepcopy(reference))
    x = _rand(2, 4, 6, 6)
    seeds = _rand(3, 2, 6, 3, 3)
    found = []
    for block in (fused, reference):
        xx = x.clone().requires_grad_()
        found.append(torch.autograd.grad(block(xx), xx, seeds, is_grads_batched=True)[0])
    torch.testing.assert_close(found[0], found[1], rtol=1e-10, atol=1e-12)
    if not train:  # running statistics: the function is the same at every call
        jacobians = [torch.autograd.functional.jacobian(block, x[:1], vectorize=True) for block in (fused, reference)]
        torch.testing.assert_close(jacobians[0], jacobians[1], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not TRITON_INTERPRETING, reason="the triton backend on CPU tensors needs the interpreter")
def test_double_backward_under_a_forced_kernel_backend_is_a_clear_error():
    op, args = _conv_bias_act_samples(requires_grad=True)[0]
    args = tuple(a.float().detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    args = (*args[:-1], "triton")
    with pytest.raises(frb.BackendUnsupportedError, match="double backward"):
        torch.autograd.grad(op(*args).sum(), args[0], create_graph=True)
    torch.autograd.grad(op(*args).sum(), args[0])  # a plain backward works


def test_block_gradcheck_train_and_eval():
    block = randomize_norms(tv.BasicBlock(3, 4, 2, nn.Sequential(tv.conv1x1(3, 4, 2), nn.BatchNorm2d(4)))).double()
    frb.convert(block)
    x = _rand(2, 3, 5, 5, requires_grad=True)
    for train in (True, False):
        block.train(train)
        snapshot = [b.clone() for b in block.buffers()]

        def fn(x, train=train):
            if train:  # running stats must not drift between gradcheck's calls
                with torch.no_grad():
                    for b, saved in zip(block.buffers(), snapshot):
                        b.copy_(saved)
            return block(x)
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def block():
    return frb.convert(tv.BasicBlock(8, 8)).eval()


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(8, 9, 9), ValueError, "4-D"),
    (torch.randn(2, 5, 9, 9), ValueError, "expected 8 channels, got 5"),
    (torch.randint(0, 5, (2, 8, 9, 9)), TypeError, "floating-point"),
    (torch.randn(2, 8, 9, 9, dtype=torch.float64), TypeError, "dtype"),
    (torch.randn(2, 8, 9, 9, device="meta"), RuntimeError, "meta"),
])
def test_bad_input_errors(block, x, error, match):
    with pytest.raises(error, match=match):
        block(x)
    block.train()
    with pytest.raises(error, match=match):
        block(x)


def test_not_a_tensor(block):
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.conv_bias_act([1.0], block.conv1.weight)
    for mode in (False, True):  # a TypeError, as torchvision's conv raises, in eval (folded) too
        with torch.no_grad(), pytest.raises(TypeError, match="torch.Tensor"):
            block.train(mode)([torch.randn(1, 8, 5, 5)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(residual=torch.randn(8, 5, 5)), "residual: expected a 4-D tensor"),
    (dict(residual=torch.randn(1, 8, 5, 5), residual_stride=0), "residual_stride"),
    (dict(shortcut_x=torch.randn(1, 8, 5, 5), shortcut_weight=torch.randn(8, 8, 1, 1), shortcut_stride=0),
     "shortcut_stride"),
    # a residual of another shape than the output: padded or cropped it would be a silent wrong answer
    (dict(residual=torch.randn(1, 4, 5, 5)), r"residual of shape \(1, 4, 5, 5\) does not match"),
    (dict(residual=torch.randn(1, 16, 5, 5)), "does not match the output's shape"),
    (dict(residual=torch.randn(1, 8, 9, 9)), "does not match the output's shape"),
    (dict(residual=torch.randn(2, 8, 5, 5)), "does not match the output's shape"),
    (dict(residual=torch.randn(1, 4, 5, 5), residual_offset=5), "from channel 5"),
    (dict(shortcut_x=torch.randn(1, 8, 5, 5), shortcut_weight=torch.randn(4, 8, 1, 1)),
     "projection shortcut of shape"),
    (dict(shortcut_x=torch.randn(1, 8, 5, 5), shortcut_weight=torch.randn(8, 8, 1, 1), shortcut_stride=2),
     "projection shortcut of shape"),
])
def test_bad_residual_and_shortcut_arguments(kwargs, match):
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match=match):
        ops.conv_bias_act(x, w, padding=1, **kwargs)
    if "shortcut_x" not in kwargs:
        mean, invstd = torch.zeros(8), torch.ones(8)
        with pytest.raises(ValueError, match=match):
            ops.bn_add_act(x, (mean, invstd, None, None), **kwargs)


@pytest.mark.parametrize("vector", [torch.ones(1), torch.ones(8, 1), torch.tensor(1.0), torch.ones(9)])
def test_per_channel_vectors_hold_one_value_per_channel(vector):
    """A broadcastable bias or BN vector: the CPU's reference would broadcast it, a GPU kernel read
    it at ptr + channel (past its end); every backend refuses it before dispatch."""
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    vec = torch.randn(8)
    match = r"expected one value per channel, shape \(8,\)"
    with pytest.raises(ops.InputShapeError, match="bias: " + match):
        ops.conv_bias_act(x, w, vector, padding=1)
    with pytest.raises(ops.InputShapeError, match="bias: " + match):
        ops.conv_stats(x, w, vector, padding=1)
    with pytest.raises(ops.InputShapeError, match="in_norm invstd: " + match):
        ops.conv_stats(x, w, padding=1, in_norm=(vec, vector, vec, vec))
    with pytest.raises(ops.InputShapeError, match="norm weight: " + match):
        ops.bn_add_act(x, (vec, vec.abs(), vector, None))
    with pytest.raises(ops.InputShapeError, match="residual_norm bias: " + match):
        ops.bn_add_act(x, (vec, vec.abs(), None, None), residual=x, residual_norm=(vec, vec.abs(), vec, vector))
    ops.bn_add_act(x, (vec, vec.abs(), vec, vec), residual=x, residual_norm=(vec, vec.abs(), None, None))  # valid


def test_sizes_past_32_bit_row_or_depth_indexing_leave_the_kernels():
    """The kernels index output pixels and taps x channels in 32 bits: such a configuration says so,
    and both kernel backends refuse it (auto runs the reference, a forced kernel raises)."""
    from fused_resblock.backends import conv_geometry_reason

    def config(x_shape, w_shape, padding=1):
        x, w = torch.empty(x_shape, device="meta"), torch.empty(w_shape, device="meta")
        return ops._config(x, w, (1, 1), (padding, padding), (1, 1), 1)
    assert "indexing" not in config((1024, 64, 224, 224), (64, 64, 3, 3))  # 51M rows: fine
    assert "indexing" not in config((128, 8, 4094, 4094), (8, 8, 3, 3))  # padded 4096^2 x 128: the bound
    past = config((128, 8, 4096, 4096), (8, 8, 3, 3))  # 2^31 output pixels
    assert "2147483648 output pixels" in past["indexing"]
    assert conv_geometry_reason(past) == past["indexing"]
    deep = config((1, 2 ** 28, 3, 3), (8, 2 ** 28, 3, 3), padding=0)  # depth 9 * 2^28
    assert "2415919104 taps" in deep["indexing"]


def test_batch_norm_needs_more_than_one_value():
    """As nn.BatchNorm2d, the batch is counted before it is refused (the count is momentum=None's
    average: code that catches the error and goes on must see torchvision's statistics)."""
    reference = tv.Bottleneck(16, 4).train()
    fused = frb.convert(copy.deepcopy(reference))
    x = torch.randn(1, 16, 2, 2)  # bn1 sees 4 values per channel; bn2, after the stride... 1x1 at stride 2
    reference.conv2.stride = fused.conv2.stride = (2, 2)
    for m in (reference, fused):
        with pytest.raises(ValueError, match="more than 1 value"):
            m(x)
    for (name, a), b in zip(reference.named_buffers(), fused.buffers()):
        assert torch.equal(a, b), name
    assert fused.bn2.num_batches_tracked == 1 and fused.bn3.num_batches_tracked == 0


@pytest.mark.parametrize("train", [False, True])
def test_an_input_smaller_than_the_kernel_is_a_runtime_error(train):
    """torch's conv raises a RuntimeError; every backend says the same before it launches."""
    x = torch.randn(2, 8, 2, 6)
    weight = torch.randn(8, 8, 3, 3)
    with pytest.raises(RuntimeError, match="smaller than the"):
        ops.conv_bias_act(x, weight)
    with pytest.raises(RuntimeError, match="smaller than the"):
        ops.conv_stats(x, weight)


# --------------------------------------------------------------------------- backend selection
def test_forced_backend_never_falls_back(block, monkeypatch):
    x = torch.randn(2, 8, 9, 9)
    frb.set_backend(block, "cuda")
    with pytest.raises(frb.BackendUnsupportedError, match="'cuda' \\(forced\\)"):
        block(x)
    frb.set_backend(block, None)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    backends.clear_caches()
    with pytest.raises(frb.BackendUnsupportedError, match="cuda"):
        block(x)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown fused_resblock backend 'bogus'"):
        block(x)


def test_auto_on_cpu_runs_reference_without_warning(block):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(torch.randn(2, 8, 9, 9))


def test_auto_on_gpu_without_kernel_warns_once(monkeypatch):
    """Selection logic for a CUDA device whose configuration no kernel backend supports."""
    monkeypatch.setattr(backends, "AUTO_ORDER", ("cuda",))
    config = {"device": torch.device("cuda", 0), "dtype": torch.float16}
    with pytest.warns(frb.FusedResblockFallbackWarning, match="conv_stats"):
        chosen = backends.select("conv_stats", "auto", config)
    assert chosen is reference
    backends.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("conv_stats", "auto", config) is reference


def test_availability_report_names_every_backend():
    report = backends.availability()
    assert set(report) == set(backends.NAMES)
    assert report["reference"] is None


# --------------------------------------------------------------------------- folding cache
def test_fold_cache_hits_and_invalidates(monkeypatch):
    from fused_resblock import folding

    model = models.resnet18(num_classes=4).eval()
    blk = model.layer1[0]
    cache = blk.fold_cache
    folds = []
    monkeypatch.setattr(folding, "fold_uncached", lambda *args: folds.append(1) or fold_uncached(*args))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        first = cache.fold(blk.conv1, blk.bn1, torch.float32)
        computed = len(folds)
        model(torch.randn(1, 3, 32, 32))
        assert cache.fold(blk.conv1, blk.bn1, torch.float32) is first          # a hit: no re-fold
        assert len(folds) == computed, "hits compute nothing"
        before = first[0].clone()
        blk.bn1.running_var.mul_(2)                                            # a buffer changed in place
        second = cache.fold(blk.conv1, blk.bn1, torch.float32)
        # refolded into the same tensors (a captured CUDA graph keeps valid pointers), with new values
        assert all(a is b for a, b in zip(second, first))
        assert not torch.equal(second[0], before)
        torch.testing.assert_close(second[0], fold_uncached(blk.conv1, blk.bn1, torch.float32)[0])
        before = second[0].clone()
        state = copy.deepcopy(model.state_dict())
        state["layer1.0.conv1.weight"].mul_(3)
        model.load_state_dict(state)                                           # load_state_dict copies in place
        third = cache.fold(blk.conv1, blk.bn1, torch.float32)
        torch.testing.assert_close(third[0], before * 3)
        model.double()                                                         # new tensors
        fourth = cache.fold(blk.conv1, blk.bn1, torch.float64)
        assert fourth[0] is not third[0] and fourth[0].dtype == torch.float64


def test_refold_updates_a_captured_fold_in_place():
    """A graph captured from the model reads the cached folds: refold() after an in-place weight
    update writes the new fold into those very tensors (no forward needed), and keeps no dead entries."""
    model = models.resnet18(num_classes=4).eval()
    blk = model.layer1[0]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        captured = blk.fold_cache.fold(blk.conv1, blk.bn1, torch.float32)
        pointer = captured[0].data_ptr()
        assert frb.refold(model) == 0  # nothing changed
        blk.conv1.weight.mul_(2)  # an optimizer step, an EMA update
        assert frb.refold(model) == 1
        assert captured[0].data_ptr() == pointer
        torch.testing.assert_close(captured[0], fold_uncached(blk.conv1, blk.bn1, torch.float32)[0])


def test_fold_cache_is_neither_pickled_nor_deep_copied():
    """The folds belong to the original's tensors: a copy starts empty (and the pickle stays small)."""
    import pickle

    model = models.resnet18(num_classes=4).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(model.layer1[0].fold_cache) > 0
    assert len(copy.deepcopy(model).layer1[0].fold_cache) == 0
    assert len(pickle.loads(pickle.dumps(model)).layer1[0].fold_cache) == 0


def test_inference_mode_parameters_and_a_later_backward():
    """Parameters made under inference_mode have no version counter (their folds are not cached);
    folds made under inference_mode are ordinary tensors, so a later backward (saliency) still works."""
    with torch.inference_mode():
        built_there = models.resnet18(num_classes=4).eval()
        out = built_there(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 4)
    model = models.resnet18(num_classes=4).eval().requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        model(x)  # the first call, caching its folds
    x.requires_grad_(True)
    model(x).sum().backward()  # frozen parameters, a gradient for the input
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_folded_weights_are_channels_last_off_the_cpu(device):
    """GPU kernels read KRSC weights; the CUDA binding would copy any other layout per call.
    (The meta device stands in for a GPU: the layout rule is "not the CPU".)"""
    from fused_resblock.folding import fold_uncached

    conv, norm = nn.Conv2d(8, 16, 3, bias=False).to(device), nn.BatchNorm2d(16).to(device).eval()
    weight, bias = fold_uncached(conv, norm, torch.float16)
    assert weight.dtype == torch.float16 and weight.shape == conv.weight.shape and bias.shape == (16,)
    on_gpu_layout = weight.is_contiguous(memory_format=torch.channels_last)
    assert on_gpu_layout == (device != "cpu") and (device != "cpu" or weight.is_contiguous())


def test_writes_through_data_refold_after_a_mode_switch_or_a_forced_refold():
    """``p.data.mul_()`` (older EMA and optimizer code) bumps no version counter: a train()/eval()
    call marks the folds stale (refolded in place), and refold(force=True) redoes them all."""
    model = randomize_norms(models.resnet18(num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32)
    blk = model.layer1[0]
    with torch.no_grad():
        model(x)
        captured = blk.fold_cache.fold(blk.conv1, blk.bn1, torch.float32)[0]
        for p in model.parameters():
            p.data.mul_(1.5)
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.data.mul_(1.25)
        expected = frb.revert(copy.deepcopy(model))(x)
        model.eval()  # already in eval mode: the call alone marks the folds stale
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert blk.fold_cache.fold(blk.conv1, blk.bn1, torch.float32)[0] is captured  # refolded in place
        for p in model.parameters():
            p.data.mul_(0.5)
        expected = frb.revert(copy.deepcopy(model))(x)
        assert frb.refold(model) == 0  # no version counter moved
        assert frb.refold(model, force=True) == sum(len(m.fold_cache) for m in model.modules()
                                                    if isinstance(m, frb.blocks.FusedModule))
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_a_mode_switch_between_forward_and_backward_keeps_the_first_graph():
    """A perceptual loss through a frozen net whose helper calls eval() before each use: the second
    eval() marks the folds stale and the second forward refolds them, in place, into the fold the
    first forward saved for its backward. That refold bumps no version (the values are what the
    versions say they are); a real in-place update still raises at backward, as in torchvision."""
    reference = randomize_norms(models.cifar_resnet20(num_classes=4)).double().requires_grad_(False)
    fused = frb.revert(copy.deepcopy(reference))
    frb.convert(fused)
    fake, real = _rand(2, 3, 8, 8), _rand(2, 3, 8, 8)
    grads = []
    for net in (fused, reference):
        x = fake.clone().requires_grad_()
        first = net.eval()(x)
        loss = (first - net.eval()(real)).square().sum()
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    for net in (fused, reference):
        x = fake.clone().requires_grad_()
        out = net(x)
        with torch.no_grad():
            net.layer1[0].conv1.weight.mul_(2)
        net(real)  # the fused net refolds here: a versioned write into the saved fold
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_a_fold_belongs_to_its_very_tensors():
    """Ids and addresses are reused once freed (the CUDA caching allocator hands a freed block to the
    next tensor of its size): a new weight whose id, address and version match the old key (forced
    here) is still refolded."""
    from fused_resblock import folding

    block = frb.convert(randomize_norms(tv.BasicBlock(4, 4))).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        block(x)
        block.conv1.weight = nn.Parameter(torch.randn_like(block.conv1.weight))
        pairs = (block.conv1, block.bn1)
        slot = tuple(map(id, pairs))
        entry = block.fold_cache._entries[slot]
        block.fold_cache._entries[slot] = (folding._key(folding._tensors(pairs), torch.float32, pairs), *entry[1:])
        expected = frb.revert(copy.deepcopy(block))(x)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd-fused", "adam-fused", "sgd"])
def test_an_optimizer_step_refolds_what_it_stepped(optimizer):
    """Fused optimizers (fused=True) write parameters without bumping their version counters:
    an optimizer step marks stale the folds that read its parameters, and only those."""
    kind, _, fused = optimizer.partition("-")
    model = randomize_norms(models.resnet18(num_classes=4)).eval()  # fine-tuning under frozen BN
    other = randomize_norms(models.resnet18(num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    make = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    opt = make(model.parameters(), lr=0.05, **({"fused": True} if fused else {}))
    with torch.no_grad():
        before = model(x)
        other(x)
    model(x).square().mean().backward()
    opt.step()
    assert all(entry[0] is not folding._STALE for entry in other.layer1[0].fold_cache._entries.values())
    with torch.no_grad():
        after, expected = model(x), frb.revert(copy.deepcopy(model))(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_moving_a_model_drops_its_folds():
    """.to()/.double() make new tensors: the old folds would only hold memory (on the old device)."""
    model = models.resnet18(num_classes=4).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(model.layer1[0].fold_cache) > 0 and len(model.fold_cache) > 0
    model.double()
    assert len(model.layer1[0].fold_cache) == 0 and len(model.fold_cache) == 0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_fold_follows_an_optimizer_step():
    model = frb.convert(randomize_norms(tv.BasicBlock(4, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(2, 4, 6, 6)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    reference = frb.revert(copy.deepcopy(model))
    with torch.no_grad():
        after, expected = model(x), reference(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def _pair_f64(block=None):
    reference = randomize_norms(block or tv.BasicBlock(4, 4)).double().eval()
    return frb.convert(copy.deepcopy(reference)), reference


def test_a_storage_replaced_through_data_is_refolded_at_a_reused_address():
    """``p.data = new`` keeps the Parameter and its version; after two such writes the allocator may
    hand back the first storage's address (forced here: the key is made to match): the dead storage
    still tells the fold is stale (vector_to_parameters, MoCo-style EMA)."""
    fused, reference = _pair_f64()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    with torch.no_grad():
        fused(x)
        new = torch.randn_like(fused.conv1.weight)
        fused.conv1.weight.data = new.clone()
        reference.conv1.weight.data = new.clone()
        pairs = (fused.conv1, fused.bn1)
        slot = tuple(map(id, pairs))
        entry = fused.fold_cache._entries[slot]
        fused.fold_cache._entries[slot] = (folding._key(folding._tensors(pairs), F64, pairs), *entry[1:])
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-12)


def test_jit_trace_reads_the_weights_not_a_cached_fold():
    """A trace after an eager forward must not bake that forward's folds in as constants."""
    fused, reference = _pair_f64()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about our Python control flow
        fused(x)
        traced, traced_reference = torch.jit.trace(fused, (x,)), torch.jit.trace(reference, (x,))
        for t in (traced, traced_reference):
            for p in t.parameters():
                p.mul_(1.5)
            t.bn1.running_mean.add_(1.0)
        torch.testing.assert_close(traced(x), traced_reference(x), rtol=1e-12, atol=1e-12)


def test_parameters_swapped_after_an_evaluation():
    """swap_tensors (``.to()`` and ``load_state_dict`` under the swap future flag, tensor-subclass
    parameters) refuses a tensor with a weak reference: the fold cache holds none to the tensors."""
    fused, reference = _pair_f64()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    state = copy.deepcopy(randomize_norms(tv.BasicBlock(4, 4)).double().state_dict())
    with torch.no_grad():
        fused(x)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for m in (fused, reference):
            m.float().double()
            m.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-12)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_shared_memory_folds_are_not_cached():
    """model.share_memory() (Hogwild): another process writes the weights and no version counter
    here sees it (simulated with a write through .data), so every eval forward folds afresh."""
    fused, reference = _pair_f64()
    fused.share_memory()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    with torch.no_grad():
        fused(x)
        for m in (fused, reference):
            m.conv2.weight.data.mul_(1.5)
            m.bn1.running_var.data.add_(1.0)
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-12)
    assert len(fused.fold_cache) == 0


def test_dataparallel_replicas_fold_their_own_tensors():
    """DataParallel's replicas (torch's replicate(), the GPU broadcast replaced by a copy) hold
    their weights as plain tensors and copy the module's __dict__: each gets its own fold cache."""
    import sys
    import torch.nn.parallel  # noqa: F401
    replicate_module = sys.modules["torch.nn.parallel.replicate"]  # the package's name is its function

    def copies(tensors, devices, detach):
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    fused, reference = _pair_f64()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    with torch.no_grad():
        fused(x)
    original = replicate_module._broadcast_coalesced_reshape
    replicate_module._broadcast_coalesced_reshape = copies
    try:
        replicas = replicate_module.replicate(fused, [0, 1], detach=True)
    finally:
        replicate_module._broadcast_coalesced_reshape = original
    assert all(r.fold_cache is not fused.fold_cache for r in replicas)
    with torch.no_grad():
        for replica in replicas:
            torch.testing.assert_close(replica(x), reference(x), rtol=1e-12, atol=1e-12)


def test_an_optimizer_step_while_another_thread_makes_models():
    """The step hook visits every live fold cache; another thread evaluating fresh copies adds caches
    meanwhile (a trainer thread beside an evaluator thread)."""
    import sys
    import threading

    errors, stop = [], threading.Event()
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)  # unrelated to the models: its hook still visits every cache

    def stepper():
        try:
            while not stop.is_set():
                w.grad = torch.ones(1)
                opt.step()
        except Exception as exc:
            errors.append(exc)
            stop.set()

    base = nn.Sequential(*[tv.BasicBlock(4, 4) for _ in range(30)]).eval()
    x = torch.randn(1, 4, 4, 4)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows within a second when present
    thread = threading.Thread(target=stepper)
    thread.start()
    try:
        keep = []
        for _ in range(150):
            model = frb.convert(copy.deepcopy(base))
            with torch.no_grad():
                model(x)
            keep = keep[-20:] + [model]
            if stop.is_set():
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors, errors


def test_torch_export_eval():
    """torch.export traces the fused ops (the fold becomes part of the exported graph)."""
    model = randomize_norms(models.cifar_resnet20()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        ops_seen = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
        assert any("fused_resblock.conv_bias_act" in op for op in ops_seen), ops_seen
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torchscript_says_what_to_use_instead():
    model = models.resnet18(num_classes=4).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in newer torch
        with pytest.raises(RuntimeError, match="torch.compile or torch.export"):
            torch.jit.script(model)
        scripted = torch.jit.script(frb.revert(copy.deepcopy(model)))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_eval_inductor():
    model = randomize_norms(models.cifar_resnet20()).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_channels_last", [True, False], ids=["x_cl-w_nchw", "x_nchw-w_cl"])
def test_compile_inductor_backward_with_mixed_layouts(x_channels_last):
    """Inductor holds the backward's gradients to the fake kernels' strides: they must be the real ones."""
    torch._dynamo.reset()
    x = torch.randn(2, 8, 6, 6).contiguous(
        memory_format=torch.channels_last if x_channels_last else torch.contiguous_format)
    w = torch.randn(12, 8, 3, 3).contiguous(
        memory_format=torch.contiguous_format if x_channels_last else torch.channels_last)

    def loss(x, w):
        return ops.conv_bias_act(x, w, padding=1, relu=True, backend="reference").square().sum()

    grads = []
    for fn in (torch.compile(loss, fullgraph=True), loss):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):  # no stale compiled graph
            fn(xi, wi).backward()
        grads.append((xi.grad, wi.grad))
    for compiled, eager in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_train_step():
    torch._dynamo.reset()
    model = randomize_norms(models.cifar_resnet20(shortcut="B")).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
