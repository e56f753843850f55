"""The benchmark driver: plan the matrix, run every case, write one JSON (+ a plot beside it).

    python -m benchmarks.run                          # on a GPU: the full matrix, trimmed to --budget-s 480
    python -m benchmarks.run --tiny                   # CI smoke run on the CPU, JSON in a temp dir
    python -m benchmarks.run --only 'model:resnet50:*' --budget-s 0   # a subset, no budget
    python -m benchmarks.run --list                   # print the plan and stop

Each case prints one progress line. A case that crashes is recorded
(``status: "error"``, message, traceback tail) and the rest still run; the
exit status is 1 when any case errored, 2 for bad arguments. See NOTES.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from typing import Optional

import torch

from . import environment, execute, matrix, roofline, validate
from .cases import OURS_PREFIX

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEMA_VERSION = 1
CHECKPOINT_S = 10.0  # the longest a run keeps measured rows only in memory


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--preset", choices=sorted(matrix.PRESETS), default=None,
                        help="full on a GPU, tiny on the CPU unless given")
    parser.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="trim the plan to fit this many seconds (full preset default: 480; 0: no budget)")
    parser.add_argument("--only", action="append", default=[], metavar="GLOB",
                        help="run only cases whose id matches (repeatable), e.g. 'model:resnet50:infer:bf16:*'")
    parser.add_argument("--inject-failure", action="append", default=[], metavar="GLOB",
                        help="test hook: cases whose id matches raise on purpose (recorded as errors)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/<time>_<device>.json; tiny: a temp dir)")
    parser.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads for a CPU run (default 1)")
    parser.add_argument("--list", action="store_true", help="print the planned cases and stop")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return torch.device(name)


def configure_device(device: torch.device, cpu_threads: int) -> None:
    """fp32 cases mean TF32 allowed, for ours and the peers alike; few CPU threads for the smoke run."""
    if device.type == "cpu":
        # a shared 2-core CI machine: one thread avoids oversubscribed OpenMP barriers (100x slower there)
        torch.set_num_threads(cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def default_out(preset: str, env: dict) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    slug = "".join(c if c.isalnum() else "-" for c in env["device_name"]).strip("-").lower() or env["device"]
    name = f"{stamp}_{slug}_{preset}.json"
    if preset == "tiny":  # a smoke run never lands among the real results
        return os.path.join(tempfile.mkdtemp(prefix="frb-bench-"), name)
    return os.path.join(RESULTS_DIR, name)


# --------------------------------------------------------------------------- after the runs
def add_ratios(rows: list) -> None:
    """Each of our ok rows gets peer median / our median for every ok peer row of its group (>1: ours faster)."""
    groups = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(row["group"], []).append(row)
    for members in groups.values():
        peers = [r for r in members if not r["impl"].startswith(OURS_PREFIX)]
        for ours in (r for r in members if r["impl"].startswith(OURS_PREFIX)):
            ours["ratio_to_peers"] = {f"{p['impl']}@{p['memory_format']}": p["median_ms"] / ours["median_ms"]
                                      for p in peers}


# How far ours' mean |output| may be from eager's: rounding moves a mean over thousands of
# elements far less (TF32 for fp32); a broken kernel (garbage, zeros, a wrong layout) far more.
AGREEMENT_REL = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 5e-2}
AGREEMENT_PEERS = ("eager", "eager-folded")  # the model at ours' precision, without autocast


def check_agreement(rows: list) -> None:
    """Each ok inference row of ours whose mean |output| differs from eager's in its group (the same
    seeded weights and first input) beyond rounding becomes an error: a fast wrong answer is no speedup."""
    reference = {}
    for name in reversed(AGREEMENT_PEERS):  # the first name wins
        for r in rows:
            if r["impl"] == name and r["status"] == "ok" and r["output_abs_mean"] is not None:
                reference[r["group"]] = r
    for row in rows:
        peer = reference.get(row["group"])
        if (peer is None or row["status"] != "ok" or row["mode"] != "infer"
                or not row["impl"].startswith(OURS_PREFIX) or row["output_abs_mean"] is None):
            continue
        ours, theirs = row["output_abs_mean"], peer["output_abs_mean"]
        if abs(ours - theirs) <= AGREEMENT_REL[row["dtype"]] * theirs:
            continue
        message = (f"mean |output| {ours:.6g}, {peer['impl']}@{peer['memory_format']} gives {theirs:.6g} "
                   f"(more than {AGREEMENT_REL[row['dtype']]:.0%} apart): not timed as a result")
        row.update(status="error", error={"type": "OutputMismatch", "message": message, "traceback_tail": ""},
                   timings_ms=[], median_ms=None, images_per_s=None, achieved_tflops=None, roofline_share=None,
                   ratio_to_peers={})


def add_roofline_shares(rows: list, peaks: dict, cases: dict) -> None:
    for row in rows:
        if row["status"] == "ok":
            row["roofline_share"] = roofline.share_of_roofline(cases[row["id"]], row["median_ms"], peaks)


INTERRUPTED = "interrupted after"  # how the rows a time limit cut off begin their reason


def was_interrupted(rows: list) -> bool:
    return any(r["status"] == "skipped" and r["reason"].startswith(INTERRUPTED) for r in rows)


def summary(rows: list, wall_s: float, complete: bool = True) -> dict:
    """Counts by status; ``complete`` is False in the checkpoints written while the run goes on."""
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "error", "skipped")}
    return {**counts, "cases": len(rows), "wall_s": wall_s, "complete": complete}


def _progress(index: int, total: int, elapsed: float, row: dict) -> str:
    head = f"[{index:>4}/{total} {elapsed:7.1f}s] {row['id']}"
    if row["status"] == "ok":
        return (f"{head}: ok {row['median_ms']:.3f} ms, {row['images_per_s']:.1f} img/s, "
                f"first call {row['first_call_s']:.2f} s")
    if row["status"] == "error":
        return f"{head}: ERROR {row['error']['type']}: {row['error']['message'][:200]}"
    return f"{head}: skipped ({row['reason'][:200]})"


def run_plan(plan: matrix.Plan, preset: matrix.Preset, device: torch.device, budget_s: Optional[float],
             inject: list, log=print, on_row=None) -> list:
    """Run the planned cases, then spares while the budget lasts; what does not fit becomes a skipped row.
    ``on_row(rows)`` follows every measured (not skipped) case: the driver checkpoints the JSON there."""
    rows = [execute.skipped_row(case, reason) for case, reason in plan.skipped]
    estimator = matrix.Estimator(device)
    started = time.perf_counter()
    dead: Optional[str] = None
    interrupted: Optional[str] = None
    queue = [(case, False) for case in plan.run] + [(case, True) for case in plan.spare]
    # as in the plan: a peer runs only beside one of ours (when its group has any; ours come first)
    with_ours = {case.group for case, _ in queue if case.is_ours}
    ours_ran: set = set()
    for index, (case, spare) in enumerate(queue, 1):
        row = None
        try:
            elapsed = time.perf_counter() - started
            if interrupted is not None:
                row = execute.skipped_row(case, interrupted)
            elif dead is not None:
                row = execute.skipped_row(case, f"device unusable after an earlier error: {dead}")
            elif budget_s is not None and elapsed + estimator.cost_s(case) > budget_s:
                row = execute.skipped_row(case, f"over budget: {elapsed:.0f} s of --budget-s {budget_s:g} spent, "
                                                f"~{estimator.cost_s(case):.0f} s needed")
            elif not case.is_ours and case.group in with_ours and case.group not in ours_ran:
                row = execute.skipped_row(case, "over budget: none of ours ran in its group, so no comparison")
            else:
                if case.is_ours:
                    ours_ran.add(case.group)
                limit_s = matrix.case_time_limit_s(estimator.cost_s(case),
                                                   None if budget_s is None else budget_s - elapsed)
                estimator.commit(case)
                injected = matrix.matches(case.id, inject)
                try:
                    row = execute.run_case(case, device, preset.timing, preset.rotation_cap, inject_failure=injected,
                                           time_limit_s=limit_s)
                except KeyboardInterrupt:  # a time limit: keep what was measured, write the JSON
                    interrupted = f"{INTERRUPTED} {time.perf_counter() - started:.0f} s (SIGINT or SIGTERM)"
                    # not measured, and not a failure of the case: a time limit ran out
                    row = execute.skipped_row(case, f"{interrupted} while it ran")
                except Exception as exc:  # run_case records its own failures; this is one of its cleanup
                    row = execute.error_row(case, exc)
                if row["status"] == "error" and interrupted is None:
                    dead = execute.device_unusable(device)
            rows.append(row)
            if on_row is not None and row["status"] != "skipped":
                on_row(rows)
            if not spare or row["status"] != "skipped":  # thousands of spares would drown the log
                log(_progress(index, len(queue), time.perf_counter() - started, row), flush=True)
        except KeyboardInterrupt:  # outside the case itself (a budget check, a checkpoint, the log)
            interrupted = interrupted or f"{INTERRUPTED} {time.perf_counter() - started:.0f} s (SIGINT or SIGTERM)"
            if not rows or rows[-1] is not row:  # the row of this case, measured or not, is kept
                rows.append(row if row is not None else execute.skipped_row(case, interrupted))
    return rows


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a killed job) interrupts like Ctrl-C, so the cases measured so far are still written."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(partial, path)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    preset = matrix.PRESETS[args.preset or ("full" if device.type == "cuda" else "tiny")]
    budget_s = preset.budget_s if args.budget_s is None else (args.budget_s or None)
    configure_device(device, args.cpu_threads)
    unknown = matrix.unmatched(preset, args.only + args.inject_failure)
    if unknown:  # exit 2 (usage), before any device time is spent
        print(f"no case of the {preset.name} preset matches {', '.join(map(repr, unknown))} "
              "(ids: kind:target:mode:dtype:format:bBATCH:impl; see --list)", file=sys.stderr)
        return 2
    plan = matrix.plan(preset, device, only=args.only, budget_s=budget_s)
    if args.list:
        estimator = matrix.Estimator(device)
        for case in plan.run:
            print(f"run   {case.id}  (~{estimator.cost_s(case):.0f} s)")
            estimator.commit(case)
        for case in plan.spare:
            print(f"spare {case.id}  (~{estimator.cost_s(case):.0f} s; runs if time is left)")
        for case, reason in plan.skipped:
            print(f"skip  {case.id}: {reason}")
        print(f"{len(plan.run)} to run (~{plan.estimated_s:.0f} s estimated), {len(plan.spare)} spare, "
              f"{len(plan.skipped)} skipped")
        return 0

    started = time.perf_counter()
    env = environment.collect(device)
    print(f"fused_resblock benchmarks: preset {preset.name} on {env['device_name']} ({device.type}); "
          f"{len(plan.run)} cases to run (~{plan.estimated_s:.0f} s estimated), {len(plan.spare)} spare, "
          f"{len(plan.skipped)} skipped",
          flush=True)
    peaks = roofline.measure_peaks(device, preset.dtypes)
    print(f"measured peaks: matmul {', '.join(f'{k} {v:.3g}' for k, v in peaks['matmul_tflops'].items())} "
          f"TFLOP/s; copy {peaks['copy_gbps']:.3g} GB/s", flush=True)
    out = args.out or default_out(preset.name, env)
    cases = {case.id: case for case in plan.run + plan.spare}

    def result_of(rows: list, complete: bool) -> dict:
        check_agreement(rows)
        add_ratios(rows)
        add_roofline_shares(rows, peaks, cases)
        return {
            "schema_version": SCHEMA_VERSION,
            "created": environment.timestamp(),
            "env": env,
            "settings": {
                "preset": preset.name, "device": device.type, "budget_s": budget_s,
                "estimated_s": plan.estimated_s, "only": args.only, "inject_failure": args.inject_failure,
                "timing": dataclasses.asdict(preset.timing), "rotation_cap": preset.rotation_cap,
                "fp32_allows_tf32": device.type == "cuda", "argv": list(sys.argv[1:] if argv is None else argv),
            },
            "peaks": peaks,
            "cases": rows,
            "summary": summary(rows, time.perf_counter() - started, complete),
        }

    # The JSON so far, every CHECKPOINT_S at most: a run killed mid-case (a hung kernel ignores
    # SIGINT until the KILL) keeps what it measured.
    last_checkpoint = [time.perf_counter()]

    def checkpoint(rows: list) -> None:
        if time.perf_counter() - last_checkpoint[0] >= CHECKPOINT_S:
            write_json(result_of(rows, complete=False), out)
            last_checkpoint[0] = time.perf_counter()

    with _sigterm_interrupts():
        rows = run_plan(plan, preset, device, budget_s, args.inject_failure, on_row=checkpoint)
    result = result_of(rows, complete=not was_interrupted(rows))
    write_json(result, out)  # before validating: a result that fails the schema is still kept
    print(f"wrote {out}", flush=True)
    problems = validate.errors(result)
    if problems:
        print(f"{out} fails validation ({len(problems)} problems):\n  " + "\n  ".join(problems[:20]), flush=True)
        return 1
    if not args.no_plot:
        _plot(result, args.plot or os.path.splitext(out)[0] + ".png")
    from .report import summary_text
    print(summary_text(result), flush=True)
    return 1 if result["summary"]["error"] else 0


def _plot(result: dict, path: str) -> None:
    from .report import plot
    try:
        plot(result, path)
    except ImportError as exc:  # matplotlib is optional: the JSON is the result
        print(f"no plot: {exc}", flush=True)
        return
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
