"""One record per request: the generator's timings joined with the request's database row.

This is the raw material of every figure in a report; :func:`join` is the only place the two
views meet, so a figure recomputed from the stored rows goes through the same join.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from loadgen.drivers import ClientSample
from tars_tasks.codes import OUTCOMES_UNKNOWN, TERMINAL_STATUSES, RequestStatus

UNFINISHED = "unfinished"
TERMINAL = TERMINAL_STATUSES
#: ``api_calls.outcome`` of an attempt nobody knows the result of: ``in_flight`` (still running,
#: or its worker died) and ``unknown`` (its worker is known dead). On a *terminal* request such
#: an attempt is "billed, outcome unknown": the provider may well have served it, and its row
#: keeps the estimated input tokens and their cost. The one definition loadgen counts by; the
#: report shows these attempts and their dollars on a line of their own, never as $0.
UNKNOWN_OUTCOMES: frozenset[str] = frozenset(OUTCOMES_UNKNOWN)


@dataclass(slots=True)
class CallRow:
    """One ``api_calls`` row (one attempt), as far as the report needs it."""

    tier: str
    outcome: str
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    #: None while in flight, and for an attempt whose worker died mid-call
    latency_ms: float | None
    ratelimit_wait_ms: float
    #: Prompt-cache writes (5-minute and 1-hour together) and reads (0 in rows written before they were kept).
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    #: Of ``cache_write_tokens``, the 1-hour writes (priced apart from the 5-minute ones).
    cache_write_1h_tokens: int = 0
    #: Billed at the batch price: the batch runner's answer of a provider batch (workers/batchlane/).
    batch: bool = False

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_usd"] = str(self.cost_usd)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CallRow:
        return cls(**{**d, "cost_usd": Decimal(str(d["cost_usd"]))})


def unknown_outcome(calls: Iterable[CallRow], *, status: str) -> list[CallRow]:
    """The attempts of a request with status ``status`` that count as "billed, outcome unknown"."""
    return [c for c in calls if c.outcome in UNKNOWN_OUTCOMES] if status in TERMINAL else []


@dataclass(slots=True)
class DbRow:
    """The fields loadgen reads from ``requests`` (plus per-request sums over ``api_calls``)."""

    id: str
    status: str
    #: the human-readable detail; never read for a reason (that is ``failure_reason``)
    error: str | None
    tier_requested: str
    tier_used: str | None
    worker: str | None
    attempts: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    api_calls: int = 0
    ratelimit_wait_ms: float = 0.0
    calls_waited: int = 0
    #: sum of ``api_calls.latency_ms`` (the provider calls themselves, every attempt)
    model_ms: float | None = None
    calls: list[CallRow] = field(default_factory=list)
    #: ``requests.failure_reason`` (None: not failed, or a row written before the column)
    failure_reason: str | None = None
    #: cost controls: how it was answered (exact / model), what a cache hit saved, the fleet mode
    #: it was admitted under, its tenant
    answered_by: str | None = None
    saved_usd: Decimal = Decimal(0)
    served_mode: str | None = None
    priority: int | None = None
    tenant: str | None = None
    #: The lane the request was submitted to (``batch`` also for one the batch sent on to the
    #: interactive lane), and the tier admission queued it on (a degraded request: not the requested).
    lane: str | None = None
    tier_queued: str | None = None

    def set_calls(self, calls: list[CallRow]) -> None:
        """The request's attempts, and the per-request sums over them."""
        self.calls = calls
        self.api_calls = len(calls)
        self.ratelimit_wait_ms = sum(c.ratelimit_wait_ms for c in calls)
        self.calls_waited = sum(1 for c in calls if c.ratelimit_wait_ms > 0)
        timed = [c.latency_ms for c in calls if c.latency_ms is not None]
        self.model_ms = sum(timed) if timed else None


@dataclass(slots=True)
class RequestRecord:
    id: str
    status: str  # succeeded | failed | unfinished
    reason: str | None
    origin: float  # epoch s latency is measured from
    done_at: float | None
    intended_at: float | None
    sent_at: float | None
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    tier_requested: str | None
    tier_used: str | None
    worker: str | None
    attempts: int
    api_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    ratelimit_wait_ms: float
    calls_waited: int
    done_via: str | None
    model_ms: float | None = None
    #: closed loop: the client that sent it (None: open loop, or a row the generator has no sample of)
    slot: int | None = None
    #: False for a row of the run the generator has no sample of (its submit call failed after the
    #: row was recorded, so the generator counted it as a refusal already): kept for the bill,
    #: left out of every population so no request is counted twice.
    sampled: bool = True
    calls: list[CallRow] = field(default_factory=list)
    #: cost controls (see :class:`DbRow`)
    answered_by: str | None = None
    saved_usd: Decimal = Decimal(0)
    served_mode: str | None = None
    #: the request's TARS priority (None: refused before it was recorded)
    priority: int | None = None
    tenant: str | None = None
    #: the lane it was submitted to and the tier admission queued it on (see :class:`DbRow`)
    lane: str | None = None
    tier_queued: str | None = None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_usd"] = str(self.cost_usd)
        d["saved_usd"] = str(self.saved_usd)
        d["calls"] = [c.as_json() for c in self.calls]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RequestRecord:
        return cls(**{**d, "cost_usd": Decimal(str(d["cost_usd"])), "saved_usd": Decimal(str(d.get("saved_usd", 0))),
                      "calls": [CallRow.from_json(c) for c in d.get("calls", [])]})


def epoch(ts: datetime | None) -> float | None:
    """Database timestamp → epoch seconds (SQLite hands back naive datetimes, which are UTC)."""
    if ts is None:
        return None
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


def failure_reason(code: str | None) -> str:
    """The reason a report counts a failed request under: its ``failure_reason`` column, as stored
    (``unknown`` for a row without one). Never derived from the error text."""
    return code or "unknown"


def join(
    *, samples: Iterable[ClientSample], rows: Mapping[str, DbRow], origin: str, ended_at: float
) -> list[RequestRecord]:
    """Every request the generator sent or the database holds for the run, once.

    ``origin`` is ``intended_at`` (open loop) or ``send_start`` (closed loop). A request whose
    row is not terminal is ``unfinished``, its latency censored at ``ended_at``.
    """
    out: list[RequestRecord] = []
    seen: set[str] = set()
    for s in samples:
        seen.add(s.request_id)
        row = rows.get(s.request_id)
        t0 = getattr(s, origin)
        if row is None:  # refused before it was recorded
            out.append(RequestRecord(
                id=s.request_id, status=RequestStatus.FAILED, reason=s.client_error or "no_row", origin=t0,
                done_at=s.done_at,
                intended_at=s.intended_at, sent_at=s.sent_at, submitted_at=None, started_at=None, finished_at=None,
                tier_requested=None, tier_used=None, worker=None, attempts=0, api_calls=0, input_tokens=0,
                output_tokens=0, cost_usd=Decimal(0), ratelimit_wait_ms=0.0, calls_waited=0, done_via=s.done_via,
                slot=getattr(s, "slot", None)))
            continue
        out.append(_record(row, origin_t=t0, done_at=s.done_at, intended_at=s.intended_at, sent_at=s.sent_at,
                           done_via=s.done_via, ended_at=ended_at, slot=getattr(s, "slot", None)))
    for rid, row in rows.items():  # rows the generator has no sample of (its submit call failed)
        if rid not in seen:
            out.append(_record(row, origin_t=row.submitted_at, done_at=row.finished_at, intended_at=None,
                               sent_at=None, done_via="row", ended_at=ended_at, sampled=False))
    return out


def _record(row: DbRow, *, origin_t: float, done_at: float | None, intended_at: float | None,
            sent_at: float | None, done_via: str | None, ended_at: float, slot: int | None = None,
            sampled: bool = True) -> RequestRecord:
    terminal = row.status in TERMINAL_STATUSES
    if terminal and done_at is None:  # finished, but after the drain stopped listening
        done_at = row.finished_at
        done_via = "row"
    status = row.status if terminal else UNFINISHED
    reason = None
    if status == RequestStatus.FAILED:
        reason = failure_reason(row.failure_reason)
    elif status == UNFINISHED:
        reason = UNFINISHED
        done_at = None
    return RequestRecord(
        id=row.id, status=status, reason=reason, origin=origin_t, done_at=done_at, intended_at=intended_at,
        sent_at=sent_at, submitted_at=row.submitted_at, started_at=row.started_at, finished_at=row.finished_at,
        tier_requested=row.tier_requested, tier_used=row.tier_used, worker=row.worker, attempts=row.attempts,
        api_calls=row.api_calls, input_tokens=row.input_tokens, output_tokens=row.output_tokens,
        cost_usd=row.cost_usd, ratelimit_wait_ms=row.ratelimit_wait_ms, calls_waited=row.calls_waited,
        done_via=done_via, model_ms=row.model_ms, slot=slot, sampled=sampled, calls=list(row.calls),
        answered_by=row.answered_by, saved_usd=row.saved_usd, served_mode=row.served_mode,
        priority=row.priority, tenant=row.tenant, lane=row.lane, tier_queued=row.tier_queued)
