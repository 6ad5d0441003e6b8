"""The project's own Prometheus metrics, read from Postgres and Redis when scraped.

Flower's ``/metrics`` counts Celery events; these count what the fleet *recorded*: requests
by tier and status, API-call attempts, tokens by billing class (input, cache writes, cache
reads, output) and dollars by tier (what a provider would bill: every attempt, retries
included, each class at its own price), time spent waiting for the fleet rate limiter,
breaker state per model and queue depth per tier and priority.

A scrape runs a few ``GROUP BY`` queries over ``requests`` and ``api_calls`` (full scans:
fine for test and load-run sizes; put a recording rule or a summary table in front of a
database with many millions of rows). Results are cached for ``min_interval_s`` so several
scrapers do not multiply the load. A source that cannot be read does not fail the scrape:
``tars_metrics_source_up{source}`` drops to 0 and that source's series are left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from decimal import Decimal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from config.keys import TIERS
from config.pricing import TOKEN_CLASSES
from config.settings import Settings
from tars_tasks.codes import OUTCOMES_UNKNOWN
from tars_tasks.db.engine import get_engine
from tars_tasks.db.models import ApiCall, Request

log = logging.getLogger(__name__)

DEFAULT_MIN_INTERVAL_S = 2.0
#: ``tars_tokens{kind}`` of each token class.
TOKEN_KINDS = {"input_tokens": "input", "cache_write_tokens": "cache_write", "cache_write_1h_tokens": "cache_write_1h",
               "cache_read_tokens": "cache_read", "output_tokens": "output"}
BREAKER_STATES = ("closed", "open", "half_open")


def request_counts(settings: Settings) -> dict[tuple[str, str], int]:
    """(tier, status) -> requests. The tier is the one that served it, else the one asked for."""
    t = Request.__table__.c
    tier = func.coalesce(t.tier_used, t.tier_requested)
    q = select(tier, t.status, func.count()).group_by(tier, t.status)
    with get_engine(settings.database_url).connect() as conn:
        return {(row[0], row[1]): int(row[2]) for row in conn.execute(q)}


def api_call_totals(settings: Settings) -> dict[tuple[str, str], dict[str, Decimal | int]]:
    """(tier, outcome) -> calls, tokens of every billing class, cost, rate-limit wait (ms) and waited calls."""
    t = ApiCall.__table__.c
    q = select(
        t.tier, t.outcome, func.count(), func.coalesce(func.sum(t.cost_usd), 0),
        func.coalesce(func.sum(t.ratelimit_wait_ms), 0),
        func.count().filter(t.ratelimit_wait_ms > 0),
        *(func.coalesce(func.sum(t[c]), 0) for c in TOKEN_CLASSES),
    ).group_by(t.tier, t.outcome)
    out: dict[tuple[str, str], dict[str, Decimal | int]] = {}
    with get_engine(settings.database_url).connect() as conn:
        for tier, outcome, n, cost, wait_ms, waited, *tokens in conn.execute(q):
            out[(tier, outcome)] = {"calls": int(n), "cost_usd": Decimal(cost), "ratelimit_wait_ms": Decimal(wait_ms),
                                    "ratelimit_waited": int(waited),
                                    **{c: int(v) for c, v in zip(TOKEN_CLASSES, tokens, strict=True)}}
    return out


def breaker_views(settings: Settings) -> list:
    """Every breaker with state (none without a shared Redis)."""
    from workers.breaker import FleetBreaker

    url = settings.shared_redis_url
    if not url:
        return []
    from tars_tasks.redis_client import get_redis

    return FleetBreaker(redis_client=get_redis(url), namespace=settings.namespace).all_views()


class FleetCollector(Collector):
    """A ``prometheus_client`` collector reading Postgres and Redis on scrape."""

    def __init__(self, *, settings: Settings, min_interval_s: float = DEFAULT_MIN_INTERVAL_S) -> None:
        self.settings = settings
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._cached: list[Metric] | None = None
        self._cached_at = 0.0

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: do not run queries at registration time

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached_at >= self.min_interval_s:
                self._cached = list(self._read())
                self._cached_at = now
            yield from self._cached

    # --- one reading ----------------------------------------------------------------------------

    def _read(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily("tars_metrics_source_up", "1 if the source could be read on this scrape.",
                               labels=["source"])
        pg_ok = True
        try:
            yield from self._postgres_metrics()
        except Exception as exc:
            pg_ok = False
            log.warning("metrics: postgres unreadable: %s", exc)
        up.add_metric(["postgres"], 1.0 if pg_ok else 0.0)
        redis_ok = True
        try:
            yield from self._redis_metrics()
        except Exception as exc:
            redis_ok = False
            log.warning("metrics: redis unreadable: %s", exc)
        up.add_metric(["redis"], 1.0 if redis_ok else 0.0)
        yield up
        duration = GaugeMetricFamily("tars_metrics_read_seconds", "Time the last reading of all sources took.")
        duration.add_metric([], time.perf_counter() - started)
        yield duration

    def _postgres_metrics(self) -> Iterator[Metric]:
        reqs = request_counts(self.settings)
        calls = api_call_totals(self.settings)
        requests = GaugeMetricFamily(
            "tars_requests", "Requests recorded, by tier (that served it, else requested) and status.",
            labels=["tier", "status"])
        for (tier, status), n in sorted(reqs.items()):
            requests.add_metric([tier, status], n)
        api = GaugeMetricFamily("tars_api_calls", "Model API call attempts recorded, by tier and outcome.",
                                labels=["tier", "outcome"])
        per_tier: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for (tier, outcome), v in sorted(calls.items()):
            api.add_metric([tier, outcome], v["calls"])
            for k in (*TOKEN_CLASSES, "cost_usd", "ratelimit_wait_ms", "ratelimit_waited"):
                per_tier[tier][k] += Decimal(v[k])
        tiers = sorted(set(per_tier) | set(TIERS))
        cost = CounterMetricFamily("tars_cost_usd", "Dollars of every API call attempt (what a provider bills).",
                                   labels=["tier"])
        tokens = CounterMetricFamily("tars_tokens", "Tokens of every API call attempt, by billing class (kind input: "
                                     "not cached; cache_write, cache_write_1h, cache_read; output).",
                                     labels=["tier", "kind"])
        wait = CounterMetricFamily("tars_ratelimit_wait_seconds",
                                   "Time API calls waited for fleet rate-limit capacity.", labels=["tier"])
        waited = CounterMetricFamily("tars_ratelimit_waited_calls", "API calls that waited for the rate limiter.",
                                     labels=["tier"])
        for tier in tiers:
            v = per_tier.get(tier, {})
            cost.add_metric([tier], float(v.get("cost_usd", 0)))
            for c in TOKEN_CLASSES:
                tokens.add_metric([tier, TOKEN_KINDS[c]], float(v.get(c, 0)))
            wait.add_metric([tier], float(v.get("ratelimit_wait_ms", 0)) / 1000.0)
            waited.add_metric([tier], float(v.get("ratelimit_waited", 0)))
        unknown = GaugeMetricFamily(
            "tars_api_calls_billed_unknown", "Attempts billed, outcome unknown (in flight, or their worker died "
            "mid-call), and their dollars at the price known when they were sent.", labels=["tier", "measure"])
        for tier in tiers:
            n = sum(v["calls"] for (t, o), v in calls.items() if t == tier and o in OUTCOMES_UNKNOWN)
            usd = sum(Decimal(v["cost_usd"]) for (t, o), v in calls.items() if t == tier and o in OUTCOMES_UNKNOWN)
            unknown.add_metric([tier, "attempts"], n)
            unknown.add_metric([tier, "cost_usd"], float(usd))
        yield from (requests, api, cost, tokens, wait, waited, unknown)
        yield from self._cost_control_metrics()

    def _cost_control_metrics(self) -> Iterator[Metric]:
        from tars_tasks.status import cache_summary

        cache = cache_summary(self.settings)
        answered = GaugeMetricFamily("tars_requests_answered", "Succeeded requests by how they were answered "
                                     "(exact: the response cache at submit; model: a provider call).", labels=["by"])
        for by, n in sorted(cache["answered_by"].items()):
            answered.add_metric([by], n)
        saved = CounterMetricFamily("tars_cache_saved_usd", "Dollars the response cache saved (the cost of the "
                                    "calls that filled the entries it answered from).")
        saved.add_metric([], float(cache["saved_usd"]))
        yield from (answered, saved)

    def _mode_budget_metrics(self) -> Iterator[Metric]:
        from tars_tasks.status import budget_states, fleet_mode

        if not self.settings.shared_redis_url:
            return
        mode = fleet_mode(self.settings)
        gauge = GaugeMetricFamily("tars_fleet_mode", "1 for the fleet's current degradation mode.", labels=["mode"])
        for m in ("optimal", "high_load", "critical"):
            gauge.add_metric([m], 1.0 if mode.get("mode") == m else 0.0)
        signals = GaugeMetricFamily("tars_fleet_mode_signal", "The signals the mode was last decided from.",
                                    labels=["signal"])
        for k, v in sorted((mode.get("signals") or {}).items()):
            signals.add_metric([k], float(v))
        yield from (gauge, signals)
        budget = GaugeMetricFamily("tars_budget_usd", "Tenants' budgets: limit, spent (settled) and reserved "
                                   "(in flight, worst case), per period kind.", labels=["tenant", "period", "measure"])
        for tenant, periods in sorted(budget_states(self.settings).items()):
            for p in periods:
                kind = p["period"].split(":", 1)[0]
                if p["limit_usd"] is None:
                    continue
                for measure in ("limit_usd", "spent_usd", "reserved_usd"):
                    budget.add_metric([tenant, kind, measure.removesuffix("_usd")], float(p[measure]))
        yield budget

    def _redis_metrics(self) -> Iterator[Metric]:
        from tars_tasks.broker.depths import queue_depths

        yield from self._mode_budget_metrics()

        depth = GaugeMetricFamily("tars_queue_depth", "Messages waiting, by tier and TARS priority (9 first).",
                                  labels=["tier", "priority"])
        for tier, by_prio in sorted(queue_depths(self.settings).items()):
            for prio, n in sorted(by_prio.items()):
                depth.add_metric([tier, str(prio)], n)
        yield depth
        from tars_tasks.status import staged_by_tier, tenant_table

        staged = GaugeMetricFamily("tars_staged", "Messages staged for dispatch (waiting where priority and tenant "
                                   "fairness apply), by tier, TARS priority and tenant.",
                                   labels=["tier", "priority", "tenant"])
        for tier, by_prio in sorted(staged_by_tier(self.settings).items()):
            for prio, by_tenant in sorted(by_prio.items()):
                for tenant, n in sorted(by_tenant.items()):
                    staged.add_metric([tier, str(prio), tenant], n)
        yield staged
        weight = GaugeMetricFamily("tars_tenant_weight", "A tenant's fair-share weight (\"*\": every other tenant).",
                                   labels=["tenant"])
        limit = GaugeMetricFamily("tars_tenant_limit", "A tenant's own rate limit (0 = none), over all tiers "
                                  "(tier=\"all\") or on one tier.", labels=["tenant", "tier", "kind"])
        for name, t in tenant_table(self.settings).items():
            weight.add_metric([name], float(t["weight"]))
            limit.add_metric([name, "all", "rpm"], t["rpm"])
            limit.add_metric([name, "all", "tpm"], t["tpm"])
            for tier, lim in t["tiers"].items():
                limit.add_metric([name, tier, "rpm"], lim["rpm"])
                limit.add_metric([name, tier, "tpm"], lim["tpm"])
        yield from (weight, limit)
        from tars_tasks.status import worker_health

        healthy = GaugeMetricFamily("tars_worker_writer_healthy",
                                    "1 if the worker process's group-commit writer is committing.", labels=["worker"])
        stalled = GaugeMetricFamily("tars_worker_writer_stalled_seconds",
                                    "Seconds the worker's commits have kept failing (0 while they succeed).",
                                    labels=["worker"])
        for owner, h in sorted(worker_health(self.settings).items()):
            w = h.get("writer") or {}
            healthy.add_metric([owner], 1.0 if w.get("healthy", True) else 0.0)
            stalled.add_metric([owner], float(w.get("stalled_for_s") or 0.0))
        yield from (healthy, stalled)
        views = breaker_views(self.settings)
        state = GaugeMetricFamily("tars_breaker_state", "1 for the breaker's current state, 0 for the others.",
                                  labels=["provider", "model", "state"])
        failures = GaugeMetricFamily("tars_breaker_consecutive_failures", "Consecutive failures counted.",
                                     labels=["provider", "model"])
        trips = CounterMetricFamily("tars_breaker_trips", "Times the breaker opened.", labels=["provider", "model"])
        for v in views:
            for s in BREAKER_STATES:
                state.add_metric([v.provider, v.model, s], 1.0 if v.state == s else 0.0)
            failures.add_metric([v.provider, v.model], v.failures)
            trips.add_metric([v.provider, v.model], v.trips)
        yield from (state, failures, trips)


def make_registry(*, settings: Settings, min_interval_s: float = DEFAULT_MIN_INTERVAL_S) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(settings=settings, min_interval_s=min_interval_s))
    return registry


def render(*, settings: Settings) -> str:
    """One reading in the Prometheus text format (``tars metrics show``)."""
    from prometheus_client import generate_latest

    return generate_latest(make_registry(settings=settings, min_interval_s=0)).decode()
