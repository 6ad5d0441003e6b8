"""Group commit: many tasks' rows in one transaction; each task waits until its rows are durable.

A task hands its rows to :meth:`GroupCommitWriter.record` (an attempt about to be made) or
:meth:`GroupCommitWriter.finish` (its final rows) and blocks. One writer thread (a greenlet
under gevent) takes everything queued, up to ``batch_max`` entries, waiting at most
``linger_ms`` for company, and commits it in one transaction:

1. the batch's request rows are locked (``FOR UPDATE``, in id order), so two workers finishing
   deliveries of the same request serialise instead of each summing without the other's calls;
2. attempt rows are upserted by attempt id (a later version of an attempt wins);
3. requests are finished only if not finished already (the first finish sets status and result;
   a duplicate delivery changes neither);
4. every touched request's attempts, tokens (every class: input, cache writes, cache reads,
   output) and cost are **recomputed from all its api_calls**, so a request row's totals equal
   the sum of its attempts however many deliveries ran it.

5. the ``on_finished`` hook, if any, runs in the same transaction with the ids of the requests
   finished in the batch that may be job steps (``FinishRecord.job_step`` not False; jobs schedule
   their next steps there: :mod:`tars_tasks.jobs.store`); what it returns runs after the commit
   (publishing those steps).

On Postgres each step is constant SQL run through the same connection and transaction
(:mod:`workers.pgsql`: all four steps in one psycopg pipeline, no SQLAlchemy compilation or
per-row binding; with no hook to run, the pipeline holds the BEGIN and the COMMIT too, so the
whole transaction is one round trip); on any other database (SQLite, embedded) the same steps are
SQLAlchemy statements. Commits that follow each other within a second share one connection
(:class:`tars_tasks.db.held.HeldConnection`): only the first after a pause or an error pays the
pool's pre-ping.

Then it wakes the waiting tasks — which return, so Celery acks their messages — and publishes
completion notices.

Errors (see :mod:`tars_tasks.db.errors`):

* transient (database down, connection lost, deadlock): the same batch is retried with bounded
  backoff, indefinitely; the tasks stay blocked and unacked, so a worker killed meanwhile loses
  nothing. :meth:`health` reports since when commits fail; past ``stall_unhealthy_s`` the
  worker's healthcheck fails.
* permanent (a row that can never be written): the batch is split in halves until the entry that
  fails is alone; the rest commit. That entry's request is finished ``failed`` with reason
  ``unwritable`` and the error (its result dropped); if even that cannot be written (e.g. the
  request row does not exist), the entry is dead-lettered. One bad row never stops another.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, func, or_, select, update

from config.pricing import TOKEN_CLASSES
from tars_tasks.codes import FailureReason, RequestStatus
from tars_tasks.db.errors import describe, is_transient
from tars_tasks.db.held import HeldConnection
from tars_tasks.db.models import ApiCall, DeadLetter, Request
from tars_tasks.db.upsert import insert_for
from tars_tasks.notify import Notice, Notifier
from workers import pgsql
from workers.records import AttemptRecord, FinishRecord

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.1
#: ``failure_reason`` of a request whose rows the database refused.
REASON_UNWRITABLE = FailureReason.UNWRITABLE

_api = ApiCall.__table__
_req = Request.__table__
_API_UPDATABLE = pgsql.API_UPDATABLE
#: Text Postgres cannot store: NUL, and lone surrogates (not encodable as UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class UnwritableRow(Exception):
    """The database refused an entry permanently; the entry was isolated (see module docstring)."""


def storable(text: str | None) -> str | None:
    """``text`` with the characters Postgres cannot store replaced by U+FFFD (for our own
    diagnostic texts: errors, reasons — never for a model's answer, which is not rewritten)."""
    if text is None:
        return None
    return _UNSTORABLE.sub("\ufffd", text)


@dataclass(slots=True)
class _Entry:
    api_rows: list[AttemptRecord]
    finish: FinishRecord | None = None
    reply_to: str | None = None
    done: threading.Event | None = None
    error: BaseException | None = field(default=None)


def _finish_stmt():
    """Finish a request once: only a row still ``queued`` (or failed only for its enqueue) changes."""
    return (
        update(_req)
        .where(
            _req.c.id == bindparam("b_id"),
            or_(
                _req.c.status == RequestStatus.QUEUED,
                # marked failed because its publish raised, yet it reached a worker: it was queued
                and_(_req.c.status == RequestStatus.FAILED, _req.c.started_at.is_(None),
                     _req.c.failure_reason == FailureReason.ENQUEUE_FAILED),
            ),
        )
        .values(
            status=bindparam("b_status"),
            result=bindparam("b_result"),
            error=bindparam("b_error"),
            failure_reason=bindparam("b_failure_reason"),
            stop_reason=bindparam("b_stop_reason"),
            tier_used=bindparam("b_tier_used"),
            model=bindparam("b_model"),
            worker=bindparam("b_worker"),
            started_at=bindparam("b_started_at"),
            finished_at=bindparam("b_finished_at"),
            answered_by=bindparam("b_answered_by"),
            served_mode=func.coalesce(bindparam("b_served_mode", type_=_req.c.served_mode.type), _req.c.served_mode),
        )
    )


def _finish_row(f: FinishRecord) -> dict[str, Any]:
    """The finishing UPDATE's values by column (the keys of :data:`workers.pgsql.FINISH_COLUMNS`)."""
    return {"id": f.request_id, "status": str(f.status), "result": f.result, "error": storable(f.error),
            "failure_reason": None if f.failure_reason is None else str(f.failure_reason),
            "stop_reason": f.stop_reason, "tier_used": f.tier_used, "model": f.model, "worker": f.worker,
            "started_at": f.started_at, "finished_at": f.finished_at,
            # a worker's answer is the model's (a cache hit is finished at submit, never here)
            "answered_by": "model" if f.status == RequestStatus.SUCCEEDED else None,
            "served_mode": f.served_mode}


def _totals_stmt():
    """Set attempts, tokens of every class and cost of the requests ``ids`` to the sums of their api_calls."""
    a = _api.c

    def calls(col):
        return select(col).where(a.request_id == _req.c.id).scalar_subquery()

    return (
        update(_req)
        .where(_req.c.id.in_(bindparam("ids", expanding=True)))
        .values(
            attempts=calls(func.count(a.id)),
            **{c: calls(func.coalesce(func.sum(a[c]), 0)) for c in TOKEN_CLASSES},
            cost_usd=calls(func.coalesce(func.sum(a.cost_usd), 0)),
        )
    )


class GroupCommitWriter:
    def __init__(
        self, *, engine: Engine, notifier: Notifier | None, batch_max: int = 500, linger_ms: float = 2.0,
        retry_max_s: float = 5.0, stall_unhealthy_s: float = 30.0,
        on_finished: Callable[[Connection, list[str]], Callable[[], None] | None] | None = None,
    ) -> None:
        self.engine = engine
        self.notifier = notifier
        self.batch_max = batch_max
        self.linger_s = linger_ms / 1000.0
        self.retry_max_s = retry_max_s
        self.stall_unhealthy_s = stall_unhealthy_s
        #: Runs inside each commit that finishes requests; returns what to run after it commits.
        self.on_finished = on_finished
        self._after_commit: list[Callable[[], None]] = []
        self._q: queue.Queue[_Entry | None] = queue.Queue()
        self._finish = _finish_stmt()
        self._totals = _totals_stmt()
        #: the commits' connection, kept while they follow each other (no pre-ping per commit)
        self._held = HeldConnection(engine)
        self._thread = threading.Thread(target=self._run, name="tars-group-commit", daemon=True)
        self._closed = False
        self.batches = 0
        self.entries = 0
        self.isolated = 0
        #: time.time() since which commits keep failing (None while they succeed)
        self.stalled_since: float | None = None
        self.last_error: str | None = None
        self.last_commit_at: float | None = None
        self._thread.start()

    # --- task side -----------------------------------------------------------------------------

    def record(self, api_rows: list[AttemptRecord], *, wait: bool = True, timeout: float | None = None) -> None:
        """Write attempt rows (an attempt about to start) and, by default, block until durable.

        Waiting is what makes "every call a provider could bill has a row" true even when the
        worker is killed the instant the call goes out: the row is committed before the call.
        Raises :class:`UnwritableRow` if the database refused the rows permanently.
        """
        entry = _Entry(api_rows=list(api_rows), done=threading.Event() if wait else None)
        self._q.put(entry)
        if wait:
            self._wait(entry, timeout)

    def finish(
        self, *, api_rows: list[AttemptRecord], request: FinishRecord, reply_to: str | None,
        timeout: float | None = None,
    ) -> None:
        """Queue the final rows of a request and block until they are committed (or isolated)."""
        entry = _Entry(api_rows=list(api_rows), finish=request, reply_to=reply_to, done=threading.Event())
        self._q.put(entry)
        self._wait(entry, timeout)

    def finish_many(self, items: list[tuple[list[AttemptRecord], FinishRecord, str | None]], *,
                    timeout: float | None = None) -> None:
        """:meth:`finish` for many requests at once (they share commits); blocks until all are durable."""
        entries = [_Entry(api_rows=list(rows), finish=fin, reply_to=reply_to, done=threading.Event())
                   for rows, fin, reply_to in items]
        for e in entries:
            self._q.put(e)
        for e in entries:
            self._wait(e, timeout)

    @staticmethod
    def _wait(entry: _Entry, timeout: float | None) -> None:
        if not entry.done.wait(timeout):
            raise TimeoutError("rows not durable in time")
        if entry.error is not None:
            raise entry.error

    def health(self) -> dict[str, Any]:
        """What the healthcheck, ``tars status`` and the metrics show of this writer."""
        stalled_for = None if self.stalled_since is None else max(0.0, time.time() - self.stalled_since)
        return {"healthy": stalled_for is None or stalled_for < self.stall_unhealthy_s,
                "stalled_for_s": None if stalled_for is None else round(stalled_for, 1),
                "pending": self._q.qsize(), "last_error": self.last_error, "isolated": self.isolated,
                "batches": self.batches, "entries": self.entries, "last_commit_at": self.last_commit_at}

    def close(self, timeout: float = 30.0) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(timeout)

    # --- writer thread -------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[_Entry], bool]:
        first = self._q.get()
        if first is None:
            return [], True
        batch, stop = [first], False
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.batch_max:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._q.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._held.release()

    def _loop(self) -> None:
        while True:
            batch, stop = self._take_batch()
            if batch:
                try:
                    self._write(batch)
                except BaseException as exc:  # never leave a task blocked on a writer that died
                    log.exception("group commit crashed; failing its %d waiting task(s)", len(batch))
                    for e in batch:
                        if e.done is not None and not e.done.is_set():
                            e.error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
                            e.done.set()
            if stop:
                return

    def _write(self, batch: list[_Entry]) -> None:
        self._commit_isolating(batch)
        after, self._after_commit = self._after_commit, []
        for action in after:
            try:
                action()
            except Exception:  # rows are durable and queued: the lost-request reconciler publishes them
                log.exception("after-commit action failed; the reconciler will publish what it left queued")
        self.batches += 1
        self.entries += len(batch)
        notices: dict[str, list[Notice]] = defaultdict(list)
        for e in batch:
            if e.finish is not None and e.reply_to:
                notices[e.reply_to].append((e.finish.request_id, str(e.finish.status)))
            if e.done is not None:
                e.done.set()
        if notices and self.notifier is not None:
            self.notifier.publish(dict(notices))

    def _commit_isolating(self, batch: list[_Entry]) -> None:
        """Commit ``batch``; on a permanent error, split it until the bad entries stand alone."""
        error = self._commit_retrying(batch)
        if error is None:
            return
        if len(batch) > 1:
            mid = len(batch) // 2
            self._commit_isolating(batch[:mid])
            self._commit_isolating(batch[mid:])
            return
        self._isolate(batch[0], error)

    def _commit_retrying(self, batch: list[_Entry]) -> BaseException | None:
        """Commit, retrying transient errors forever; return a permanent error instead of raising."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                self._commit(batch)
            except Exception as exc:
                if not is_transient(exc):
                    return exc
                self.last_error = describe(exc)
                if self.stalled_since is None:
                    self.stalled_since = time.time()
                log.warning("group commit of %d entries failed (%s); retrying in %.1fs", len(batch),
                            self.last_error, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            self.stalled_since = None
            self.last_commit_at = time.time()
            return None

    def _isolate(self, entry: _Entry, error: BaseException) -> None:
        """One entry the database refuses: finish its request failed with the reason, or dead-letter it."""
        self.isolated += 1
        reason = describe(error)
        request_id = (entry.finish.request_id if entry.finish is not None
                      else next((r.request_id for r in entry.api_rows), None))
        log.error("rows of request %s cannot be written (%s); isolating them", request_id, reason)
        if entry.finish is not None:
            failed = entry.finish.replace(
                status=RequestStatus.FAILED, result=None, failure_reason=REASON_UNWRITABLE,
                error=storable(f"{REASON_UNWRITABLE}: the database refused this request's rows: {reason}"))
            rows = [r.replace(error=storable(r.error)) for r in entry.api_rows]
            salvage = _Entry(api_rows=rows, finish=failed, reply_to=entry.reply_to)
            if self._commit_retrying([salvage]) is None:
                entry.finish = failed
                return
            salvage.api_rows = []  # the attempt rows themselves are refused: keep the request's verdict
            if self._commit_retrying([salvage]) is None:
                entry.finish = failed
                self._dead_letter(reason=REASON_UNWRITABLE, request_id=request_id,
                                  detail=f"attempt rows refused: {reason}")
                return
        else:
            entry.error = UnwritableRow(reason)
        self._dead_letter(reason=REASON_UNWRITABLE, request_id=request_id, detail=reason)

    def _dead_letter(self, *, reason: str, request_id: str | None, detail: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(DeadLetter.__table__.insert().values(
                    reason=reason, detail=storable(f"request {request_id}: {detail}")[:10_000], queue=None,
                    received_at=datetime.now(UTC)))
        except Exception:
            log.exception("could not record dead letter for request %s", request_id)

    def _commit(self, batch: list[_Entry]) -> None:
        api_rows: dict[str, dict[str, Any]] = {}
        finishes: list[dict[str, Any]] = []
        for e in batch:
            for rec in e.api_rows:
                api_rows[rec.id] = rec.columns()  # a later version of the same attempt wins
            if e.finish is not None:
                finishes.append(_finish_row(e.finish))
        ids = sorted({r["request_id"] for r in api_rows.values()} | {f["id"] for f in finishes})
        # the hook looks the finished requests up among job steps: not those known to be none
        steps = [e.finish.request_id for e in batch if e.finish is not None and e.finish.job_step is not False]
        hook = self.on_finished if steps else None
        with self._held.begin() as conn:
            if conn.dialect.name == "postgresql":
                # with no hook to run in the transaction, the whole of it is one pipeline
                self._commit_pg(conn, ids, api_rows, finishes, commit=hook is None)
            else:
                self._commit_orm(conn, ids, api_rows, finishes)
            after = hook(conn, steps) if hook is not None else None
        if after is not None:
            self._after_commit.append(after)

    @staticmethod
    def _commit_pg(conn: Connection, ids: list[str], api_rows: dict[str, dict[str, Any]],
                   finishes: list[dict[str, Any]], *, commit: bool) -> None:
        """Postgres: the steps' constant SQL in one pipeline (:func:`workers.pgsql.write_batch`),
        with its BEGIN and COMMIT if ``commit``."""
        pgsql.write_batch(conn, ids=ids, api_rows=list(api_rows.values()), finishes=finishes, commit=commit)

    def _commit_orm(self, conn: Connection, ids: list[str], api_rows: dict[str, dict[str, Any]],
                    finishes: list[dict[str, Any]]) -> None:
        """Any other database (SQLite, embedded): the same steps through SQLAlchemy."""
        if ids:
            conn.execute(select(_req.c.id).where(_req.c.id.in_(ids)).order_by(_req.c.id).with_for_update())
        if api_rows:
            ins = insert_for(conn, _api)
            stmt = ins.on_conflict_do_update(
                index_elements=["id"], set_={c: getattr(ins.excluded, c) for c in _API_UPDATABLE}
            )
            conn.execute(stmt, list(api_rows.values()))
        if finishes:
            conn.execute(self._finish, [{f"b_{k}": v for k, v in f.items()} for f in finishes])
        if ids:
            conn.execute(self._totals, {"ids": ids})
