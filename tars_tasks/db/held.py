"""One connection kept between closely following uses: the group-commit writer's and the row
loader's, which each use one connection at a time from one thread (a greenlet under gevent).

Checking a connection out of the engine's pool costs a round trip of its own: the pool's
pre-ping (``SELECT 1``) that keeps a connection broken while it sat in the pool from failing a
commit. A busy writer checks one out for every group commit, so every commit waited for two
round trips where one would do. :class:`HeldConnection` keeps the connection while uses follow
each other within ``idle_s``; after a longer pause, after ``max_age_s``, or after any error in a
use, the next use checks one out afresh (and the pool pings it). A connection that breaks while
held fails the use that meets it, as a broken connection does anywhere: the writer and the
loader retry transient errors, and their retry checks out a pinged connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from time import monotonic

from sqlalchemy import Connection, Engine

#: A held connection unused for longer than this is given back; the next use is pinged.
DEFAULT_IDLE_S = 1.0
#: And one held for longer than this (the pool's recycling happens at check-out).
DEFAULT_MAX_AGE_S = 60.0


class HeldConnection:
    """``begin()``: a transaction on the held connection (committed on success, rolled back and
    the connection given back on error); ``connect()``: the same for reads, ended by a rollback."""

    def __init__(self, engine: Engine, *, idle_s: float = DEFAULT_IDLE_S,
                 max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.engine = engine
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._conn: Connection | None = None
        self._taken_at = 0.0
        self._used_at = 0.0

    def _take(self) -> Connection:
        now = monotonic()
        conn = self._conn
        if conn is not None and (conn.closed or conn.invalidated or now - self._used_at > self.idle_s
                                 or now - self._taken_at > self.max_age_s):
            self.release()
            conn = None
        if conn is None:
            conn = self.engine.connect()
            self._conn, self._taken_at = conn, now
        return conn

    def _drop(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        conn = self._take()
        try:
            with conn.begin():
                yield conn
        except BaseException:
            self._drop()
            raise
        self._used_at = monotonic()

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        conn = self._take()
        try:
            yield conn
            conn.rollback()
        except BaseException:
            self._drop()
            raise
        self._used_at = monotonic()

    def release(self) -> None:
        """Give the held connection back to the pool (at close, and before a pause)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
