"""Celery task definitions and worker lifecycle hooks. The work itself is in ``workers.agent``."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from celery import signals

from config.keys import TASK_RUN_REQUEST
from config.settings import get_settings
from tars_tasks.celery_app import app

log = logging.getLogger(__name__)


@app.task(name=TASK_RUN_REQUEST, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_request(self, *, request_id: str, tier: str, prompt: str, reply_to: str | None = None, **extra) -> str:
    """Run one request on its tier's model. May run more than once; records once."""
    from workers.agent import get_agent

    info = self.request.delivery_info or {}
    redelivered = bool(info.get("redelivered")) or bool((self.request.headers or {}).get("redelivered"))
    return get_agent().run(
        request_id=request_id,
        tier=tier,
        prompt=prompt,
        reply_to=reply_to,
        redelivered=redelivered,
        worker=f"{self.request.hostname}",
        **extra,
    )


@signals.worker_process_init.connect
def _init_process(**_kw) -> None:
    from tars_tasks.db.engine import dispose_engines

    dispose_engines()  # never share a parent's pooled connections after fork


_maintenance: list = []


@signals.worker_ready.connect
def _start_maintenance(sender=None, **_kw) -> None:
    from workers.maintenance import LostRequestReconciler, UnackedRestorer

    app_ = getattr(sender, "app", None) or app
    settings = get_settings()
    _maintenance.append(UnackedRestorer(celery_app=app_, interval_s=settings.unacked_restore_interval_s).start())
    _maintenance.append(LostRequestReconciler(celery_app=app_, settings=settings).start())


@signals.worker_shutdown.connect
def _flush_on_shutdown(**_kw) -> None:
    from workers.agent import close_agent

    for job in _maintenance:
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
