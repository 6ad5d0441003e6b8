"""Every queue name and Redis key TARS uses, in one place."""

from __future__ import annotations

TIERS: tuple[str, ...] = ("haiku", "sonnet", "opus")
QUEUE_PREFIX = "tars."
TASK_RUN_REQUEST = "tars.run_request"


def queue_for_tier(tier: str) -> str:
    return f"{QUEUE_PREFIX}{tier}"


def done_channel(namespace: str, producer_id: str) -> str:
    """Pub/sub channel on which workers announce finished requests to one producer."""
    return f"{namespace}:done:{producer_id}"


def deliveries_key(namespace: str, request_id: str) -> str:
    """Counter of redeliveries of one request (poison-message cap)."""
    return f"{namespace}:deliveries:{request_id}"


def ratelimit_key(namespace: str, provider: str, model: str) -> str:
    return f"{namespace}:ratelimit:{provider}:{model}"


def breaker_key(namespace: str, provider: str, model: str) -> str:
    return f"{namespace}:breaker:{provider}:{model}"


def reconcile_lock_key(namespace: str) -> str:
    """Held by the one worker that looks for lost requests in a given interval."""
    return f"{namespace}:reconcile:lock"


# --- dispatch staging (workers/dispatch.py, docs/DISPATCH.md) ---------------------------------


def stage_prefix(namespace: str, tier: str) -> str:
    """Prefix of one tier's staging keys. Under it, built by the Lua scripts:
    ``:q:{priority}:{tenant}`` (list of entries), ``:ring:{priority}`` (list of tenants with
    work, the round-robin order), ``:parked`` (sorted set of ``{priority}:{tenant}`` with work
    whose tenant is at its own limit, scored by the µs its next slot is due), ``:deficit:{priority}``
    (hash tenant -> DRR deficit) and ``:count`` (entries staged in the tier)."""
    return f"{namespace}:stage:{tier}"


def stage_count_key(namespace: str, tier: str) -> str:
    """Entries staged in a tier, all priorities and tenants (the admission bound reads it)."""
    return f"{stage_prefix(namespace, tier)}:count"


def stage_queue_key(namespace: str, tier: str, priority: int, tenant: str) -> str:
    return f"{stage_prefix(namespace, tier)}:q:{priority}:{tenant}"


def stage_ring_key(namespace: str, tier: str, priority: int) -> str:
    return f"{stage_prefix(namespace, tier)}:ring:{priority}"


def stage_parked_key(namespace: str, tier: str) -> str:
    return f"{stage_prefix(namespace, tier)}:parked"


def stage_deficit_key(namespace: str, tier: str, priority: int) -> str:
    return f"{stage_prefix(namespace, tier)}:deficit:{priority}"


def tenant_config_key(namespace: str) -> str:
    """Hash of every configured tenant's weight and limits, as the dispatch script reads them."""
    return f"{namespace}:tenants"


def tenant_limit_prefix(namespace: str) -> str:
    return f"{namespace}:tlimit:"


def tenant_ratelimit_key(namespace: str, tenant: str, tier: str | None = None) -> str:
    """GCRA state (same fields as :func:`ratelimit_key`) of a tenant's limit, or of its limit on one tier."""
    return f"{tenant_limit_prefix(namespace)}{tenant}" + (f":{tier}" if tier else "")
