"""``auto``'s per-shape choice between capable backends (``backends.choice``), on the CPU with fakes.

The real measurement runs on a GPU (tests/test_cuda_ext.py and the benchmarks);
here the timing is a formula, so the logic — fastest wins, memo, the file a
fresh process reads, no measurement when disabled or capturing — is checked.
"""
import json
import types
import warnings

import pytest
import torch

from fused_resblock import backends
from fused_resblock.backends import choice

FAST, SLOW = types.SimpleNamespace(NAME="fast"), types.SimpleNamespace(NAME="slow")
SPEED = {"fast": 1.0, "slow": 3.0}
KEY = ((8, 64, 56, 56, True), (64, 64, 3, 3, True), (1, 1), (1, 1), (1, 1), 1, True)


class FakeTimer:
    """Times a backend by the SPEED table and records which backends ran."""

    def __init__(self):
        self.ran = []

    def __call__(self, call):
        return call()

    def run(self, module):
        self.ran.append(module.NAME)
        return SPEED[module.NAME]


def never_time(call):
    raise AssertionError("a remembered choice must not be measured again")


def make_chooser(path, benchmark):
    return choice.BackendChooser(path, benchmark=benchmark, device_name=lambda device: "Fake GPU")


@pytest.mark.parametrize("order", [(SLOW, FAST), (FAST, SLOW)], ids=["slow_first", "fast_first"])
def test_the_faster_backend_wins_and_is_remembered(tmp_path, order):
    timer = FakeTimer()
    chooser = make_chooser(tmp_path / "backends.json", timer)
    assert chooser.choose("conv_bias_act", KEY, order, timer.run, "cuda", allowed=True) is FAST
    assert sorted(timer.ran) == ["fast", "slow"], "each candidate measured once"
    assert chooser.choose("conv_bias_act", KEY, order, timer.run, "cuda", allowed=True) is FAST
    assert len(timer.ran) == 2, "memoised in the process"
    other_shape = KEY[:-1] + (False,)
    chooser.choose("conv_bias_act", other_shape, order, timer.run, "cuda", allowed=True)
    assert len(timer.ran) == 4, "a new shape is measured"

    fresh = make_chooser(tmp_path / "backends.json", never_time)  # another process
    assert fresh.choose("conv_bias_act", KEY, order, timer.run, "cuda", allowed=True) is FAST
    data = json.loads((tmp_path / "backends.json").read_text())
    assert data["format"] == choice.FORMAT and sorted(data["entries"].values()) == ["fast", "fast"]


def test_a_failing_candidate_is_skipped(tmp_path):
    def benchmark(call):
        return call()

    def run(module):
        if module is FAST:
            raise RuntimeError("too much shared memory")
        return 1.0

    chooser = make_chooser(tmp_path / "backends.json", benchmark)
    assert chooser.choose("conv_bias_act", KEY, (FAST, SLOW), run, "cuda", allowed=True) is SLOW
    # a failure may be of the moment (out of memory): the verdict stays in this process only
    assert not (tmp_path / "backends.json").exists()
    assert chooser.choose("conv_bias_act", KEY, (FAST, SLOW), never_time, "cuda", allowed=True) is SLOW


def test_the_cuda_extensions_build_is_part_of_the_verdicts_key(tmp_path):
    """A rebuilt kernel (another sources digest) or another forced pipeline is measured afresh."""
    timer = FakeTimer()
    chooser = make_chooser(tmp_path / "backends.json", timer)
    speed = dict(SPEED, cuda=2.0)

    def run(module):
        timer.ran.append(module.NAME)
        return speed[module.NAME]

    def cuda_build(digest):
        return types.SimpleNamespace(NAME="cuda", PIPELINE=0, sources_digest=lambda: digest)
    assert chooser.choose("conv_bias_act", KEY, (cuda_build("aaaa"), SLOW), run, "cuda", allowed=True).NAME == "cuda"
    keys = list(json.loads((tmp_path / "backends.json").read_text())["entries"])
    assert len(keys) == 1 and "cuda-ext-aaaa-pipeline0" in keys[0]
    rebuilt = make_chooser(tmp_path / "backends.json", timer)  # another process, a rebuilt extension
    ran = len(timer.ran)
    rebuilt.choose("conv_bias_act", KEY, (cuda_build("bbbb"), SLOW), run, "cuda", allowed=True)
    assert len(timer.ran) == ran + 2, "measured again"


def test_no_measurement_when_disabled_or_capturing(tmp_path, monkeypatch):
    chooser = make_chooser(tmp_path / "backends.json", never_time)
    assert chooser.choose("conv_bias_act", KEY, (SLOW, FAST), FakeTimer().run, "cuda", allowed=False) is SLOW
    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", "0")
    assert choice.measurement_allowed() is False
    monkeypatch.setenv("FUSED_RESBLOCK_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choice.measurement_allowed() is None
    capturing = make_chooser(tmp_path / "other.json", never_time)
    assert capturing.choose("conv_bias_act", KEY, (SLOW, FAST), FakeTimer().run, "cuda") is SLOW
    assert not (tmp_path / "other.json").exists(), "nothing remembered while capturing"


def test_a_shape_seen_while_measurement_was_off_is_measured_once_it_is_on(tmp_path):
    """FUSED_RESBLOCK_AUTOTUNE=0 then 1 in one process: the first candidate taken while measurement
    was off is not kept as the shape's verdict."""
    timer = FakeTimer()
    chooser = make_chooser(tmp_path / "backends.json", timer)
    assert chooser.choose("conv_bias_act", KEY, (SLOW, FAST), timer.run, "cuda", allowed=False) is SLOW
    assert chooser.choose("conv_bias_act", KEY, (SLOW, FAST), timer.run, "cuda", allowed=True) is FAST
    assert sorted(timer.ran) == ["fast", "slow"]


def test_bad_file_is_ignored_with_one_warning(tmp_path):
    path = tmp_path / "backends.json"
    path.write_text(json.dumps({"format": choice.FORMAT, "version": 1, "entries": {"k": 3}}))
    timer = FakeTimer()
    chooser = make_chooser(path, timer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chooser.choose("conv_bias_act", KEY, (SLOW, FAST), timer.run, "cuda", allowed=True)
        chooser.choose("conv_bias_act", KEY[:-1] + (False,), (SLOW, FAST), timer.run, "cuda", allowed=True)
    assert len([w for w in caught if "backend choice cache" in str(w.message)]) == 1
    assert list(json.loads(path.read_text())["entries"].values()) == ["fast", "fast"], "bad file replaced"


def test_cache_file_beside_the_autotune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_RESBLOCK_CACHE_DIR", str(tmp_path))
    assert choice.cache_path() == tmp_path / "backends.json"


# --------------------------------------------------------------------------- select()
@pytest.fixture
def two_capable_backends(monkeypatch):
    """Pretend triton and cuda both support every call; record what the chooser is asked."""
    monkeypatch.setattr(backends, "_unsupported", lambda name, op, config: None)
    backends.clear_caches()
    asked = []

    class Spy:
        def choose(self, op, shape_key, candidates, run, device, reference):
            assert reference is backends.get("reference"), "auto checks its candidates against the reference"
            asked.append((op, shape_key, [m.NAME for m in candidates], device))
            return candidates[-1]

    monkeypatch.setattr(choice, "CHOOSER", Spy())
    yield asked
    backends.clear_caches()


def test_select_asks_the_chooser_only_with_several_candidates(two_capable_backends):
    config = {"device": torch.device("cuda", 0), "dtype": torch.float16}
    chosen = backends.select("conv_bias_act", "auto", config, measure=lambda: (KEY, lambda m: None))
    assert chosen.NAME == "cuda"
    assert two_capable_backends == [("conv_bias_act", KEY, list(backends.AUTO_ORDER), torch.device("cuda", 0))]
    # without arguments to measure: the first of AUTO_ORDER, no chooser
    assert backends.select("conv_bias_act", "auto", config).NAME == backends.AUTO_ORDER[0]
    # a forced backend is never measured
    assert backends.select("conv_bias_act", "triton", config, measure=lambda: 1 / 0).NAME == "triton"
    assert len(two_capable_backends) == 1


def test_select_on_cpu_never_measures(two_capable_backends):
    config = {"device": torch.device("cpu"), "dtype": torch.float32}
    assert backends.select("conv_bias_act", "auto", config, measure=lambda: 1 / 0).NAME == "reference"
    assert two_capable_backends == []


def test_the_op_measures_per_dtype_shape_and_layout(monkeypatch):
    """conv_bias_act's shape key (what auto's choice is remembered by) tells dtypes, shapes and layouts apart."""
    from fused_resblock import ops
    from fused_resblock.backends import reference

    keys = []

    def spy_select(op, requested, config, measure=None):
        if op == "conv_bias_act":
            shape_key, run = measure()
            keys.append(shape_key)
            assert run(reference).shape[1:] == (8, 5, 5)  # run() calls the op on the given backend
        return reference

    monkeypatch.setattr(backends, "select", spy_select)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(8, 4, 3, 3)
    for dtype in (torch.float32, torch.float64):
        ops.conv_bias_act(x.to(dtype), w.to(dtype), padding=1, relu=True)
    ops.conv_bias_act(x.contiguous(memory_format=torch.channels_last), w, padding=1, relu=True)
    ops.conv_bias_act(x[:1], w, padding=1, relu=True)
    assert len(set(keys)) == 4, keys


def test_concurrent_merges_keep_every_entry(tmp_path, monkeypatch):
    """Two writers at once (processes tuning one GPU each): the second reads after the first wrote.

    The first reader waits for a second one to arrive before it goes on: without the lock both
    would read the old file and the later write would drop the earlier entry."""
    import threading

    from fused_resblock.backends import cache_file

    path = tmp_path / "cache.json"
    real_read = cache_file.read_entries
    second_reader = threading.Event()
    readers = []

    def slow_read(*args, **kwargs):
        entries = real_read(*args, **kwargs)
        readers.append(threading.current_thread().name)
        if len(readers) == 1:
            second_reader.wait(timeout=0.5)  # under the lock the second never comes: it waits for us
        else:
            second_reader.set()
        return entries
    monkeypatch.setattr(cache_file, "read_entries", slow_read)
    threads = [threading.Thread(target=cache_file.merge_entry, name=f"writer-{i}",
                                args=(path, "fmt", 1, f"key{i}", i, int)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert real_read(path, "fmt", 1, int) == {"key0": 0, "key1": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"], "no lock file left beside the caches"


# --------------------------------------------------------------------------- the agreement check
REFERENCE = types.SimpleNamespace(NAME="reference")


def _outputs(values):
    """run(module) returning each backend's output; the benchmark times by SPEED (fast wins)."""
    ran = []

    def run(module):
        ran.append(module.NAME)
        return values[module.NAME]

    def benchmark(call):
        call()
        return SPEED[ran[-1]]
    return run, benchmark, ran


def test_a_candidate_that_disagrees_with_the_reference_is_not_chosen(tmp_path):
    expected = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    wrong = expected.clone()
    wrong[0, 3, 1, 1] += 0.5 * float(expected.abs().max())  # one bad element is enough
    rounding = (expected.double() * (1 + 2e-3)).half()  # two rounding steps off: agrees
    run, benchmark, ran = _outputs({"reference": expected, "fast": wrong, "slow": rounding})
    chooser = make_chooser(tmp_path / "backends.json", benchmark)
    with pytest.warns(UserWarning, match="'fast' disagrees with the reference"):
        chosen = chooser.choose("conv_bias_act", KEY, (FAST, SLOW), run, "cuda", allowed=True, reference=REFERENCE)
    assert chosen is SLOW and ran[0] == "reference"
    assert not (tmp_path / "backends.json").exists(), "every process checks again"
    assert chooser.choose("conv_bias_act", KEY, (FAST, SLOW), never_time, "cuda", allowed=True,
                          reference=REFERENCE) is SLOW


@pytest.mark.parametrize("degenerate", ["zeros", "constant", "nan"])
def test_a_check_on_degenerate_outputs_is_not_kept(tmp_path, degenerate):
    """Agreeing on all zeros (a warm-up call on torch.zeros), one value or all NaN proves nothing:
    the verdict serves this process but another one checks again."""
    expected = {"zeros": torch.zeros(2, 8, 5, 5), "constant": torch.full((2, 8, 5, 5), 3.0),
                "nan": torch.full((2, 8, 5, 5), float("nan"))}[degenerate]
    run, benchmark, ran = _outputs({"reference": expected, "fast": expected.clone(), "slow": expected.clone()})
    chooser = make_chooser(tmp_path / "backends.json", benchmark)
    assert chooser.choose("conv_bias_act", KEY, (FAST, SLOW), run, "cuda", allowed=True, reference=REFERENCE) is FAST
    assert not (tmp_path / "backends.json").exists()
    informative = torch.randn(2, 8, 5, 5)
    run, benchmark, ran = _outputs({"reference": informative, "fast": informative.clone(), "slow": informative})
    chooser = make_chooser(tmp_path / "backends.json", benchmark)
    assert chooser.choose("conv_bias_act", KEY, (FAST, SLOW), run, "cuda", allowed=True, reference=REFERENCE) is FAST
    assert (tmp_path / "backends.json").exists()


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_with_no_candidate_agreeing_the_reference_runs(tmp_path, bad):
    expected = torch.randn(4, 6, dtype=torch.bfloat16)
    broken = expected.clone()
    broken[1, 2] = float("nan")
    wrong = broken if bad == "nan" else expected[:, :5]
    run, benchmark, _ = _outputs({"reference": expected, "fast": wrong, "slow": wrong})
    chooser = make_chooser(tmp_path / "backends.json", benchmark)
    with pytest.warns(UserWarning, match="disagrees"):
        chosen = chooser.choose("conv_bias_act", KEY, (FAST, SLOW), run, "cuda", allowed=True, reference=REFERENCE)
    assert chosen is REFERENCE


def test_agreement_tolerates_rounding_and_shared_nan_and_inf():
    expected = torch.randn(64, dtype=torch.float16) * 10
    expected[3], expected[7] = float("nan"), float("inf")
    close = (expected.double() * (1 + 4 * torch.finfo(torch.float16).eps)).half()
    assert choice.disagreement(close, expected) is None
    far = expected.clone()
    far[0] += 40 * torch.finfo(torch.float16).eps * float(expected[torch.isfinite(expected)].abs().max())
    assert "max |difference|" in choice.disagreement(far, expected)
    assert choice.disagreement(torch.zeros(3), torch.zeros(3)) is None


def test_agreement_of_a_backwards_gradients_each_by_its_own_scale():
    """A backward's outputs: each gradient against its own max, presence included; a wrong bias
    gradient (small numbers) is caught beside a weight gradient of large ones."""
    gw = torch.randn(8, 4, 3, 3, dtype=torch.float16) * 100
    gb = torch.randn(8)
    expected = (None, gw, gb, None)
    assert choice.disagreement((None, gw.clone(), gb.clone(), None), expected) is None
    wrong_bias = gb.clone()
    wrong_bias[2] += 1.0  # far off for a bias gradient, a rounding step of the weight gradient's scale
    assert "output 2" in choice.disagreement((None, gw, wrong_bias, None), expected)
    assert "output 0 present" in choice.disagreement((gw, gw, gb, None), expected)
    assert "outputs" in choice.disagreement((None, gw), expected)
    assert choice._informative(expected)
    assert not choice._informative((None, gw, torch.zeros(8), None)), "one degenerate gradient proves little"


def test_the_backward_op_measures_per_dtype_shape_layout_and_needs(monkeypatch):
    """conv_bias_act_backward asks auto to measure too, remembered by dtype, shapes, layouts and which
    gradients are needed; run() calls the backward on the given backend."""
    from fused_resblock import ops
    from fused_resblock.backends import reference

    keys = []

    def spy_select(op, requested, config, measure=None):
        if op == "conv_bias_act_backward":
            shape_key, run = measure()
            keys.append(shape_key)
            assert len(run(reference)) == 6
        return reference

    monkeypatch.setattr(backends, "select", spy_select)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(8, 4, 3, 3)
    for dtype, layout, needs_w in ((torch.float32, torch.contiguous_format, True),
                                   (torch.float64, torch.contiguous_format, True),
                                   (torch.float32, torch.channels_last, True),
                                   (torch.float32, torch.contiguous_format, False)):
        xi = x.to(dtype).contiguous(memory_format=layout).requires_grad_()
        wi = w.to(dtype).requires_grad_(needs_w)
        ops.conv_bias_act(xi, wi, padding=1, relu=True).sum().backward()
    assert len(set(keys)) == 4, keys
