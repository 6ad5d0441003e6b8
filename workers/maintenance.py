"""Repairs the fleet runs on a timer inside every worker process.

:class:`LostRequestReconciler` repairs requests the broker lost. Kombu's Redis transport
takes a message with BRPOP and records it as unacked in a *second* round trip; a worker
SIGKILLed between the two, or a Redis restart between them, loses the message although the pop
happened (seen: ``test_a_redis_restart_with_work_queued_and_running_loses_nothing``, one request
of 80; ``test_sigkill_of_a_worker_mid_job``, a job's next step published while the killed worker
sat in BRPOP, 3 runs in 12). The request row is the record, so the fleet can tell: a request
still ``queued`` after ``requeue_lost_after_s`` (5 s), with no attempt in flight, whose message
two sweeps a few seconds apart found in none of its tier's lists, its staging (dispatch,
docs/DISPATCH.md) and no ``unacked`` entry, is lost — and is staged again from its row (with
dispatch off: published). A Redis restart without persistence loses staging with the queues; the
requests come back this way, ``BATCH_MAX`` per sweep. The checks make a duplicate unlikely; if one happens
anyway, the request is still finished once and both calls are on the bill.

:class:`UnackedRestorer` repairs lost messages of dead workers. With ``acks_late`` on Redis a
message a worker holds sits in kombu's ``unacked`` hash until it is acked; if the worker is
SIGKILLed, kombu puts it back once it is older than the visibility timeout — but only from
the idle path of its poller, and Celery's gevent/eventlet event loop ("synloop") never takes
that path: the BRPOP's own timeout reply counts as an event, so "no events" never happens.
Measured here: messages held by a SIGKILLed gevent worker stayed in ``unacked`` indefinitely
while another worker sat idle. This loop calls the same restore on a timer; kombu's Redis
mutex keeps concurrent restores by several workers from duplicating anything. It is the
fallback for messages with no lease owner (taken by a stock worker). It also restores the
messages this process gave up when its broker connection broke while Redis was away
(:func:`tars_tasks.broker.leases.restore_abandoned`).

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


def running_tags() -> set[str]:
    """Delivery tags of the tasks this worker process is running now (Celery's worker state)."""
    from celery.worker import state

    tags = set()
    for req in list(state.active_requests):
        tag = getattr(getattr(req, "_message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(str(tag))
    return tags


class UnackedRestorer:
    def __init__(self, *, celery_app, interval_s: float) -> None:
        self.app = celery_app
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0
        self.restored_abandoned = 0

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
                channel = conn.default_channel
                channel.qos.restore_visible(num=None, interval=1)
                n = leases.restore_abandoned(channel, running=running_tags())
                if n:
                    log.warning("restored %d message(s) this worker had to give up while the broker was away", n)
                self.restored_abandoned += n
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
    #: A tier whose lists hold more messages than this is not searched message by message (its
    #: backlog delays a lost request anyway); it is searched once it has drained below this.
    SCAN_MAX = 2000
    #: A request must be seen absent twice, at least this far apart, before it counts as lost: a
    #: live worker's message is absent from both a list and ``unacked`` only for the moment between
    #: the broker's pop and kombu's unacked record (one round trip).
    CONFIRM_S = 2.0

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

    def sweep(self, *, now: float | None = None) -> int:
        """One pass (if this worker holds the fleet-wide lock); returns how many were re-published.

        Lost: still ``queued`` after ``requeue_lost_after_s``, no attempt in flight (attempts of
        dead workers were marked ``unknown`` by the lease sweeper), and its message in none of its
        tier's lists, its staging and no worker's ``unacked`` entry — in two sweeps at least ``CONFIRM_S``
        apart (first sightings are kept in Redis, so the confirming sweep may run in another
        worker). A request whose task died without a verdict is found the same way.
        """
        from sqlalchemy import exists, select

        from config.keys import reconcile_absent_key, reconcile_lock_key
        from tars_tasks.broker.depths import waiting_by_tier
        from tars_tasks.broker.presence import ids_in_broker
        from tars_tasks.codes import AttemptOutcome, RequestStatus
        from tars_tasks.db.engine import get_engine
        from tars_tasks.db.models import ApiCall, Request
        from tars_tasks.redis_client import get_redis

        s = self.settings
        r = get_redis(s.broker_redis_url)
        if not r.set(reconcile_lock_key(s.namespace), "1", nx=True, px=max(100, int(s.reconcile_interval_s * 900))):
            return 0
        absent_key = reconcile_absent_key(s.namespace)
        req, api = Request.__table__.c, ApiCall.__table__.c
        cutoff = datetime.now(UTC) - timedelta(seconds=s.requeue_lost_after_s)
        with get_engine(s.database_url).connect() as conn:
            rows = conn.execute(
                select(req.id, req.tier_requested, req.tier_queued, req.tenant, req.priority, req.prompt, req.system,
                       req.messages, req.max_tokens)
                .where(req.status == RequestStatus.QUEUED, req.submitted_at < cutoff,
                       req.lane != "batch",  # a batch-lane request waits for the batch runner, in no queue
                       ~exists().where(api.request_id == req.id, api.outcome == AttemptOutcome.IN_FLIGHT))
                .order_by(req.submitted_at)
                .limit(self.BATCH_MAX)
            ).all()
        if not rows:
            r.delete(absent_key)
            return 0
        depths = waiting_by_tier(s)  # queued and staged for dispatch
        searchable = {t for t, d in depths.items() if d <= self.SCAN_MAX}
        candidates = [row for row in rows if (row.tier_queued or row.tier_requested) in searchable]
        present = ids_in_broker(r, ids=[c.id for c in candidates],
                                tiers={c.tier_queued or c.tier_requested for c in candidates}, namespace=s.namespace)
        absent = {c.id: c for c in candidates if c.id not in present}
        now = time.time() if now is None else now
        seen = {k.decode(): float(v) for k, v in r.hgetall(absent_key).items()}
        lost = [c for rid, c in absent.items() if rid in seen and now - seen[rid] >= self.CONFIRM_S]
        pipe = r.pipeline(transaction=False)
        pipe.delete(absent_key)
        keep = {rid: seen.get(rid, now) for rid in absent if rid not in {c.id for c in lost}}
        if keep:
            pipe.hset(absent_key, mapping={k: repr(v) for k, v in keep.items()})
            pipe.expire(absent_key, max(60, int(s.requeue_lost_after_s * 10)))
        pipe.execute()
        if not lost:
            return 0
        for row in lost:
            log.warning("request %s was lost (queued since before %s, in no queue or staging, held by no worker, "
                        "nothing in flight); %s it again", row.id, cutoff.isoformat(),
                        "staging" if s.dispatch_enabled else "publishing")
        self._send_again(r, lost)
        self.requeued += len(lost)
        return len(lost)

    def _send_again(self, broker_redis, lost) -> None:
        """Stage the lost requests again (dispatch on: they wait where priority applies), or publish them."""
        from config.catalog import load_catalog
        from tars_tasks.publish import ToStage, publish_request, stage_requests
        from tars_tasks.staging import staged_tokens

        s = self.settings
        if s.dispatch_enabled:
            catalog = load_catalog(s.catalog_path)
            todo = []
            for row in lost:
                tier = row.tier_queued or row.tier_requested
                tokens = staged_tokens(spec=catalog.spec(tier), prompt=row.prompt, system=row.system,
                                       messages=row.messages, max_tokens=row.max_tokens)
                todo.append(ToStage(request_id=row.id, tier=tier, tenant=row.tenant, priority=row.priority,
                                    tokens=tokens))
            stage_requests(self.app, redis_client=broker_redis, namespace=s.namespace, requests=todo)
            return
        with self.app.producer_or_acquire() as producer:
            for row in lost:
                publish_request(self.app, producer=producer, request_id=row.id,
                                tier=row.tier_queued or row.tier_requested, tenant=row.tenant,
                                priority=row.priority, reply_to=None)


class FleetModeKeeper:
    """Re-decides the fleet's degradation mode every ``mode_interval_s`` from this worker too
    (tars_tasks/fleetmode.py), so the mode follows the load down when producers stop submitting
    (a drain, a quiet night) and its transitions are recorded then, not at the next submit. The
    decision is one script in Redis: any number of workers and producers agree."""

    def __init__(self, *, settings, catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self._stop = threading.Event()

    def start(self) -> FleetModeKeeper:
        if self.settings.shared_redis_url is None:
            return self
        threading.Thread(target=self._run, name="tars-fleet-mode", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from tars_tasks.db.engine import get_engine
        from tars_tasks.fleetmode import FleetModeSource

        source = FleetModeSource.for_settings(settings=self.settings, catalog=self.catalog,
                                              engine=get_engine(self.settings.database_url))
        while source is not None and not self._stop.wait(self.settings.mode_interval_s):
            try:
                source.current()
            except Exception as exc:
                log.warning("fleet mode not re-decided (%s)", exc)
