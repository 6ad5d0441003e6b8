"""Engines and sessions. One engine per process, URL and bounds; URLs are normalised to psycopg 3.

Nothing waits forever on Postgres (docs/OPERATIONS.md, "Timeouts"):

* connecting is bounded by ``db_connect_timeout_s`` (libpq ``connect_timeout``);
* a statement running too long is cancelled by the server (``db_statement_timeout_s``, sent
  as ``statement_timeout`` when the connection opens) — a clean error, the connection lives;
* a session left inside a transaction by a client that froze or died is ended by the server
  (``db_idle_in_transaction_timeout_s``), so its row locks do not block everyone's retries;
* TCP keepalives and ``TCP_USER_TIMEOUT`` close a connection whose peer *host* vanished
  (the client's, and the server's ``tcp_keepalives_*`` for the session, set to the same values);
* and :class:`BoundedConnection` bounds every exchange on the client side
  (``db_io_timeout_s``). That is the one that catches a *frozen* server — a stopped process,
  a proxy or NAT that keeps the socket open but forwards nothing. Its kernel still ACKs what
  we send and answers keepalive probes, so none of the above fires and the client would wait
  for an answer forever (measured: a ``SELECT 1`` through a frozen proxy never returned, with
  keepalives and ``tcp_user_timeout`` set). Past the bound the connection is closed, the
  caller gets an ``OperationalError``, and SQLAlchemy's pool replaces the connection;
* the server process of such a connection may wait for it forever, holding its locks:
  :class:`AbandonedBackends` ends it from the engine's next new connection.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from time import monotonic
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from config.settings import Settings, get_settings
from config.urls import normalise_url  # re-exported: tars_tasks.db.engine.normalise_url

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[tuple[str, tuple], Engine] = {}


class _Silent(Exception):
    """Raised inside a psycopg protocol generator whose server stopped answering."""


def _until_silent_for(gen, silence_s: float):
    """Pass ``gen``'s waits through; raise :class:`_Silent` after ``silence_s`` without the socket
    becoming ready. psycopg's wait loop wakes every 0.1 s (``Connection.wait``'s interval) and then
    sends "nothing happened"; a live server that sends or accepts data resets the clock, so a long
    result that keeps coming is never cut off — only silence is."""
    quiet_since = monotonic()
    try:
        state = next(gen)
        while True:
            ready = yield state
            now = monotonic()
            if ready:
                quiet_since = now
            elif now - quiet_since >= silence_s:
                gen.close()
                raise _Silent
            state = gen.send(ready)
    except StopIteration as stop:
        return stop.value


class BoundedConnection(psycopg.Connection):
    """A psycopg connection on which no wait for the server lasts more than ``io_timeout_s`` of silence.

    Every operation of a psycopg connection — a statement and its whole result, COMMIT,
    ROLLBACK, SQLAlchemy's pre-ping — is one :meth:`wait` on a protocol generator; this one
    wraps the generator (:func:`_until_silent_for`), which works the same with psycopg's C and
    Python wait loops and across psycopg versions. Past the bound the connection is closed (its
    protocol state is unknown: it must never be reused) and ``OperationalError`` is raised,
    which SQLAlchemy takes for a disconnect. The server side of the abandoned connection is
    handed to ``on_abandon`` (see :class:`AbandonedBackends`).
    """

    #: Seconds of silence; None waits as long as the server takes (plain psycopg).
    io_timeout_s: float | None = None
    #: ``(pid, backend_start)`` of this connection's server process, read when it opened.
    backend: tuple[int, Any] | None = None
    on_abandon: Any = None

    def wait(self, gen, *args, **kwargs):
        if self.io_timeout_s is None:
            return super().wait(gen, *args, **kwargs)
        try:
            return super().wait(_until_silent_for(gen, self.io_timeout_s), *args, **kwargs)
        except _Silent:
            if self.backend is not None and self.on_abandon is not None:
                self.on_abandon(self.backend)
            try:
                self.close()
            except Exception:  # pragma: no cover - closing a dead socket cannot matter
                pass
            raise psycopg.OperationalError(
                f"no answer from Postgres within {self.io_timeout_s:g}s (db_io_timeout_s): the connection was "
                "closed and will be replaced"
            ) from None


_BACKEND_IDENTITY = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
_TERMINATE = """
SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity
WHERE (pid, backend_start) IN (SELECT * FROM unnest(%s::int[], %s::timestamptz[]))
  AND usename = current_user AND datname = current_database()
"""


class AbandonedBackends:
    """Server processes of connections this engine gave up on, ended from the next new connection.

    Closing a frozen connection ends only our side. The server may still believe it lives —
    behind a proxy, a NAT or a partition nothing tells it otherwise — and a server process
    caught in the middle of a pipelined ``executemany`` (no Sync yet) waits for the rest of it
    in state ``active``: neither ``statement_timeout`` nor
    ``idle_in_transaction_session_timeout`` applies to it, and it keeps its row locks.
    Measured: the group-commit writer's retries of the same rows then blocked on the unique
    index until ``statement_timeout``, over and over, for good. So the next connection the
    engine opens terminates those processes (``pg_terminate_backend``: allowed on backends of
    one's own role), matched by pid *and* start time, so a reused pid is never hit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[int, Any]] = []
        #: Backends terminated so far (a test and ``tars status`` can read it).
        self.terminated = 0

    def add(self, backend: tuple[int, Any]) -> None:
        with self._lock:
            self._pending.append(backend)

    def terminate_from(self, conn: psycopg.Connection) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            rows = conn.execute(_TERMINATE, ([p for p, _ in pending], [t for _, t in pending])).fetchall()
            conn.commit()
        except psycopg.Error as exc:
            log.warning("could not end %d abandoned Postgres session(s): %s", len(pending), exc)
            conn.rollback()
            return
        self.terminated += sum(1 for _, ok in rows if ok)
        if rows:
            log.warning("ended %d Postgres session(s) of connections that stopped answering: pids %s",
                        len(rows), ", ".join(str(pid) for pid, _ in rows))


def postgres_connect_args(settings: Settings, *, url_options: str | None = None) -> dict[str, Any]:
    """libpq parameters every TARS Postgres connection opens with (bounds and keepalives)."""
    args: dict[str, Any] = {
        "connect_timeout": settings.db_connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": settings.tcp_keepalive_idle_s,
        "keepalives_interval": settings.tcp_keepalive_interval_s,
        "keepalives_count": settings.tcp_keepalive_count,
    }
    if settings.tcp_user_timeout_s:
        args["tcp_user_timeout"] = int(settings.tcp_user_timeout_s * 1000)
    #: the server's side of the same keepalives: it ends a session whose client host vanished
    server = [f"-c tcp_keepalives_idle={settings.tcp_keepalive_idle_s}",
              f"-c tcp_keepalives_interval={settings.tcp_keepalive_interval_s}",
              f"-c tcp_keepalives_count={settings.tcp_keepalive_count}"]
    if settings.db_statement_timeout_s:
        server.append(f"-c statement_timeout={int(settings.db_statement_timeout_s * 1000)}")
    if settings.db_idle_in_transaction_timeout_s:
        server.append(f"-c idle_in_transaction_session_timeout={int(settings.db_idle_in_transaction_timeout_s * 1000)}")
    args["options"] = " ".join([url_options, *server] if url_options else server)
    return args


def _bounds(settings: Settings) -> tuple:
    return (settings.db_connect_timeout_s, settings.db_statement_timeout_s, settings.db_io_timeout_s,
            settings.db_idle_in_transaction_timeout_s, settings.db_end_abandoned_sessions,
            settings.tcp_keepalive_idle_s, settings.tcp_keepalive_interval_s, settings.tcp_keepalive_count,
            settings.tcp_user_timeout_s)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def get_engine(url: str, *, settings: Settings | None = None) -> Engine:
    """The engine of this process for ``url``, bounded by ``settings`` (default: the environment's)."""
    settings = settings or get_settings()
    url = normalise_url(url)
    key = (url, _bounds(settings))
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _make_engine(url, settings)
            _engines[key] = engine
        return engine


def _make_engine(url: str, settings: Settings) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    url_options = parsed.query.get("options")
    connect_args = postgres_connect_args(settings, url_options=url_options if isinstance(url_options, str) else None)
    # hide_parameters: a failed statement's error (and so the worker's log) names the statement, never the
    # rows' values — model answers, prompts and error texts stay out of logs (docs/OPERATIONS.md)
    engine = create_engine(url, pool_size=5, max_overflow=20, pool_pre_ping=True, pool_recycle=1800,
                           connect_args=connect_args, hide_parameters=True)
    io_timeout_s = settings.db_io_timeout_s
    end_abandoned = settings.db_end_abandoned_sessions
    abandoned = AbandonedBackends()
    engine.abandoned_backends = abandoned  # type: ignore[attr-defined]

    @event.listens_for(engine, "do_connect")
    def _bounded_connect(_dialect, _record, cargs, cparams):
        conn = BoundedConnection.connect(*cargs, **cparams)
        conn.io_timeout_s = io_timeout_s
        try:
            conn.backend = conn.execute(_BACKEND_IDENTITY).fetchone()
            conn.commit()
            abandoned.terminate_from(conn)
        except BaseException:
            conn.close()
            raise
        if end_abandoned:
            conn.on_abandon = abandoned.add
        return conn

    return engine


def dispose_engines() -> None:
    """Drop pooled connections (after fork, or in tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()

