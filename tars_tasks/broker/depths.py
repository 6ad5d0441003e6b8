"""Queue depths: messages waiting per tier and TARS priority, read from the broker's own lists.

Messages *staged* for dispatch (``docs/DISPATCH.md``) wait too: :func:`staged_counts` reads the
tiers' staged counts, :func:`waiting_by_tier` adds them to the queues' (what admission control
and the lost-request reconciler count). Core, not operations: admission control (producer
side), the lost-request reconciler (worker side) and ``tars status`` (operations) all read them.
"""

from __future__ import annotations

from config.keys import PRIORITY_MAX, PRIORITY_MIN, TIERS, priority_list, queue_for_tier, stage_count_key
from config.settings import Settings
from tars_tasks.redis_client import get_redis


def queue_depths(settings: Settings, *, timeout_s: float | None = None) -> dict[str, dict[int, int]]:
    """Messages waiting per tier and TARS priority, read from the *broker* (never the fleet-state
    Redis, which may be another server: reading it there switched admission control off)."""
    url = settings.broker_redis_url
    if not url:
        return {t: {} for t in TIERS}
    r = get_redis(url, settings=settings, timeout_s=timeout_s)
    pipe = r.pipeline(transaction=False)
    keys = [(t, p) for t in TIERS for p in range(PRIORITY_MAX, PRIORITY_MIN - 1, -1)]
    for t, p in keys:
        pipe.llen(priority_list(queue_for_tier(t), p))
    out: dict[str, dict[int, int]] = {t: {} for t in TIERS}
    for (t, p), n in zip(keys, pipe.execute(), strict=True):
        out[t][p] = int(n)
    return out


def staged_counts(settings: Settings, *, timeout_s: float | None = None) -> dict[str, int]:
    """Messages staged per tier (waiting for a dispatcher), read from the broker."""
    url = settings.broker_redis_url
    if not url:
        return dict.fromkeys(TIERS, 0)
    r = get_redis(url, settings=settings, timeout_s=timeout_s)
    values = r.mget([stage_count_key(settings.namespace, t) for t in TIERS])
    return {t: int(v or 0) for t, v in zip(TIERS, values, strict=True)}


def waiting_by_tier(settings: Settings, *, timeout_s: float | None = None) -> dict[str, int]:
    """Messages waiting per tier: in its Celery queue lists plus staged."""
    queued = queue_depths(settings, timeout_s=timeout_s)
    staged = staged_counts(settings, timeout_s=timeout_s)
    return {t: sum(queued[t].values()) + staged[t] for t in TIERS}
