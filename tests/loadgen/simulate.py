"""A simulated fleet with known answers, in virtual time: C closed-loop clients over S worker
slots with a chosen service time per request. It produces exactly what a real run hands to
loadgen — the generator's :class:`ClientSample` list and the database's :class:`DbRow` per
request — so the whole measuring chain (join, aggregate, report) runs on data whose true
throughput, latencies and bottleneck are known in advance.

Each request: sent at ``origin``; recorded ``submit_s`` later; waits for a free slot (FIFO);
holds the slot for its rate-limit wait, its model call and ``worker_s``; its completion
notice arrives ``notice_s`` after it finished; the client sends the next one ``refill_s``
after the notice.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Any

from loadgen.drivers import ClientSample
from loadgen.records import DbRow, join
from loadgen.runner import ScenarioResult, Session, StepResult, aggregate
from loadgen.scenarios import Scenario

T0 = 1_800_000_000.0


@dataclass
class Call:
    model_s: float
    wait_s: float = 0.0
    tier: str = "sonnet"
    outcome: str = "ok"
    input_tokens: int = 150
    output_tokens: int = 450
    cost_usd: Decimal = Decimal("0.007200000")


@dataclass
class Sim:
    concurrency: int
    duration_s: float
    warmup_s: float
    calls: Callable[[int], list[Call]]
    slots: int = 10_000
    submit_s: float = 0.002
    worker_s: float = 0.003
    notice_s: float = 0.001
    refill_s: float = 0.0005
    status: Callable[[int], str] = lambda i: "succeeded"
    #: a fleet-wide limiter (GCRA without burst): calls are spaced 1/rate apart, callers wait in their slot
    rate_limit_per_s: float | None = None
    samples: list[ClientSample] = field(default_factory=list)
    rows: dict[str, DbRow] = field(default_factory=dict)

    def run(self) -> Sim:
        self._tat = T0
        load_end = T0 + self.duration_s
        ready = [(T0, c, T0) for c in range(self.concurrency)]  # (origin, client, intended)
        heapq.heapify(ready)
        free_at = [T0] * self.slots
        heapq.heapify(free_at)
        ids = itertools.count()
        has_slot = "slot" in {f.name for f in fields(ClientSample)}
        while ready:
            origin, client, intended = heapq.heappop(ready)
            if origin >= load_end:
                continue
            i = next(ids)
            calls = self.calls(i)
            submitted = origin + self.submit_s
            started = max(submitted, heapq.heappop(free_at))
            if self.rate_limit_per_s:
                t = started
                for c in calls:
                    slot_t = max(t, self._tat)
                    self._tat = slot_t + 1 / self.rate_limit_per_s
                    c.wait_s = slot_t - t
                    t = slot_t + c.model_s
            finished = started + sum(c.wait_s + c.model_s for c in calls) + self.worker_s
            heapq.heappush(free_at, finished)
            done = finished + self.notice_s
            rid = f"r{i}"
            status = self.status(i)
            kw: dict[str, Any] = {"slot": client} if has_slot else {}
            self.samples.append(ClientSample(request_id=rid, intended_at=intended, send_start=origin,
                                             sent_at=submitted, done_at=done, status=status, client_error=None,
                                             done_via="notice", **kw))
            self.rows[rid] = _row(rid, status=status, submitted=submitted, started=started, finished=finished,
                                  calls=calls)
            heapq.heappush(ready, (done + self.refill_s, client, done))
        return self

    @property
    def ended_at(self) -> float:
        return max(s.done_at for s in self.samples)

    def drive(self) -> dict[str, Any]:
        # the driver's warm-up lasts warmup_s and until C requests completed
        dones = sorted(s.done_at for s in self.samples)
        warm_until = dones[min(self.concurrency, len(dones)) - 1]
        load_end = T0 + self.duration_s
        w0 = min(max(T0 + self.warmup_s, warm_until), load_end)
        return {"kind": "closed", "started_at": T0, "window": [w0, load_end], "load_end": load_end,
                "ended_at": self.ended_at, "concurrency": self.concurrency, "rate_per_s": None, "arrival": None,
                "stopped_early": None, "unfinished": 0, "latency_origin": "send_start", "count_bounded": False}

    def step(self, *, limits: dict[str, Any] | None = None, label: str = "sim", level: float | None = None,
             fleet_kind: str = "local") -> StepResult:
        drive = self.drive()
        records = join(samples=self.samples, rows=self.rows, origin="send_start", ended_at=drive["ended_at"])
        try:
            agg = aggregate(records, drive, slots=self.slots, limits=limits)
        except TypeError:  # the aggregate() of before the population rework takes neither
            agg = aggregate(records, drive)
        agg.setdefault("resources", {"sampled": False, "processes": "none", "samples": 0})
        agg.setdefault("not_exercised", [])
        config = {**Scenario(name=label, title=label, concurrency=self.concurrency, duration_s=self.duration_s,
                             warmup_s=self.warmup_s).config(),
                  "label": label, "level": level, "fleet": f"simulated: {self.slots} slots", "fleet_kind": fleet_kind,
                  "fleet_processes": 1, "fleet_slots": self.slots, "rate_limits": limits}
        return StepResult(run_id=f"sim-{label}", scenario=label, label=label, level=level, config=config,
                          drive=drive, aggregates=agg, records=records)


def _row(rid: str, *, status: str, submitted: float, started: float, finished: float, calls: list[Call]) -> DbRow:
    row = DbRow(id=rid, status=status, error=None if status == "succeeded" else "transient_error after 4 attempt(s)",
                failure_reason=None if status == "succeeded" else "transient_error",
                tier_requested="sonnet", tier_used=calls[-1].tier if calls else None, worker="w1@sim",
                attempts=len(calls), input_tokens=sum(c.input_tokens for c in calls),
                output_tokens=sum(c.output_tokens for c in calls),
                cost_usd=sum((c.cost_usd for c in calls), Decimal(0)),
                submitted_at=submitted, started_at=started, finished_at=finished)
    if hasattr(row, "set_calls"):
        from loadgen.records import CallRow

        row.set_calls([CallRow(tier=c.tier, outcome=c.outcome, input_tokens=c.input_tokens,
                               output_tokens=c.output_tokens, cost_usd=c.cost_usd, latency_ms=c.model_s * 1000,
                               ratelimit_wait_ms=c.wait_s * 1000) for c in calls])
    else:
        row.api_calls = len(calls)
        row.ratelimit_wait_ms = sum(c.wait_s * 1000 for c in calls)
        row.calls_waited = sum(1 for c in calls if c.wait_s > 0)
        row.model_ms = sum(c.model_s * 1000 for c in calls)
    return row


ENVIRONMENT = {"host": "sim", "python": "3", "platform": "sim", "cpus": 2, "memory_gb": 1, "fleet_mode": "local",
               "broker": "redis://sim", "database": "postgresql://sim", "sim_latency": None, "sim_failure_rate": None,
               "capabilities_present": {"fleet_rate_limiter": True}}


def session_of(*steps: StepResult, out_dir: Path = Path("/nonexistent")) -> Session:
    results = [ScenarioResult(scenario=Scenario(name=s.label, title=f"Simulated {s.label}",
                                                concurrency=s.drive["concurrency"]), steps=[s]) for s in steps]
    return Session(id="sim", started_at="t0", finished_at="t1", environment=dict(ENVIRONMENT), scenarios=results,
                   out_dir=out_dir)


def results_rows(md: str, run_id: str) -> dict[str, str]:
    """The Results table of run ``run_id`` in a report: {metric: value}."""
    import re

    section = md.split(f"Run id: `{run_id}`", 1)[1].split("**Analysis:**", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| \*\*(.+?)\*\* \| (.+?) \|$", section, re.M)}
