"""The fleet rate limiter step: wait for fleet-wide RPM + TPM capacity before each attempt (the
wait is recorded on the row), and correct the reservation to the real usage after the answer.

The slot is *reserved* before the attempt row is committed and *waited for* just before the send,
so the commit happens while the slot comes due instead of eating into it. A slot that passed
anyway (a commit slower than the wait, a CPU-starved process) is given up — sent late, the call
would crowd the next window past the limit — and a fresh one taken.

An unreachable limiter Redis is retried with backoff within the tier's retry budget, then the
attempt fails :class:`FleetStateUnavailable` (no call is ever made without the fleet limit). A
slot a step before this one already holds (``attempt.slot_held``, e.g. reserved by the
dispatcher, with ``attempt.reserved_tokens`` its tokens) is not acquired again; its tokens are
still corrected to the real usage.

A tenant's own limits (``TARS_TENANTS_PATH``: its RPM/TPM, and on the attempt's tier) are taken in
the same script and the same slot as the model's, for every attempt this step acquires — retries
and fallbacks as much as first attempts — and corrected with it after the answer, so the tenant's
limit counts every call the provider sees from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis

from config.keys import tenant_ratelimit_key
from config.tenants import TenantConfig
from tars_tasks.errors import FleetStateUnavailable, RateLimited
from workers.callpath.context import Attempt, Call
from workers.callpath.path import CallStep
from workers.ratelimit import ExtraLimit, LimitSpec, SlotMissed, Ticket

log = logging.getLogger(__name__)
T = TypeVar("T")

#: First and longest pause between two tries of an unreachable fleet-state Redis.
FLEET_STATE_RETRY_INITIAL_S = 0.1
FLEET_STATE_RETRY_MAX_S = 2.0


class Limiter(Protocol):
    """What the step needs of a limiter (:class:`workers.ratelimit.FleetRateLimiter`, or the in-memory one)."""

    late_tolerance_s: float

    def acquire(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                deadline_s: float | None = None, also: tuple[ExtraLimit, ...] = ()) -> float: ...
    def reserve(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                deadline_s: float | None = None, also: tuple[ExtraLimit, ...] = ()) -> Ticket: ...
    def wait_for(self, ticket: Ticket) -> None: ...
    def adjust_tokens(self, *, provider: str, model: str, limits: LimitSpec, tokens: int,
                      defer: bool = False, also: tuple[ExtraLimit, ...] = ()) -> None: ...


class LimiterStep(CallStep):
    def __init__(self, *, limiter: Limiter, tenants: TenantConfig | None = None, namespace: str = "tars") -> None:
        self.limiter = limiter
        self.tenants = tenants or TenantConfig()
        self.namespace = namespace

    def tenant_limits(self, call: Call, attempt: Attempt) -> tuple[ExtraLimit, ...]:
        """The tenant's own limits that this attempt's call must also fit (the same keys and
        limits the dispatcher reserves: ``workers/dispatch.py``)."""
        tenant = call.hints.get("tenant")
        if not tenant:
            return ()
        spec = self.tenants.spec(str(tenant))
        tier = attempt.spec.tier
        out: list[ExtraLimit] = []
        if spec.limited:
            out.append((tenant_ratelimit_key(self.namespace, str(tenant)), LimitSpec(rpm=spec.rpm, tpm=spec.tpm)))
        on_tier = spec.tiers.get(tier)
        if on_tier is not None and on_tier.limited:
            out.append((tenant_ratelimit_key(self.namespace, str(tenant), tier),
                        LimitSpec(rpm=on_tier.rpm, tpm=on_tier.tpm)))
        return tuple(out)

    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        if attempt.slot_held:
            return
        ticket = self._fleet_state(call, attempt, lambda spec: self.limiter.reserve(
            provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
            tokens=call.reserved_tokens(spec), deadline_s=call.tier_deadline, also=self.tenant_limits(call, attempt)))
        # the time the limit makes this attempt wait: its slot's distance once booked (the commit runs
        # meanwhile) and any sleep inside reserve; the round trip to Redis is the worker's own work
        attempt.waited_s += ticket.slept_s + max(ticket.due - time.monotonic(), 0.0)
        attempt.ticket, attempt.slot_held, attempt.slot_at = ticket, True, ticket.due
        attempt.reserved_tokens = call.reserved_tokens(attempt.spec)

    def before_send(self, call: Call, attempt: Attempt) -> None:
        if attempt.ticket is not None:
            ticket, attempt.ticket = attempt.ticket, None
            try:
                self.limiter.wait_for(ticket)  # tokens given back if it passed
                return
            except SlotMissed:
                pass
        elif attempt.slot_at is None or time.monotonic() - attempt.slot_at <= self.limiter.late_tolerance_s:
            return
        else:
            # A slot held from upstream (the dispatcher's) went stale before the send: give its
            # tokens back; the request slot is spent (only lowers the rate).
            spec = attempt.spec
            self.limiter.adjust_tokens(provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
                                       tokens=-_reserved(call, attempt), defer=True,
                                       also=self.tenant_limits(call, attempt))
        attempt.slot_held, attempt.slot_at, attempt.reserved_tokens = False, None, None
        attempt.waited_s += self._acquire(call, attempt)  # raises: recorded, never sent
        attempt.slot_held, attempt.slot_at = True, time.monotonic()
        attempt.reserved_tokens = call.reserved_tokens(attempt.spec)

    def after_attempt(self, call: Call, attempt: Attempt) -> None:
        c = attempt.completion
        assert c is not None
        spec = attempt.spec
        self.limiter.adjust_tokens(provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
                                   tokens=c.usage.total_tokens - _reserved(call, attempt), defer=True,
                                   also=self.tenant_limits(call, attempt))

    def _acquire(self, call: Call, attempt: Attempt) -> float:
        """Wait for capacity until the tier's deadline; an unreachable Redis is retried with backoff.
        Returns the seconds the limit made the attempt wait (as the limiter counts them)."""
        return self._fleet_state(call, attempt, lambda spec: self.limiter.acquire(
            provider=attempt.provider.name, model=spec.model, limits=_limits(spec),
            tokens=call.reserved_tokens(spec), deadline_s=call.tier_deadline, also=self.tenant_limits(call, attempt)))

    def _fleet_state(self, call: Call, attempt: Attempt, ask: Callable[[Any], T]) -> T:
        """``ask`` the limiter; no capacity before the tier's deadline is :class:`RateLimited`, an
        unreachable Redis is retried with backoff until then, then :class:`FleetStateUnavailable`."""
        spec = attempt.spec
        t0 = time.monotonic()
        delay = FLEET_STATE_RETRY_INITIAL_S
        while True:
            try:
                return ask(spec)
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
