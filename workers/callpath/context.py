"""The state of one model call as the steps see it: :class:`Call` (one request, every tier and
attempt) and :class:`Attempt` (one try), the moves a step may ask for after a failed attempt, and
:class:`CallOutcome`, what the call path hands back.

Steps share these objects, never module globals: a worker runs many calls at once (greenlets),
and each call has its own :class:`Call`. A step keeps per-call data of its own in
:meth:`Call.state_of`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from config.catalog import ModelSpec
from tars_tasks.codes import AttemptOutcome, FailureReason, RequestStatus
from tars_tasks.errors import CircuitOpen, FleetStateUnavailable, ProviderError
from workers.providers import Completion, Provider
from workers.providers.request import ModelRequest
from workers.records import AttemptRecord

#: What a step (or the provider) may raise to end one attempt; anything else is a bug and
#: propagates (the sub-agent fails the request ``internal_error``).
CALL_ERRORS: tuple[type[BaseException], ...] = (ProviderError, CircuitOpen, FleetStateUnavailable)
#: Errors kept on a row or a request are cut to this many characters.
ERROR_MAX_CHARS = 2000


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class CallOutcome:
    """The verdict of one call: always returned, never a raised provider error."""

    status: RequestStatus
    text: str | None
    error: str | None
    tier_used: str
    model: str
    #: Every recorded attempt, as its ``api_calls`` row will be.
    api_rows: list[AttemptRecord]
    #: Why it failed (None when it succeeded).
    failure_reason: FailureReason | None = None
    #: Why the model stopped (``end_turn``, ``max_tokens``, ...; None when it failed).
    stop_reason: str | None = None


# --- moves: what a step's ``next_move`` may answer after a failed attempt ----------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again on the same tier (the step has already waited whatever it wanted)."""


@dataclass(frozen=True, slots=True)
class UseTier:
    """Go on with ``tier`` (a fresh retry policy). ``restart``: forget the tiers tried so far."""

    tier: str
    restart: bool = False


@dataclass(frozen=True, slots=True)
class GiveUp:
    """End the call failed with this reason and error text."""

    reason: FailureReason
    error: str


Move = Retry | UseTier | GiveUp
RETRY = Retry()


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of the provider on one tier; the columns of its ``api_calls`` row once recorded."""

    spec: ModelSpec
    provider: Provider
    #: 1-based count of tries in this call (refused tries included: no row, no number).
    try_number: int
    #: The row's attempt number (1-based over the request's recorded attempts).
    number: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: Set by the attempt recorder once its row is written (the attempt may then be billed).
    recorded: bool = False
    #: True once the request is handed to the provider (before that, nothing can be billed).
    sent: bool = False
    #: A rate-limit slot is held for this attempt: the fleet limiter does not acquire one.
    #: A step before the limiter may set it (a slot the dispatcher reserved already).
    slot_held: bool = False
    #: ``time.monotonic()`` at which the held slot was granted (None: unknown, never judged stale).
    slot_at: float | None = None
    #: The limiter's reservation (:class:`workers.ratelimit.Ticket`) not yet waited for: the
    #: attempt row is committed while the slot comes due, then the send waits for it.
    ticket: Any = None
    #: Tokens the held slot reserved (None: the call's estimate, :meth:`Call.reserved_tokens`);
    #: the limiter corrects the reservation from this to the real usage after the answer.
    reserved_tokens: int | None = None
    #: Seconds spent waiting for rate-limit slots.
    waited_s: float = 0.0
    #: The breaker's leave for this attempt (:class:`workers.breaker.Permit`), if a breaker asked.
    permit: Any = None
    completion: Completion | None = None
    error: BaseException | None = None
    # the row's columns
    outcome: AttemptOutcome = AttemptOutcome.IN_FLIGHT
    http_status: int | None = None
    error_text: str | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    cost_usd: Decimal = Decimal(0)
    latency_ms: float | None = None
    worker: str = ""
    started_at: datetime = field(default_factory=now)
    finished_at: datetime | None = None

    @property
    def tier(self) -> str:
        return self.spec.tier


@dataclass(slots=True, eq=False)
class Call:
    """One request's call: the tiers it went through, its attempts, and the verdict."""

    request_id: str
    request: ModelRequest
    worker: str
    requested: ModelSpec
    #: Sleeps of the call path (a greenlet switch under gevent; a list's append in tests).
    sleep: Callable[[float], None]
    #: The tier's spec (settings' overrides applied) and its provider.
    spec_for: Callable[[str], ModelSpec]
    provider_for: Callable[[ModelSpec], Provider]
    #: What the caller of :meth:`ModelCaller.call` passed along for steps (e.g. a reserved slot).
    hints: Mapping[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None
    tried: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    outcome: CallOutcome | None = None
    #: ``time.monotonic()`` by which the whole call must end (the requested tier's retry budget).
    deadline: float = 0.0
    #: ``time.monotonic()`` by which the current tier's attempts must end (its retry budget).
    tier_deadline: float = 0.0
    _state: dict[int, dict[str, Any]] = field(default_factory=dict)
    _est_input: int | None = None

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.requested.retry_budget_s

    # --- per-step state ------------------------------------------------------------------------

    def state_of(self, step: object) -> dict[str, Any]:
        """A dict of ``step``'s own for this call (steps are shared by concurrent calls)."""
        return self._state.setdefault(id(step), {})

    @property
    def estimated_input_tokens(self) -> int:
        """The whole request's input (system prompt and every turn), estimated."""
        if self._est_input is None:
            self._est_input = self.request.estimated_input_tokens()
        return self._est_input

    def reserved_tokens(self, spec: ModelSpec) -> int:
        """Tokens a rate-limit slot on ``spec`` reserves: the whole input plus the output limit."""
        return self.estimated_input_tokens + self.request.reserved_output_tokens(spec)

    # --- tiers and attempts --------------------------------------------------------------------

    def start_tier(self, tier: str, *, restart: bool = False) -> None:
        if restart:
            self.tried = []
        self.spec = self.spec_for(tier)
        self.tried.append(tier)
        self.tier_deadline = time.monotonic() + self.spec.retry_budget_s

    @property
    def recorded(self) -> list[Attempt]:
        return [a for a in self.attempts if a.recorded]

    def new_attempt(self) -> Attempt:
        assert self.spec is not None
        a = Attempt(spec=self.spec, provider=self.provider_for(self.spec), try_number=len(self.attempts) + 1,
                    number=len(self.recorded) + 1, worker=self.worker)
        self.attempts.append(a)
        return a

    # --- the verdict ---------------------------------------------------------------------------

    def rows(self) -> list[AttemptRecord]:
        return [record_of(a, request_id=self.request_id) for a in self.recorded]

    def succeed(self, attempt: Attempt) -> CallOutcome:
        c = attempt.completion
        assert c is not None
        self.outcome = CallOutcome(status=RequestStatus.SUCCEEDED, text=c.text, error=None, tier_used=attempt.tier,
                                   model=attempt.spec.model, api_rows=self.rows(), stop_reason=c.stop_reason)
        return self.outcome

    def answered(self, *, text: str, stop_reason: str | None = None) -> CallOutcome:
        """Succeeded without a provider call of its own (a step answered it: a cached answer)."""
        spec = self.spec or self.requested
        self.outcome = CallOutcome(status=RequestStatus.SUCCEEDED, text=text, error=None, tier_used=spec.tier,
                                   model=spec.model, api_rows=self.rows(), stop_reason=stop_reason)
        return self.outcome

    def give_up(self, *, reason: FailureReason, error: str) -> CallOutcome:
        spec = self.spec or self.requested
        self.outcome = CallOutcome(status=RequestStatus.FAILED, text=None, error=error[:ERROR_MAX_CHARS],
                                   tier_used=spec.tier, model=spec.model, api_rows=self.rows(),
                                   failure_reason=reason)
        return self.outcome

    def fail(self, exc: BaseException) -> CallOutcome:
        """Failed with ``exc``, no step having another move."""
        reason = FailureReason.of(exc)
        if isinstance(exc, ProviderError):
            spec = self.spec or self.requested
            n = sum(1 for a in self.recorded if a.tier == spec.tier)
            return self.give_up(reason=reason, error=f"{reason} after {n} attempt(s) on tier {spec.tier}: {exc}")
        return self.give_up(reason=reason, error=f"{reason}: {exc}")


def record_of(a: Attempt, *, request_id: str) -> AttemptRecord:
    """The attempt's ``api_calls`` row as it stands."""
    t = a.tokens
    return AttemptRecord(
        id=a.id, request_id=request_id, attempt=a.number, tier=a.tier, provider=a.provider.name,
        model=a.spec.model, outcome=a.outcome, http_status=a.http_status, error=a.error_text,
        input_tokens=t.get("input_tokens", 0), output_tokens=t.get("output_tokens", 0),
        cache_write_tokens=t.get("cache_write_tokens", 0), cache_write_1h_tokens=t.get("cache_write_1h_tokens", 0),
        cache_read_tokens=t.get("cache_read_tokens", 0), cost_usd=a.cost_usd, latency_ms=a.latency_ms,
        ratelimit_wait_ms=round(a.waited_s * 1000, 3), worker=a.worker, started_at=a.started_at,
        finished_at=a.finished_at,
    )
