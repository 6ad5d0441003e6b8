from decimal import Decimal

import numpy as np
import pytest

from loadgen import metrics, samplers
from loadgen.records import RequestRecord, failure_reason


def _rec(i, origin, latency, *, status="succeeded", service=None, wait=0.0, worker="w1", tier="haiku"):
    service = latency - wait if service is None else service
    return RequestRecord(
        id=f"r{i}", status=status, reason=None if status == "succeeded" else "transient_error", origin=origin,
        done_at=origin + latency, intended_at=origin, sent_at=origin, submitted_at=origin,
        started_at=origin + wait, finished_at=origin + wait + service, tier_requested="sonnet", tier_used=tier,
        worker=worker, attempts=1, api_calls=1, input_tokens=100, output_tokens=200, cost_usd=Decimal("0.001"),
        ratelimit_wait_ms=0.0, calls_waited=0, done_via="notice")


def test_hdr_percentiles_agree_with_the_raw_values_within_the_histograms_resolution():
    rng = np.random.default_rng(3)
    vals = rng.uniform(0.5, 2.5, 5000)
    s = metrics.latency_summary(vals)
    for p in (50, 95, 99):
        assert s[f"p{p}"] == pytest.approx(np.percentile(vals, p, method="inverted_cdf") * 1000, rel=2e-3)
    assert s["max"] == pytest.approx(vals.max() * 1000)
    assert s["avg"] == pytest.approx(vals.mean() * 1000)


def test_failed_requests_stay_in_the_latency_figures():
    recs = [_rec(i, i * 0.1, 0.1) for i in range(95)] + [_rec(95 + i, 9.5 + i * 0.1, 5.0, status="failed")
                                                         for i in range(5)]
    agg = metrics.compute(recs, kind="open", window=(0, 100), started_at=0, load_end=100, ended_at=120)
    assert agg["latency_ms"]["e2e"]["count"] == 100
    assert agg["latency_ms"]["e2e"]["p99"] == pytest.approx(5000, rel=2e-3)
    assert agg["latency_ms"]["e2e_succeeded"]["p99"] == pytest.approx(100, rel=2e-3)
    assert agg["requests"]["window"]["failures_by_reason"] == {"transient_error": 5}


def test_throughput_weighs_each_request_by_the_share_of_its_life_inside_the_window():
    # one slot, back-to-back 1 s requests from t=0 to t=10; window [2.5, 7.5): exactly 5 requests' worth
    recs = [_rec(i, float(i), 1.0) for i in range(10)]
    agg = metrics.compute(recs, kind="closed", window=(2.5, 7.5), started_at=0, load_end=7.5, ended_at=10,
                          concurrency=1)
    assert agg["throughput"]["completions_per_s"] == pytest.approx(1.0)
    assert agg["window"]["completed_in_window"] == 5
    assert agg["little"]["ratio"] == pytest.approx(1.0)


def test_queue_wait_and_service_time_come_from_the_row_timestamps():
    recs = [_rec(i, i * 1.0, 1.0, wait=0.3) for i in range(10)]
    agg = metrics.compute(recs, kind="closed", window=(0, 10), started_at=0, load_end=10, ended_at=11,
                          concurrency=1)
    assert agg["latency_ms"]["queue_wait"]["avg"] == pytest.approx(300)
    assert agg["latency_ms"]["service"]["avg"] == pytest.approx(700)
    assert agg["little"]["bound_per_s"] == pytest.approx(1 / 0.7)


def test_fallbacks_cost_and_worker_shares_are_counted_per_request():
    recs = [_rec(i, i * 0.1, 0.1, worker=f"w{i % 2}", tier="haiku" if i < 3 else "sonnet") for i in range(10)]
    agg = metrics.compute(recs, kind="open", window=(0, 10), started_at=0, load_end=10, ended_at=10)
    assert agg["fallbacks"]["count"] == 3 and agg["fallbacks"]["pairs"] == {"sonnet->haiku": 3}
    assert Decimal(agg["cost"]["total_usd"]) == Decimal("0.010")
    assert agg["cost"]["by_tier"]["haiku"]["requests"] == 3
    assert agg["workers"]["jain_index"] == pytest.approx(1.0)


def test_a_failure_reason_is_the_outcome_before_the_attempt_count():
    assert failure_reason("transient_error after 4 attempt(s): simulated overloaded") == "transient_error"
    assert failure_reason("poison: redelivered 5 times") == "poison"
    assert failure_reason(None) == "unknown"


def _series(slope_mb_per_min, seconds=120, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return [samplers.Sample(t=float(t), pid=1, rss=int((100 + slope_mb_per_min * t / 60 + rng.normal(0, noise))
                                                       * 1024 * 1024), cpu_percent=10.0)
            for t in np.arange(0, seconds, 0.5)]


def test_the_leak_indicator_reads_growing_for_a_steady_climb_and_flat_for_noise():
    growing = samplers.summarise(_series(5.0), after=10, processes="test")
    flat = samplers.summarise(_series(0.0), after=10, processes="test")
    short = samplers.summarise(_series(5.0, seconds=10), after=1, processes="test")
    assert growing["leak"] == "growing" and growing["growth_mb_per_min"] == pytest.approx(5.0, rel=0.1)
    assert flat["leak"] == "flat"
    assert short["leak"] == "inconclusive"
