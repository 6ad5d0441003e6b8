"""The fleet-wide rate limiter: requests per minute **and** tokens per minute per (provider, model).

Repairs celery#5732: Celery's ``rate_limit`` is per worker, so N workers overrun a provider's
limit N-fold. Here every worker process on every host shares one Redis hash per
(provider, model) and one Lua script decides atomically.

The algorithm is GCRA (the generic cell rate algorithm) used as a *scheduler*. Each dimension
keeps a theoretical arrival time (TAT, µs on Redis' clock). A call costing ``r`` requests and
``t`` tokens is given the slot ``start = max(now, TAT_req, TAT_tok)``; the script advances
``TAT_req = start + r·T_req`` and ``TAT_tok = start + t·T_tok`` (``T = window / limit``) and
answers "wait ``start - now``". The caller sleeps exactly that long (``time.sleep``, a
greenlet switch under gevent) and calls: no polling, no thundering herd, no CPU burnt.

Guarantees (window ``W``, limit ``L`` after the utilisation factor):
* requests: slots are spaced at least ``W/L`` apart, so no window of length ``W`` holds more
  than ``L`` slot times;
* tokens: a window holds at most ``L_tok`` plus the tokens of the one call that opened it
  (GCRA without burst; reconcile with :meth:`FleetRateLimiter.adjust_tokens` after the call);
* a caller woken more than ``late_tolerance_s`` after its slot (a stalled process) does not
  send late into the next window; it gives the slot up and reserves again;
* a reservation is made at most ``max_wait_s`` ahead. Further out the script reserves nothing
  and answers the wait; the caller sleeps part of it and asks again, so capacity is never
  held for a caller that has gone away (a killed worker wastes at most its own slots, which
  only lowers the rate, never raises it).

The clock is Redis' ``TIME``, so hosts with skewed clocks still agree on slot times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from config.keys import ratelimit_key

log = logging.getLogger(__name__)

_US_PER_S = 1_000_000
#: A caller that wakes this much later than its slot (a CPU-starved or stalled process) gives
#: the slot up and asks again: sent late, it would crowd the next window past the limit.
LATE_TOLERANCE_S = 0.05

#: KEYS[1] = the limiter hash. ARGV: mode ("acquire" | "adjust"), request cost, token cost
#: (may be negative in "adjust"), µs per request, µs per token, max wait µs, now µs ("" = TIME),
#: token correction of earlier calls applied first (deferred :meth:`adjust_tokens`).
#: Returns {granted (0/1), wait µs}.
LIMITER_LUA = """
local now
if ARGV[7] ~= '' then now = tonumber(ARGV[7]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local rtat = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local ttat = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local tok_us = tonumber(ARGV[3]) * tonumber(ARGV[5])
local credit = tonumber(ARGV[8] or '0')
if credit ~= 0 then ttat = math.max(ttat + credit * tonumber(ARGV[5]), now) end
if ARGV[1] == 'adjust' then
  ttat = math.max(ttat + tok_us, now)
  redis.call('HSET', KEYS[1], 't', string.format('%d', ttat))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(rtat, ttat) - now) / 1000) + 60000)
  return {1, 0}
end
local start = math.max(now, rtat, ttat)
local wait = start - now
if wait > tonumber(ARGV[6]) then return {0, string.format('%d', wait)} end
rtat = start + tonumber(ARGV[2]) * tonumber(ARGV[4])
ttat = start + tok_us
redis.call('HSET', KEYS[1], 'r', string.format('%d', rtat), 't', string.format('%d', ttat))
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(rtat, ttat) - now) / 1000) + 60000)
return {1, string.format('%d', wait)}
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """The script's answer: capacity reserved (``granted``) at ``wait_s`` from now, or not."""

    granted: bool
    wait_s: float


class SlotMissed(Exception):
    """The reserved slot passed before the caller could use it (its tokens were given back)."""


@dataclass(frozen=True, slots=True)
class LimitSpec:
    rpm: int
    tpm: int

    def intervals_us(self, *, window_s: float, utilisation: float) -> tuple[float, float]:
        """µs of the window each request and each token uses up."""
        window_us = window_s * _US_PER_S
        return window_us / (self.rpm * utilisation), window_us / (self.tpm * utilisation)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A reserved slot: the call may go out at ``due`` (``time.monotonic()``), not before."""

    provider: str
    model: str
    limits: LimitSpec
    tokens: int
    due: float
    #: seconds the limiter slept inside ``reserve`` (a slot too far out to book at once): waiting for
    #: capacity, like the distance to ``due``; the round trips to Redis are not
    slept_s: float = 0.0


class FleetRateLimiter:
    """Shared RPM+TPM limiter. ``acquire`` blocks (cooperatively) until the call may go out."""

    def __init__(
        self,
        *,
        redis_client: redis.Redis,
        namespace: str,
        window_s: float = 60.0,
        utilisation: float = 1.0,
        max_wait_s: float = 30.0,
        late_tolerance_s: float = LATE_TOLERANCE_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = redis_client
        self.late_tolerance_s = late_tolerance_s
        self.late_slots = 0  # slots given up because the caller woke too late (this process)
        self.namespace = namespace
        self.window_s = window_s
        self.utilisation = utilisation
        self.max_wait_s = max_wait_s
        self._sleep = sleep
        self._script = redis_client.register_script(LIMITER_LUA)
        #: Token corrections not yet sent, per key: they ride along with the next reservation,
        #: so reconciling usage costs no round trip of its own.
        self._pending_tokens: dict[str, int] = {}

    def key(self, *, provider: str, model: str) -> str:
        return ratelimit_key(self.namespace, provider, model)

    def try_reserve(
        self, *, provider: str, model: str, limits: LimitSpec, tokens: int, requests: int = 1,
        max_wait_s: float | None = None, now_us: int | None = None,
    ) -> Grant:
        """One round trip: reserve a slot at most ``max_wait_s`` ahead, or learn the wait."""
        req_us, tok_us = limits.intervals_us(window_s=self.window_s, utilisation=self.utilisation)
        wait_cap_us = (self.max_wait_s if max_wait_s is None else max_wait_s) * _US_PER_S
        key = self.key(provider=provider, model=model)
        credit = self._pending_tokens.pop(key, 0)
        try:
            granted, wait_us = self._script(
                keys=[key],
                args=["acquire", requests, tokens, repr(req_us), repr(tok_us), repr(wait_cap_us),
                      "" if now_us is None else str(now_us), credit],
            )
        except BaseException:
            if credit:
                self._pending_tokens[key] = self._pending_tokens.get(key, 0) + credit
            raise
        return Grant(granted=bool(int(granted)), wait_s=int(wait_us) / _US_PER_S)

    def reserve(
        self, *, provider: str, model: str, limits: LimitSpec, tokens: int, deadline_s: float | None = None
    ) -> Ticket:
        """Reserve the next slot without waiting for it: the caller may do its own work (commit
        the attempt row) while the slot comes due, then :meth:`wait_for` it.

        Raises :class:`TimeoutError` (before reserving anything) when the slot would fall
        after ``deadline_s`` (a ``time.monotonic()`` value).
        """
        slept = 0.0
        while True:
            grant = self.try_reserve(provider=provider, model=model, limits=limits, tokens=tokens)
            now = time.monotonic()
            if deadline_s is not None and now + grant.wait_s > deadline_s:
                if grant.granted:  # give the slot back; a later caller may use it
                    self.adjust_tokens(provider=provider, model=model, limits=limits, tokens=-tokens)
                raise TimeoutError(f"no {provider}:{model} capacity within the deadline "
                                   f"(next slot in {grant.wait_s:.1f}s)")
            if grant.granted:
                return Ticket(provider=provider, model=model, limits=limits, tokens=tokens, due=now + grant.wait_s,
                              slept_s=slept)
            # Too far out to reserve: sleep until the slot is within reach, then ask again.
            pause = max(grant.wait_s - self.max_wait_s, 0.001)
            self._sleep(pause)
            slept += pause

    def wait_for(self, ticket: Ticket) -> None:
        """Sleep until ``ticket``'s slot is due. Raises :class:`SlotMissed` (its tokens given back;
        the request slot is spent) when it is already more than ``late_tolerance_s`` past: sent
        now, the call would crowd the next window past the limit."""
        left = ticket.due - time.monotonic()
        if left > 0:
            self._sleep(left)
        if time.monotonic() - ticket.due > self.late_tolerance_s:
            self.late_slots += 1
            self.adjust_tokens(provider=ticket.provider, model=ticket.model, limits=ticket.limits,
                               tokens=-ticket.tokens, defer=True)
            raise SlotMissed(f"{ticket.provider}:{ticket.model} slot missed by "
                             f"{time.monotonic() - ticket.due:.3f}s")

    def acquire(
        self, *, provider: str, model: str, limits: LimitSpec, tokens: int, deadline_s: float | None = None
    ) -> float:
        """Wait until a call of ``tokens`` tokens may be sent; return the seconds the limit made it
        wait (the slots' distance and the sleeps for them, not the round trips to Redis).

        Raises :class:`TimeoutError` (before reserving anything) when the slot would fall
        after ``deadline_s`` (a ``time.monotonic()`` value).
        """
        waited = 0.0
        while True:
            ticket = self.reserve(provider=provider, model=model, limits=limits, tokens=tokens,
                                  deadline_s=deadline_s)
            waited += ticket.slept_s + max(ticket.due - time.monotonic(), 0.0)
            try:
                self.wait_for(ticket)
            except SlotMissed:
                continue
            return waited

    def adjust_tokens(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                      now_us: int | None = None, defer: bool = False) -> None:
        """Charge (``tokens`` > 0) or refund (< 0) tokens after the call, once usage is known.
        ``defer``: send it with this process's next reservation for the model instead of now."""
        if tokens == 0:
            return
        if defer:
            key = self.key(provider=provider, model=model)
            self._pending_tokens[key] = self._pending_tokens.get(key, 0) + tokens
            return
        req_us, tok_us = limits.intervals_us(window_s=self.window_s, utilisation=self.utilisation)
        self._script(
            keys=[self.key(provider=provider, model=model)],
            args=["adjust", 0, tokens, repr(req_us), repr(tok_us), "0", "" if now_us is None else str(now_us)],
        )

    def reset(self, *, provider: str, model: str) -> None:
        self.redis.delete(self.key(provider=provider, model=model))
