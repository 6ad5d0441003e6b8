"""The circuit breaker step: refuse at once while the model is known sick (fleet-wide), and tell
the breaker how each attempt that reached the provider went. Best effort: a breaker whose Redis
is unreachable lets calls through (the provider's own errors still count once it is back)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from tars_tasks.errors import ProviderError
from workers.breaker import Permit, counts_as_failure, trips_at_once
from workers.callpath.context import Attempt, Call
from workers.callpath.path import CallStep

log = logging.getLogger(__name__)

#: A probe's lease outlives the call's own timeout by this much.
PROBE_LEASE_MARGIN_S = 5.0


class Breaker(Protocol):
    """What the step needs of a breaker (:class:`workers.breaker.FleetBreaker`, or the in-memory one)."""

    def allow(self, *, provider: str, model: str, probe_lease_s: float | None = None) -> Permit: ...
    def record_success(self, *, provider: str, model: str) -> None: ...
    def record_failure(self, *, provider: str, model: str, reason: str, trip: bool = False) -> bool: ...


class BreakerStep(CallStep):
    def __init__(self, *, breaker: Breaker, cache_s: float = 0.0) -> None:
        self.breaker = breaker
        #: A breaker seen closed with no failures is trusted this long without asking (two round
        #: trips saved per call in the common case).
        self.cache_s = cache_s
        #: (provider, model) -> monotonic time until which a closed breaker is trusted unasked.
        self._closed_until: dict[tuple[str, str], float] = {}

    def before_attempt(self, call: Call, attempt: Attempt) -> None:
        provider, model = attempt.provider.name, attempt.spec.model
        key = (provider, model)
        if self._closed_until.get(key, 0.0) > time.monotonic():
            attempt.permit = Permit(probe=False)
            return
        try:
            permit = self.breaker.allow(provider=provider, model=model,
                                        probe_lease_s=attempt.spec.timeout_s + PROBE_LEASE_MARGIN_S)
        except redis.RedisError as exc:
            log.warning("fleet breaker unreachable (%s); letting the call through", exc)
            permit = Permit(probe=False)
        else:
            if not permit.probe and permit.failures == 0 and self.cache_s > 0:
                self._closed_until[key] = time.monotonic() + self.cache_s
        attempt.permit = permit  # CircuitOpen raised above refuses the attempt

    def after_attempt(self, call: Call, attempt: Attempt) -> None:
        if attempt.permit is not None and attempt.permit.success_matters:
            self._best_effort(self.breaker.record_success, provider=attempt.provider.name, model=attempt.spec.model)

    def after_attempt_failed(self, call: Call, attempt: Attempt, exc: BaseException) -> None:
        if not attempt.sent or not isinstance(exc, ProviderError):
            return  # refused before the call: says nothing about the model
        provider, model = attempt.provider.name, attempt.spec.model
        self._closed_until.pop((provider, model), None)
        record = self._best_effort
        if trips_at_once(exc):
            log.error("%s:%s answered 401; opening its breaker (no retries into a ban)", provider, model)
            record(self.breaker.record_failure, provider=provider, model=model, reason=exc.outcome, trip=True)
        elif counts_as_failure(exc):
            if record(self.breaker.record_failure, provider=provider, model=model,
                      reason=f"{exc.outcome}: {exc}"[:200]):
                log.warning("breaker for %s:%s is open after %s", provider, model, exc.outcome)
        elif attempt.permit is not None and attempt.permit.success_matters:
            # The model answered (429, 400, ...): it is up. A probe that got this far closes the breaker.
            record(self.breaker.record_success, provider=provider, model=model)

    @staticmethod
    def _best_effort(fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except redis.RedisError as exc:
            log.warning("fleet breaker unreachable (%s); carrying on without it", exc)
            return None
