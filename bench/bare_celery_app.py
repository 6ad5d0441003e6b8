"""Bare Celery baseline for bench/bench_fleet.py: a no-op task, same Redis, ignore_result.

Configured like the fleet where it matters for a fair comparison (acks_late, prefetch 2,
JSON, gevent pool, no events, no result backend, and — as TARS workers by default,
``TARS_TASK_LOG_LINES`` — no per-task INFO lines)."""

import logging
import os

from celery import Celery, signals

app = Celery("bare", broker=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/10"))
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=2,
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_transport_options={"visibility_timeout": 3600},
)


@signals.after_setup_logger.connect
def _quiet_task_lines(**_kw) -> None:
    for name in ("celery.worker.strategy", "celery.app.trace"):  # as tars_tasks.tasks.TASK_LINE_LOGGERS
        logging.getLogger(name).setLevel(logging.WARNING)


@app.task(name="bare.noop")
def noop(i: int = 0) -> None:
    return None


_done = None


@app.task(name="bare.sleep")
def sleep_then_done(token: str, seconds: float) -> None:
    """The closed loop's baseline: the seed's model time as a sleep, then one LPUSH so the
    producer knows (bare Celery has no result backend here, as the fleet has none)."""
    global _done
    import time

    import redis

    time.sleep(seconds)  # gevent-patched in the worker: a cooperative sleep, like an HTTP wait
    if _done is None:
        _done = redis.Redis.from_url(os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/10"))
    _done.lpush("bare:done", token)
