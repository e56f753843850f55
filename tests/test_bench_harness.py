"""The benchmark harness on the CPU: the tiny matrix, its JSON, README table, failures, budget, shapes.

One tiny run (reference backend, one model, block and layer, one batch) with
one injected failure serves most tests; it takes a few seconds.
"""
import contextlib
import copy
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # benchmarks/ is not an installed package: import it from the checkout
    sys.path.insert(0, REPO)

from benchmarks import (  # noqa: E402
    environment, execute, matrix, peers, report, roofline, run, shapes, validate, workloads,
)
from benchmarks.cases import Case  # noqa: E402
from benchmarks.peers import fold_batchnorms  # noqa: E402

INJECT = "block:*:eager"  # the block group's eager peer fails on purpose
README = """# Project

Intro text that must survive.

<!-- BENCH-TABLE:BEGIN -->
old table, typed by hand
<!-- BENCH-TABLE:END -->

Text after the table.
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(exit status, result dict, JSON path, stdout) of one tiny CPU run with an injected failure."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    saved = {k: os.environ.pop(k, None) for k in ("TRITON_INTERPRET", "FUSED_RESBLOCK_BACKEND")}
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = run.main(["--tiny", "--device", "cpu", "--out", str(out), "--inject-failure", INJECT])
    finally:
        torch.set_num_threads(threads)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    with open(out) as f:
        result = json.load(f)
    return status, result, out, stdout.getvalue()


def _rows(result, **fields):
    return [r for r in result["cases"] if all(r[k] == v for k, v in fields.items())]


# --------------------------------------------------------------------------- the run and its JSON
def test_tiny_run_validates_against_the_schema(tiny):
    _, result, _, _ = tiny
    validate.validate(result)                 # jsonschema when installed, else the hand validator
    assert validate.errors(result, engine="hand") == []
    assert result["settings"]["preset"] == "tiny" and result["env"]["device"] == "cpu"
    assert result["env"]["git_commit"]
    assert result["peaks"]["matmul_tflops"]["fp32"] > 0 and result["peaks"]["copy_gbps"] > 0


def test_jsonschema_agrees_with_the_hand_validator(tiny):
    pytest.importorskip("jsonschema")
    _, result, _, _ = tiny
    broken = copy.deepcopy(result)
    broken["cases"][0]["status"] = "fine"
    del broken["env"]["torch"]
    for doc in (result, broken):
        schema = validate.load_schema()
        assert bool(validate.jsonschema_errors(doc, schema)) == bool(validate.hand_errors(doc, schema))


def test_every_case_of_the_tiny_matrix_is_recorded(tiny):
    _, result, _, stdout = tiny
    expected = {case.id for case in matrix.expand(matrix.TINY)}
    assert {r["id"] for r in result["cases"]} == expected
    ran = [r for r in result["cases"] if r["status"] != "skipped"]
    assert len(ran) >= 10
    for row in ran:  # one progress line per case that ran
        assert row["id"] in stdout


def test_peers_that_cannot_run_here_are_skipped_with_a_reason(tiny):
    _, result, _, _ = tiny
    group = "model:cifar_resnet20@16:infer:fp32:b2"
    by_impl = {r["impl"]: r for r in _rows(result, group=group)}
    for name in ("compile-default", "compile-max-autotune", "compile-reduce-overhead", "ours:auto+cudagraph"):
        assert by_impl[name]["status"] == "skipped" and by_impl[name]["reason"]
    for name in ("ours:reference", "ours:auto", "eager", "eager-folded"):
        assert by_impl[name]["status"] == "ok", by_impl[name]
    triton = by_impl["ours:triton"]
    assert triton["status"] == "skipped" and triton["reason"]


def test_an_injected_failure_is_recorded_and_the_rest_still_run(tiny):
    status, result, _, stdout = tiny
    assert status == 1  # a run with an error says so
    failed = [r for r in result["cases"] if r["status"] == "error"]
    assert [r["id"] for r in failed] == ["block:cifar.layer3.1:infer:fp32:channels_last:b2:eager"]
    error = failed[0]["error"]
    assert execute.INJECTED in error["message"] and "RuntimeError" in error["traceback_tail"]
    assert "ERROR RuntimeError" in stdout
    block_ours = _rows(result, group=failed[0]["group"], impl="ours:reference")[0]
    assert block_ours["status"] == "ok"
    assert "eager@channels_last" not in block_ours["ratio_to_peers"]
    assert "eager-folded@channels_last" in block_ours["ratio_to_peers"]
    later = _rows(result, kind="layer", status="ok")
    assert later, "cases after the failure did not run"


def test_ok_rows_carry_the_measurements(tiny):
    _, result, _, _ = tiny
    for row in _rows(result, status="ok"):
        assert len(row["timings_ms"]) == row["iterations"] >= 3
        assert row["median_ms"] > 0 and row["images_per_s"] > 0 and row["first_call_s"] >= 0
        assert row["flops"] > 0 and row["min_bytes"] > 0 and row["roofline_share"] > 0
        assert row["peak_memory_bytes"] is None  # CPU: no allocator statistics
    ours = _rows(result, group="model:cifar_resnet20@16:infer:fp32:b2", impl="ours:auto")[0]
    assert set(ours["ratio_to_peers"]) == {"eager@channels_last", "eager-folded@channels_last"}


def test_the_plot_is_written_beside_the_json(tiny):
    pytest.importorskip("matplotlib")
    _, _, path, _ = tiny
    png = path.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_tiny_output_defaults_to_a_temp_dir_not_results():
    env = {"device_name": "x86_64", "device": "cpu"}
    assert not os.path.abspath(run.default_out("tiny", env)).startswith(run.RESULTS_DIR)
    assert os.path.dirname(run.default_out("full", env)) == run.RESULTS_DIR


# --------------------------------------------------------------------------- the validator is honest
@pytest.mark.parametrize("corrupt, expected", [
    (lambda d: d["env"].pop("torch"), "missing required key 'torch'"),
    (lambda d: d["cases"][0].update(status="fine"), "is not one of"),
    (lambda d: d["cases"][0].update(batch="two"), "expected integer"),
    (lambda d: d.update(surprise=1), "unexpected key 'surprise'"),
])
def test_the_hand_validator_rejects_schema_violations(tiny, corrupt, expected):
    doc = copy.deepcopy(tiny[1])
    corrupt(doc)
    assert any(expected in e for e in validate.errors(doc, engine="hand"))


def test_consistency_checks_catch_what_a_schema_cannot(tiny):
    doc = copy.deepcopy(tiny[1])
    ok = next(r for r in doc["cases"] if r["status"] == "ok" and r["ratio_to_peers"])
    ok["median_ms"] *= 2
    ok["ratio_to_peers"]["ghost@nchw"] = 1.0
    doc["summary"]["ok"] += 1
    found = "\n".join(validate.consistency_errors(doc))
    assert "not the median" in found and "ghost@nchw" in found and "summary.ok" in found


def test_the_hand_validator_refuses_keywords_it_does_not_implement():
    with pytest.raises(validate.SchemaError, match="pattern"):
        validate.hand_errors("x", {"type": "string", "pattern": "^x$"})


# --------------------------------------------------------------------------- README table
def test_readme_table_regenerates_from_the_json(tiny, tmp_path):
    _, result, path, _ = tiny
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.update_readme(str(readme), str(path))
    text = readme.read_text()
    assert "typed by hand" not in text
    assert text.startswith("# Project\n\nIntro text that must survive.") and text.endswith("Text after the table.\n")
    table = report.render_table(result, source=path.name)
    assert table in text and "| cifar_resnet20@16 | infer | fp32 | 2 |" in table
    assert "CPU smoke run" in table and "errors: 1" in table
    report.update_readme(str(readme), str(path))
    assert readme.read_text() == text  # regenerating is idempotent


def test_readme_without_markers_is_a_clear_error(tiny, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nNo markers here.\n")
    with pytest.raises(ValueError, match="BENCH-TABLE:BEGIN"):
        report.update_readme(str(readme), str(tiny[2]))


# --------------------------------------------------------------------------- the plan and its budget
def test_the_budget_trims_the_full_matrix_without_losing_cases():
    device = torch.device("cuda")  # planning only: nothing touches a GPU
    plan = matrix.plan(matrix.FULL, device, budget_s=480)
    assert 0 < plan.estimated_s <= 480 and plan.spare
    planned = [c.id for c in plan.run] + [c.id for c in plan.spare] + [c.id for c, _ in plan.skipped]
    assert sorted(planned) == sorted(c.id for c in matrix.expand(matrix.FULL))
    first = {c.id for c in plan.run[:20]}
    assert "model:resnet50:infer:bf16:channels_last:b256:ours:auto" in first
    assert "model:resnet50:infer:bf16:channels_last:b256:eager" in first
    groups = [c.group for c in plan.run]
    for group in set(groups):  # a group's members run back to back
        where = [i for i, g in enumerate(groups) if g == group]
        assert where == list(range(where[0], where[-1] + 1)), group


@pytest.mark.parametrize("budget_s", [60, 220, 480])
def test_no_peer_is_planned_without_one_of_ours_beside_it(budget_s):
    """A peer row is a comparison: the budget never buys eager's time without ours in the same group."""
    plan = matrix.plan(matrix.FULL, torch.device("cuda"), budget_s=budget_s)
    ours_groups = {c.group for c in plan.run if c.is_ours}
    lonely = [c.id for c in plan.run if not c.is_ours and c.group not in ours_groups]
    assert lonely == []
    for cases in (plan.run, plan.spare):  # group by group, ours first in each
        seen_peer, done = set(), set()
        for i, c in enumerate(cases):
            if i and cases[i - 1].group != c.group:
                done.add(cases[i - 1].group)
            assert c.group not in done, f"{c.group} split"
            assert not (c.is_ours and c.group in seen_peer), f"{c.id} after a peer of its group"
            if not c.is_ours:
                seen_peer.add(c.group)
    # without any of ours in the selection, the peers are planned as they are
    only_peers = matrix.plan(matrix.FULL, torch.device("cuda"), only=["model:resnet50:*:eager"], budget_s=budget_s)
    assert only_peers.run and not any(c.is_ours for c in only_peers.run)


def test_a_spare_peer_runs_only_beside_one_of_ours(monkeypatch):
    """At run time too: a spare eager row whose group's ours did not run is skipped, not measured."""
    ran = []

    def fake_run(case, *args, **kwargs):
        ran.append(case.id)
        return execute.skipped_row(case, "stand-in for a measurement")  # any row; only the order matters
    monkeypatch.setattr(execute, "run_case", fake_run)
    lonely = Case("model", "resnet50", "infer", "bf16", "channels_last", 64, "eager")
    ours = Case("model", "resnet50", "infer", "bf16", "channels_last", 256, "ours:auto")
    beside = Case("model", "resnet50", "infer", "bf16", "channels_last", 256, "eager")
    ours_b64 = Case("model", "resnet50", "infer", "bf16", "channels_last", 64, "ours:auto")
    peer_only = Case("model", "resnet18", "infer", "bf16", "channels_last", 8, "eager")  # no ours in its group
    # lonely's group has one of ours, queued after it: the queue's order decides, as in a real run
    plan = matrix.Plan(run=[], spare=[ours, beside, lonely, peer_only, ours_b64])
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=None, inject=[], log=lambda *a, **k: None)
    assert ran == [ours.id, beside.id, peer_only.id, ours_b64.id]
    assert "none of ours ran" in next(r for r in rows if r["id"] == lonely.id)["reason"]


def test_cases_over_the_budget_are_recorded_not_dropped():
    plan = matrix.plan(matrix.TINY, torch.device("cpu"), only=["model:*:infer:*"])
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=1e-9, inject=[], log=lambda *a, **k: None)
    assert {r["id"] for r in rows} == {c.id for c in plan.run} | {c.id for c, _ in plan.skipped}
    assert all(r["status"] == "skipped" for r in rows)
    assert sum("over budget" in r["reason"] for r in rows) == len(plan.run)


def test_an_interrupt_keeps_the_rows_and_skips_the_rest(monkeypatch):
    """A time limit's SIGINT mid-case: that case and the rest are skipped (not errors: nothing failed),
    the run still returns."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(execute, "run_case", interrupted)
    plan = matrix.plan(matrix.TINY, torch.device("cpu"), only=["model:*:infer:*"])
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=None, inject=[], log=lambda *a, **k: None)
    ran = [r for r in rows if r["id"] in {c.id for c in plan.run}]
    assert ran[0]["status"] == "skipped" and ran[0]["reason"].endswith("while it ran")
    assert all(r["status"] == "skipped" and "interrupted" in r["reason"] for r in ran[1:])


def test_a_case_past_its_time_limit_is_an_error_and_the_rest_still_run(monkeypatch):
    """One slow case (a tuner far slower than its estimate) must not spend the budget of the others."""
    plan = matrix.plan(matrix.TINY, torch.device("cpu"), only=["model:*:infer:*"])
    slow = plan.run[0].id
    measure = execute._measure

    def slow_first(case, *args, **kwargs):
        if case.id == slow:
            while True:  # busy Python code, as a tuner's loop is: the limit fires between bytecodes
                time.sleep(0.01)
        return measure(case, *args, **kwargs)
    monkeypatch.setattr(execute, "_measure", slow_first)
    monkeypatch.setattr(matrix, "CASE_LIMIT_FLOOR_S", 0.5)
    cost_s = matrix.Estimator.cost_s  # the others get ample limits: a loaded CI machine is slow
    monkeypatch.setattr(matrix.Estimator, "cost_s", lambda self, case: cost_s(self, case) if case.id == slow else 30.0)
    started = time.perf_counter()
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=600, inject=[], log=lambda *a, **k: None)
    by_id = {r["id"]: r for r in rows}
    assert by_id[slow]["status"] == "error" and by_id[slow]["error"]["type"] == "CaseTimeLimit"
    assert "time limit of 3 s" in by_id[slow]["error"]["message"]  # 3 x the CPU estimate of 1 s
    assert all(by_id[c.id]["status"] == "ok" for c in plan.run[1:])
    assert time.perf_counter() - started < 60


def test_the_time_limit_is_cleared_when_the_case_ends():
    with execute.time_limit(0.2):
        pass
    time.sleep(0.4)  # a timer left running would raise here
    with pytest.raises(execute.CaseTimeLimit):
        with execute.time_limit(0.05):
            while True:
                time.sleep(0.01)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_case_time_limits_scale_with_the_estimate_and_stay_within_the_budget():
    assert matrix.case_time_limit_s(10.0, None) is None  # --budget-s 0: no budget, no per-case limit
    assert matrix.case_time_limit_s(10.0, 1000.0) == matrix.CASE_LIMIT_FLOOR_S
    assert matrix.case_time_limit_s(50.0, 1000.0) == 50.0 * matrix.CASE_LIMIT_FACTOR
    assert matrix.case_time_limit_s(50.0, 70.0) == 70.0


def _summary_row(impl, median_ms, batch=1):
    case = Case("model", "resnet50", "infer", "bf16", "channels_last", batch, impl)
    row = execute.base_row(case, "ok")
    row.update(median_ms=median_ms, images_per_s=batch / (median_ms * 1e-3), timings_ms=[median_ms])
    return row


def test_the_graphs_variant_is_the_headline_only_beside_the_graphs_peer():
    """At batch 1 CUDA graphs save launches: against peers without graphs that is not the fusion's gain."""
    rows = [_summary_row("ours:auto", 3.0), _summary_row("ours:auto+cudagraph", 1.0), _summary_row("eager", 4.0)]
    (alone,) = report.group_summaries({"cases": rows})
    assert alone["ours"]["impl"] == "ours:auto" and alone["speedup"] == pytest.approx(4.0 / 3.0)
    (beside,) = report.group_summaries({"cases": rows + [_summary_row("compile-reduce-overhead", 2.0)]})
    assert beside["ours"]["impl"] == "ours:auto+cudagraph" and beside["speedup"] == pytest.approx(2.0)


@pytest.mark.parametrize("budget_s", [210, 480])
def test_a_layer_is_planned_with_its_folded_eager_peer(budget_s):
    """A conv layer's fair peer is a folded conv: eager alone (conv, then BN, add, ReLU) flatters us."""
    plan = matrix.plan(matrix.FULL, torch.device("cuda"), budget_s=budget_s)
    layer_ours = {c.group for c in plan.run if c.kind == "layer" and c.impl == "ours:auto"}
    layer_folded = {c.group for c in plan.run if c.kind == "layer" and c.impl == "eager-folded"}
    assert layer_ours and layer_ours <= layer_folded


def test_list_prints_the_plan(capsys):
    assert run.main(["--tiny", "--device", "cpu", "--list"]) == 0
    assert "model:cifar_resnet20@16:infer:fp32:channels_last:b2:ours:reference" in capsys.readouterr().out


# --------------------------------------------------------------------------- shapes and roofline
def _conv_signature(conv: nn.Conv2d, height: int):
    return (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0], height)


def test_the_resnet50_layer_table_matches_torchvision():
    import torchvision

    seen = Counter()
    model = torchvision.models.resnet50().to("meta")
    hooks = [m.register_forward_hook(lambda m, args, out: seen.update([_conv_signature(m, args[0].shape[2])]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(torch.empty(1, 3, 224, 224, device="meta"))
    for hook in hooks:
        hook.remove()
    table = Counter()
    for spec in shapes.RESNET50_LAYERS:
        table[(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding, spec.height)] += spec.count
        if spec.residual == "projection":  # the downsample conv merged into this GEMM
            table[(spec.shortcut_in_channels, spec.out_channels, 1, spec.shortcut_stride, 0,
                   spec.shortcut_height)] += spec.count
    assert table == seen


def test_resnet50_costs_4_09_gmac_per_image():
    macs = sum(roofline.layer_macs(spec, 1) * spec.count for spec in shapes.RESNET50_LAYERS)
    macs += shapes.RESNET50_FC[0] * shapes.RESNET50_FC[1]
    assert macs / 1e9 == pytest.approx(shapes.RESNET50_GMAC, abs=0.005)
    counted, _, weights, _ = roofline.module_cost("model", "resnet50")
    assert counted == macs
    assert weights == sum(p.numel() for name, p in workloads.build_plain(shapes.model("resnet50"), "meta")
                          .named_parameters() if name.endswith("weight") and p.dim() > 1)


def _convs_floor(specs, batch=256, element_bytes=2):
    """The per-layer floors of ``specs`` (each as often as it occurs) less their fp32 biases, which
    the module count leaves out."""
    return sum((roofline.layer_min_bytes(s, batch, element_bytes) - s.out_channels * roofline.BIAS_BYTES) * s.count
               for s in specs)


def test_model_and_block_bytes_are_the_sums_of_their_fused_convs_floors():
    """The hooks' count of a whole module agrees with the per-layer floors: a merged projection's
    output is neither written nor read back, a strided 1x1 shortcut reads one pixel in four."""
    fc_in, fc_out = shapes.RESNET50_FC
    _, model_bytes = roofline.case_cost(Case("model", "resnet50", "infer", "bf16", "channels_last", 256, "eager"))
    classifier = (fc_in * fc_out + 256 * (fc_in + fc_out)) * 2  # weights once, features and logits per image
    assert model_bytes == _convs_floor(shapes.RESNET50_LAYERS) + classifier
    for block, names in [("resnet50.layer1.0", ("layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3+downsample")),
                         ("resnet50.layer2.0", ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3+downsample"))]:
        _, block_bytes = roofline.case_cost(Case("block", block, "infer", "bf16", "channels_last", 256, "eager"))
        assert block_bytes == _convs_floor([s for s in shapes.RESNET50_LAYERS if s.name in names]), block


def test_a_training_step_skips_the_dgrad_of_the_convs_reading_its_input():
    infer = Case("model", "resnet50", "infer", "bf16", "channels_last", 64, "eager")
    train = Case("model", "resnet50", "train", "bf16", "channels_last", 64, "eager")
    stem = next(spec for spec in shapes.RESNET50_LAYERS if spec.name == "conv1")
    assert roofline.case_cost(train)[0] == 3 * roofline.case_cost(infer)[0] - 2 * roofline.layer_macs(stem, 64)


def test_eager_folded_computes_what_eager_computes():
    spec = shapes.block("resnet50.layer2.0")
    plain = workloads.build_plain(spec, "cpu").eval()
    x = torch.randn(2, spec.inplanes, 16, 16)
    with torch.no_grad():
        expected = plain(x)
        folded = fold_batchnorms(copy.deepcopy(plain))(x)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


def test_case_ids_round_trip_their_fields():
    case = Case("layer", "conv1", "infer", "bf16", "nchw", 256, "ours:auto")
    assert case.id == "layer:conv1:infer:bf16:nchw:b256:ours:auto"
    assert case.group == "layer:conv1:infer:bf16:b256" and case.peer_key == "ours:auto@nchw"


# --------------------------------------------------------------------------- failures that must not lose a run
def test_a_failing_cleanup_is_recorded_and_the_run_goes_on(monkeypatch):
    """After a sticky CUDA error the allocator's cleanup raises too: the case is an error, the run goes on."""
    calls = []

    def release(device):
        calls.append(device)
        if len(calls) % 2 == 0:  # every case's second release: the one after its measurement
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(execute, "_release", release)
    plan = matrix.plan(matrix.TINY, torch.device("cpu"), only=["model:*:infer:*"])
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=None, inject=[], log=lambda *a, **k: None)
    ran = [r for r in rows if r["id"] in {c.id for c in plan.run}]
    assert len(ran) == len(plan.run) >= 2
    assert all(r["status"] == "error" and "illegal memory access" in r["error"]["message"] for r in ran)
    # the failure may be the timed work's own (asynchronous): no timing survives beside the error
    assert all(r["timings_ms"] == [] and r["median_ms"] is None and r["images_per_s"] is None for r in ran)
    result = {"schema_version": run.SCHEMA_VERSION, "cases": rows}
    assert not [p for p in validate.errors(result) if "has timings" in p]


def test_an_interrupt_between_cases_keeps_the_rows_and_marks_the_run_partial(monkeypatch):
    """SIGTERM while the driver writes a checkpoint or a log line, outside any case."""
    def interrupting_log(*args, **kwargs):
        raise KeyboardInterrupt
    plan = matrix.plan(matrix.TINY, torch.device("cpu"), only=["model:*:infer:*"])
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=None, inject=[], log=interrupting_log)
    assert len(rows) == len(plan.skipped) + len(plan.run) + len(plan.spare)  # every case has its row
    ran = [r for r in rows if r["id"] in {c.id for c in plan.run}]
    assert ran[0]["status"] == "ok"  # measured before the interrupt: kept
    assert all(r["status"] == "skipped" and r["reason"].startswith(run.INTERRUPTED) for r in ran[1:])
    assert run.was_interrupted(rows)


def test_a_partial_result_says_so_in_the_table_and_the_summary(tiny):
    _, result, _, _ = tiny
    assert result["summary"]["complete"] is True
    partial = copy.deepcopy(result)
    partial["summary"]["complete"] = False
    assert "A partial run" in report.render_table(partial)
    assert "PARTIAL" in report.summary_text(partial)
    assert "A partial run" not in report.render_table(result) and "PARTIAL" not in report.summary_text(result)


def test_an_exception_escaping_a_case_becomes_its_error_row(monkeypatch):
    def broken(case, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")
    monkeypatch.setattr(execute, "run_case", broken)
    plan = matrix.plan(matrix.TINY, torch.device("cpu"), only=["model:*:infer:*"])
    rows = run.run_plan(plan, matrix.TINY, torch.device("cpu"), budget_s=None, inject=[], log=lambda *a, **k: None)
    ran = [r for r in rows if r["id"] in {c.id for c in plan.run}]
    assert ran and all(r["status"] == "error" and "device-side assert" in r["error"]["message"] for r in ran)


def test_the_json_is_checkpointed_while_the_run_goes_on(tmp_path, monkeypatch):
    """A run killed mid-case keeps what it measured: partial JSON (complete: false) after the cases."""
    written = []
    real_write = run.write_json

    def recording_write(result, path):
        written.append(result["summary"]["complete"])
        real_write(result, path)
    monkeypatch.setattr(run, "write_json", recording_write)
    monkeypatch.setattr(run, "CHECKPOINT_S", 0.0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "r.json"), "--no-plot",
                      "--only", "model:*:infer:*"])
    finally:
        torch.set_num_threads(threads)
    assert written[-1] is True and written.count(False) >= 1
    assert validate.errors(json.loads((tmp_path / "r.json").read_text()), engine="hand") == []


def test_a_result_that_fails_validation_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "errors", lambda doc, engine="auto": ["a made-up schema problem"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = run.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "r.json"), "--no-plot",
                               "--only", "layer:*"])
    finally:
        torch.set_num_threads(threads)
    assert status == 1 and (tmp_path / "r.json").exists()
    assert "a made-up schema problem" in stdout.getvalue()


def test_the_source_state_stands_in_for_git_in_a_copy_without_it(tmp_path, monkeypatch):
    """The device's copy of the tree has no .git: the carried state file gives the commit, while it
    matches the code; after an edit it is ignored."""
    for top in ("fused_resblock", "benchmarks"):
        (tmp_path / top).mkdir()
        (tmp_path / top / "code.py").write_text(f"# {top}\n")
    monkeypatch.setattr(environment, "_git", lambda repo: ("0123abcd", False))
    state = environment.write_source_state(str(tmp_path))
    assert state["commit"] == "0123abcd" and state["dirty"] is False
    monkeypatch.setattr(environment, "_git", lambda repo: (None, None))  # the copy: no .git
    commit, dirty, source = environment.git_state(str(tmp_path))
    assert (commit, dirty) == ("0123abcd", False) and source.startswith(".source_state.json written")
    (tmp_path / "benchmarks" / "code.py").write_text("# edited after the state was written\n")
    commit, dirty, source = environment.git_state(str(tmp_path))
    assert (commit, dirty) == ("unknown", None) and "does not match" in source
    (tmp_path / ".source_state.json").unlink()
    assert environment.git_state(str(tmp_path)) == ("unknown", None, None)


# --------------------------------------------------------------------------- wrong answers are no results
def test_a_non_finite_output_is_an_error_row(monkeypatch):
    """A fast kernel that writes NaN must not read as a speedup."""
    impl = type(peers.by_name()["ours:reference"])
    built = impl.build

    def build_nan(self, module, spec, case, device):
        step = built(self, module, spec, case, device)
        return lambda inputs: step(inputs) * float("nan")
    monkeypatch.setattr(impl, "build", build_nan)
    case = Case("block", "cifar.layer3.1", "infer", "fp32", "channels_last", 2, "ours:reference")
    row = execute.run_case(case, torch.device("cpu"), matrix.TINY.timing, matrix.TINY.rotation_cap)
    assert row["status"] == "error" and row["error"]["type"] == "NonFiniteOutput", row
    assert "are NaN or infinite" in row["error"]["message"] and row["timings_ms"] == []


def test_ours_agree_with_eager_in_the_tiny_run(tiny):
    _, result, _, _ = tiny
    checked = 0
    for row in _rows(result, status="ok", mode="infer"):
        eager = _rows(result, group=row["group"], impl="eager-folded")[0]
        assert row["output_abs_mean"] == pytest.approx(eager["output_abs_mean"], rel=1e-5), row["id"]
        checked += row["impl"].startswith("ours:")
    assert checked >= 4


def test_an_output_that_differs_from_eager_makes_ours_an_error(tiny):
    _, result, _, _ = tiny
    rows = copy.deepcopy(result["cases"])
    group = "model:cifar_resnet20@16:infer:fp32:b2"
    wrong = _rows({"cases": rows}, group=group, impl="ours:reference")[0]
    close = _rows({"cases": rows}, group=group, impl="ours:auto")[0]
    eager = _rows({"cases": rows}, group=group, impl="eager")[0]
    wrong["output_abs_mean"] = eager["output_abs_mean"] * 1.03  # 3%: past fp32's 1%
    close["output_abs_mean"] = eager["output_abs_mean"] * 1.005
    run.check_agreement(rows)
    assert wrong["status"] == "error" and wrong["error"]["type"] == "OutputMismatch"
    assert wrong["timings_ms"] == [] and wrong["ratio_to_peers"] == {}
    assert close["status"] == "ok"
    run.add_ratios(rows)
    doc = dict(copy.deepcopy(result), cases=rows)
    doc["summary"] = run.summary(rows, result["summary"]["wall_s"])
    assert validate.errors(doc) == []


def test_an_only_pattern_that_names_no_case_is_a_usage_error(capsys):
    assert run.main(["--tiny", "--device", "cpu", "--only", "model:resnet50:infer:bf16:b256:*"]) == 2
    assert "no case of the tiny preset matches 'model:resnet50:infer:bf16:b256:*'" in capsys.readouterr().err
    assert matrix.unmatched(matrix.FULL, ["model:resnet50:infer:bf16:channels_last:b256:ours:cuda[wmma]"]) == [], \
        "an exact id names its case, brackets and all"
    assert matrix.matches("a:ours:cuda[wmma]", ["a:ours:cuda[wmma]"]) and not matrix.matches("a:b", ["a:c"])


@pytest.mark.parametrize("field, value, expected", [
    ("roofline_share", float("nan"), "not finite"),
    ("images_per_s", None, "ok without"),
    ("iterations", 999, "is not the number of timings"),
    ("ratio_to_peers", {}, "no ratio to the ok peer rows"),
])
def test_the_validator_refuses_what_the_schema_lets_through(tiny, field, value, expected):
    _, result, _, _ = tiny
    doc = copy.deepcopy(result)
    row = _rows(doc, group="model:cifar_resnet20@16:infer:fp32:b2", impl="ours:auto")[0]
    row[field] = value
    found = validate.errors(doc)
    assert any(expected in problem for problem in found), found


def test_the_workloads_bn_statistics_keep_a_deep_nets_activations_in_fp16s_range():
    """Fixed BN statistics let a deep random ResNet's activations double per residual block (CIFAR
    ResNet-56 reached 2.4e4, ResNet-101 2e5: inf at fp16); calibrated on a random batch, a BN
    normalises what it sees, as a trained network's does, and leaves momentum and the count alone."""
    spec = shapes.model("cifar_resnet56")
    module = workloads.build_plain(spec, "cpu")
    assert module.training, "built as nn.Module builds: in training mode"
    module.eval()
    peak = []
    hooks = [m.register_forward_hook(lambda m, args, out: peak.append(float(out.abs().max())))
             for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        module(*workloads.module_args(spec, 2, torch.float32, "cpu"))
    for hook in hooks:
        hook.remove()
    assert max(peak) < 500, max(peak)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 and int(m.num_batches_tracked) == 0 for m in norms)
    means = torch.cat([m.running_mean for m in norms])
    assert means.abs().max() > 0.05, "statistics from data, not the 0/1 defaults"


def test_a_finetune_step_trains_the_convs_through_frozen_norms():
    """finetune: eval mode, every BN frozen (no gradient, running statistics untouched), the convs and the
    classifier stepped by SGD, on ours and on eager alike."""
    spec = shapes.target_spec("model", shapes.TINY_MODEL.name)
    for impl in (peers.Ours("reference"), peers.Eager()):
        case = Case("model", spec.name, "finetune", "fp32", "channels_last", 2, impl.name)
        module = workloads.prepare(workloads.build_plain(spec, "cpu"), case, impl.precision(case))
        before = copy.deepcopy(module.state_dict())
        step = impl.build(module, spec, case, torch.device("cpu"))
        loss = step(workloads.make_input(spec, case, torch.float32, "cpu"))
        assert torch.isfinite(loss) and not module.training
        after = module.state_dict()
        norms = {n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}
        for key, value in after.items():
            owner = key.rsplit(".", 1)[0]
            if owner in norms:
                assert torch.equal(value, before[key]), f"{impl.name}: {key} changed"
            elif key.endswith("weight"):
                assert not torch.equal(value, before[key]), f"{impl.name}: {key} was not trained"


def test_a_single_layers_finetune_step_counts_its_dgrad():
    """A layer's step takes its input's gradient (as inside a net): 3x the forward's FLOPs."""
    layer = shapes.RESNET50_LAYERS[3].name
    infer = Case("layer", layer, "infer", "bf16", "channels_last", 256, "eager")
    finetune = Case("layer", layer, "finetune", "bf16", "channels_last", 256, "eager")
    assert roofline.case_cost(finetune)[0] == 3 * roofline.case_cost(infer)[0]
    spec = shapes.target_spec("layer", layer)
    assert workloads.make_input(spec, finetune, torch.float32, "cpu")[0].requires_grad
