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
* Priorities: ten Redis lists per queue, one per kombu priority step, kombu's default
  separator; workers poll the steps in :data:`config.keys.PRIORITY_POLL_ORDER` so that TARS
  priority 9 is served first and a message with no priority at all runs at normal (5).
* On Redis, ``redis://`` is served by :class:`tars_tasks.broker.transport.Transport` (kombu's
  Redis transport plus leases on unacked messages, TARS's priority poll order and half-open
  checks on the gevent path; installed by :func:`make_app`).
* ``-P gevent`` runs :class:`tars_tasks.broker.gevent_pool.TaskPool`: Celery's gevent pool, whose
  finished task greenlets refcounting frees (Celery's own keeps each in a cycle; also installed
  by :func:`make_app`).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, concurrency

from config.keys import (
    KOMBU_PRIORITY_SEP,
    PRIORITY_MAX,
    PRIORITY_MIN,
    PRIORITY_NORMAL,
    PRIORITY_POLL_ORDER,
    TASK_RUN_REQUEST,
    kombu_priority,
    queue_for_tier,
)
from config.settings import Settings, get_settings
from tars_tasks.broker import transport as broker_transport
from tars_tasks.redis_client import broker_transport_bounds

#: kombu's in-memory transport polls an empty queue every second by default; at concurrency 1
#: that second was most of a request's life. Measured: baseline C=1 at 72% of Little's bound.
EMBEDDED_POLLING_INTERVAL_S = 0.005

#: What ``-P gevent`` runs once an app is made (a string: a producer never imports gevent for it).
GEVENT_POOL = "tars_tasks.broker.gevent_pool:TaskPool"

__all__ = ["PRIORITY_MAX", "PRIORITY_MIN", "celery_config", "get_app", "make_app", "redis_priority"]



def redis_priority(priority: int) -> int:
    """The kombu priority a TARS priority is published with (see :mod:`config.keys`)."""
    return kombu_priority(priority)


def celery_config(settings: Settings, *, producer: bool = False) -> dict:
    """``producer``: a producer's app, whose every broker operation is bounded by
    ``client_timeout_s`` (a hung Redis raises instead of blocking submit)."""
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
        "task_default_priority": redis_priority(PRIORITY_NORMAL),
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "priority_steps": list(PRIORITY_POLL_ORDER),
            "sep": KOMBU_PRIORITY_SEP,
            "queue_order_strategy": "priority",
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # connect/reply bounds, keepalives, half-open checks: tars_tasks.redis_client; a
            # producer's every broker operation is bounded by its client_timeout_s
            **broker_transport_bounds(settings, timeout_s=settings.client_timeout_s if producer else None),
            "max_connections": 1000,
            **({"polling_interval": EMBEDDED_POLLING_INTERVAL_S} if settings.embedded else {}),
        },
        "broker_pool_limit": 100,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 1 if producer else 3, "interval_start": 0.1,
                                      "interval_step": 0.5},
    }


def make_app(settings: Settings | None = None, *, producer: bool = False) -> Celery:
    broker_transport.install()  # redis:// served by TARS's transport in this process
    concurrency.ALIASES["gevent"] = GEVENT_POOL  # -P gevent: Celery's pool less a cycle per task
    settings = settings or get_settings()
    celery = Celery("tars_tasks", include=["tars_tasks.tasks"])
    celery.conf.update(celery_config(settings, producer=producer))
    return celery


_app: Celery | None = None
_app_lock = threading.Lock()


def get_app() -> Celery:
    """This process's Celery app (the one ``celery -A tars_tasks`` runs), built on first use.

    Importing this module (or :mod:`tars_tasks`) builds nothing and reads no setting: a bad
    ``TARS_*`` value surfaces here, as a one-line :class:`~tars_tasks.errors.ConfigurationError`,
    in the command that needs the app — not in ``tars --help``.
    """
    global _app
    if _app is None:
        with _app_lock:
            if _app is None:
                _app = make_app()
    return _app


def __getattr__(name: str) -> Any:
    # ``from tars_tasks.celery_app import app`` and Celery's ``-A tars_tasks`` still work: the
    # attribute is resolved (and the app built) when it is first asked for.
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
