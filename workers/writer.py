"""Group commit: many tasks' rows in one transaction; each task waits until its rows are durable.

A task hands its rows to :meth:`GroupCommitWriter.finish` and blocks. One writer thread
(a greenlet under gevent) takes everything queued, up to ``batch_max`` entries, waiting at
most ``linger_ms`` for company, and commits it in one transaction: attempt rows are upserted
by attempt id, request rows are finished only if not finished already (the first finish wins;
a redelivered duplicate changes nothing). Then it wakes the waiting tasks — which return,
so Celery acks their messages — and publishes completion notices.

If the database is down the writer retries the same batch with backoff, forever: the tasks
stay blocked and unacked, so a worker killed meanwhile loses nothing (Redis redelivers).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, bindparam, func, or_, select, update

from tars_tasks.db.models import ENQUEUE_FAILED, STATUS_FAILED, STATUS_QUEUED, ApiCall, Request
from tars_tasks.db.upsert import insert_for
from tars_tasks.notify import Notice, Notifier

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 5.0

_api = ApiCall.__table__
_req = Request.__table__
_API_UPDATABLE = ("outcome", "http_status", "error", "input_tokens", "output_tokens", "cost_usd",
                  "latency_ms", "ratelimit_wait_ms", "finished_at")


@dataclass(slots=True)
class _Entry:
    api_rows: list[dict[str, Any]]
    finish: dict[str, Any] | None = None
    reply_to: str | None = None
    done: threading.Event | None = None
    error: BaseException | None = field(default=None)


def _finish_stmt():
    """Finish a request once: only a row still ``queued`` (or failed only for its enqueue) changes.
    Totals come from api_calls, so the request's cost is what every attempt of every delivery cost."""
    a = _api.c
    calls = lambda col: select(col).where(a.request_id == _req.c.id).scalar_subquery()  # noqa: E731
    return (
        update(_req)
        .where(
            _req.c.id == bindparam("b_id"),
            or_(
                _req.c.status == STATUS_QUEUED,
                # marked failed because its publish raised, yet it reached a worker: it was queued
                and_(_req.c.status == STATUS_FAILED, _req.c.started_at.is_(None),
                     _req.c.error.startswith(ENQUEUE_FAILED)),
            ),
        )
        .values(
            status=bindparam("b_status"),
            result=bindparam("b_result"),
            error=bindparam("b_error"),
            tier_used=bindparam("b_tier_used"),
            model=bindparam("b_model"),
            worker=bindparam("b_worker"),
            started_at=bindparam("b_started_at"),
            finished_at=bindparam("b_finished_at"),
            attempts=calls(func.count(a.id)),
            input_tokens=calls(func.coalesce(func.sum(a.input_tokens), 0)),
            output_tokens=calls(func.coalesce(func.sum(a.output_tokens), 0)),
            cost_usd=calls(func.coalesce(func.sum(a.cost_usd), 0)),
        )
    )


class GroupCommitWriter:
    def __init__(
        self, *, engine: Engine, notifier: Notifier | None, batch_max: int = 500, linger_ms: float = 2.0
    ) -> None:
        self.engine = engine
        self.notifier = notifier
        self.batch_max = batch_max
        self.linger_s = linger_ms / 1000.0
        self._q: queue.Queue[_Entry | None] = queue.Queue()
        self._finish = _finish_stmt()
        self._thread = threading.Thread(target=self._run, name="tars-group-commit", daemon=True)
        self._closed = False
        self.batches = 0
        self.entries = 0
        self._thread.start()

    # --- task side -----------------------------------------------------------------------------

    def record(self, api_rows: list[dict[str, Any]], *, wait: bool = True, timeout: float | None = None) -> None:
        """Write attempt rows (an attempt about to start) and, by default, block until durable.

        Waiting is what makes "every call a provider could bill has a row" true even when the
        worker is killed the instant the call goes out: the row is committed before the call.
        """
        entry = _Entry(api_rows=api_rows, done=threading.Event() if wait else None)
        self._q.put(entry)
        if wait:
            self._wait(entry, timeout)

    def finish(
        self, *, api_rows: list[dict[str, Any]], request: dict[str, Any], reply_to: str | None,
        timeout: float | None = None,
    ) -> None:
        """Queue the final rows of a request and block until they are committed."""
        entry = _Entry(api_rows=api_rows, finish=request, reply_to=reply_to, done=threading.Event())
        self._q.put(entry)
        self._wait(entry, timeout)

    @staticmethod
    def _wait(entry: _Entry, timeout: float | None) -> None:
        if not entry.done.wait(timeout):
            raise TimeoutError("rows not durable in time")
        if entry.error is not None:
            raise entry.error

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
        while True:
            batch, stop = self._take_batch()
            if batch:
                self._commit_with_retry(batch)
            if stop:
                return

    def _commit_with_retry(self, batch: list[_Entry]) -> None:
        delay = RETRY_INITIAL_S
        while True:
            try:
                self._commit(batch)
                break
            except Exception as exc:
                log.warning("group commit of %d entries failed (%s); retrying in %.1fs", len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        self.batches += 1
        self.entries += len(batch)
        notices: dict[str, list[Notice]] = defaultdict(list)
        for e in batch:
            if e.finish is not None and e.reply_to:
                notices[e.reply_to].append((e.finish["b_id"], e.finish["b_status"]))
            if e.done is not None:
                e.done.set()
        if notices and self.notifier is not None:
            self.notifier.publish(dict(notices))

    def _commit(self, batch: list[_Entry]) -> None:
        api_rows: dict[str, dict[str, Any]] = {}
        finishes: list[dict[str, Any]] = []
        for e in batch:
            for row in e.api_rows:
                api_rows[row["id"]] = row  # a later version of the same attempt wins
            if e.finish is not None:
                finishes.append(e.finish)
        with self.engine.begin() as conn:
            if api_rows:
                ins = insert_for(conn, _api)
                stmt = ins.on_conflict_do_update(
                    index_elements=["id"], set_={c: getattr(ins.excluded, c) for c in _API_UPDATABLE}
                )
                conn.execute(stmt, list(api_rows.values()))
            if finishes:
                conn.execute(self._finish, finishes)
