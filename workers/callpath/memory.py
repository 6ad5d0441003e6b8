"""In-memory stand-ins for the fleet limiter and breaker, for unit tests of the call path's pure
logic (no Redis). They keep the same contracts as :class:`workers.ratelimit.FleetRateLimiter`
and :class:`workers.breaker.FleetBreaker` on one process's clock: GCRA slots spaced by the
limits, and closed → open → half-open with one probe. Anything that claims the *fleet* works
runs against the real ones on real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tars_tasks.errors import CircuitOpen
from workers.breaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, Permit
from workers.ratelimit import LATE_TOLERANCE_S, ExtraLimit, LimitSpec, SlotMissed, Ticket


class InMemoryRateLimiter:
    """GCRA on a clock of its own (``clock()`` in seconds; ``sleep`` advances a fake one)."""

    def __init__(self, *, window_s: float = 60.0, utilisation: float = 1.0,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] = time.sleep,
                 late_tolerance_s: float = LATE_TOLERANCE_S) -> None:
        self.window_s, self.utilisation = window_s, utilisation
        self.late_tolerance_s = late_tolerance_s
        self._clock = clock or (lambda: time.monotonic())  # late-bound: a test may patch the clock
        self._sleep = sleep
        #: (provider, model), or ("", key) of a further limit -> [request TAT, token TAT] in clock seconds
        self._tat: dict[tuple[str, str], list[float]] = {}
        self.acquired: list[tuple[str, str, int]] = []
        self.adjusted: list[tuple[str, str, int]] = []

    def _intervals(self, limits: LimitSpec) -> tuple[float, float]:
        return (self.window_s / (limits.rpm * self.utilisation) if limits.rpm > 0 else 0.0,
                self.window_s / (limits.tpm * self.utilisation) if limits.tpm > 0 else 0.0)

    def _states(self, provider: str, model: str, limits: LimitSpec,
                also: tuple[ExtraLimit, ...]) -> list[tuple[list[float], float, float]]:
        return [(self._tat.setdefault(name, [0.0, 0.0]), *self._intervals(lim))
                for name, lim in [((provider, model), limits), *((("", k), lim) for k, lim in also)]]

    def acquire(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                deadline_s: float | None = None, also: tuple[ExtraLimit, ...] = ()) -> float:
        now = self._clock()
        ticket = self._book(provider=provider, model=model, limits=limits, tokens=tokens, deadline_s=deadline_s,
                            also=also)
        if ticket.due > now:
            self._sleep(ticket.due - now)
        return ticket.due - now

    def reserve(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                deadline_s: float | None = None, also: tuple[ExtraLimit, ...] = ()) -> Ticket:
        return self._book(provider=provider, model=model, limits=limits, tokens=tokens, deadline_s=deadline_s,
                          also=also)

    def _book(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
              deadline_s: float | None, also: tuple[ExtraLimit, ...] = ()) -> Ticket:
        """Take the next slot on this limiter's clock (acquire and reserve both book through here):
        the latest of the model's and every further limit's next slot; all of them advance."""
        states = self._states(provider, model, limits, also)
        now = self._clock()
        start = max(now, *(x for tat, _, _ in states for x in tat))
        if deadline_s is not None and start > deadline_s:
            raise TimeoutError(f"no {provider}:{model} capacity within the deadline (next slot in {start - now:.1f}s)")
        for tat, req_s, tok_s in states:
            if req_s > 0:
                tat[0] = start + req_s
            if tok_s > 0:
                tat[1] = start + tokens * tok_s
        self.acquired.append((provider, model, tokens))
        return Ticket(provider=provider, model=model, limits=limits, tokens=tokens, due=start, also=also)

    def wait_for(self, ticket: Ticket) -> None:
        left = ticket.due - self._clock()
        if left > 0:
            self._sleep(left)
        if self._clock() - ticket.due > self.late_tolerance_s:
            self.adjust_tokens(provider=ticket.provider, model=ticket.model, limits=ticket.limits,
                               tokens=-ticket.tokens, defer=True, also=ticket.also)
            raise SlotMissed(f"{ticket.provider}:{ticket.model} slot missed")

    def adjust_tokens(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                      defer: bool = False, also: tuple[ExtraLimit, ...] = ()) -> None:
        if tokens == 0:
            return
        for tat, _, tok_s in self._states(provider, model, limits, also):
            if tok_s > 0:
                tat[1] = max(tat[1] + tokens * tok_s, self._clock())
        self.adjusted.append((provider, model, tokens))


@dataclass(slots=True)
class _State:
    state: str = STATE_CLOSED
    failures: int = 0
    open_until: float = 0.0
    probe_until: float = 0.0
    reason: str = ""
    trips: int = 0


class InMemoryBreaker:
    """The breaker's state machine for one process (see :mod:`workers.breaker`)."""

    def __init__(self, *, failure_threshold: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold, self.cooldown_s = failure_threshold, cooldown_s
        self._clock = clock or (lambda: time.monotonic())
        self._s: dict[tuple[str, str], _State] = {}

    def state(self, *, provider: str, model: str) -> str:
        return self._s.setdefault((provider, model), _State()).state

    def allow(self, *, provider: str, model: str, probe_lease_s: float | None = None) -> Permit:
        s = self._s.setdefault((provider, model), _State())
        now = self._clock()
        if s.state == STATE_CLOSED:
            return Permit(probe=False, failures=s.failures)
        if s.state == STATE_OPEN and now < s.open_until:
            raise CircuitOpen(f"breaker for {provider}:{model} is open ({s.reason})", retry_after_s=s.open_until - now)
        if s.state == STATE_HALF_OPEN and now < s.probe_until:
            raise CircuitOpen(f"breaker for {provider}:{model} is half open (probe in flight)",
                              retry_after_s=s.probe_until - now)
        s.state, s.probe_until = STATE_HALF_OPEN, now + (probe_lease_s or 60.0)
        return Permit(probe=True)

    def record_success(self, *, provider: str, model: str) -> None:
        s = self._s.setdefault((provider, model), _State())
        s.state, s.failures, s.probe_until = STATE_CLOSED, 0, 0.0

    def record_failure(self, *, provider: str, model: str, reason: str, trip: bool = False) -> bool:
        s = self._s.setdefault((provider, model), _State())
        s.failures += 1
        if trip or s.state == STATE_HALF_OPEN or s.failures >= self.failure_threshold:
            s.state, s.open_until, s.reason, s.probe_until = STATE_OPEN, self._clock() + self.cooldown_s, reason, 0.0
            s.trips += 1
            return True
        return s.state == STATE_OPEN
