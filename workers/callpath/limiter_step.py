"""The fleet rate limiter step: wait for fleet-wide RPM + TPM capacity before each attempt (the
wait is recorded on the row), take a fresh slot if the old one went stale while the attempt row
was committed, and correct the reservation to the real usage after the answer.

An unreachable limiter Redis is retried with backoff within the tier's retry budget, then the
attempt fails :class:`FleetStateUnavailable` (no call is ever made without the fleet limit). A
slot a step before this one already holds (``attempt.slot_held``, e.g. reserved by the
dispatcher, with ``attempt.reserved_tokens`` its tokens) is not acquired again; its tokens are
still corrected to the real usage.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import redis

from tars_tasks.errors import FleetStateUnavailable, RateLimited
from workers.callpath.context import Attempt, Call
from workers.callpath.path import CallStep
from workers.ratelimit import LimitSpec

log = logging.getLogger(__name__)

#: First and longest pause between two tries of an unreachable fleet-state Redis.
FLEET_STATE_RETRY_INITIAL_S = 0.1
FLEET_STATE_RETRY_MAX_S = 2.0


class Limiter(Protocol):
    """What the step needs of a limiter (:class:`workers.ratelimit.FleetRateLimiter`, or the in-memory one)."""

    late_tolerance_s: float

    def acquire(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                deadline_s: float | None = None) -> float: ...
    def adjust_tokens(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                      defer: bool = False) -> None: ...


class LimiterStep(CallStep):
    def __init__(self, *, limiter: Limiter) -> None:
        self.limiter = limiter

    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        if attempt.slot_held:
            return
        attempt.waited_s += self._acquire(call, attempt)
        attempt.slot_held, attempt.slot_at = True, time.monotonic()
        attempt.reserved_tokens = call.reserved_tokens(attempt.spec)

    def before_send(self, call: Call, attempt: Attempt) -> None:
        if attempt.slot_at is None or time.monotonic() - attempt.slot_at <= self.limiter.late_tolerance_s:
            return
        # The steps between the slot and the send (the commit of the attempt row: a slow database,
        # a busy process) outlasted it: sent now, this call would crowd the next window. Give the
        # tokens back and wait for a fresh slot; the request slot is spent (only lowers the rate).
        spec = attempt.spec
        self.limiter.adjust_tokens(provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
                                   tokens=-_reserved(call, attempt), defer=True)
        attempt.slot_held, attempt.slot_at, attempt.reserved_tokens = False, None, None
        attempt.waited_s += self._acquire(call, attempt)  # raises: recorded, never sent
        attempt.slot_held, attempt.slot_at = True, time.monotonic()
        attempt.reserved_tokens = call.reserved_tokens(spec)

    def after_attempt(self, call: Call, attempt: Attempt) -> None:
        c = attempt.completion
        assert c is not None
        spec = attempt.spec
        self.limiter.adjust_tokens(provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
                                   tokens=c.usage.total_tokens - _reserved(call, attempt), defer=True)

    def _acquire(self, call: Call, attempt: Attempt) -> float:
        """Wait for capacity until the tier's deadline; an unreachable Redis is retried with backoff."""
        spec = attempt.spec
        t0 = time.monotonic()
        delay = FLEET_STATE_RETRY_INITIAL_S
        while True:
            try:
                self.limiter.acquire(provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
                                     tokens=call.reserved_tokens(spec), deadline_s=call.tier_deadline)
                return time.monotonic() - t0
            except TimeoutError as exc:
                raise RateLimited(f"fleet rate limiter: {exc}") from None
            except redis.RedisError as exc:
                if time.monotonic() + delay >= call.tier_deadline:
                    raise FleetStateUnavailable(
                        f"the fleet rate limiter's Redis was unreachable for {time.monotonic() - t0:.1f}s "
                        f"(retry budget {spec.retry_budget_s:g}s): {exc}") from None
                log.warning("fleet rate limiter unreachable (%s); retrying in %.1fs", exc, delay)
                call.sleep(delay)
                delay = min(delay * 2, FLEET_STATE_RETRY_MAX_S)


def _reserved(call: Call, attempt: Attempt) -> int:
    """What the attempt's slot reserved: its own figure if a step set one, else the call's estimate."""
    return attempt.reserved_tokens if attempt.reserved_tokens is not None else call.reserved_tokens(attempt.spec)


def _limits(spec) -> LimitSpec:
    return LimitSpec(rpm=spec.rpm, tpm=spec.tpm)
