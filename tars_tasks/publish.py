"""Publishing one request's task message: the only place that knows how it goes on the wire."""

from __future__ import annotations

from celery import Celery

from config.keys import TASK_RUN_REQUEST, kombu_priority, queue_for_tier
from tars_tasks.messages import RunRequestMessage


def publish_request(
    celery_app: Celery,
    *,
    producer,
    request_id: str,
    tier: str,
    tenant: str,
    priority: int,
    reply_to: str | None,
) -> None:
    """Send ``tars.run_request`` for a recorded request; the task id is the request id.

    The message carries only what the worker uses (see :mod:`tars_tasks.messages`); the prompt,
    tenant and priority stay in Postgres (``priority`` still sets the broker priority).
    ``argsrepr``/``kwargsrepr`` are set so that events show the id, nothing more.
    """
    queue = queue_for_tier(tier)
    message = RunRequestMessage(request_id=request_id, tier=tier, reply_to=reply_to)
    celery_app.send_task(
        TASK_RUN_REQUEST,
        kwargs=message.encode(),
        task_id=request_id,
        queue=queue,
        routing_key=queue,
        priority=kombu_priority(priority),
        producer=producer,
        argsrepr="()",
        kwargsrepr=message.kwargsrepr(),
    )
