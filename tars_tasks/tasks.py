"""Celery task definitions and worker lifecycle hooks. The work itself is in ``workers.agent``."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from celery import signals
from celery.worker.control import inspect_command

from config.keys import TASK_RUN_BUNDLE, TASK_RUN_REQUEST
from config.settings import get_settings
from tars_tasks.celery_app import app

log = logging.getLogger(__name__)


@app.task(name=TASK_RUN_REQUEST, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_request(self, *args, **kwargs) -> str:
    """Run one request on its tier's model. May run more than once; records once.

    Takes keyword arguments only (see :mod:`tars_tasks.messages`); a message that cannot be run
    is dead-lettered with the reason, not acked silently.
    """
    from tars_tasks.messages import MalformedMessage, RunRequestMessage
    from workers.agent import DEAD_LETTERED, get_agent

    req = self.request
    info = req.delivery_info or {}
    agent = get_agent()
    try:
        message = RunRequestMessage.decode(args=args, kwargs=kwargs, task_id=req.id,
                                           delivery_priority=info.get("priority"))
    except MalformedMessage as exc:
        agent.dead_letter(reason="malformed_message", detail=f"task id {req.id}: {exc}",
                          queue=info.get("routing_key"))
        return DEAD_LETTERED
    headers = req.headers or {}
    redelivered = bool(info.get("redelivered")) or bool(headers.get("redelivered"))
    return agent.handle(message=message, redelivered=redelivered, worker=f"{req.hostname}",
                        reserved_tokens=_staged_tokens(headers))


@app.task(name=TASK_RUN_BUNDLE, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_bundle(self, *args, **kwargs) -> str:
    """Run every request of a bundle (``tars_tasks.bundles``); acked once all their rows are durable.

    A redelivered bundle reruns only its members whose rows are not terminal."""
    from tars_tasks.bundles import BundleMessage
    from tars_tasks.messages import MalformedMessage
    from workers.agent import DEAD_LETTERED, get_agent

    req = self.request
    info = req.delivery_info or {}
    agent = get_agent()
    try:
        bundle = BundleMessage.decode(args=args, kwargs=kwargs)
    except MalformedMessage as exc:
        agent.dead_letter(reason="malformed_message", detail=f"bundle {req.id}: {exc}",
                          queue=info.get("routing_key"))
        return DEAD_LETTERED
    headers = req.headers or {}
    redelivered = bool(info.get("redelivered")) or bool(headers.get("redelivered"))
    verdicts = agent.handle_bundle(messages=bundle.members(), redelivered=redelivered, worker=f"{req.hostname}",
                                   bundle_id=req.id, reserved_tokens=_staged_member_tokens(headers))
    return ",".join(verdicts)


def _staged_tokens(headers: dict) -> int | None:
    """The tokens a staged message's dispatcher reserved for its first attempt (its header), if any."""
    from tars_tasks.staging import STAGED_HEADER

    value = headers.get(STAGED_HEADER)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _staged_member_tokens(headers: dict) -> list[int] | None:
    """A staged bundle's header: the tokens its dispatcher reserved for each member's first attempt."""
    from tars_tasks.staging import STAGED_HEADER

    value = headers.get(STAGED_HEADER)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return value
    return None


@inspect_command(name="tars_health")
def tars_health(state, **_kw) -> dict:
    """This worker's own view of its health: the group-commit writer and its lease."""
    from tars_tasks.broker import leases
    from workers.agent import peek_agent

    agent = peek_agent()
    writer = agent.health() if agent is not None else {"healthy": True, "idle": True}
    return {"writer": writer, "lease_owner": leases.current_owner(), "healthy": bool(writer.get("healthy", True))}


#: Celery's loggers of the per-task INFO lines (received; succeeded / retried), quieted unless
#: ``task_log_lines`` (their warnings and errors — a task that raised — are always logged).
TASK_LINE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def _quiet_task_lines() -> None:
    if not get_settings().task_log_lines:
        for name in TASK_LINE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


@signals.after_setup_logger.connect
def _after_setup_logger(**_kw) -> None:
    _quiet_task_lines()


@signals.worker_init.connect
@signals.worker_process_init.connect
def _fix_allocator(**_kw) -> None:
    """Before the worker's first message (in each pool child too): a fixed mmap threshold, logged
    once the worker's logging is set up (``worker_init`` comes before it)."""
    from workers.memory import fix_mmap_threshold

    n = get_settings().worker_mmap_threshold_bytes
    _allocator_note[:] = [f"mmap threshold fixed at {n:,} bytes" if fix_mmap_threshold(threshold_bytes=n)
                          else "mmap threshold left to the C library"]


_allocator_note: list[str] = []


@signals.worker_process_init.connect
def _init_process(**_kw) -> None:
    from tars_tasks.db.engine import dispose_engines

    dispose_engines()  # never share a parent's pooled connections after fork
    _quiet_task_lines()


_maintenance: list = []


@signals.worker_init.connect
def _take_lease(sender=None, **_kw) -> None:
    """Before the consumer takes its first message: a lease, kept alive while this process lives."""
    from workers.maintenance import LeaseKeeper

    settings = get_settings()
    if settings.broker_redis_url is None:
        return
    node = getattr(sender, "hostname", None)
    _maintenance.append(LeaseKeeper(settings=settings, node=node).start())


@signals.worker_ready.connect
def _start_maintenance(sender=None, **_kw) -> None:
    from workers.maintenance import LeaseSweeper, LostRequestReconciler, UnackedRestorer

    app_ = getattr(sender, "app", None) or app
    settings = get_settings()
    for note in _allocator_note:
        log.info("allocator: %s", note)
    _maintenance.append(UnackedRestorer(celery_app=app_, interval_s=settings.unacked_restore_interval_s).start())
    _maintenance.append(LeaseSweeper(celery_app=app_, settings=settings).start())
    _maintenance.append(LostRequestReconciler(celery_app=app_, settings=settings).start())
    from config.catalog import load_catalog
    from workers.maintenance import FleetModeKeeper

    _maintenance.append(FleetModeKeeper(settings=settings, catalog=load_catalog(settings.catalog_path)).start())
    _limit_calls_at_once(sender)
    _start_dispatcher(sender, settings)
    if settings.worker_gc_freeze and not settings.embedded:  # a process of its own, not its host's
        from workers.memory import freeze_startup_objects

        log.info("gc: %s objects of the worker's start-up frozen out of the collector", f"{freeze_startup_objects():,}")


def _limit_calls_at_once(consumer) -> None:
    """A pool that runs tasks in this process (gevent, threads, solo) runs at most its concurrency
    of requests at once, bundle members included (``workers.agent.limit_calls_at_once``)."""
    from workers.agent import limit_calls_at_once
    from workers.dispatch import runs_in_process

    pool = getattr(consumer, "pool", None)
    if pool is not None and runs_in_process(pool):
        limit_calls_at_once(int(getattr(pool, "limit", None) or get_settings().worker_concurrency))


_dispatchers: list = []


def _start_dispatcher(consumer, settings) -> None:
    """This worker's dispatcher (docs/DISPATCH.md): staged messages of its tiers into their queues."""
    from workers.dispatch import start_for_worker

    if consumer is None or getattr(consumer, "pool", None) is None:
        return
    try:
        loop = start_for_worker(consumer=consumer, settings=settings)
    except Exception:
        log.exception("dispatcher not started; staged requests wait for another worker's")
        return
    if loop is not None:
        _dispatchers.append(loop)
        _maintenance.append(loop)


@signals.task_received.connect
def _received(request=None, **_kw) -> None:
    for loop in _dispatchers:  # a message taken: its requests are held until the next exact count
        loop.received(request)


@signals.task_postrun.connect
def _slot_freed(**_kw) -> None:
    for loop in _dispatchers:  # a freed slot is refilled at once, not at the next tick (if it was wanted)
        loop.slot_freed()


@signals.worker_shutdown.connect
def _flush_on_shutdown(**_kw) -> None:
    from workers.agent import close_agent

    for job in reversed(_maintenance):
        job.stop()
    close_agent()


def _dead_letter(*, reason: str, detail: str, queue: str | None) -> None:
    from tars_tasks.db.engine import get_engine
    from tars_tasks.db.models import DeadLetter

    try:
        with get_engine(get_settings().database_url).begin() as conn:
            conn.execute(
                DeadLetter.__table__.insert().values(
                    reason=reason, detail=detail[:10_000], queue=queue, received_at=datetime.now(UTC)
                )
            )
    except Exception:
        log.exception("could not record dead letter (%s)", reason)


@signals.task_unknown.connect
def _on_unknown(*, name=None, id=None, message=None, exc=None, **_kw) -> None:
    queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    _dead_letter(reason="unknown_task", detail=f"task {name!r} id={id}: {exc}", queue=queue)


@signals.task_rejected.connect
def _on_rejected(*, message=None, exc=None, **_kw) -> None:
    queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    body = getattr(message, "body", b"")
    _dead_letter(reason="rejected_message", detail=f"{exc!r}; body[:500]={body[:500]!r}", queue=queue)
