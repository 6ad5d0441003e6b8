"""One model call for one request, the way it must go against real APIs. The steps, in the order
:meth:`ModelCaller.default_steps` composes them (each a small module of :mod:`workers.callpath`,
run by the one loop of :class:`workers.callpath.path.CallPath`):

    fallback          — while a tier's breaker is open: its cheaper fallback tier (or wait)
    retry policy      — tenacity; transient errors only; Retry-After honoured; attempts and time capped
    circuit breaker   — refuse at once if the model is known sick (fleet-wide)
    reserved slot     — a staged request's first attempt: its dispatcher reserved the slot already
    rate limiter      — wait for fleet-wide RPM + TPM capacity (a sleep, recorded)
    cost accounting   — the input estimate before the call, every token class at its price after
    attempt recorder  — the api_calls row written ``in_flight`` before the call ...
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
from collections.abc import Callable, Mapping
from typing import Any

import redis

from config.catalog import Catalog, LatencyProfile, ModelSpec
from config.settings import Settings
from config.tenants import load_tenants
from workers.breaker import FleetBreaker
from workers.callpath.breaker_step import BreakerStep
from workers.callpath.budget_step import BudgetStep
from workers.callpath.cache_step import CacheFillStep
from workers.callpath.context import ERROR_MAX_CHARS, Call, CallOutcome
from workers.callpath.cost_step import CostStep
from workers.callpath.fallback_step import FallbackStep
from workers.callpath.limiter_step import LimiterStep
from workers.callpath.path import CallPath, CallStep
from workers.callpath.recorder_step import RecorderStep, RowSink
from workers.callpath.retry_step import RetryStep
from workers.callpath.slot_step import ReservedSlotStep
from workers.providers import Provider, get_provider
from workers.providers.request import ModelRequest
from workers.ratelimit import FleetRateLimiter

log = logging.getLogger(__name__)

__all__ = ["ERROR_MAX_CHARS", "CallOutcome", "ModelCaller", "RowSink"]


class ModelCaller:
    """The call path of one worker process. Without Redis (embedded) there is no limiter or breaker;
    ``limiter`` / ``breaker`` may be given instead (the in-memory stand-ins of unit tests)."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        writer: RowSink,
        redis_client: redis.Redis | None,
        sleep: Callable[[float], None] = time.sleep,
        limiter: Any = None,
        breaker: Any = None,
        limiter_redis: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog.with_overrides(provider=settings.provider_override,
                                              base_url=settings.provider_base_url)
        self._sleep = sleep
        self._providers: dict[str, Provider] = {}
        self.limiter = limiter
        self.breaker = breaker
        limiter_redis = limiter_redis if limiter_redis is not None else redis_client
        if limiter is None and limiter_redis is not None and settings.ratelimit_enabled:
            self.limiter = FleetRateLimiter(
                redis_client=limiter_redis, namespace=settings.namespace, window_s=settings.ratelimit_window_s,
                utilisation=settings.ratelimit_utilisation, max_wait_s=settings.ratelimit_max_wait_s, sleep=sleep,
                coalesce_s=0.0,  # reservations made at the same moment (a bundle's members) share a script call
            )
        if breaker is None and redis_client is not None and settings.breaker_enabled:
            self.breaker = FleetBreaker(
                redis_client=redis_client, namespace=settings.namespace,
                failure_threshold=settings.breaker_failure_threshold, cooldown_s=settings.breaker_cooldown_s,
            )
        self.tenants = load_tenants(settings.tenants_path)
        self._recorder = RecorderStep(writer=writer)
        from tars_tasks.cache import ResponseCache

        self.cache = ResponseCache.for_settings(settings, timeout_s=settings.redis_socket_timeout_s)
        from tars_tasks.budgets import Budgets

        self.budgets = (Budgets(redis_client=redis_client, namespace=settings.namespace,
                                lease_s=settings.budget_reservation_lease_s)
                        if redis_client is not None and settings.budgets_enabled else None)
        self.path = CallPath(self.default_steps())

    def default_steps(self) -> list[CallStep]:
        """The call path, in order: the one place it is composed.

        ``before_*`` hooks run top to bottom, ``after_*`` bottom to top; after a failed attempt the
        first step with a move decides. A new step goes in with ``caller.path.add(step, before=...)``.
        """
        s = self.settings
        steps: list[CallStep | None] = [
            CacheFillStep(cache=self.cache) if self.cache is not None else None,  # a success's answer, cached
            BudgetStep(budgets=self.budgets) if self.budgets is not None else None,  # reserve worst case, settle
            FallbackStep(policy=s.breaker_open_policy),            # open breaker: the cheaper tier, or wait
            RetryStep(initial_s=s.retry_backoff_initial_s,          # tenacity: which failures, how long
                      max_s=s.retry_backoff_max_s),
            BreakerStep(breaker=self.breaker, cache_s=s.breaker_cache_s) if self.breaker is not None else None,
            ReservedSlotStep() if self.limiter is not None else None,  # a staged first attempt: slot reserved
            LimiterStep(limiter=self.limiter, tenants=self.tenants,  # model + tenant limits, one script
                        namespace=s.namespace) if self.limiter is not None else None,
            CostStep(),                                              # estimate before, exact after
            self._recorder,                                          # in_flight row before, completed after
        ]
        return [step for step in steps if step is not None]

    @property
    def writer(self) -> RowSink:
        return self._recorder.writer

    @writer.setter
    def writer(self, writer: RowSink) -> None:
        self._recorder.writer = writer

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
                st = self.settings
                kwargs = {
                    "latency": LatencyProfile.parse(st.sim_latency) if st.sim_latency else None,
                    "failure_rate": st.sim_failure_rate,
                    "seed": st.sim_seed,
                    "crash_marker": st.sim_crash_marker,
                    "unstorable_marker": st.sim_unstorable_marker,
                }
            else:
                kwargs = {"base_url": eff.base_url, "api_key_env": eff.api_key_env}
            p = self._providers[spec.tier] = get_provider(eff.provider, **kwargs)
        return p

    # --- the call ------------------------------------------------------------------------------

    def call(self, *, request_id: str, tier: str, request: ModelRequest, worker: str,
             hints: Mapping[str, Any] | None = None) -> CallOutcome:
        """Call the tier's model (or its fallback). Always returns; never raises a provider error.
        ``hints``: what steps may read from :attr:`Call.hints` (e.g. a slot reserved upstream)."""
        call = Call(request_id=request_id, request=request, worker=worker, requested=self.spec(tier),
                    sleep=lambda s: self._sleep(s), spec_for=self.spec, provider_for=self.provider_for,
                    hints=dict(hints or {}))
        return self.path.run(call)
