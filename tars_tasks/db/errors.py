"""Telling a database error that will pass (retry it) from one that never will (isolate it).

Retrying *every* error forever turned one unwritable row (a foreign key, a NUL character) into
a stalled worker; failing on every error turned a Postgres restart into failed requests. So:

* **transient** — the database could not be reached or the transaction lost a race: connection
  refused/reset/closed, pool timeout, deadlock, serialization failure, admin shutdown,
  "database is locked" (SQLite). Retry the same work with backoff.
* **permanent** — the statement itself can never succeed: constraint violations, values the
  column refuses (NUL, out of range, too long), a bad statement, a value the driver cannot
  encode (lone surrogates). Retrying is pointless; isolate the entry that caused it.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

_PERMANENT_DBAPI = (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError, sa_exc.NotSupportedError)


def is_transient(error: BaseException) -> bool:
    """True if the same work may succeed when retried later."""
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        return not isinstance(error, _PERMANENT_DBAPI)
    if isinstance(error, sa_exc.StatementError):
        # raised while preparing parameters (e.g. a value the driver cannot encode)
        return False
    if isinstance(error, sa_exc.DisconnectionError | sa_exc.TimeoutError | ConnectionError | TimeoutError | OSError):
        return True
    return False


def describe(error: BaseException, *, limit: int = 300) -> str:
    """One line naming the error, without SQL or bound parameters (they may hold user data)."""
    orig = getattr(error, "orig", None) or error
    text = " ".join(str(orig).split()) or type(orig).__name__
    text = f"{type(orig).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
