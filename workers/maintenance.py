"""Repairs the fleet runs on a timer inside every worker process.

:class:`LostRequestReconciler` repairs requests the broker lost. Kombu's Redis transport
takes a message with BRPOP and records it as unacked in a *second* round trip; a Redis
restart between the two loses the message although the pop was persisted (seen in
``test_a_redis_restart_with_work_queued_and_running_loses_nothing``: one request of 80 stayed
``queued`` forever). The request row is the record, so the fleet can tell: a request still
``queued`` long after submission, with no attempt row, while its tier's queue is empty and no
worker holds its message in ``unacked``, is lost — and is published again from its row. The
checks make a duplicate unlikely; if one happens anyway, the request is still finished once
and both calls are on the bill.

:class:`UnackedRestorer` repairs lost messages of dead workers. With ``acks_late`` on Redis a
message a worker holds sits in kombu's ``unacked`` hash until it is acked; if the worker is
SIGKILLed, kombu puts it back once it is older than the visibility timeout — but only from
the idle path of its poller, and Celery's gevent/eventlet event loop ("synloop") never takes
that path: the BRPOP's own timeout reply counts as an event, so "no events" never happens.
Measured here: messages held by a SIGKILLed gevent worker stayed in ``unacked`` indefinitely
while another worker sat idle. This loop calls the same restore on a timer; kombu's Redis
mutex keeps concurrent restores by several workers from duplicating anything.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)


class UnackedRestorer:
    def __init__(self, *, celery_app, interval_s: float) -> None:
        self.app = celery_app
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0

    def start(self) -> UnackedRestorer:
        if not str(self.app.conf.broker_url).startswith(("redis://", "rediss://", "unix://")):
            return self
        self._thread = threading.Thread(target=self._run, name="tars-unacked-restorer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.interval_s):
            try:
                if conn is None:
                    conn = self.app.connection_for_write()
                    conn.ensure_connection(max_retries=1)
                conn.default_channel.qos.restore_visible(num=None, interval=1)
                self.sweeps += 1
            except Exception as exc:
                log.warning("unacked-message sweep failed (%s); retrying in %.0fs", exc, self.interval_s)
                if conn is not None:
                    try:
                        conn.release()
                    except Exception:
                        pass
                conn = None
                time.sleep(0)
        if conn is not None:
            conn.release()

    def stop(self) -> None:
        self._stop.set()


class LostRequestReconciler:
    #: At most this many lost requests re-published per sweep.
    BATCH_MAX = 500

    def __init__(self, *, celery_app, settings) -> None:
        self.app = celery_app
        self.settings = settings
        self._stop = threading.Event()
        self.requeued = 0

    def start(self) -> LostRequestReconciler:
        if self.settings.shared_redis_url is None:
            return self
        threading.Thread(target=self._run, name="tars-lost-request-reconciler", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                self.sweep()
            except Exception as exc:
                log.warning("lost-request sweep failed (%s)", exc)

    def sweep(self) -> int:
        """One pass (if this worker holds the fleet-wide lock); returns how many were re-published."""
        from sqlalchemy import exists, select

        from config.keys import reconcile_lock_key
        from tars_tasks.db.engine import get_engine
        from tars_tasks.db.models import STATUS_QUEUED, ApiCall, Request
        from tars_tasks.publish import publish_request
        from tars_tasks.redis_client import get_redis
        from tars_tasks.status import queue_depths

        s = self.settings
        r = get_redis(s.shared_redis_url)
        if not r.set(reconcile_lock_key(s.namespace), "1", nx=True, ex=max(1, int(s.reconcile_interval_s))):
            return 0
        req, api = Request.__table__.c, ApiCall.__table__.c
        cutoff = datetime.now(UTC) - timedelta(seconds=s.requeue_lost_after_s)
        with get_engine(s.database_url).connect() as conn:
            rows = conn.execute(
                select(req.id, req.tier_requested, req.role, req.prompt, req.tenant, req.priority)
                .where(req.status == STATUS_QUEUED, req.submitted_at < cutoff,
                       ~exists().where(api.request_id == req.id))
                .limit(self.BATCH_MAX)
            ).all()
        if not rows:
            return 0
        depths = {tier: sum(by_prio.values()) for tier, by_prio in queue_depths(s).items()}
        held = b"".join(r.hvals("unacked"))
        lost = [row for row in rows if depths.get(row.tier_requested, 0) == 0 and row.id.encode() not in held]
        if not lost:
            return 0
        with self.app.producer_or_acquire() as producer:
            for row in lost:
                log.warning("request %s was lost by the broker (queued since before %s, in no queue, held by "
                            "no worker); publishing it again", row.id, cutoff.isoformat())
                publish_request(self.app, producer=producer, request_id=row.id, tier=row.tier_requested,
                                role=row.role, prompt=row.prompt, tenant=row.tenant, priority=row.priority,
                                reply_to=None)
        self.requeued += len(lost)
        return len(lost)
