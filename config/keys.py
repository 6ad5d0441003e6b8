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
