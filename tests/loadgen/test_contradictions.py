"""One test per way a report contradicted itself (issue #14), each on a simulated run whose
true figures are known (tests/loadgen/simulate.py), read back from the rendered Markdown the
way an engineer with a calculator would. Each of these failed on the code before the rework."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadgen import metrics
from loadgen.report import render_markdown
from loadgen.runner import aggregate
from tests.loadgen.simulate import T0, Call, Sim, results_rows, session_of


def _num(s: str) -> float:
    return float(re.search(r"-?[\d,]*\.?\d+", s.replace("$", "")).group(0).replace(",", ""))


def _baseline_like() -> Sim:
    """C=1 for 10 s after a 2 s warm-up, model calls of 1.2-2.8 s (the issue's baseline)."""
    return Sim(concurrency=1, duration_s=10, warmup_s=2,
               calls=lambda i: [Call(model_s=(1.2, 2.8, 1.3, 1.9, 2.4, 1.4, 2.2)[i % 7])]).run()


def _report(*steps) -> str:
    return render_markdown(session_of(*steps))


def test_1_throughput_never_exceeds_c_over_the_average_response_time_of_its_own_table():
    for sim in (_baseline_like(),
                Sim(concurrency=10, duration_s=6, warmup_s=1,
                    calls=lambda i: [Call(model_s=0.5 + (i * 37 % 100) / 50)]).run(),
                Sim(concurrency=25, duration_s=6, warmup_s=1,
                    calls=lambda i: [Call(model_s=0.5 + (i * 13 % 100) / 50)]).run()):
        step = sim.step()
        t = results_rows(_report(step), step.run_id)
        thr = _num(t["Throughput"])
        avg_s = _num(t["Avg Response Time"]) / 1000
        assert thr <= sim.concurrency / avg_s * (1 + 1e-3), (thr, sim.concurrency / avg_s)


def test_2_every_mean_a_bound_is_computed_from_is_a_figure_of_the_same_table():
    step = _baseline_like().step()
    md = _report(step)
    t = results_rows(md, step.run_id)
    avgs = {_num(v.split("/")[0]) for k, v in t.items() if "avg" in k or k == "Avg Response Time"}
    used = [_num(m) for m in re.findall(r"÷ ([\d,.]+ ms)", md)]
    assert used, "the report names no mean behind its bound"
    for v in used:
        assert v in avgs, f"a bound divides by {v} ms, which is no average in the table {sorted(avgs)}"


def test_3_the_counts_of_one_table_add_up_to_its_request_count():
    sim = Sim(concurrency=4, duration_s=5, warmup_s=1.5, calls=lambda i: [Call(model_s=0.6 + (i % 5) / 10)],
              status=lambda i: "failed" if i % 7 == 3 else "succeeded").run()
    step = sim.step()
    t = results_rows(_report(step), step.run_id)
    total = int(_num(t.get("Requests") or t["Total Requests"]))
    parts = int(_num(t["Successful"])) + int(_num(t["Failed"])) + int(_num(t.get("Unfinished", "0")))
    assert parts == total, t


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=600_000, allow_nan=False), min_size=1, max_size=400))
def test_4_percentiles_are_values_that_occurred_in_order_and_never_above_the_max(values_ms):
    s = metrics.latency_summary(values_ms)
    got = [s[k] for k in ("p50", "p95", "p99") if s[k] is not None]
    assert all(v in values_ms for v in got)
    assert got == sorted(got) and all(v <= s["max"] for v in got)
    assert s["max"] == max(values_ms)


def test_4_the_reported_p99_is_not_above_the_reported_max():
    # 120 requests whose slowest took 2,586.4 ms: a histogram bucket edge would print 2,587
    sim = Sim(concurrency=20, duration_s=12, warmup_s=1,
              calls=lambda i: [Call(model_s=2.5864 if i % 9 == 0 else 1.0 + (i % 50) / 100)]).run()
    step = sim.step()
    t = results_rows(_report(step), step.run_id)
    assert "needs" not in t["p99 Response Time"]  # enough samples for a p99
    p50, p95, p99, mx = (_num(t[f"{k} Response Time"]) for k in ("p50", "p95", "p99", "Max"))
    assert p50 <= p95 <= p99 <= mx


def test_5_a_run_that_completed_nothing_is_invalid():
    drive = {"kind": "closed", "started_at": T0, "window": [T0 + 2, T0 + 10], "load_end": T0 + 10,
             "ended_at": T0 + 10, "concurrency": 1, "stopped_early": None}
    agg = aggregate([], drive)
    assert agg["valid"] is False and agg["invalid_reasons"]


def test_5_a_duration_bounded_run_with_no_steady_window_is_invalid():
    # the warm-up (until C requests completed) outlasted the load phase: c2000's 0.0 s window
    sim = Sim(concurrency=50, duration_s=3, warmup_s=3, calls=lambda i: [Call(model_s=1.0)]).run()
    step = sim.step()
    assert step.drive["window"][1] - step.drive["window"][0] == 0
    assert step.aggregates["valid"] is False
    assert "steady window" in " ".join(step.aggregates["invalid_reasons"])
    assert "INVALID" in _report(step)


def _rate_limited(concurrency=100, rate=20.0):
    return Sim(concurrency=concurrency, duration_s=30, warmup_s=5, calls=lambda i: [Call(model_s=1.5)],
               rate_limit_per_s=rate).run()


LIMITS = {"enforced": True, "source": "test", "window_s": 60.0, "utilisation": 1.0,
          "tiers": {"sonnet": {"rpm": 1200, "tpm": 10_000_000}}}


def test_6_a_run_bound_by_the_rate_limit_says_so_and_keeps_the_waits_out_of_the_service_time():
    step = _rate_limited().step(limits=LIMITS)
    md = _report(step)
    t = results_rows(md, step.run_id)
    assert t["Bound by"].startswith("rate limits"), t["Bound by"]
    assert _num(t["Bound by"].split("—")[1]) == pytest.approx(20.0, rel=0.01)
    svc = _num(t["Service Time excl. Rate-Limit Waits (avg / p99)"].split("/")[0])
    wait = _num(t["Rate-Limit Wait (avg / p99)"].split("/")[0])
    assert svc == pytest.approx(1503, abs=2)  # model call + worker, no wait
    assert wait > 2 * svc  # most of the time went to waiting, and the table shows it as such
    # the headline efficiency is against the rate limit, not against C / mean time with waits inside
    assert _num(t["Bound by"].split("achieved")[1]) == pytest.approx(100, abs=3)


def test_6_the_c1000_and_c2000_presets_lift_the_rate_limits_so_they_measure_the_fleet():
    from loadgen.scenarios import PRESETS

    for name in ("c1000", "c2000"):
        sc = PRESETS[name]
        offered_per_min = sc.concurrency / 0.5 * 60  # C over the fastest model call the catalog has
        assert sc.catalog_overrides.get("rpm", 0) > 10 * offered_per_min, name
        assert sc.catalog_overrides.get("tpm", 0) > 10 * offered_per_min * 2000, name


def test_7_plots_start_at_zero_use_whole_concurrency_ticks_distinct_markers_mib_and_shade_the_warm_up(
        tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from loadgen import plots

    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    monkeypatch.setattr(plots.plt, "close", lambda *a, **k: None)
    steps = []
    for c in (1, 2, 3):
        s = Sim(concurrency=c, duration_s=6, warmup_s=1, calls=lambda i: [Call(model_s=0.633 + (i % 3) / 1000)]).run()
        step = s.step(label=f"sweep @ concurrency={c}", level=c)
        step.aggregates["resources"] = {"sampled": True, "processes": "the fleet's worker processes",
                                        "series": [[T0 + k * 0.5, 120.0 + k * 0.01, 5.0] for k in range(12)]}
        steps.append(step)
    plots.write_plots(steps, tmp_path)
    by_title = {f.axes[0].get_title(): f.axes[0] for f in saved}
    assert len(by_title) == 3, list(by_title)
    for title, ax in by_title.items():
        assert ax.get_ylim()[0] == 0, f"{title}: y axis starts at {ax.get_ylim()[0]}"
        styles = [(line.get_marker(), line.get_linestyle()) for line in ax.get_lines()]
        assert len(set(styles)) == len(styles), f"{title}: series share a marker and line style: {styles}"
        if "concurrency" in ax.get_xlabel():
            assert all(float(x).is_integer() for x in ax.get_xticks()), f"{title}: fractional concurrency ticks"
        else:  # memory over time
            assert "MiB" in ax.get_ylabel() and "MB" not in ax.get_ylabel().replace("MiB", "")
            assert "worker processes" in title
            assert ax.patches, "the warm-up is not shaded"


def test_7_memory_is_mib_everywhere_in_the_report():
    step = _baseline_like().step()
    step.aggregates["resources"] = {"sampled": True, "processes": "the fleet's worker processes", "samples": 3,
                                    "rss_peak_mib": 130.0, "rss_avg_mib": 120.0, "growth_mib_per_min": 0.1,
                                    "growth_ci95_mib_per_min": (0.0, 0.2), "steady_span_s": 8, "leak": "flat",
                                    "leak_threshold_mib_per_min": 1.0, "cpu_avg_percent": 3, "cpu_peak_percent": 9,
                                    "series": []}
    md = _report(step)
    assert "130.0 MiB" in md and not re.search(r"\d MB\b", md)


def test_unknown_outcome_attempts_are_counted_with_their_dollars_not_as_zero():
    sim = Sim(concurrency=2, duration_s=5, warmup_s=1,
              calls=lambda i: ([Call(model_s=0.4, outcome="unknown", output_tokens=0, cost_usd=Decimal("0.00045")),
                                Call(model_s=0.5)] if i % 4 == 0 else [Call(model_s=0.5)])).run()
    step = sim.step()
    t = results_rows(_report(step), step.run_id)
    n_unknown = sum(1 for r in step.records if step.aggregates["population"]["start"] <= r.origin
                    < step.aggregates["population"]["end"] for c in r.calls if c.outcome == "unknown")
    assert n_unknown > 0
    assert t["Attempts with Unknown Outcome"].startswith(f"{n_unknown} (${n_unknown * 0.00045:.4f}")
