"""Open loop against a deliberately stalled fleet: the stall must show in the latency.

The only worker process is frozen (SIGSTOP) for two seconds in the middle of an open-loop
run. The schedule does not wait for the fleet, so every arrival during the freeze is late
by the rest of the freeze, measured from its intended send time: no coordinated omission.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from loadgen.scenarios import Scenario

pytestmark = pytest.mark.integration


def test_a_stalled_fleet_shows_the_stall_in_open_loop_latency(make_runner):
    runner = make_runner(env={"TARS_SIM_LATENCY": "uniform:20:40"})
    rate, stall_s = 40.0, 2.0
    sc = Scenario(name="stall", title="open loop with a frozen worker", kind="open", rate_per_s=rate,
                  duration_s=8, warmup_s=0, workers=1, worker_concurrency=100, roles={"researcher": 1.0})
    fleet = runner._fleet_for(sc)
    (pid,) = fleet.pids()
    marks: dict[str, float] = {}

    def signal_worker(sig: signal.Signals, name: str) -> None:
        os.kill(pid, sig)
        marks[name] = time.time()

    timers = [threading.Timer(2.5, signal_worker, (signal.SIGSTOP, "stopped")),
              threading.Timer(2.5 + stall_s, signal_worker, (signal.SIGCONT, "resumed"))]
    for t in timers:
        t.start()
    try:
        step = runner.run_scenario(sc).steps[0]
    finally:
        for t in timers:
            t.join()
        os.kill(pid, signal.SIGCONT)
    lat = [r.done_at - r.origin for r in step.records if r.done_at is not None]
    assert len(step.records) == len(lat) == 320  # the schedule was kept: every arrival was sent and finished
    # arrivals in the first second of the freeze waited at least its last second
    late = [x for x in lat if x > 1.0]
    assert len(late) >= 0.8 * rate * (stall_s - 1.0)
    e2e = step.aggregates["latency_ms"]["e2e"]
    assert e2e["max"] >= 0.9 * stall_s * 1000
    assert e2e["p99"] >= 1000  # ~10% of the arrivals fell in the freeze
    # the generator itself kept to the schedule: what was due in the freeze's first second was sent
    # while the worker was still frozen (an ordering, not a clock bound: a sender that waited for the
    # fleet would send them only after the resume), so the lateness is the fleet's, not the sender's
    due = [r for r in step.records if marks["stopped"] <= r.intended_at < marks["stopped"] + 1.0]
    assert len(due) >= 0.8 * rate
    sent_frozen = [r for r in due if r.sent_at < marks["resumed"] <= r.done_at]
    assert len(sent_frozen) >= 0.9 * len(due), (len(sent_frozen), len(due))
