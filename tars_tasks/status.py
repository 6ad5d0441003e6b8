"""Fleet status: queue depth per tier and priority, workers online per tier, requests by status."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from config.keys import TIERS, queue_for_tier
from config.settings import Settings
from tars_tasks.celery_app import PRIORITY_MAX, PRIORITY_MIN, redis_priority
from tars_tasks.db.engine import get_engine
from tars_tasks.db.models import Request
from tars_tasks.redis_client import get_redis


def _priority_list(queue: str, prio: int) -> str:
    """The Redis list kombu uses for ``queue`` at a TARS priority (sep ':', steps 0..9)."""
    rp = redis_priority(prio)
    return queue if rp == 0 else f"{queue}:{rp}"


@dataclass
class FleetStatus:
    #: tier -> TARS priority -> messages waiting
    queue_depth: dict[str, dict[int, int]] = field(default_factory=dict)
    #: tier -> worker node names online
    workers: dict[str, list[str]] = field(default_factory=dict)
    #: status -> count
    requests: dict[str, int] = field(default_factory=dict)
    breakers: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"queue_depth": self.queue_depth, "workers": self.workers, "requests": self.requests,
                "breakers": self.breakers}


def queue_depths(settings: Settings) -> dict[str, dict[int, int]]:
    url = settings.shared_redis_url
    if not url:
        return {t: {} for t in TIERS}
    r = get_redis(url)
    pipe = r.pipeline(transaction=False)
    keys = [(t, p) for t in TIERS for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1)]
    for t, p in keys:
        pipe.llen(_priority_list(queue_for_tier(t), p))
    out: dict[str, dict[int, int]] = {t: {} for t in TIERS}
    for (t, p), n in zip(keys, pipe.execute(), strict=True):
        out[t][p] = int(n)
    return out


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

    breaker = FleetBreaker(redis_client=get_redis(url), namespace=settings.namespace)
    return {f"{v.provider}:{v.model}": v.describe() for v in breaker.all_views()}


def fleet_status(settings: Settings, celery_app) -> FleetStatus:
    return FleetStatus(
        queue_depth=queue_depths(settings),
        workers=workers_by_tier(celery_app) if settings.shared_redis_url else {},
        requests=requests_by_status(settings),
        breakers=breaker_states(settings),
    )
