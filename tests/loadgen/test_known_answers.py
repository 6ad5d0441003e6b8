"""A simulated queue with known answers (virtual time, tests/loadgen/simulate.py): closed loops of C
clients over S worker slots of known service time. Queueing theory gives throughput, latency,
percentiles and the bottleneck exactly; the whole measuring chain (records join, aggregates,
ceilings) must recover them within 1%."""

from __future__ import annotations

import pytest

from tests.loadgen.simulate import Call, Sim

# every request: 2 ms submit + model + 3 ms worker + 1 ms notice; the client refills 0.5 ms later
OVERHEAD_S = 0.002 + 0.003 + 0.001
REFILL_S = 0.0005


def test_c_clients_over_ample_slots_run_at_c_over_the_cycle_time_with_the_servers_latency():
    model = 0.4
    step = Sim(concurrency=10, duration_s=60, warmup_s=5, calls=lambda i: [Call(model_s=model)]).run().step()
    a = step.aggregates
    latency = model + OVERHEAD_S
    assert a["throughput"]["completions_per_s"] == pytest.approx(10 / (latency + REFILL_S), rel=0.01)
    for p in ("p50", "p95", "p99", "avg", "max"):
        assert a["latency_ms"]["e2e"][p] == pytest.approx(latency * 1000, rel=0.01), p
    assert a["latency_ms"]["queue_wait"]["p99"] == pytest.approx(0, abs=1e-6)
    c = a["ceilings"]
    assert c["binding"] == "concurrency"
    assert c["binding_per_s"] == pytest.approx(10 / model, rel=1e-9)
    assert c["efficiency"] == pytest.approx(model / (latency + REFILL_S), rel=0.01)
    assert a["clients"]["refill_share"] == pytest.approx(REFILL_S / (latency + REFILL_S), rel=0.05)


def test_more_clients_than_slots_run_at_s_over_the_service_time_and_wait_the_rest_in_the_queue():
    clients, slots, service = 40, 10, 0.2
    step = Sim(concurrency=clients, duration_s=60, warmup_s=5, slots=slots,
               calls=lambda i: [Call(model_s=service - 0.003)]).run().step()
    a = step.aggregates
    x = slots / service  # the slots are the bottleneck
    assert a["throughput"]["completions_per_s"] == pytest.approx(x, rel=0.01)
    # Little's law for the closed system: every client is always in the system (but for refill)
    assert a["latency_ms"]["e2e"]["avg"] == pytest.approx(clients / x * 1000, rel=0.01)
    assert a["latency_ms"]["queue_wait"]["avg"] == pytest.approx((clients / x - service) * 1000, rel=0.02)
    c = a["ceilings"]
    assert c["binding"] == "worker slots"
    assert c["efficiency"] == pytest.approx((service - 0.003) / service, rel=0.01)


def test_a_known_latency_distribution_comes_back_as_its_percentiles():
    # model times on a grid uniform over [0.5, 1.5) s, in a scrambled order
    step = Sim(concurrency=50, duration_s=60, warmup_s=5,
               calls=lambda i: [Call(model_s=0.5 + (i * 7919 % 1000) / 1000)]).run().step()
    e2e = step.aggregates["latency_ms"]["e2e"]
    assert e2e["count"] > 2000
    for p, q in ((50, 0.50), (95, 0.95), (99, 0.99)):
        assert e2e[f"p{p}"] == pytest.approx((0.5 + q + OVERHEAD_S) * 1000, rel=0.01), p
    assert e2e["max"] == pytest.approx((1.499 + OVERHEAD_S) * 1000, rel=1e-6)


def test_a_fleet_wide_rate_limit_below_the_offered_load_is_what_binds():
    rate = 25.0
    limits = {"enforced": True, "source": "test", "window_s": 60.0, "utilisation": 1.0,
              "tiers": {"sonnet": {"rpm": int(rate * 60), "tpm": 10**9}}}
    step = Sim(concurrency=100, duration_s=60, warmup_s=10, calls=lambda i: [Call(model_s=1.0)],
               rate_limit_per_s=rate).run().step(limits=limits)
    a = step.aggregates
    assert a["throughput"]["completions_per_s"] == pytest.approx(rate, rel=0.01)
    assert a["ceilings"]["binding"] == "rate limits" and a["ceilings"]["efficiency"] == pytest.approx(1, abs=0.01)
    # the clients' time: C / X in all, 1 s of it the model, the rest waiting for the limiter
    assert a["latency_ms"]["ratelimit_wait"]["avg"] == pytest.approx((100 / rate - 1.0 - OVERHEAD_S) * 1000, rel=0.02)
    assert a["latency_ms"]["service"]["avg"] == pytest.approx(1003, rel=1e-3)
