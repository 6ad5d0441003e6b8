"""The drivers against a producer double whose service times and stalls are known exactly."""

from __future__ import annotations

from loadgen.clock import RunClock
from loadgen.drivers import ClosedLoop, OpenLoop
from loadgen.records import join
from loadgen.runner import aggregate, drive_info
from loadgen.schedule import make_schedule
from tests.loadgen.fakes import FakeProducer


def _factory(i: int) -> dict:
    return {"role": "researcher", "prompt": f"p{i}"}


def _aggregate(fake: FakeProducer, drive):
    info = drive_info(drive)
    records = join(samples=drive.samples, rows=fake.rows(), origin=drive.latency_origin, ended_at=drive.ended_at)
    return aggregate(records, info), records


def test_a_closed_loop_keeps_exactly_c_requests_in_flight():
    clock = RunClock()
    fake = FakeProducer(service_s=lambda n: 0.05, clock=clock)
    drive = ClosedLoop(producer=fake, factory=_factory, concurrency=8, duration_s=1.0, clock=clock).run()
    fake.close()
    assert fake.max_in_flight == 8
    assert drive.unfinished == 0
    assert 8 * 1.0 / 0.05 * 0.8 <= len(drive.samples) <= 8 * 1.0 / 0.05 + 8


def test_a_closed_loop_bounded_by_count_sends_exactly_that_many():
    fake = FakeProducer(service_s=lambda n: 0.01)
    drive = ClosedLoop(producer=fake, factory=_factory, concurrency=4, count=37).run()
    fake.close()
    assert len(drive.samples) == 37 and all(s.done_at is not None for s in drive.samples)


def test_throughput_is_c_over_the_response_time_when_slots_refill_at_once_and_the_gap_is_the_generators_refill():
    clock = RunClock()
    prompt = FakeProducer(service_s=lambda n: 0.1, clock=clock)
    good = ClosedLoop(producer=prompt, factory=_factory, concurrency=5, duration_s=1.5, warmup_s=0.2,
                      clock=clock).run()
    prompt.close()
    slow = FakeProducer(service_s=lambda n: 0.1, submit_delay_s=lambda n: 0.05, clock=clock)
    bad = ClosedLoop(producer=slow, factory=_factory, concurrency=5, duration_s=1.5, warmup_s=0.2, clock=clock).run()
    slow.close()
    agg_good, _ = _aggregate(prompt, good)
    agg_bad, _ = _aggregate(slow, bad)
    for agg in (agg_good, agg_bad):  # Little's law for the population: exact, whatever the generator did
        assert agg["throughput"]["completions_per_s"] <= agg["clients"]["ceiling_per_s"] * (1 + 1e-12)
        assert {r for r in agg["requests"]["window"]} and agg["clients"]["clients_seen"] == 5
    assert agg_good["clients"]["ratio"] > 0.97
    assert agg_good["clients"]["refill_share"] < 0.03
    # the slow submit is inside each request's response time (it is the fleet's submit path), so the
    # ratio stays near 1; what it costs shows as a longer response time, not as idle clients
    assert agg_bad["latency_ms"]["e2e"]["avg"] >= agg_good["latency_ms"]["e2e"]["avg"] + 40


def test_an_open_loop_shows_a_generator_stall_in_latency_and_send_lag_and_marks_the_run_invalid():
    clock = RunClock()
    fake = FakeProducer(service_s=lambda n: 0.01, submit_delay_s=lambda n: 0.4 if n == 20 else 0.0, clock=clock)
    schedule = make_schedule(rate_per_s=100, duration_s=1.5)
    drive = OpenLoop(producer=fake, factory=_factory, schedule=schedule, rate_per_s=100, arrival="constant",
                     clock=clock).run()
    fake.close()
    agg, _ = _aggregate(fake, drive)
    assert len(drive.samples) == len(schedule)
    assert agg["latency_ms"]["e2e"]["max"] >= 390
    assert agg["send_lag_ms"]["max"] >= 390
    assert agg["valid"] is False and "fell behind" in agg["invalid_reasons"][0]


def test_a_fleet_stall_hits_every_open_loop_request_sent_during_it_but_only_one_closed_loop_request():
    clock = RunClock()
    stall = (0.5, 1.0)
    fake = FakeProducer(service_s=lambda n: 0.01, stall=stall, clock=clock)
    schedule = make_schedule(rate_per_s=100, duration_s=1.5)
    open_drive = OpenLoop(producer=fake, factory=_factory, schedule=schedule, rate_per_s=100,
                          arrival="constant", clock=clock).run()
    fake.close()
    _, open_records = _aggregate(fake, open_drive)
    slow_open = [r for r in open_records if r.done_at - r.origin > 0.2]
    # arrivals in the first 0.3 s of the 0.5 s stall wait more than 0.2 s: about 30 of them
    assert len(slow_open) >= 25
    fake2 = FakeProducer(service_s=lambda n: 0.01, stall=stall, clock=clock)
    closed = ClosedLoop(producer=fake2, factory=_factory, concurrency=1, duration_s=1.5, clock=clock).run()
    fake2.close()
    _, closed_records = _aggregate(fake2, closed)
    assert sum(1 for r in closed_records if r.done_at - r.origin > 0.2) == 1  # coordinated omission
