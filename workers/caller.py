"""One model call for one request, the way it must go against real APIs:

    for each tier (the requested one, then its fallback while a breaker is open):
        retry loop (tenacity; transient errors only; Retry-After honoured; attempts and time capped)
            circuit breaker   — refuse at once if the model is known sick (fleet-wide)
            rate limiter      — wait for fleet-wide RPM + TPM capacity (a sleep, recorded)
            api_calls row     — written ``in_flight`` before the call ...
            provider call     — ... and completed after it, whatever happened

Repairs: requests lost or hung when a provider storms 429/5xx (every path ends in a
terminal :class:`CallOutcome`), one worker overrunning a fleet limit (the limiter is shared),
and every worker hammering a failing model (the breaker is shared). A 401 opens the breaker
and fails the request at once; other permanent errors (400/403/404, context too long) fail it
at once without touching the breaker.

Delivery note: a request may be called more than once (redelivery); every attempt that was
really made is its own row, so costs match what a provider would bill. The row written before the
call already carries the input tokens (estimated over the whole request: system prompt and every
turn) and their cost at the catalog's input price: if the worker dies mid-call, the attempt stays
on the bill as "billed, outcome unknown", never $0. An answered attempt's row holds its tokens by
class (input, cache writes, cache reads, output) and their cost, each class at its own price.

Fleet-state Redis failures (the limiter's or the breaker's Redis down or timing out): the limiter
is retried with backoff inside the retry budget (no call is made without the fleet limit) and the
request fails ``fleet_state_unavailable`` when the budget is spent; an unreadable breaker lets the
call through (the provider's own errors still count once Redis is back). Either way the task ends
with a terminal row, never an acked message with a ``queued`` row.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import redis

from config.catalog import Catalog, LatencyProfile, ModelSpec
from config.settings import Settings
from tars_tasks.db.models import OUTCOME_IN_FLIGHT, OUTCOME_NOT_SENT, OUTCOME_OK, STATUS_FAILED, STATUS_SUCCEEDED
from tars_tasks.errors import CircuitOpen, FleetStateUnavailable, ProviderError, RateLimited
from workers.breaker import FleetBreaker, Permit, counts_as_failure, trips_at_once
from workers.providers import Completion, Provider, get_provider
from workers.providers.request import ModelRequest
from workers.ratelimit import FleetRateLimiter, LimitSpec
from workers.retry import retrying_for

log = logging.getLogger(__name__)

#: Longest single sleep while waiting for an open breaker (policy "wait").
BREAKER_WAIT_STEP_MAX_S = 5.0
#: Errors kept on a row are cut to this many characters.
ERROR_MAX_CHARS = 2000
#: First and longest pause between two tries of an unreachable fleet-state Redis.
FLEET_STATE_RETRY_INITIAL_S = 0.1
FLEET_STATE_RETRY_MAX_S = 2.0


class RowSink(Protocol):
    """Where attempt rows go before the call (the group-commit writer)."""

    def record(self, api_rows: list[dict[str, Any]]) -> None: ...


@dataclass(slots=True)
class CallOutcome:
    status: str
    text: str | None
    error: str | None
    tier_used: str
    model: str
    api_rows: list[dict[str, Any]]
    #: Short code of why it failed (None when it succeeded).
    failure_reason: str | None = None
    #: Why the model stopped (``end_turn``, ``max_tokens``, ...; None when it failed).
    stop_reason: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


class ModelCaller:
    """The call path of one worker process. Without Redis (embedded) there is no limiter or breaker."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        writer: RowSink,
        redis_client: redis.Redis | None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.catalog = catalog.with_overrides(provider=settings.provider_override,
                                              base_url=settings.provider_base_url)
        self.writer = writer
        self._sleep = sleep
        self._providers: dict[str, Provider] = {}
        self.limiter: FleetRateLimiter | None = None
        self.breaker: FleetBreaker | None = None
        #: (provider, model) -> monotonic time until which a closed breaker is trusted unasked.
        self._closed_until: dict[tuple[str, str], float] = {}
        if redis_client is not None and settings.ratelimit_enabled:
            self.limiter = FleetRateLimiter(
                redis_client=redis_client, namespace=settings.namespace, window_s=settings.ratelimit_window_s,
                utilisation=settings.ratelimit_utilisation, max_wait_s=settings.ratelimit_max_wait_s, sleep=sleep,
            )
        if redis_client is not None and settings.breaker_enabled:
            self.breaker = FleetBreaker(
                redis_client=redis_client, namespace=settings.namespace,
                failure_threshold=settings.breaker_failure_threshold, cooldown_s=settings.breaker_cooldown_s,
            )

    # --- providers -----------------------------------------------------------------------------

    def spec(self, tier: str) -> ModelSpec:
        """The tier's spec with the settings' provider/base-URL overrides applied."""
        return self.catalog.spec(tier)

    def provider_for(self, spec: ModelSpec) -> Provider:
        p = self._providers.get(spec.tier)
        if p is None:
            eff = self.spec(spec.tier)
            kwargs: dict[str, Any] = {}
            if eff.provider == "simulated":
                s = self.settings
                kwargs = {
                    "latency": LatencyProfile.parse(s.sim_latency) if s.sim_latency else None,
                    "failure_rate": s.sim_failure_rate,
                    "seed": s.sim_seed,
                    "crash_marker": s.sim_crash_marker,
                    "unstorable_marker": s.sim_unstorable_marker,
                }
            else:
                kwargs = {"base_url": eff.base_url, "api_key_env": eff.api_key_env}
            p = self._providers[spec.tier] = get_provider(eff.provider, **kwargs)
        return p

    # --- the call ------------------------------------------------------------------------------

    def call(self, *, request_id: str, tier: str, request: ModelRequest, worker: str) -> CallOutcome:
        """Call the tier's model (or its fallback). Always returns; never raises a provider error."""
        rows: list[dict[str, Any]] = []
        requested = self.spec(tier)
        deadline = time.monotonic() + requested.retry_budget_s
        tried: list[str] = [tier]
        current = tier
        while True:
            spec = self.spec(current)
            try:
                completion = self._call_tier(spec=spec, request=request, request_id=request_id, worker=worker,
                                             rows=rows)
            except CircuitOpen as exc:
                if (self.settings.breaker_open_policy == "fallback" and spec.fallback
                        and spec.fallback not in tried):
                    log.warning("request %s: %s; falling back from tier %s to %s",
                                request_id, exc, current, spec.fallback)
                    current = spec.fallback
                    tried.append(current)
                    continue
                wait_s = min(max(exc.retry_after_s or 0.0, 0.05), BREAKER_WAIT_STEP_MAX_S)
                if time.monotonic() + wait_s >= deadline:
                    return self._failed(rows=rows, spec=spec, reason=CircuitOpen.outcome,
                                        error=f"{CircuitOpen.outcome}: {exc}; tiers tried: {', '.join(tried)}; "
                                              f"retry budget {requested.retry_budget_s:g}s spent")
                self._sleep(wait_s)
                current, tried = tier, [tier]  # the requested tier may have recovered
                continue
            except FleetStateUnavailable as exc:
                return self._failed(rows=rows, spec=spec, error=f"{exc.outcome}: {exc}", reason=exc.outcome)
            except ProviderError as exc:
                tier_rows = sum(1 for r in rows if r["tier"] == spec.tier)
                return self._failed(rows=rows, spec=spec, reason=exc.outcome,
                                    error=f"{exc.outcome} after {tier_rows} attempt(s) on tier {spec.tier}: {exc}")
            return CallOutcome(status=STATUS_SUCCEEDED, text=completion.text, error=None, tier_used=spec.tier,
                               model=spec.model, api_rows=rows, stop_reason=completion.stop_reason)

    def _failed(self, *, rows: list[dict[str, Any]], spec: ModelSpec, error: str,
                reason: str = CircuitOpen.outcome) -> CallOutcome:
        return CallOutcome(status=STATUS_FAILED, text=None, error=error[:ERROR_MAX_CHARS], tier_used=spec.tier,
                           model=spec.model, api_rows=rows, failure_reason=reason)

    def _call_tier(self, *, spec: ModelSpec, request: ModelRequest, request_id: str, worker: str,
                   rows: list[dict[str, Any]]) -> Completion:
        provider = self.provider_for(spec)
        limits = LimitSpec(rpm=spec.rpm, tpm=spec.tpm)
        est_input = request.estimated_input_tokens()
        est_tokens = est_input + request.reserved_output_tokens(spec)
        budget_deadline = time.monotonic() + spec.retry_budget_s
        completion: Completion | None = None
        retrying = retrying_for(spec, sleep=self._sleep, initial_s=self.settings.retry_backoff_initial_s,
                                max_s=self.settings.retry_backoff_max_s)
        for attempt in retrying:
            with attempt:
                permit = self._allow(provider=provider.name, model=spec.model, probe_lease_s=spec.timeout_s + 5)
                waited_s = self._acquire(provider=provider.name, spec=spec, limits=limits, tokens=est_tokens,
                                         deadline=budget_deadline)
                row = self._attempt_row(request_id=request_id, attempt=len(rows) + 1, spec=spec,
                                        provider=provider, worker=worker, waited_s=waited_s,
                                        input_tokens=est_input)
                granted_at = time.monotonic()
                self.writer.record([dict(row)])
                rows.append(row)
                if self.limiter is not None and time.monotonic() - granted_at > self.limiter.late_tolerance_s:
                    # The commit of the attempt row outlasted the slot (a slow database, a busy
                    # process): sent now, this call would crowd the next window. Give the tokens
                    # back and wait for a fresh slot; the request slot is spent (only lowers the rate).
                    self.limiter.adjust_tokens(provider=provider.name, model=spec.model, limits=limits,
                                               tokens=-est_tokens, defer=True)
                    try:
                        waited_s += self._acquire(provider=provider.name, spec=spec, limits=limits,
                                                  tokens=est_tokens, deadline=budget_deadline)
                    except (RateLimited, FleetStateUnavailable) as exc:
                        # recorded but never sent: not on the bill
                        row.update(outcome=OUTCOME_NOT_SENT, input_tokens=0, cost_usd=0, finished_at=_now(),
                                   error=f"not sent: {exc}"[:ERROR_MAX_CHARS], latency_ms=0)
                        raise
                    row["ratelimit_wait_ms"] = round(waited_s * 1000, 3)
                t0 = time.perf_counter()
                try:
                    completion = provider.complete(spec=spec, request=request, request_id=request_id,
                                                   attempt=row["attempt"])
                except ProviderError as exc:
                    row.update(outcome=exc.outcome, http_status=exc.status_code, error=str(exc)[:ERROR_MAX_CHARS],
                               latency_ms=(time.perf_counter() - t0) * 1000, finished_at=_now())
                    if exc.status_code is not None:  # the provider answered with an error: nothing billed
                        row.update(input_tokens=0, cost_usd=0)
                    self._tell_breaker(exc=exc, permit=permit, provider=provider.name, model=spec.model)
                    raise
                usage = completion.usage
                row.update(
                    outcome=OUTCOME_OK,
                    http_status=completion.http_status,
                    **usage.columns(),
                    cost_usd=spec.usage_cost_usd(usage),
                    latency_ms=(time.perf_counter() - t0) * 1000,
                    finished_at=_now(),
                )
                if self.breaker is not None and permit.success_matters:
                    self._fleet_state_best_effort(self.breaker.record_success, provider=provider.name,
                                                  model=spec.model)
                if self.limiter is not None:
                    used = usage.total_tokens
                    self.limiter.adjust_tokens(provider=provider.name, model=spec.model, limits=limits,
                                               tokens=used - est_tokens, defer=True)
        assert completion is not None  # tenacity re-raises when it stops
        return completion

    def _acquire(self, *, provider: str, spec: ModelSpec, limits: LimitSpec, tokens: int,
                 deadline: float) -> float:
        """Wait for fleet-wide capacity. An unreachable limiter Redis is retried with backoff until
        ``deadline``; then :class:`FleetStateUnavailable` (the call is never made unlimited)."""
        if self.limiter is None:
            return 0.0
        t0 = time.monotonic()
        delay = FLEET_STATE_RETRY_INITIAL_S
        while True:
            try:
                self.limiter.acquire(provider=provider, model=spec.model, limits=limits, tokens=tokens,
                                     deadline_s=deadline)
                return time.monotonic() - t0
            except TimeoutError as exc:
                raise RateLimited(f"fleet rate limiter: {exc}") from None
            except redis.RedisError as exc:
                if time.monotonic() + delay >= deadline:
                    raise FleetStateUnavailable(
                        f"the fleet rate limiter's Redis was unreachable for {time.monotonic() - t0:.1f}s "
                        f"(retry budget {spec.retry_budget_s:g}s): {exc}") from None
                log.warning("fleet rate limiter unreachable (%s); retrying in %.1fs", exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, FLEET_STATE_RETRY_MAX_S)

    @staticmethod
    def _fleet_state_best_effort(fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except redis.RedisError as exc:
            log.warning("fleet breaker unreachable (%s); carrying on without it", exc)
            return None

    def _allow(self, *, provider: str, model: str, probe_lease_s: float) -> Permit:
        """The breaker's leave for one call. A breaker seen closed with no failures is trusted for
        ``breaker_cache_s`` without asking Redis (two round trips saved per call in the common case)."""
        if self.breaker is None:
            return Permit(probe=False)
        key = (provider, model)
        if self._closed_until.get(key, 0.0) > time.monotonic():
            return Permit(probe=False)
        try:
            permit = self.breaker.allow(provider=provider, model=model, probe_lease_s=probe_lease_s)
        except redis.RedisError as exc:
            log.warning("fleet breaker unreachable (%s); letting the call through", exc)
            return Permit(probe=False)
        if not permit.probe and permit.failures == 0 and self.settings.breaker_cache_s > 0:
            self._closed_until[key] = time.monotonic() + self.settings.breaker_cache_s
        return permit

    def _tell_breaker(self, *, exc: ProviderError, permit: Permit, provider: str, model: str) -> None:
        if self.breaker is None:
            return
        self._closed_until.pop((provider, model), None)
        record = self._fleet_state_best_effort
        if trips_at_once(exc):
            log.error("%s:%s answered 401; opening its breaker (no retries into a ban)", provider, model)
            record(self.breaker.record_failure, provider=provider, model=model, reason=exc.outcome, trip=True)
        elif counts_as_failure(exc):
            if record(self.breaker.record_failure, provider=provider, model=model,
                      reason=f"{exc.outcome}: {exc}"[:200]):
                log.warning("breaker for %s:%s is open after %s", provider, model, exc.outcome)
        elif permit.success_matters:
            # The model answered (429, 400, ...): it is up. A probe that got this far closes the breaker.
            record(self.breaker.record_success, provider=provider, model=model)

    @staticmethod
    def _attempt_row(*, request_id: str, attempt: int, spec: ModelSpec, provider: Provider, worker: str,
                     waited_s: float, input_tokens: int) -> dict[str, Any]:
        """The row committed before the call: what the provider will bill for the input if the
        worker dies before the answer (output unknown, so not counted)."""
        return {
            "id": str(uuid.uuid4()),
            "request_id": request_id,
            "attempt": attempt,
            "tier": spec.tier,
            "provider": provider.name,
            "model": spec.model,
            "outcome": OUTCOME_IN_FLIGHT,
            "http_status": None,
            "error": None,
            "input_tokens": input_tokens,
            "output_tokens": 0,
            "cache_write_tokens": 0,
            "cache_write_1h_tokens": 0,
            "cache_read_tokens": 0,
            "cost_usd": spec.cost_usd(input_tokens=input_tokens),
            "latency_ms": None,
            "ratelimit_wait_ms": round(waited_s * 1000, 3),
            "worker": worker,
            "started_at": _now(),
            "finished_at": None,
        }
