"""Repairs the fleet runs on a timer inside every worker process.

:class:`LostRequestReconciler` repairs requests the broker lost. Kombu's Redis transport
takes a message with BRPOP and records it as unacked in a *second* round trip; a Redis
restart between the two loses the message although the pop was persisted (seen in
``test_a_redis_restart_with_work_queued_and_running_loses_nothing``: one request of 80 stayed
``queued`` forever). The request row is the record, so the fleet can tell: a request still
``queued`` long after submission, with no attempt row, while its tier's queue and staging are
empty and no worker holds its message in ``unacked``, is lost — and is staged (or, with
dispatch off, published) again from its row. A Redis restart without persistence loses staging
with the queues; the requests come back this way, ``BATCH_MAX`` per sweep. The
checks make a duplicate unlikely; if one happens anyway, the request is still finished once
and both calls are on the bill.

:class:`UnackedRestorer` repairs lost messages of dead workers. With ``acks_late`` on Redis a
message a worker holds sits in kombu's ``unacked`` hash until it is acked; if the worker is
SIGKILLed, kombu puts it back once it is older than the visibility timeout — but only from
the idle path of its poller, and Celery's gevent/eventlet event loop ("synloop") never takes
that path: the BRPOP's own timeout reply counts as an event, so "no events" never happens.
Measured here: messages held by a SIGKILLed gevent worker stayed in ``unacked`` indefinitely
while another worker sat idle. This loop calls the same restore on a timer; kombu's Redis
mutex keeps concurrent restores by several workers from duplicating anything. It is the
fallback for messages with no lease owner (taken by a stock worker).

:class:`LeaseKeeper` and :class:`LeaseSweeper` repair the hour a hard-killed worker's requests
waited under the default visibility timeout (see :mod:`tars_tasks.broker.leases`): every worker
process keeps a lease alive; one live worker at a time restores the messages of owners whose
lease expired and marks their in-flight attempts ``unknown`` (billed, outcome unknown).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta

import redis

from config.keys import lease_key, lease_sweep_lock_key
from tars_tasks.broker import leases

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


class LeaseKeeper:
    """Keeps this worker process's lease alive (and publishes its writer's health in it)."""

    def __init__(self, *, settings, node: str | None = None) -> None:
        self.settings = settings
        self.owner = leases.claim_owner(node=node)
        self.key = lease_key(settings.namespace, self.owner)
        self._ttl_ms = int(settings.lease_ttl_s * 1000)
        self._stop = threading.Event()
        self.renewals = 0
        self.lost = 0

    def _client(self):
        from tars_tasks.redis_client import get_redis

        return get_redis(self.settings.broker_redis_url)

    def _value(self) -> str:
        from workers.agent import peek_agent

        agent = peek_agent()
        writer = agent.health() if agent is not None else None
        return json.dumps({"owner": self.owner, "pid": os.getpid(), "at": time.time(), "writer": writer},
                          separators=(",", ":"), default=str)

    def start(self) -> LeaseKeeper:
        try:
            self._client().set(self.key, self._value(), px=self._ttl_ms)
        except redis.RedisError as exc:
            log.warning("could not take lease %s yet (%s); the keeper keeps trying", self.owner, exc)
        threading.Thread(target=self._run, name="tars-lease-keeper", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.settings.lease_renew_interval_s):
            try:
                previous = self._client().set(self.key, self._value(), px=self._ttl_ms, get=True)
                self.renewals += 1
                if previous is None:
                    self.lost += 1
                    log.error("lease %s had expired while this worker was alive (stalled, or Redis was away); "
                              "its messages may have been handed to another worker", self.owner)
            except redis.RedisError as exc:
                log.warning("lease %s not renewed (%s)", self.owner, exc)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._client().delete(self.key)
        except redis.RedisError:
            pass
        leases.release_owner()


class LeaseSweeper:
    """Restores the messages of dead workers (lease expired) and marks their attempts unknown."""

    def __init__(self, *, celery_app, settings) -> None:
        self.app = celery_app
        self.settings = settings
        self._stop = threading.Event()
        self._last_error_at = float("-inf")
        self.restored = 0
        self.marked_unknown = 0
        self.sweeps = 0

    @property
    def grace_s(self) -> float:
        """After losing Redis (or Redis restarting), wait this long: live workers renew first."""
        return self.settings.lease_ttl_s + 2 * self.settings.lease_renew_interval_s

    def start(self) -> LeaseSweeper:
        if self.settings.broker_redis_url is None:
            return self
        threading.Thread(target=self._run, name="tars-lease-sweeper", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.settings.lease_sweep_interval_s):
            try:
                if conn is None:
                    conn = self.app.connection_for_write()
                    conn.ensure_connection(max_retries=1)
                self.sweep(channel=conn.default_channel)
            except Exception as exc:
                self._last_error_at = time.monotonic()
                log.warning("lease sweep failed (%s)", exc)
                if conn is not None:
                    try:
                        conn.release()
                    except Exception:
                        pass
                conn = None
        if conn is not None:
            conn.release()

    def sweep(self, *, channel) -> int:
        """One pass (if this worker holds the fleet-wide lock); returns how many messages it restored."""
        from tars_tasks.redis_client import get_redis

        s = self.settings
        if time.monotonic() - self._last_error_at < self.grace_s:
            return 0
        r = get_redis(s.broker_redis_url)
        lock_ms = max(200, int(s.lease_sweep_interval_s * 900))
        if not r.set(lease_sweep_lock_key(s.namespace), leases.current_owner() or "?", nx=True, px=lock_ms):
            return 0
        if int(r.info("server").get("uptime_in_seconds", 0)) < self.grace_s:
            return 0  # Redis just (re)started: leases it lost are not deaths
        self.sweeps += 1
        me = leases.current_owner()
        dead = {tag: owner for tag, owner in leases.dead_tags(r, namespace=s.namespace).items() if owner != me}
        restored = 0
        if dead:
            restored = leases.restore_dead(channel, sorted(dead))
            self.restored += restored
            log.warning("restored %d message(s) held by %d dead worker process(es): %s", restored,
                        len(set(dead.values())), ", ".join(sorted(set(dead.values()))))
        self.marked_unknown += self._mark_unknown(r)
        return restored

    def _mark_unknown(self, r) -> int:
        """In-flight attempts whose worker has no lease: billed, outcome unknown."""
        from sqlalchemy import select, update

        from tars_tasks.codes import AttemptOutcome
        from tars_tasks.db.engine import get_engine
        from tars_tasks.db.models import ApiCall

        s = self.settings
        api = ApiCall.__table__
        engine = get_engine(s.database_url)
        with engine.connect() as conn:
            workers = [w for w in conn.execute(
                select(api.c.worker).where(api.c.outcome == AttemptOutcome.IN_FLIGHT).distinct()).scalars() if w]
        if not workers:
            return 0
        pipe = r.pipeline(transaction=False)
        for w in workers:
            pipe.exists(lease_key(s.namespace, w))
        dead = [w for w, alive in zip(workers, pipe.execute(), strict=True) if not alive]
        if not dead:
            return 0
        with engine.begin() as conn:
            n = conn.execute(update(api).where(api.c.outcome == AttemptOutcome.IN_FLIGHT, api.c.worker.in_(dead))
                             .values(outcome=AttemptOutcome.UNKNOWN)).rowcount
        if n:
            log.warning("%d in-flight attempt(s) of dead worker(s) %s marked unknown (billed, outcome unknown)",
                        n, ", ".join(dead))
        return n or 0


class LostRequestReconciler:
    #: At most this many lost requests re-published per sweep.
    BATCH_MAX = 500

    def __init__(self, *, celery_app, settings) -> None:
        self.app = celery_app
        self.settings = settings
        self._stop = threading.Event()
        self.requeued = 0

    def start(self) -> LostRequestReconciler:
        if self.settings.broker_redis_url is None:
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
        """One pass (if this worker holds the fleet-wide lock); returns how many were re-published.

        Lost: still ``queued`` after ``requeue_lost_after_s``, no attempt in flight (attempts of
        dead workers were marked ``unknown`` by the lease sweeper), its tier's queue empty and its
        id in no worker's ``unacked`` entry. A request whose task died without a verdict (acked
        after an error, in an older version) is found the same way.
        """
        from sqlalchemy import exists, select

        from config.catalog import load_catalog
        from config.keys import UNACKED_KEY, reconcile_lock_key
        from tars_tasks.broker.depths import waiting_by_tier
        from tars_tasks.codes import AttemptOutcome, RequestStatus
        from tars_tasks.db.engine import get_engine
        from tars_tasks.db.models import ApiCall, Request
        from tars_tasks.publish import ToStage, publish_request, stage_requests
        from tars_tasks.redis_client import get_redis
        from tars_tasks.staging import staged_tokens

        s = self.settings
        r = get_redis(s.broker_redis_url)
        if not r.set(reconcile_lock_key(s.namespace), "1", nx=True, ex=max(1, int(s.reconcile_interval_s))):
            return 0
        req, api = Request.__table__.c, ApiCall.__table__.c
        cutoff = datetime.now(UTC) - timedelta(seconds=s.requeue_lost_after_s)
        with get_engine(s.database_url).connect() as conn:
            rows = conn.execute(
                select(req.id, req.tier_requested, req.tier_queued, req.tenant, req.priority, req.prompt, req.system,
                       req.messages, req.max_tokens)
                .where(req.status == RequestStatus.QUEUED, req.submitted_at < cutoff,
                       ~exists().where(api.request_id == req.id, api.outcome == AttemptOutcome.IN_FLIGHT))
                .limit(self.BATCH_MAX)
            ).all()
        if not rows:
            return 0
        # queued *or staged* (waiting for dispatch): a staged request is not lost, however long it waits
        depths = waiting_by_tier(s)
        held = b"".join(r.hvals(UNACKED_KEY))
        lost = [row for row in rows
                if depths.get(row.tier_queued or row.tier_requested, 0) == 0 and row.id.encode() not in held]
        if not lost:
            return 0
        for row in lost:
            log.warning("request %s was lost (queued since before %s, in no queue or staging, held by no worker, "
                        "nothing in flight); %s it again", row.id, cutoff.isoformat(),
                        "staging" if s.dispatch_enabled else "publishing")
        if s.dispatch_enabled:
            catalog = load_catalog(s.catalog_path)
            stage_requests(self.app, redis_client=r, namespace=s.namespace, requests=[
                ToStage(request_id=row.id, tier=(tier := row.tier_queued or row.tier_requested), tenant=row.tenant,
                        priority=row.priority,
                        tokens=staged_tokens(spec=catalog.spec(tier), prompt=row.prompt, system=row.system,
                                             messages=row.messages, max_tokens=row.max_tokens))
                for row in lost])
        else:
            with self.app.producer_or_acquire() as producer:
                for row in lost:
                    publish_request(self.app, producer=producer, request_id=row.id,
                                    tier=row.tier_queued or row.tier_requested, tenant=row.tenant,
                                    priority=row.priority, reply_to=None)
        self.requeued += len(lost)
        return len(lost)
