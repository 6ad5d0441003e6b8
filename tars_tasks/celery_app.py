"""The Celery application, configured for at-least-once delivery.

Delivery guarantee: **a request may run more than once** (a worker killed mid-task, a
visibility timeout that expired). Every write is idempotent, so it is recorded once; every
model call that really happened is recorded as its own ``api_calls`` row.

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acked only after the
  task returned, and the task returns only after its rows are committed.
* ``worker_prefetch_multiplier`` (default 1): a worker holds at most ``concurrency``
  messages it has not started.
* Redis ``visibility_timeout_s``: an unacked message returns to the queue after this long.
  It must exceed the longest task, or live tasks are run twice. No countdown/ETA is used.
* Priorities: ten Redis lists per queue (``priority_steps`` 0..9, ``sep`` ':'); on Redis
  a *lower* number is served first, so :func:`redis_priority` maps TARS priority 9 to 0.
"""

from __future__ import annotations

from celery import Celery

from config.keys import TASK_RUN_REQUEST, queue_for_tier
from config.settings import Settings, get_settings
from tars_tasks import broker_transport
from tars_tasks.redis_client import broker_transport_bounds

#: kombu's in-memory transport polls an empty queue every second by default; at concurrency 1
#: that second was most of a request's life. Measured: baseline C=1 at 72% of Little's bound.
EMBEDDED_POLLING_INTERVAL_S = 0.005

#: TARS priorities: 0 (lowest) .. 9 (highest, served first).
PRIORITY_MIN, PRIORITY_MAX = 0, 9


def redis_priority(priority: int) -> int:
    """Celery/kombu on Redis serve priority 0 first; TARS serves 9 first."""
    return PRIORITY_MAX - priority


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        "task_create_missing_queues": True,
        "task_routes": {TASK_RUN_REQUEST: {"queue": queue_for_tier("haiku")}},
        "task_default_queue": queue_for_tier("haiku"),
        "task_default_priority": redis_priority(5),
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "priority_steps": list(range(PRIORITY_MIN, PRIORITY_MAX + 1)),
            "sep": ":",
            "queue_order_strategy": "priority",
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # connect/reply bounds, keepalives, half-open checks: tars_tasks.redis_client
            **broker_transport_bounds(settings),
            "max_connections": 1000,
            **({"polling_interval": EMBEDDED_POLLING_INTERVAL_S} if settings.embedded else {}),
        },
        "broker_pool_limit": 100,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5},
    }


def make_app(settings: Settings | None = None) -> Celery:
    broker_transport.install()  # redis:// with the pub/sub half-open check on the gevent path too
    settings = settings or get_settings()
    celery = Celery("tars_tasks", include=["tars_tasks.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = make_app()
