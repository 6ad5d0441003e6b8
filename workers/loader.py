"""Group reads: many tasks' request rows in one ``SELECT ... WHERE id IN (...)``.

Every delivery reads its request row first (the prompt is not in the message, and a request
that is already terminal must not be called again). Hundreds of greenlets reading one row each
would queue on the connection pool; here one reader thread takes every id asked for within
``linger_ms`` (at most ``batch_max``) and answers them with one query.

A read that fails transiently (database down, connection reset) is retried with bounded
backoff while the task waits — its message stays unacked, so nothing is lost; a permanent
error is raised to the task.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from tars_tasks.db.errors import describe, is_transient
from tars_tasks.db.held import HeldConnection
from tars_tasks.db.models import Request
from workers import pgsql
from workers.providers.request import ModelRequest

log = logging.getLogger(__name__)

_req = Request.__table__.c
_COLUMNS = (_req.id, _req.status, _req.role, _req.tenant, _req.priority, _req.prompt, _req.tier_requested,
            _req.started_at, _req.submitted_at, _req.system, _req.messages, _req.max_tokens, _req.temperature,
            _req.stop, _req.response_format, _req["metadata"], _req.cache_digest, _req.lane)


@dataclass(frozen=True, slots=True)
class RequestRow:
    id: str
    status: str
    role: str
    tenant: str
    priority: int
    prompt: str | None
    tier_requested: str
    started_at: datetime | None
    submitted_at: datetime
    system: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stop: list[str] | None = None
    response_format: str | None = None
    metadata: dict[str, str] | None = None
    #: The response cache's digest (None: not cacheable); the call path fills the cache under it.
    cache_digest: str | None = None
    #: ``interactive``, or ``batch``: left to the batch runner (workers/batchlane/), never called here.
    lane: str = "interactive"

    def model_request(self) -> ModelRequest:
        """What the model is asked: the stored conversation and options (role defaults already in)."""
        return ModelRequest.from_fields(prompt=self.prompt, messages=self.messages, system=self.system,
                                        max_tokens=self.max_tokens, temperature=self.temperature, stop=self.stop,
                                        response_format=self.response_format, metadata=self.metadata)


@dataclass(slots=True)
class _Ask:
    request_id: str
    done: threading.Event
    row: RequestRow | None = None
    error: BaseException | None = None


class RequestLoader:
    def __init__(self, *, engine: Engine, batch_max: int = 500, linger_ms: float = 2.0,
                 retry_max_s: float = 5.0) -> None:
        self.engine = engine
        self.batch_max = batch_max
        self.linger_s = linger_ms / 1000
        self.retry_max_s = retry_max_s
        self._q: queue.Queue[_Ask | None] = queue.Queue()
        #: time.time() since which reads keep failing (None while they succeed)
        self.stalled_since: float | None = None
        self.last_error: str | None = None
        #: the reads' connection, kept while they follow each other (no pre-ping per read)
        self._held = HeldConnection(engine)
        self._thread = threading.Thread(target=self._run, name="tars-row-loader", daemon=True)
        self._closed = False
        self._thread.start()

    def get(self, request_id: str) -> RequestRow | None:
        """The request's row, or None if there is none. Blocks while the database is down."""
        ask = _Ask(request_id=request_id, done=threading.Event())
        self._q.put(ask)
        ask.done.wait()
        if ask.error is not None:
            raise ask.error
        return ask.row

    def pending(self) -> int:
        return self._q.qsize()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(10)

    def _take(self) -> tuple[list[_Ask], bool]:
        first = self._q.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        try:
            while True:
                batch, stop = self._take()
                if batch:
                    self._answer(batch)
                if stop:
                    return
        finally:
            self._held.release()

    def _answer(self, batch: list[_Ask]) -> None:
        delay = 0.05
        while True:
            try:
                rows = self._read(sorted({a.request_id for a in batch}))
                self.stalled_since = None
                break
            except Exception as exc:
                if not is_transient(exc):
                    for a in batch:
                        a.error = exc
                        a.done.set()
                    return
                self.last_error = describe(exc)
                if self.stalled_since is None:
                    self.stalled_since = time.time()
                log.warning("reading %d request row(s) failed (%s); retrying in %.1fs", len(batch), self.last_error,
                            delay)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
        for a in batch:
            a.row = rows.get(a.request_id)
            a.done.set()

    def _read(self, ids: list[str]) -> dict[str, RequestRow]:
        with self._held.connect() as conn:
            if conn.dialect.name == "postgresql":  # one prepared statement, the ids as one array
                return {t[0]: RequestRow(*t) for t in pgsql.load_requests(conn, ids)}
            return _orm_rows(conn, ids)

    def _read_orm(self, ids: list[str]) -> dict[str, RequestRow]:
        """The SQLAlchemy statement on any database (bench/bench_pgwrite.py compares the two)."""
        with self.engine.connect() as conn:
            return _orm_rows(conn, ids)


def _orm_rows(conn: Connection, ids: list[str]) -> dict[str, RequestRow]:
    return {row.id: RequestRow(**row._asdict()) for row in conn.execute(select(*_COLUMNS).where(_req.id.in_(ids)))}
