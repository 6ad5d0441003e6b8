"""A producer double for driver tests: completes each request after a chosen service time.

It behaves like :class:`tars_tasks.client.TarsClient` as far as the drivers can tell
(``submit_many``, ``listener.on_done``, ``get_many``) and can be stalled for a while, during
which it finishes nothing — like a fleet whose workers froze.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from loadgen.clock import RunClock
from loadgen.records import DbRow


@dataclass
class _Result:
    id: str
    status: str

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")


class FakeListener:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[str, str, float], None]] = []

    def on_done(self, callback: Callable[[str, str, float], None]) -> None:
        self.callbacks.append(callback)


class FakeProducer:
    def __init__(self, *, service_s: Callable[[int], float], submit_delay_s: Callable[[int], float] | None = None,
                 stall: tuple[float, float] | None = None, clock: RunClock | None = None) -> None:
        self.clock = clock or RunClock()
        self.submitted: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.listener = FakeListener()
        self.service_s = service_s
        self.submit_delay_s = submit_delay_s
        self.stall = stall  # (start, end) in seconds after the first submit: nothing completes
        self.t0: float | None = None
        self._ids = itertools.count()
        self._heap: list[tuple[float, str]] = []
        self._status: dict[str, str] = {}
        self._lock = threading.Condition()
        self.in_flight = 0
        self.max_in_flight = 0
        self.submit_calls = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit_many(self, specs, *, run_id=None):
        self.submit_calls += 1
        if self.submit_delay_s is not None:
            time.sleep(self.submit_delay_s(self.submit_calls))
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        handles = []
        with self._lock:
            for _ in specs:
                n = next(self._ids)
                rid = f"r{n}"
                due = now + self.service_s(n)
                if self.stall is not None:
                    s0, s1 = self.t0 + self.stall[0], self.t0 + self.stall[1]
                    if s0 <= due < s1:
                        due = s1
                heapq.heappush(self._heap, (due, rid))
                self._status[rid] = "queued"
                self.submitted[rid] = now
                handles.append(_Result(id=rid, status="queued"))
            self.in_flight += len(specs)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._lock.notify()
        return handles

    def get_many(self, ids):
        return [_Result(id=i, status=self._status[i]) for i in ids if i in self._status]

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                if not self._heap:
                    self._lock.wait(0.05)
                    continue
                due, rid = self._heap[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._lock.wait(min(delay, 0.05))
                    continue
                heapq.heappop(self._heap)
                self._status[rid] = "succeeded"
                self.in_flight -= 1
                t = time.monotonic()
                self.finished[rid] = t
            for cb in self.listener.callbacks:
                cb(rid, "succeeded", t)

    def rows(self) -> dict[str, DbRow]:
        """Request rows as the database would hold them: started when submitted (no queue)."""
        out = {}
        for rid, t in self.submitted.items():
            done = self.finished.get(rid)
            out[rid] = DbRow(id=rid, status=self._status[rid], error=None, tier_requested="haiku",
                             tier_used="haiku" if done else None, worker="fake@test" if done else None, attempts=1,
                             input_tokens=10, output_tokens=20, cost_usd=Decimal("0.0001"),
                             submitted_at=self.clock.epoch(t), started_at=self.clock.epoch(t),
                             finished_at=self.clock.epoch(done) if done else None, api_calls=1)
        return out

    def close(self) -> None:
        self._stop = True
