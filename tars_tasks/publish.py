"""Publishing one request's task message: the only place that knows the message's shape."""

from __future__ import annotations

from celery import Celery

from config.keys import TASK_RUN_REQUEST, queue_for_tier
from tars_tasks.celery_app import redis_priority


def publish_request(
    celery_app: Celery,
    *,
    producer,
    request_id: str,
    tier: str,
    role: str,
    prompt: str,
    tenant: str,
    priority: int,
    reply_to: str | None,
) -> None:
    """Send ``tars.run_request`` for a recorded request; the task id is the request id."""
    queue = queue_for_tier(tier)
    celery_app.send_task(
        TASK_RUN_REQUEST,
        kwargs={"request_id": request_id, "tier": tier, "role": role, "prompt": prompt, "tenant": tenant,
                "priority": priority, "reply_to": reply_to},
        task_id=request_id,
        queue=queue,
        routing_key=queue,
        priority=redis_priority(priority),
        producer=producer,
    )
