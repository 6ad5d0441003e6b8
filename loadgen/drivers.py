"""Load drivers: closed loop (keep C requests in flight) and open loop (a fixed schedule).

Both talk to the fleet only through the producer API (``submit_many``, the completion
listener's ``on_done`` and ``get_many``), so they drive the embedded fleet, a local fleet of
worker processes or a remote one alike. Every request gets a :class:`ClientSample` with the
generator's view of its life; the request rows in the database hold the fleet's view.

Timings (epoch seconds, see :mod:`loadgen.clock`):

* ``intended_at`` — open loop: the schedule's send time; closed loop: when the slot became
  free (the completion notice of the request before it, or the start);
* ``send_start`` / ``sent_at`` — the ``submit_many`` call began / returned (recorded and
  published). The send lag is ``sent_at - intended_at``;
* ``done_at`` — the completion notice arrived (or a poll found the row finished).

Latency runs from ``intended_at`` in the open loop (so a stall of the fleet *or* of the
generator shows, no coordinated omission) and from ``send_start`` in the closed loop (where
the refill delay is the generator's, and shows instead in the Little's-law ratio).
"""

from __future__ import annotations

import heapq
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from loadgen.clock import RunClock
from tars_tasks.codes import RequestStatus
from tars_tasks.errors import LoadgenError, Overloaded, TarsError

DriverKind = Literal["closed", "open"]

#: Ids still in flight after this long are looked up in the database (a notice may be lost).
POLL_AFTER_S = 3.0
POLL_INTERVAL_S = 2.0
#: Backoff of a closed-loop slot whose submission was refused without a ``retry_after``.
REJECT_BACKOFF_S = 0.1
PROGRESS_INTERVAL_S = 0.25
OPEN_LOOP_MAX_BATCH = 200
DEFAULT_DRAIN_TIMEOUT_S = 60.0
DEFAULT_MAX_IN_FLIGHT = 20_000


class _Handle(Protocol):
    id: str


class _Result(Protocol):
    id: str
    status: str

    @property
    def done(self) -> bool: ...


class _Listener(Protocol):
    def on_done(self, callback: Callable[[str, str, float], None]) -> None: ...


class Producer(Protocol):
    """What a driver needs of :class:`tars_tasks.client.TarsClient`."""

    @property
    def listener(self) -> _Listener: ...

    def submit_many(self, requests: Sequence[dict[str, Any]], *, run_id: str | None = None) -> Sequence[_Handle]: ...

    def get_many(self, request_ids: Sequence[str]) -> Sequence[_Result]: ...


RequestFactory = Callable[[int], dict[str, Any]]


@dataclass(slots=True)
class ClientSample:
    """The generator's record of one request (``request_id`` is ``client-N`` if it never got one)."""

    request_id: str
    intended_at: float
    send_start: float
    sent_at: float
    done_at: float | None = None
    status: str | None = None
    #: why the generator itself counts it failed: ``rejected:overloaded``, ``submit_error:...``.
    client_error: str | None = None
    done_via: str | None = None
    #: closed loop: the client (0..C-1) that sent it; a client's requests never overlap.
    slot: int | None = None

    COLUMNS = ("request_id", "intended_at", "send_start", "sent_at", "done_at", "status", "client_error",
               "done_via", "slot")

    def as_row(self) -> list[Any]:
        return [getattr(self, c) for c in self.COLUMNS]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ClientSample:
        return cls(**dict(zip(cls.COLUMNS[: len(row)], row, strict=True)))


@dataclass(slots=True)
class Progress:
    elapsed_s: float
    sent: int
    done: int
    in_flight: int
    failed: int
    phase: str


@dataclass
class DriveResult:
    kind: DriverKind
    samples: list[ClientSample]
    #: epoch s: the load phase began, the steady window, issuing stopped, the drain ended.
    started_at: float
    window: tuple[float, float]
    load_end: float
    ended_at: float
    concurrency: int | None = None
    rate_per_s: float | None = None
    arrival: str | None = None
    #: set when the driver stopped issuing before its bound (backlog cap reached).
    stopped_early: str | None = None
    #: bounded by a request count (a burst), not a duration: the whole run is the population.
    count_bounded: bool = False
    unfinished: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_origin(self) -> str:
        return "intended_at" if self.kind == "open" else "send_start"


class _Tracker:
    """Completion notices → a queue the driver drains; thread-safe, cheap in the callback."""

    def __init__(self, producer: Producer) -> None:
        self.notices: queue.SimpleQueue[tuple[str, str, float]] = queue.SimpleQueue()
        producer.listener.on_done(lambda rid, status, t: self.notices.put((rid, status, t)))


def _window(start: float, load_end: float, warmup_s: float) -> tuple[float, float]:
    w0 = min(start + warmup_s, load_end)
    return (w0, load_end)


class _Base:
    def __init__(self, *, producer: Producer, factory: RequestFactory, run_id: str | None,
                 warmup_s: float, duration_s: float | None, count: int | None,
                 drain_timeout_s: float, on_progress: Callable[[Progress], None] | None,
                 clock: RunClock | None) -> None:
        if duration_s is None and count is None:
            raise LoadgenError("a load run needs a bound: duration_s or count")
        self.producer = producer
        self.factory = factory
        self.run_id = run_id
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        self.count = count
        self.drain_timeout_s = drain_timeout_s
        self.on_progress = on_progress
        self.clock = clock or RunClock()
        self.samples: dict[str, ClientSample] = {}
        self.order: list[ClientSample] = []
        self.in_flight: dict[str, ClientSample] = {}
        self.unmatched: dict[str, tuple[str, float]] = {}
        self.failed = 0
        self._n = 0
        self._client_n = 0
        self._last_progress = 0.0
        self._last_poll = time.monotonic()
        #: (slot, monotonic time) of requests whose notice arrived before their submit returned
        self._early_freed: list[tuple[int | None, float]] = []
        self.tracker = _Tracker(producer)

    # --- submission ------------------------------------------------------------------------------

    def _submit(self, intended: Sequence[float], slots: Sequence[int | None] | None = None) -> tuple[int, float | None]:
        """Submit one request per intended time (monotonic), sent by ``slots`` (closed loop).
        Returns (refused, retry_after_s)."""
        slots = list(slots) if slots is not None else [None] * len(intended)
        specs = [self.factory(self._n + i) for i in range(len(intended))]
        self._n += len(intended)
        t_start = time.monotonic()
        try:
            handles = self.producer.submit_many(specs, run_id=self.run_id)
        except TarsError as exc:
            t_end = time.monotonic()
            kind = "rejected:overloaded" if isinstance(exc, Overloaded) else f"submit_error:{type(exc).__name__}"
            for t, slot in zip(intended, slots, strict=True):
                self._client_n += 1
                s = ClientSample(request_id=f"client-{self._client_n}", intended_at=self.clock.epoch(t),
                                 send_start=self.clock.epoch(t_start), sent_at=self.clock.epoch(t_end),
                                 done_at=self.clock.epoch(t_end), status=RequestStatus.FAILED, client_error=kind,
                                 done_via="client", slot=slot)
                self.order.append(s)
            self.failed += len(intended)
            return len(intended), getattr(exc, "retry_after_s", None)
        t_end = time.monotonic()
        for h, t, slot in zip(handles, intended, slots, strict=True):
            s = ClientSample(request_id=h.id, intended_at=self.clock.epoch(t),
                             send_start=self.clock.epoch(t_start), sent_at=self.clock.epoch(t_end), slot=slot)
            self.samples[h.id] = s
            self.order.append(s)
            early = self.unmatched.pop(h.id, None)
            if early is not None:  # finished before submit_many returned: its slot is free already
                self._mark_done(s, early[0], early[1], via="notice")
                self._early_freed.append((slot, early[1]))
            else:
                self.in_flight[h.id] = s
        return 0, None

    def _mark_done(self, s: ClientSample, status: str, t_mono: float, *, via: str) -> None:
        s.done_at = self.clock.epoch(t_mono)
        s.status = status
        s.done_via = via
        if status != RequestStatus.SUCCEEDED:
            self.failed += 1

    # --- completions -----------------------------------------------------------------------------

    def _take_notices(self, timeout: float | None) -> list[tuple[int | None, float]]:
        """Drain waiting notices (block up to ``timeout`` for the first). Returns freed (slot, time)."""
        freed: list[tuple[int | None, float]] = self._early_freed
        self._early_freed = []
        try:
            item = self.tracker.notices.get(timeout=timeout) if timeout else self.tracker.notices.get_nowait()
        except queue.Empty:
            return freed
        while True:
            rid, status, t = item
            s = self.in_flight.pop(rid, None)
            if s is not None:
                self._mark_done(s, status, t, via="notice")
                freed.append((s.slot, t))
            elif rid not in self.samples:
                self.unmatched[rid] = (status, t)
            try:
                item = self.tracker.notices.get_nowait()
            except queue.Empty:
                return freed

    def _poll(self, *, force: bool = False) -> list[tuple[int | None, float]]:
        """Find requests finished without a notice reaching us (the row is the truth)."""
        now = time.monotonic()
        if not force and now - self._last_poll < POLL_INTERVAL_S:
            return []
        self._last_poll = now
        cutoff = self.clock.epoch(now - POLL_AFTER_S)
        stale = [rid for rid, s in self.in_flight.items() if force or s.sent_at < cutoff]
        freed: list[tuple[int | None, float]] = []
        for i in range(0, len(stale), 1000):
            try:
                results = self.producer.get_many(stale[i : i + 1000])
            except TarsError:
                return freed
            t = time.monotonic()
            for r in results:
                if r.done and r.id in self.in_flight:
                    s = self.in_flight.pop(r.id)
                    self._mark_done(s, r.status, t, via="poll")
                    freed.append((s.slot, t))
        return freed

    def _progress(self, phase: str, start: float, *, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            sent = len(self.order)
            self.on_progress(Progress(elapsed_s=now - start, sent=sent, done=sent - len(self.in_flight),
                                      in_flight=len(self.in_flight), failed=self.failed, phase=phase))

    def _drain(self, start: float) -> float:
        """Wait for the requests still in flight; returns the monotonic end of the drain."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self._take_notices(0.05)
            self._poll()
            self._progress("drain", start)
        if self.in_flight:
            self._poll(force=True)
        return time.monotonic()

    def _result(self, kind: DriverKind, start: float, load_end: float, end: float, *,
                warm_until: float | None = None, **kw: Any) -> DriveResult:
        s, le = self.clock.epoch(start), self.clock.epoch(load_end)
        w0, w1 = _window(s, le, self.warmup_s)
        if warm_until is not None:
            w0 = min(max(w0, self.clock.epoch(warm_until)), w1)
        return DriveResult(kind=kind, samples=list(self.order), started_at=s, window=(w0, w1),
                           load_end=le, ended_at=self.clock.epoch(end), unfinished=len(self.in_flight), **kw)


class ClosedLoop(_Base):
    """Keep ``concurrency`` requests in flight; each completion notice releases the next request.

    The warm-up lasts ``warmup_s`` *and* until ``concurrency`` requests have completed, so
    every slot has cycled once before the steady window opens (a cold fleet's first calls —
    connections, caches, imports — stay out of it).
    """

    def __init__(self, *, producer: Producer, factory: RequestFactory, concurrency: int,
                 duration_s: float | None = None, count: int | None = None, warmup_s: float = 0.0,
                 run_id: str | None = None, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
                 on_progress: Callable[[Progress], None] | None = None, clock: RunClock | None = None) -> None:
        if concurrency < 1:
            raise LoadgenError(f"concurrency must be >= 1, got {concurrency}")
        super().__init__(producer=producer, factory=factory, run_id=run_id, warmup_s=warmup_s,
                         duration_s=duration_s, count=count, drain_timeout_s=drain_timeout_s,
                         on_progress=on_progress, clock=clock)
        self.concurrency = concurrency

    def run(self) -> DriveResult:
        start = time.monotonic()
        stop_at = start + self.duration_s if self.duration_s is not None else None
        budget = self.count if self.count is not None else None
        deferred: list[tuple[float, int]] = []  # (monotonic time a refused slot may send again, slot)
        free: list[tuple[int, float]] = [(i, start) for i in range(self.concurrency)]  # (slot, intended)
        load_end: float | None = None
        warm_until: float | None = None
        completed = 0
        while True:
            now = time.monotonic()
            while deferred and deferred[0][0] <= now:
                back, slot = heapq.heappop(deferred)
                free.append((slot, back))
            if load_end is None and ((stop_at is not None and now >= stop_at) or budget == 0):
                load_end = now
            if load_end is not None:
                break
            if free:
                n = len(free) if budget is None else min(len(free), budget)
                batch, free = free[:n], free[n:]
                if budget is not None:
                    budget -= n
                refused, retry_after = self._submit([t for _, t in batch], [slot for slot, _ in batch])
                if refused:
                    back = time.monotonic() + (retry_after or REJECT_BACKOFF_S)
                    for slot, _ in batch:
                        heapq.heappush(deferred, (back, slot))
            wait = 0.05
            if deferred:
                wait = max(0.0, min(wait, deferred[0][0] - time.monotonic()))
            if stop_at is not None:
                wait = max(0.0, min(wait, stop_at - time.monotonic()))
            freed = self._take_notices(wait or None) if not free else self._take_notices(None)
            freed += self._poll()
            free.extend((slot, t) for slot, t in freed if slot is not None)
            completed += len(freed)
            if warm_until is None and completed >= self.concurrency:
                warm_until = time.monotonic()
            self._progress("load", start)
        end = self._drain(start)
        self._progress("done", start, force=True)
        return self._result("closed", start, load_end, end, warm_until=warm_until if warm_until is not None else end,
                            concurrency=self.concurrency, count_bounded=self.count is not None and
                            self.duration_s is None)


class OpenLoop(_Base):
    """Send on a schedule fixed in advance, whatever the fleet does (bounded backlog)."""

    def __init__(self, *, producer: Producer, factory: RequestFactory, schedule: np.ndarray,
                 rate_per_s: float, arrival: str, warmup_s: float = 0.0, run_id: str | None = None,
                 drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 on_progress: Callable[[Progress], None] | None = None, clock: RunClock | None = None,
                 lead_s: float = 0.05, count_bounded: bool = False) -> None:
        super().__init__(producer=producer, factory=factory, run_id=run_id, warmup_s=warmup_s,
                         duration_s=None, count=len(schedule), drain_timeout_s=drain_timeout_s,
                         on_progress=on_progress, clock=clock)
        self.schedule = np.asarray(schedule, dtype=np.float64)
        self.rate_per_s = rate_per_s
        self.arrival = arrival
        self.max_in_flight = max_in_flight
        self.lead_s = lead_s
        self.count_bounded = count_bounded

    def run(self) -> DriveResult:
        start = time.monotonic() + self.lead_s
        due = start + self.schedule
        n = len(due)
        i = 0
        stopped: str | None = None
        while i < n:
            now = time.monotonic()
            if now < due[i]:
                self._take_notices(None)
                self._progress("load", start)
                time.sleep(max(0.0, due[i] - time.monotonic()))
                continue
            j = min(int(np.searchsorted(due, now, side="right")), i + OPEN_LOOP_MAX_BATCH)
            j = max(j, i + 1)
            self._submit(due[i:j].tolist())
            i = j
            self._take_notices(None)
            self._poll()
            if len(self.in_flight) > self.max_in_flight:
                stopped = (f"backlog of {len(self.in_flight)} requests in flight exceeded "
                           f"max_in_flight={self.max_in_flight}; {n - i} scheduled arrivals not sent")
                break
        load_end = time.monotonic()
        end = self._drain(start)
        self._progress("done", start, force=True)
        scheduled_end = start + (float(self.schedule[-1]) if n else 0.0)
        return self._result("open", start, max(load_end, scheduled_end) if stopped is None else load_end, end,
                            rate_per_s=self.rate_per_s, arrival=self.arrival, stopped_early=stopped,
                            count_bounded=self.count_bounded, extra={"scheduled": n, "sent": i})
