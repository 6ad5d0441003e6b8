"""Issue #14 audit: places of a report that still contradicted another part of it, or showed a
withheld percentile as a bare "—" (the rule: "—" with the reason), found by reading generated
reports. Each test failed on the code before its fix."""

from __future__ import annotations

from pathlib import Path

from loadgen import costcontrols, jobs
from loadgen.metrics import latency_summary
from loadgen.report import _breakdown_lines, render_markdown
from loadgen.runner import ScenarioResult, Session
from loadgen.scenarios import Scenario
from tests.loadgen.simulate import ENVIRONMENT, Call, Sim


def _healthy_sweep() -> Session:
    steps = [Sim(concurrency=c, duration_s=6, warmup_s=1, calls=lambda i: [Call(model_s=0.5)]).run()
             .step(label=f"sweep @ concurrency={c}", level=c) for c in (1, 2, 3)]
    sweep = {"axis": "concurrency", "levels": [1, 2, 3], "knee": 3, "broke_at": None, "why": [], "stopped": None,
             "policy": {}}
    result = ScenarioResult(scenario=Scenario(name="sweep", title="Sweep", kind="sweep", levels=(1, 2, 3)),
                            steps=steps, sweep=sweep)
    return Session(id="sim", started_at="t0", finished_at="t1", environment=dict(ENVIRONMENT), scenarios=[result],
                   out_dir=Path("/nonexistent"))


def test_a_sweep_in_which_no_level_broke_names_no_knee_in_the_summary_either():
    md = render_markdown(_healthy_sweep())
    assert "No knee within the levels run" in md  # the sweep's own analysis
    summary = md.split("## Executive Summary", 1)[1].split("---", 1)[0]
    assert "**Knee (sweep):** concurrency = 3" not in summary, summary  # a knee is where the next level broke
    assert "none within the levels run" in summary, summary


def test_per_priority_and_per_tenant_percentiles_withheld_for_too_few_samples_say_why():
    groups = {"0": {"requests": 150, "completions": 150, "succeeded": 150, "completions_per_s": 5.0,
                    "e2e": latency_summary(float(100 + i) for i in range(150))},
              "9": {"requests": 30, "completions": 30, "succeeded": 30, "completions_per_s": 1.0,
                    "e2e": latency_summary(float(100 + i) for i in range(30))}}
    lines = " ".join(_breakdown_lines({"by_priority": groups, "by_tenant": groups}))
    assert "p99 —" in lines
    assert "p99 — (30 samples; p99 needs ≥ 100)" in lines, lines
    assert "p99 — ," not in lines and "p99 —;" not in lines and "p99 —." not in lines


def test_the_cost_controls_latencies_say_why_a_percentile_is_withheld_and_never_print_dash_ms():
    fig = {"requests": 1, "succeeded": 1, "answered_by": {"exact": 1}, "hit_rate": 1.0,
           "latency_exact_ms": latency_summary([12.0]), "latency_model_ms": latency_summary([]),
           "spent_usd": "0", "saved_usd": "0.01", "served_mode": {"optimal": 1}, "transitions": 0,
           "budget": {"limit_usd": None}, "phases": [], "file": "mode-changes-x.jsonl"}
    md = "\n".join(costcontrols.report_lines(fig))
    assert "— ms" not in md, md
    assert "p50 — (1 sample; p50 needs ≥ 2)" in md, md


def test_the_jobs_table_says_why_a_completion_percentile_is_withheld():
    fig = {"jobs": 5, "by_status": {"succeeded": 5}, "template": "t", "steps": 25, "steps_ran": 25,
           "steps_cancelled": 0, "revisions": 0, "span_s": 10.0, "steps_per_worker": {"w1": 25},
           "workers_seen": 1, "workers_expected": 1, "steps_per_worker_per_s": {"w1": 2.5},
           "share": {"min": 25, "max": 25, "mean": 25.0, "cv": 0.0},
           "completion_s": {"n": 5, "avg": 2.0, "p50": 2.0, "p95": None, "p99": None, "max": 3.0},
           "critical_path_s": {"avg": 1.5}, "step_latency_sum_s": {"avg": 2.5}, "e2e_s": {"avg": 2.0},
           "cost_usd": {"total": "0.5", "per_job": "0.1", "by_tier": {"haiku": "0.5"},
                        "per_job_by_tier": {"haiku": "0.1"}}, "file": "jobs-x.jsonl"}
    md = "\n".join(jobs.report_lines(fig))
    assert "p95 — (5 samples; p95 needs ≥ 20)" in md and "p99 — (5 samples; p99 needs ≥ 100)" in md, md


def test_a_run_without_a_steady_window_names_its_whole_run_population_in_a_sentence_that_reads():
    from loadgen.report import population_caption

    # the warm-up (until C requests completed) outlasted the load phase: c1000's 0.0 s window
    step = Sim(concurrency=50, duration_s=3, warmup_s=3, calls=lambda i: [Call(model_s=1.0)]).run().step()
    caption = population_caption(step)
    n = step.aggregates["population"]["requests"]
    assert caption == f"*Population: the {n} requests of the whole run (the steady window was only 0.00 s).*", caption


def test_the_phases_table_names_the_requests_each_of_its_columns_counts():
    # a phase's requests are those sent in it, its throughput the successes that finished in it:
    # two populations in one row, so the table must say which column counts which
    fig = {"requests": 2, "succeeded": 2, "answered_by": {"model": 2}, "hit_rate": 0.0,
           "latency_exact_ms": latency_summary([]), "latency_model_ms": latency_summary([10.0, 12.0]),
           "spent_usd": "0", "saved_usd": "0", "served_mode": {"optimal": 2}, "transitions": 1,
           "budget": {"limit_usd": None}, "file": "mode-changes-x.jsonl",
           "phases": [{"phase": 1, "start_s": 0.0, "duration_s": 1.0, "mode": "optimal", "requests": 2,
                       "throughput": 1.0, "error_rate": 0.0, "model": "haiku 100%", "cache_hit_rate": 0.0},
                      {"phase": 2, "start_s": 1.0, "duration_s": 1.0, "mode": "high_load", "requests": 0,
                       "throughput": 1.0, "error_rate": None, "model": "—", "cache_hit_rate": None}]}
    md = "\n".join(costcontrols.report_lines(fig))
    after = md.split("| Phase |", 1)[1]
    assert "sent in it" in after and "finished in it" in after, after


def test_priority_gets_no_verdict_when_nothing_queued_for_its_order_to_matter():
    from loadgen.metrics import _contended

    held = {"high": 9, "low": 0, "high_p50_ms": 1678.0, "low_p50_ms": 1517.0, "held": False}
    # the rate-limit preset on the embedded default: 10 ms queue wait of a 1,558 ms response, no limiter
    idle = _contended(held, {"queue_wait": {"avg": 10.0}, "ratelimit_wait": {"avg": 0.0}, "e2e": {"avg": 1558.0}})
    line = " ".join(_breakdown_lines({"priority_held": idle}))
    assert "did NOT hold" not in line and "Priority held" not in line, line
    assert "not put to the test" in line and "10 ms" in line and "0.6%" in line, line
    # a run whose requests queued: the verdict stands
    busy = _contended(held, {"queue_wait": {"avg": 900.0}, "ratelimit_wait": {"avg": 300.0}, "e2e": {"avg": 2800.0}})
    assert "Priority did NOT hold: priority 9 p50 1,678 ms" in " ".join(_breakdown_lines({"priority_held": busy}))


def test_a_sweep_knee_is_never_decided_by_a_slowest_response():
    from loadgen.sweep import KneePolicy, find_knee, level_of

    def agg(n: int, slowest: float) -> dict:
        e2e = latency_summary([1000.0] * (n - 1) + [slowest])
        return {"latency_ms": {"e2e": e2e}, "throughput": {"completions_per_s": n / 10},
                "requests": {"window": {"error_rate": 0.0, "total": n}},
                "ceilings": {"efficiency": 0.95, "binding": "concurrency"}}

    # the degradation preset on the embedded default: 5 and 42 requests, p99 withheld at both (—); one
    # slow outlier at C=10 (a retry) made "the knee" C=5 while every level ran at 95% of its ceiling
    knee = find_knee([level_of(1, agg(5, 2557.0)), level_of(10, agg(42, 5314.0)), level_of(25, agg(90, 2600.0))],
                     KneePolicy())
    assert (knee["knee"], knee["broke_at"], knee["why"]) == (25, None, []), knee
    # with real p99s on both sides the tail still decides
    knee = find_knee([level_of(1, agg(200, 1000.0)), level_of(10, agg(200, 1000.0) | {
        "latency_ms": {"e2e": latency_summary([1000.0] * 190 + [5000.0] * 10)}})], KneePolicy())
    assert knee["broke_at"] == 10 and knee["why"][0].startswith("p99 5,000 ms > 2x"), knee
