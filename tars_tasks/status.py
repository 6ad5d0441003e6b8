"""Fleet status: queue depth per tier and priority (and what is staged for dispatch, per
priority and tenant), the tenants' weights and limits, workers online per tier, requests by status."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from config.keys import TIERS, lease_prefix, queue_for_tier
from config.pricing import TOKEN_CLASSES
from config.settings import Settings
from tars_tasks.broker.depths import queue_depths  # re-exported: status.queue_depths
from tars_tasks.codes import OUTCOMES_UNKNOWN
from tars_tasks.db.engine import get_engine
from tars_tasks.db.models import ApiCall, Request
from tars_tasks.redis_client import get_redis


@dataclass
class FleetStatus:
    #: tier -> TARS priority -> messages waiting
    queue_depth: dict[str, dict[int, int]] = field(default_factory=dict)
    #: tier -> TARS priority -> tenant -> messages staged for dispatch (docs/DISPATCH.md)
    staged: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)
    #: the tenants' fair-share weights and RPM/TPM limits (config/tenants.py; "*" = the defaults)
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: tier -> worker node names online
    workers: dict[str, list[str]] = field(default_factory=dict)
    #: status -> count
    requests: dict[str, int] = field(default_factory=dict)
    breakers: dict[str, str] = field(default_factory=dict)
    #: lease owner -> what the worker process last reported (its writer's health among it)
    worker_health: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: attempts billed, outcome unknown (their worker died mid-call, or still in flight)
    billed_unknown: dict[str, Any] = field(default_factory=dict)
    #: tier -> attempts, tokens by billing class and dollars of every api_calls row
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the fleet's degradation mode (tars_tasks/fleetmode.py): mode, since, transition, signals
    fleet_mode: dict[str, Any] = field(default_factory=dict)
    #: tenant -> its budget periods (limit, spent, reserved, expired reservations, share used)
    budgets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: requests by how they were answered, dollars the cache saved, the cache's own counters
    cache: dict[str, Any] = field(default_factory=dict)
    #: the batch lane: batch-lane requests waiting for a batch per tier, and the provider batches in flight
    batches: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"queue_depth": self.queue_depth, "staged": self.staged, "tenants": self.tenants,
                "workers": self.workers, "requests": self.requests,
                "breakers": self.breakers, "worker_health": self.worker_health,
                "billed_unknown": self.billed_unknown, "usage": self.usage, "fleet_mode": self.fleet_mode,
                "budgets": self.budgets, "cache": self.cache, "batches": self.batches}


def workers_by_tier(celery_app, *, timeout: float = 1.0) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in TIERS}
    try:
        replies = celery_app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception:
        return out
    for node, queues in replies.items():
        for q in queues or []:
            for t in TIERS:
                if q.get("name") == queue_for_tier(t):
                    out[t].append(node)
    return {t: sorted(v) for t, v in out.items()}


def requests_by_status(settings: Settings) -> dict[str, int]:
    t = Request.__table__.c
    with get_engine(settings.database_url).connect() as conn:
        return {s: n for s, n in conn.execute(select(t.status, func.count()).group_by(t.status))}


def breaker_states(settings: Settings) -> dict[str, str]:
    """``provider:model`` -> a one-line state of every fleet breaker that has state in Redis."""
    url = settings.shared_redis_url
    if not url:
        return {}
    from workers.breaker import FleetBreaker

    breaker = FleetBreaker(redis_client=get_redis(url, settings=settings), namespace=settings.namespace)
    return {f"{v.provider}:{v.model}": v.describe() for v in breaker.all_views()}


def worker_health(settings: Settings) -> dict[str, dict[str, Any]]:
    """Lease owner -> the health each live worker process publishes with its lease."""
    url = settings.broker_redis_url
    if not url:
        return {}
    r = get_redis(url, settings=settings)
    prefix = lease_prefix(settings.namespace)
    keys = sorted(r.scan_iter(match=f"{prefix}*", count=500))
    out: dict[str, dict[str, Any]] = {}
    for key, raw in zip(keys, r.mget(keys) if keys else [], strict=True):
        if raw is None:
            continue
        try:
            out[key.decode()[len(prefix):]] = json.loads(raw)
        except ValueError:
            continue
    return out


def billed_unknown(settings: Settings) -> dict[str, Any]:
    """Attempts whose outcome is unknown (in flight, or their worker died) and what they cost."""
    a = ApiCall.__table__.c
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(select(a.outcome, func.count(), func.coalesce(func.sum(a.cost_usd), 0))
                            .where(a.outcome.in_(OUTCOMES_UNKNOWN)).group_by(a.outcome)).all()
    by = {o: (int(n), float(c)) for o, n, c in rows}
    return {"attempts": sum(n for n, _ in by.values()), "cost_usd": round(sum(c for _, c in by.values()), 9),
            "by_outcome": {o: n for o, (n, _) in by.items()}}


def usage_by_class(settings: Settings) -> dict[str, dict[str, Any]]:
    """Tier -> attempts, tokens of each billing class and dollars, over every api_calls row
    (what the providers bill; each class was priced at its own catalog price)."""
    a = ApiCall.__table__.c
    sums = [func.coalesce(func.sum(a[c]), 0) for c in TOKEN_CLASSES]
    q = select(a.tier, func.count(), *sums, func.coalesce(func.sum(a.cost_usd), 0)).group_by(a.tier)
    out: dict[str, dict[str, Any]] = {}
    with get_engine(settings.database_url).connect() as conn:
        for tier, n, *rest in conn.execute(q):
            *tokens, cost = rest
            out[tier] = {"attempts": int(n), **{c: int(v) for c, v in zip(TOKEN_CLASSES, tokens, strict=True)},
                         "cost_usd": str(Decimal(cost))}
    return dict(sorted(out.items()))


def fleet_mode(settings: Settings) -> dict[str, Any]:
    """The fleet's mode as stored in Redis (as of the last decision any process made)."""
    url = settings.shared_redis_url
    if not url:
        return {}
    from tars_tasks.fleetmode import ModeBook

    view = ModeBook(redis_client=get_redis(url, settings=settings), namespace=settings.namespace,
                    settings=settings).read()
    return {"mode": str(view.mode), "transition": view.seq, "since_ms": view.since_ms, "signals": view.signals}


def budget_states(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Tenant -> the state of each budget period, for every tenant with a limit."""
    from tars_tasks.budgets import Budgets

    b = Budgets.for_settings(settings)
    if b is None:
        return {}
    return {t: [st.as_dict() for st in b.state(t)] for t in b.tenants()}


def cache_summary(settings: Settings) -> dict[str, Any]:
    """Requests by ``answered_by``, dollars saved, and the response cache's counters (if it has one)."""
    t = Request.__table__.c
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(select(t.answered_by, func.count(), func.coalesce(func.sum(t.saved_usd), 0))
                            .where(t.answered_by.is_not(None)).group_by(t.answered_by)).all()
    out: dict[str, Any] = {"answered_by": {a: int(n) for a, n, _ in rows},
                           "saved_usd": str(sum((Decimal(s) for _, _, s in rows), Decimal(0)))}
    from tars_tasks.cache import ResponseCache

    cache = ResponseCache.for_settings(settings)
    if cache is not None:
        try:
            out["store"] = cache.stats()
        except Exception as exc:  # the cache is an optimisation: say so, do not fail the status
            out["store"] = {"error": str(exc)}
    return out


def batch_lane(settings: Settings) -> dict[str, Any]:
    """Batch-lane requests not yet in a provider batch (per tier), and every provider batch not done:
    tier, provider, model, state, requests, the provider's id and status, polls, age."""
    from tars_tasks.db.models import BatchItem, ProviderBatch

    t, pb, bi = Request.__table__.c, ProviderBatch.__table__.c, BatchItem.__table__.c
    now = datetime.now(UTC)
    with get_engine(settings.database_url).connect() as conn:
        waiting = conn.execute(select(t.tier_queued, func.count())
                               .where(t.lane == "batch", t.status == "queued",
                                      ~select(bi.request_id).where(bi.request_id == t.id).exists())
                               .group_by(t.tier_queued)).all()
        flying = conn.execute(select(ProviderBatch.__table__).where(pb.state != "done").order_by(pb.created_at)).all()
    return {"waiting": {tier: int(n) for tier, n in waiting},
            "in_flight": [{"id": r.id, "tier": r.tier, "provider": r.provider, "model": r.model, "state": r.state,
                           "requests": r.request_count, "provider_batch_id": r.provider_batch_id,
                           "provider_status": r.provider_status, "polls": r.polls,
                           "age_s": round((now - r.created_at).total_seconds(), 1)} for r in flying]}


def staged_by_tier(settings: Settings) -> dict[str, dict[int, dict[str, int]]]:
    """Tier -> TARS priority -> tenant -> messages staged (waiting for a dispatcher), from the broker."""
    from tars_tasks.staging import Staging

    url = settings.broker_redis_url
    if not url:
        return {}
    staging = Staging(redis_client=get_redis(url, settings=settings), namespace=settings.namespace)
    return {t: staging.staged_by_priority(tier=t) for t in TIERS}


def tenant_table(settings: Settings) -> dict[str, dict[str, Any]]:
    """Tenant -> weight, rpm, tpm (0 = none) and per-tier limits; ``"*"`` is every other tenant."""
    from config.tenants import load_tenants

    cfg = load_tenants(settings.tenants_path)

    def row(spec) -> dict[str, Any]:
        return {"weight": spec.weight, "rpm": spec.rpm, "tpm": spec.tpm,
                "tiers": {t: {"rpm": lim.rpm, "tpm": lim.tpm} for t, lim in sorted(spec.tiers.items())}}

    return {"*": row(cfg.defaults), **{name: row(spec) for name, spec in sorted(cfg.tenants.items())}}


def fleet_status(settings: Settings, celery_app) -> FleetStatus:
    return FleetStatus(
        queue_depth=queue_depths(settings),
        staged=staged_by_tier(settings),
        tenants=tenant_table(settings),
        workers=workers_by_tier(celery_app) if settings.shared_redis_url else {},
        requests=requests_by_status(settings),
        breakers=breaker_states(settings),
        worker_health=worker_health(settings),
        billed_unknown=billed_unknown(settings),
        usage=usage_by_class(settings),
        fleet_mode=fleet_mode(settings),
        budgets=budget_states(settings),
        cache=cache_summary(settings),
        batches=batch_lane(settings),
    )
