"""The batch runner: gathers batch-lane requests into provider batches, submits, polls, records.

One tick (:meth:`BatchRunner.tick`), run by the one runner holding the Postgres advisory lock
(``tars batch-runner``; several may run, one acts — the lock dies with its connection, so a
SIGKILLed runner hands over at once):

1. **form** — per tier, the queued batch-lane requests in no batch yet (oldest first, at most
   ``batch_max_requests``), once there are ``batch_max_requests`` of them or the oldest has waited
   ``batch_max_age_s``: one transaction inserts the ``provider_batches`` row (``pending``) and a
   ``batch_items`` row per request (its primary key is the request id: a request is in one batch
   at most). Nothing has been sent yet.
2. **submit** — ``pending`` -> ``submitting`` (committed, with the time) -> the provider's create
   call -> ``submitted`` with the provider's batch id (committed). A batch found ``submitting`` was
   left by a runner that died (or a create call that failed) somewhere in that window: the
   provider's batch list is searched first (:meth:`find`: OpenAI by ``metadata.tars_batch``,
   Anthropic by creation time and request count) and a batch found is adopted; only if there is
   none is the batch created again.
3. **poll** — every ``batch_poll_interval_s`` per batch; when it has ended, its results are
   read and written like a worker's: per request an ``api_calls`` row (its id derived from batch
   and request, so writing again changes nothing) with every token class at the catalog's batch
   price, the request finished once (the writer's finish-once UPDATE, totals recomputed from
   ``api_calls``), the producer's completion notice. Then one transaction marks the items, moves
   the requests the batch did not answer to the interactive lane (``batch_retry_policy``) and the
   batch ``done``; those requests are staged for their tier after the commit (if the runner dies
   first, the lost-request reconciler stages them: they are ``queued``, interactive, in no queue).

``batch_crash_at`` (tests) SIGKILLs the process at ``formed``, ``before_submit``, ``after_submit``,
``polling`` or ``mid_results``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Engine, and_, exists, insert, select, text, update

from config.catalog import Catalog, ModelSpec
from config.keys import batch_runner_heartbeat_key
from config.settings import Settings
from tars_tasks.cache import CachedAnswer, ResponseCache
from tars_tasks.codes import AttemptOutcome, FailureReason, RequestStatus
from tars_tasks.db.models import BatchItem, ProviderBatch, Request
from tars_tasks.errors import ProviderError
from tars_tasks.notify import LocalNotifier, Notifier, RedisNotifier
from tars_tasks.schemas import LANE_BATCH, LANE_INTERACTIVE
from workers.batchlane.api import (
    ERRORED,
    MISSING,
    SUCCEEDED,
    BatchRefused,
    ItemResult,
    batch_api,
)
from workers.loader import RequestRow
from workers.records import AttemptRecord, FinishRecord
from workers.writer import GroupCommitWriter

log = logging.getLogger(__name__)

#: Postgres advisory lock key of the active batch runner ("TARSBATC").
LOCK_KEY = 0x5441525342415443 & 0x7FFFFFFFFFFFFFFF
#: Namespace of the attempt ids of batch results (uuid5 of batch id and request id).
ATTEMPT_NS = uuid.UUID("6f1c1b52-7d7e-4a43-9a57-3f0c6a1b0b7e")

PENDING, SUBMITTING, SUBMITTED, DONE = "pending", "submitting", "submitted", "done"
#: The heartbeat outlives three of the runner's loops, and never less than this (seconds).
HEARTBEAT_MIN_TTL_S = 30.0

_req = Request.__table__
_pb = ProviderBatch.__table__
_bi = BatchItem.__table__


def attempt_id(batch_id: str, request_id: str) -> str:
    return str(uuid.uuid5(ATTEMPT_NS, f"{batch_id}/{request_id}"))


class BatchRunner:
    def __init__(self, *, settings: Settings, catalog: Catalog, engine: Engine, writer: GroupCommitWriter | None = None,
                 notifier: Notifier | None = None, celery_app: Any = None) -> None:
        self.settings = settings
        self.catalog = catalog.with_overrides(provider=settings.provider_override, base_url=settings.provider_base_url)
        self.engine = engine
        if notifier is None:
            if settings.shared_redis_url:
                from tars_tasks.redis_client import get_redis

                notifier = RedisNotifier(get_redis(settings.shared_redis_url))
            else:
                notifier = LocalNotifier()
        self.celery_app = celery_app
        self.writer = writer or GroupCommitWriter(engine=engine, notifier=notifier,
                                                  batch_max=settings.writer_batch_max,
                                                  linger_ms=settings.writer_linger_ms,
                                                  retry_max_s=settings.writer_retry_max_s,
                                                  on_finished=self._jobs_hook(notifier))
        self.name = f"batch-runner@{socket.gethostname()}:{os.getpid()}"
        from tars_tasks.budgets import Budgets

        #: Tenants' (and the fleet's) budgets: each member's worst case at the batch price is
        #: reserved before its batch is sent and settled when its result is written.
        self.budgets = Budgets.for_settings(settings) if settings.budgets_enabled else None
        #: The response cache the batch's answers fill (None: no TARS_CACHE_URL).
        self.cache = ResponseCache.for_settings(settings)
        self._lock_conn = None
        self._next_poll: dict[str, float] = {}
        self._crashed_at: set[str] = set()
        self.counts: dict[str, int] = defaultdict(int)

    def _app(self) -> Any:
        """The Celery app the runner publishes with (the one given, or made once: no connection until used)."""
        if self.celery_app is None:
            from tars_tasks.celery_app import make_app

            self.celery_app = make_app(self.settings, producer=True)
        return self.celery_app

    def _jobs_hook(self, notifier: Notifier):
        """A batch-lane job step finished here schedules the job's next steps in the same commit, as a
        worker's finish does (tars_tasks.jobs). If the runner dies after that commit and before they
        are sent, they are ``queued`` in no queue: the lost-request reconciler stages them."""
        from tars_tasks.jobs.store import JobStore

        return JobStore(settings=self.settings, catalog=self.catalog, engine=self.engine,
                        celery_app=self._app(), notifier=notifier).on_finished

    # --- the lock -----------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Hold the runner lock (a session advisory lock on a connection kept open); False if another has it."""
        if self._lock_conn is not None:
            try:  # a connection Postgres dropped (a restart) took the lock with it: take it again
                self._lock_conn.execute(text("SELECT 1"))
                self._lock_conn.commit()
                return True
            except Exception:
                log.warning("the batch runner lock's connection is gone; taking the lock again")
                try:
                    self._lock_conn.invalidate()
                    self._lock_conn.close()
                except Exception:
                    pass
                self._lock_conn = None
        conn = self.engine.connect()
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar()
        conn.commit()
        if not got:
            conn.close()
            return False
        self._lock_conn = conn
        return True

    def release(self) -> None:
        if self._lock_conn is not None:
            try:
                self._lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                self._lock_conn.commit()
            finally:
                self._lock_conn.close()
                self._lock_conn = None

    def close(self) -> None:
        self.release()
        self.writer.close()

    # --- the loop -----------------------------------------------------------------------------

    def run(self, *, stop: Any = None) -> None:
        """Tick every ``batch_poll_interval_s`` (sooner while batches wait to be formed) until ``stop`` is set."""
        interval = self.settings.batch_poll_interval_s
        wait = min(interval, max(0.2, self.settings.batch_max_age_s / 4 or interval))
        while stop is None or not stop.is_set():
            self.heartbeat(ttl_s=max(HEARTBEAT_MIN_TTL_S, 3 * wait))
            try:
                self.tick()
            except Exception:
                log.exception("batch runner tick failed; trying again in %.1fs", interval)
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)

    def tick(self) -> dict[str, int]:
        if not self.acquire():
            return {"active": 0}
        formed = self.form()
        for b in self._batches(PENDING, SUBMITTING):
            self.submit(b)
        polled = self.poll()
        return {"active": 1, "formed": formed, "polled": polled}

    def heartbeat(self, *, ttl_s: float) -> None:
        """Say "this host's runner looped" for ``ttl_s`` (``tars fleet healthcheck batch-runner``); a
        standby runner, which holds no lock, beats too. A Redis that does not answer is logged, not fatal."""
        url = self.settings.shared_redis_url
        if url is None:
            return
        try:
            from tars_tasks.redis_client import get_redis

            get_redis(url).set(batch_runner_heartbeat_key(self.settings.namespace, socket.gethostname()),
                               self.name, px=int(ttl_s * 1000))
        except Exception as exc:
            log.warning("batch runner heartbeat not written: %s", exc)

    def _crash(self, point: str) -> None:
        if self.settings.batch_crash_at == point and point not in self._crashed_at:
            self._crashed_at.add(point)
            log.warning("batch_crash_at=%s: killing this process", point)
            os.kill(os.getpid(), signal.SIGKILL)

    # --- 1. form ------------------------------------------------------------------------------

    def form(self, *, now: datetime | None = None) -> int:
        """Gather the waiting batch-lane requests of every tier into batches; return how many were formed."""
        s = self.settings
        formed = 0
        for tier in self.catalog.tiers:
            spec = self.catalog.spec(tier)
            while True:
                now = datetime.now(UTC)
                with self.engine.begin() as conn:
                    rows = conn.execute(
                        select(_req.c.id, _req.c.submitted_at)
                        .where(_req.c.lane == LANE_BATCH, _req.c.status == RequestStatus.QUEUED,
                               _req.c.tier_queued == tier, ~exists().where(_bi.c.request_id == _req.c.id))
                        .order_by(_req.c.submitted_at, _req.c.id)
                        .limit(s.batch_max_requests)
                        .with_for_update(skip_locked=True)
                    ).all()
                    if not rows:
                        break
                    full = len(rows) >= s.batch_max_requests
                    if not full and (now - rows[0].submitted_at).total_seconds() < s.batch_max_age_s:
                        break
                    bid = str(uuid.uuid4())
                    conn.execute(insert(_pb).values(id=bid, tier=tier, provider=spec.provider, model=spec.model,
                                                    state=PENDING, request_count=len(rows), created_at=now))
                    conn.execute(insert(_bi), [{"request_id": r.id, "batch_id": bid} for r in rows])
                formed += 1
                log.info("formed batch %s: %d %s request(s)", bid, len(rows), tier)
                self._crash("formed")
                if not full:
                    break
        return formed

    # --- 2. submit ----------------------------------------------------------------------------

    def _batches(self, *states: str) -> list[Any]:
        with self.engine.connect() as conn:
            return conn.execute(select(_pb).where(_pb.c.state.in_(states)).order_by(_pb.c.created_at)).all()

    def _members(self, batch_id: str) -> list[RequestRow]:
        from workers.loader import _COLUMNS

        with self.engine.connect() as conn:
            rows = conn.execute(select(*_COLUMNS).join(_bi, _bi.c.request_id == _req.c.id)
                                .where(_bi.c.batch_id == batch_id).order_by(_req.c.id)).all()
        return [RequestRow(**r._mapping) for r in rows]

    def submit(self, b: Any) -> None:
        spec = self.catalog.spec(b.tier)
        api = batch_api(spec)
        try:
            if b.state == SUBMITTING:  # a submit that may have reached the provider: look for it first
                known = self._known_ids()
                found = api.find(tars_batch_id=b.id, request_count=b.request_count, since=b.submit_started_at,
                                 known=known)
                if found is not None:
                    log.warning("batch %s: adopting provider batch %s created by an interrupted submit", b.id, found)
                    self._record_submitted(b.id, found, None)
                    self.counts["adopted"] += 1
                    return
            members = self._reserve_budgets(b, spec, [m for m in self._members(b.id)
                                                      if m.status == RequestStatus.QUEUED])
            items = [(m.id, m.model_request()) for m in members]
            if not items:
                self._finish_batch(b.id, outcomes={}, retry=[], error="no queued member left")
                return
            with self.engine.begin() as conn:
                conn.execute(update(_pb).where(_pb.c.id == b.id, _pb.c.state.in_((PENDING, SUBMITTING)))
                             .values(state=SUBMITTING, submit_started_at=datetime.now(UTC), request_count=len(items),
                                     submit_attempts=_pb.c.submit_attempts + 1))
            self._crash("before_submit")
            try:
                sub = api.submit(tars_batch_id=b.id, items=items)
            except BatchRefused as exc:
                log.error("batch %s refused by the provider: %s; its requests go on as the policy says", b.id, exc)
                self.write_results(b, [], refused=str(exc))
                return
            self.counts["submitted"] += 1
            self._crash("after_submit")
            self._record_submitted(b.id, sub.provider_batch_id, sub.input_file_id)
        except ProviderError as exc:  # transient: stays submitting; the next tick looks for it, then retries
            log.warning("batch %s not submitted (%s); trying again next tick", b.id, exc)
        finally:
            api.close()

    def _reserve_budgets(self, b: Any, spec: ModelSpec, members: list[RequestRow]) -> list[RequestRow]:
        """Reserve every member's worst case (its input and output limit at the batch price) against its
        tenant's budget and the fleet's, as the interactive call path does before a call; a member the
        budget refuses fails ``budget`` (no attempt, nothing billed) and is left out of the batch. A
        reservation outliving ``budget_reservation_lease_s`` (a batch takes up to a day) is charged at
        its worst case meanwhile, and its settle corrects that to the real cost."""
        if self.budgets is None or not members:
            return members
        kept, refused = [], []
        for m in members:
            req = m.model_request()
            worst = spec.cost_usd(input_tokens=req.estimated_input_tokens(), output_tokens=req.output_limit(spec),
                                  batch=True)
            refusal = self.budgets.reserve(tenant=m.tenant, reservation_id=attempt_id(b.id, m.id), usd=worst)
            if refusal is None:
                kept.append(m)
                continue
            refused.append(([], FinishRecord(
                request_id=m.id, status=RequestStatus.FAILED, tier_used=b.tier, model=spec.model, worker=self.name,
                started_at=datetime.now(UTC), failure_reason=FailureReason.BUDGET,
                error=f"{FailureReason.BUDGET}: {refusal.owner} has {refusal.used_usd:.6f} of its "
                      f"{refusal.limit_usd:.6f} USD {refusal.period} budget spent or reserved; this batch request "
                      f"may cost {worst:.6f}"),
                None))
        if refused:
            with self.engine.connect() as conn:
                replies = {r.id: r.reply_to for r in conn.execute(
                    select(_req.c.id, _req.c.reply_to).where(_req.c.id.in_([f.request_id for _, f, _ in refused])))}
            self.writer.finish_many([(rows, f, replies.get(f.request_id)) for rows, f, _ in refused])
            log.info("batch %s: %d request(s) refused by their budget", b.id, len(refused))
        return kept

    def _settle_budgets(self, b: Any, members: list[RequestRow]) -> None:
        """Settle each member's reservation to what its batch call cost as recorded (its ``api_calls``
        row, whichever runner wrote it; 0: no call was made, or it went on to the interactive lane,
        which reserves for itself)."""
        if self.budgets is None or not members:
            return
        from decimal import Decimal

        import redis

        from tars_tasks.db.models import ApiCall

        ids = {attempt_id(b.id, m.id): m.id for m in members}
        with self.engine.connect() as conn:
            costs = {ids[r.id]: r.cost_usd for r in conn.execute(
                select(ApiCall.__table__.c.id, ApiCall.__table__.c.cost_usd).where(ApiCall.__table__.c.id.in_(ids)))}

        for m in members:
            try:
                self.budgets.settle(tenant=m.tenant, reservation_id=attempt_id(b.id, m.id),
                                    usd=costs.get(m.id, Decimal(0)))
            except redis.RedisError as exc:  # its lease expires: charged at its worst case
                log.warning("batch %s: budget of request %s not settled (%s)", b.id, m.id, exc)

    def _known_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(select(_pb.c.provider_batch_id)
                                               .where(_pb.c.provider_batch_id.is_not(None)))}

    def _record_submitted(self, batch_id: str, provider_batch_id: str, input_file_id: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(_pb).where(_pb.c.id == batch_id, _pb.c.state.in_((PENDING, SUBMITTING)))
                         .values(state=SUBMITTED, provider_batch_id=provider_batch_id, input_file_id=input_file_id,
                                 submitted_at=datetime.now(UTC)))

    # --- 3. poll and record -------------------------------------------------------------------

    def poll(self) -> int:
        polled = 0
        for b in self._batches(SUBMITTED):
            if time.monotonic() < self._next_poll.get(b.id, 0.0):
                continue
            self._next_poll[b.id] = time.monotonic() + self.settings.batch_poll_interval_s
            api = batch_api(self.catalog.spec(b.tier))
            try:
                st = api.status(b.provider_batch_id)
                polled += 1
                with self.engine.begin() as conn:
                    conn.execute(update(_pb).where(_pb.c.id == b.id)
                                 .values(polls=_pb.c.polls + 1, provider_status=st.provider_status))
                self._crash("polling")
                if st.ended:
                    self.write_results(b, api.results(b.provider_batch_id))
                    self._next_poll.pop(b.id, None)
            except ProviderError as exc:
                log.warning("batch %s (%s): poll failed (%s); next poll in %.0fs", b.id, b.provider_batch_id, exc,
                            self.settings.batch_poll_interval_s)
            finally:
                api.close()
        return polled

    def write_results(self, b: Any, results: list[ItemResult], *, refused: str | None = None) -> None:
        """Record every member's result exactly once (writing again changes nothing), then close the batch."""
        spec = self.catalog.spec(b.tier)
        members = self._members(b.id)
        by_id = {r.custom_id: r for r in results}
        strangers = set(by_id) - {m.id for m in members}
        if strangers:
            log.error("batch %s: %d result(s) for requests not in it (ignored)", b.id, len(strangers))
        with self.engine.connect() as conn:
            meta = {r.id: r for r in conn.execute(select(_req.c.id, _req.c.reply_to, _req.c.submitted_at)
                                                  .where(_req.c.id.in_([m.id for m in members])))}
        now = datetime.now(UTC)
        started = b.submitted_at or b.created_at
        latency_ms = max(0.0, (now - started).total_seconds() * 1000)
        finishes, outcomes, retry = [], {}, []
        for m in members:
            r = by_id.get(m.id) or ItemResult(custom_id=m.id, kind=MISSING)
            outcomes[m.id] = r.kind
            if m.status != RequestStatus.QUEUED:
                continue
            rows, fin = self._verdict(b, spec, m, r, started=started, latency_ms=latency_ms, refused=refused)
            if fin is None:
                retry.append(m.id)
                if rows:
                    finishes.append((rows, None, None))
                continue
            finishes.append((rows, fin, meta[m.id].reply_to if m.id in meta else None))
        half = len(finishes) // 2
        for part, last in ((finishes[:half], False), (finishes[half:], True)):
            done = [(rows, fin, reply) for rows, fin, reply in part if fin is not None]
            calls_only = [rows for rows, fin, _ in part if fin is None]
            if done:
                self.writer.finish_many(done)
            for rows in calls_only:
                self.writer.record(rows)
            if not last:
                self._crash("mid_results")
        self._fill_cache(spec, [m for m in members if m.status == RequestStatus.QUEUED], by_id)
        self._settle_budgets(b, members)  # before the batch is done: a crash here settles again (a no-op)
        self._finish_batch(b.id, outcomes=outcomes, retry=retry, error=refused)
        self.counts["results"] += len(finishes)
        if retry:
            self._send_interactive(retry)

    def _fill_cache(self, spec: ModelSpec, members: list[RequestRow], by_id: dict[str, ItemResult]) -> None:
        """Fill the response cache with the answers just recorded, as a worker's call path does
        (workers/callpath/cache_step.py): only a cacheable request's (its digest is on the row), under
        its digest, for the tier's TTL; the entry's cost is what the batch call cost. Runs after the
        rows are committed; a cache that does not answer is skipped with a warning."""
        if self.cache is None:
            return
        for m in members:
            r = by_id.get(m.id)
            if (m.cache_digest is None or r is None or r.kind != SUCCEEDED or r.usage is None or r.text is None
                    or "\x00" in r.text):
                continue
            answer = CachedAnswer(text=r.text, stop_reason=r.stop_reason, model=spec.model, tier=spec.tier,
                                  cost_usd=spec.usage_cost_usd(r.usage, batch=True), source_request_id=m.id)
            try:
                self.cache.put(key=self.cache.key(model=spec.model, digest=m.cache_digest), answer=answer,
                               ttl_s=spec.cache_ttl_s, digest=m.cache_digest)
            except (redis.RedisError, UnicodeError) as exc:
                log.warning("request %s: response cache not filled (%s)", m.id, exc)

    def _verdict(self, b: Any, spec: ModelSpec, m: RequestRow, r: ItemResult, *, started: datetime,
                 latency_ms: float, refused: str | None) -> tuple[list[AttemptRecord], FinishRecord | None]:
        """A member's api_calls rows and finish (None: it goes on to the interactive lane or fails by policy)."""
        call = AttemptRecord(id=attempt_id(b.id, m.id), request_id=m.id, attempt=1, tier=b.tier,
                             provider=spec.provider, model=spec.model, outcome=AttemptOutcome.OK, worker=self.name,
                             started_at=started, finished_at=datetime.now(UTC), latency_ms=latency_ms)
        fin = FinishRecord(request_id=m.id, status=RequestStatus.SUCCEEDED, tier_used=b.tier, model=spec.model,
                           worker=self.name, started_at=started)
        if r.kind == SUCCEEDED and r.usage is not None:
            call = call.replace(http_status=200, cost_usd=spec.usage_cost_usd(r.usage, batch=True), **r.usage.columns())
            return [call], fin.replace(result=r.text, stop_reason=r.stop_reason)
        if r.kind == ERRORED and r.error is not None:
            call = call.replace(outcome=AttemptOutcome(r.error.outcome), http_status=r.http_status,
                                error=str(r.error)[:2000])
            if r.permanent:
                return [call], fin.replace(status=RequestStatus.FAILED, failure_reason=FailureReason.of(r.error),
                                           error=f"{FailureReason.of(r.error)} in provider batch "
                                                 f"{b.provider_batch_id}: {r.error}")
            if self.settings.batch_retry_policy == "fail":
                return [call], fin.replace(status=RequestStatus.FAILED, failure_reason=FailureReason.of(r.error),
                                           error=f"{FailureReason.of(r.error)} in provider batch "
                                                 f"{b.provider_batch_id}: {r.error}")
            return [call], None
        # expired, canceled, missing from the results, or the whole batch refused: no call was made
        if self.settings.batch_retry_policy == "fail":
            why = refused or f"{r.kind} in provider batch {b.provider_batch_id}"
            return [], fin.replace(status=RequestStatus.FAILED, failure_reason=FailureReason.BATCH_EXPIRED,
                                   error=f"{FailureReason.BATCH_EXPIRED}: {why}")
        return [], None

    def _finish_batch(self, batch_id: str, *, outcomes: dict[str, str], retry: list[str], error: str | None) -> None:
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            for kind in {*outcomes.values()}:
                ids = [rid for rid, k in outcomes.items() if k == kind]
                conn.execute(update(_bi).where(_bi.c.batch_id == batch_id, _bi.c.request_id.in_(ids))
                             .values(outcome=kind))
            if retry:
                conn.execute(update(_req).where(_req.c.id.in_(retry), _req.c.status == RequestStatus.QUEUED,
                                                _req.c.lane == LANE_BATCH)
                             .values(lane=LANE_INTERACTIVE))
                conn.execute(update(_bi).where(and_(_bi.c.batch_id == batch_id, _bi.c.request_id.in_(retry)))
                             .values(retried=True))
            conn.execute(update(_pb).where(_pb.c.id == batch_id)
                         .values(state=DONE, done_at=now, ended_at=now, error=error))

    def _send_interactive(self, ids: list[str]) -> None:
        """Stage (or publish) requests the batch did not answer, as a producer would; on failure the
        lost-request reconciler stages them (they are queued, interactive, in no queue)."""
        from tars_tasks.publish import ToStage, publish_request, stage_requests
        from tars_tasks.staging import staged_tokens

        s = self.settings
        try:
            app = self._app()
            with self.engine.connect() as conn:
                rows = conn.execute(select(_req.c.id, _req.c.tier_queued, _req.c.tier_requested, _req.c.tenant,
                                           _req.c.priority, _req.c.prompt, _req.c.system, _req.c.messages,
                                           _req.c.max_tokens, _req.c.reply_to)
                                    .where(_req.c.id.in_(ids), _req.c.status == RequestStatus.QUEUED)).all()
            if s.dispatch_enabled and s.broker_redis_url:
                from tars_tasks.redis_client import get_redis

                todo = []
                for row in rows:
                    tier = row.tier_queued or row.tier_requested
                    tokens = staged_tokens(spec=self.catalog.spec(tier), prompt=row.prompt, system=row.system,
                                           messages=row.messages, max_tokens=row.max_tokens)
                    todo.append(ToStage(request_id=row.id, tier=tier, tenant=row.tenant, priority=row.priority,
                                        tokens=tokens, reply_to=row.reply_to))
                stage_requests(app, redis_client=get_redis(s.broker_redis_url), namespace=s.namespace, requests=todo)
            else:
                with app.producer_or_acquire() as producer:
                    for row in rows:
                        publish_request(app, producer=producer, request_id=row.id,
                                        tier=row.tier_queued or row.tier_requested, tenant=row.tenant,
                                        priority=row.priority, reply_to=row.reply_to)
            self.counts["retried_interactive"] += len(rows)
        except Exception:
            log.exception("%d request(s) not sent to the interactive lane; the reconciler will stage them", len(ids))

