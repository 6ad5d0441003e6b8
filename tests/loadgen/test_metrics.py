from decimal import Decimal

import numpy as np
import pytest

from loadgen import metrics, samplers
from loadgen.records import CallRow, DbRow, RequestRecord, failure_reason, join


def _rec(i, origin, latency, *, status="succeeded", service=None, wait=0.0, worker="w1", tier="haiku", rl_ms=0.0,
         slot=None):
    service = latency - wait if service is None else service
    r = RequestRecord(
        id=f"r{i}", status=status, reason=None if status == "succeeded" else "transient_error", origin=origin,
        done_at=origin + latency, intended_at=origin, sent_at=origin, submitted_at=origin,
        started_at=origin + wait, finished_at=origin + wait + service, tier_requested="sonnet", tier_used=tier,
        worker=worker, attempts=1, api_calls=1, input_tokens=100, output_tokens=200, cost_usd=Decimal("0.001"),
        ratelimit_wait_ms=rl_ms, calls_waited=1 if rl_ms else 0, done_via="notice", slot=slot)
    r.calls = [CallRow(tier=tier, outcome="ok", input_tokens=100, output_tokens=200, cost_usd=Decimal("0.001"),
                       latency_ms=(service * 1000 - rl_ms), ratelimit_wait_ms=rl_ms)]
    return r


def test_percentiles_are_numpys_inverted_cdf_of_the_raw_values_exactly():
    rng = np.random.default_rng(3)
    vals = rng.uniform(500, 2500, 5000)
    s = metrics.latency_summary(vals)
    for p in (50, 95, 99):
        assert s[f"p{p}"] == np.percentile(vals, p, method="inverted_cdf")
    assert s["max"] == vals.max()
    assert s["avg"] == pytest.approx(vals.mean(), rel=1e-12)


def test_a_percentile_is_withheld_with_its_reason_below_100_over_100_minus_p_samples():
    s = metrics.latency_summary([float(i) for i in range(1, 20)])
    assert s["p50"] == 10.0 and s["p95"] is None and s["p99"] is None
    assert s["withheld"] == {"p95": "19 samples; p95 needs ≥ 20", "p99": "19 samples; p99 needs ≥ 100"}
    assert metrics.latency_summary([1.0] * 20)["p95"] == 1.0
    assert metrics.latency_summary([1.0] * 100)["p99"] == 1.0


def test_failed_requests_stay_in_the_latency_figures():
    recs = [_rec(i, i * 0.1, 0.1) for i in range(95)] + [_rec(95 + i, 9.5 + i * 0.1, 5.0, status="failed")
                                                         for i in range(5)]
    agg = metrics.compute(recs, kind="open", window=(0, 100), started_at=0, load_end=100, ended_at=120)
    assert agg["latency_ms"]["e2e"]["count"] == 100
    assert agg["latency_ms"]["e2e"]["p99"] == pytest.approx(5000)
    assert agg["latency_ms"]["e2e_succeeded"]["p95"] == pytest.approx(100)
    assert agg["requests"]["window"]["failures_by_reason"] == {"transient_error": 5}


def test_closed_loop_throughput_is_completions_over_the_clients_mean_span_and_equals_c_over_latency_back_to_back():
    # one client, back-to-back 1 s requests from t=0 to t=10; window [2.5, 7.5): sent at 3, 4, 5, 6, 7
    recs = [_rec(i, float(i), 1.0, slot=0) for i in range(10)]
    agg = metrics.compute(recs, kind="closed", window=(2.5, 7.5), started_at=0, load_end=7.5, ended_at=10,
                          concurrency=1)
    assert agg["requests"]["window"]["total"] == 5
    assert agg["throughput"]["span_s"] == pytest.approx(5.0)  # 3 -> 8
    assert agg["throughput"]["completions_per_s"] == pytest.approx(1.0)
    assert agg["clients"]["ratio"] == pytest.approx(1.0) and agg["clients"]["refill_share"] == pytest.approx(0)


def test_queue_wait_rate_limit_wait_and_service_time_come_from_the_rows_and_never_overlap():
    recs = [_rec(i, i * 1.0, 1.0, wait=0.3, rl_ms=200.0, slot=0) for i in range(10)]
    agg = metrics.compute(recs, kind="closed", window=(0, 10), started_at=0, load_end=10, ended_at=11,
                          concurrency=1)
    lat = agg["latency_ms"]
    assert lat["queue_wait"]["avg"] == pytest.approx(300)
    assert lat["ratelimit_wait"]["avg"] == pytest.approx(200)
    assert lat["service"]["avg"] == pytest.approx(500)  # 700 ms in the worker, 200 of them waiting


def test_fallbacks_cost_and_worker_shares_are_counted_per_request():
    recs = [_rec(i, i * 0.1, 0.1, worker=f"w{i % 2}", tier="haiku" if i < 3 else "sonnet") for i in range(10)]
    agg = metrics.compute(recs, kind="open", window=(0, 10), started_at=0, load_end=10, ended_at=10)
    assert agg["fallbacks"]["count"] == 3 and agg["fallbacks"]["pairs"] == {"sonnet->haiku": 3}
    assert Decimal(agg["cost"]["total_usd"]) == Decimal("0.010")
    assert agg["cost"]["by_tier"]["haiku"]["calls"] == 3
    assert agg["workers"]["jain_index"] == pytest.approx(1.0)


def test_a_failure_reason_is_the_rows_failure_reason_column_never_its_error_text():
    def row(rid, *, error, code):
        return DbRow(id=rid, status="failed", error=error, failure_reason=code, tier_requested="sonnet",
                     tier_used="sonnet", worker="w", attempts=1, input_tokens=0, output_tokens=0, cost_usd=Decimal(0),
                     submitted_at=1.0, started_at=1.0, finished_at=2.0)

    rows = {"a": row("a", error="transient_error after 4 attempt(s): simulated overloaded", code="transient_error"),
            # the text says one thing, the column another: the column wins
            "b": row("b", error="rate_limited after 4 attempt(s) on tier haiku: 429", code="circuit_open"),
            "c": row("c", error="poison: redelivered 5 times", code=None)}
    recs = {r.id: r for r in join(samples=[], rows=rows, origin="intended_at", ended_at=3.0)}
    assert {k: r.reason for k, r in recs.items()} == {"a": "transient_error", "b": "circuit_open", "c": "unknown"}
    assert failure_reason(None) == "unknown" and failure_reason("poison") == "poison"


def _series(slope_mib_per_min, seconds=120, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return [samplers.Sample(t=float(t), pid=1, rss=int((100 + slope_mib_per_min * t / 60 + rng.normal(0, noise))
                                                       * 1024 * 1024), cpu_percent=10.0)
            for t in np.arange(0, seconds, 0.5)]


def test_the_leak_indicator_reads_growing_for_a_steady_climb_and_flat_for_noise():
    growing = samplers.summarise(_series(5.0), after=10, processes="test")
    flat = samplers.summarise(_series(0.0), after=10, processes="test")
    short = samplers.summarise(_series(5.0, seconds=10), after=1, processes="test")
    assert growing["leak"] == "growing" and growing["growth_mib_per_min"] == pytest.approx(5.0, rel=0.1)
    assert flat["leak"] == "flat"
    assert short["leak"] == "inconclusive"
