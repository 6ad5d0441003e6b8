"""The writer's and the loader's statements as plain Postgres SQL (psycopg 3), compiled by nobody.

SQLAlchemy compiled and bound every row of every batch (an ``executemany`` of the finishing
UPDATE, the attempt upsert): about a fifth of a worker's CPU in issue 13's profile. Here the SQL
is constant text, in two forms for each per-row step (attempt upsert, finish, totals): a
statement per row (psycopg's pipelined ``executemany``, prepared once per connection) and one
statement for the whole step, each column's values as one array (``unnest``, binary parameters).
The writer takes the set form from :data:`SETS_FROM` rows of a step on. The lock and the loader's
read are one statement with an array of ids, probed id by id (see ``_BY_ID`` below: why no
statement may leave the plan a choice of scanning a whole table).

Why both: a gevent worker's psycopg waits in Python (``wait_poll`` on gevent's poll: the C wait
loop is not used once ``select`` is patched), and a pipeline passes through that wait once per
statement it sends, so a statement per row costs the client a poll per row. ``bench/bench_pgwrite.py
--gevent --rounds 10 --repeat 20`` (2026-12-07), client / server CPU per entry (two attempts, a
finish, totals): batches of 3, rows 226 / 183 us, sets 218 / 350 us; of 8, rows 150 / 119, sets
90 / 100; of 100, rows 106 / 93, sets 23 / 56 (SQLAlchemy: 515, 265, 145 us of client CPU); the
binding shared with the submit insert since costs the sets ~2 us more per entry at 100. An
array must be of one Python type (psycopg refuses ``[Decimal, float]``): the arrays are bound as
:mod:`tars_tasks.db.bulk` binds the submit insert's, by the columns' types.

The statements run on the caller's SQLAlchemy connection (the loader's through
``Connection.exec_driver_sql``, the writer's on its driver connection, :func:`write_batch`): the
same transaction as before (the ``on_finished`` hook still gets that connection), the same pool,
pre-ping and invalidation of a connection a Postgres restart broke, the same SQLAlchemy exceptions
for :mod:`tars_tasks.db.errors` to classify. Only SQL compilation and SQLAlchemy's
per-row parameter handling are gone. The schema stays Alembic's
(``tests/integration/test_pg_statements.py`` checks the rows against the ORM statements').

A group commit's four steps go out in **one psycopg pipeline** (:func:`write_batch`): sent
together, their results read at one sync, then the COMMIT — two round trips where one per step
and a sync per ``executemany`` made five. (Three in fact: psycopg syncs after the BEGIN it sends
before a pipeline's first statement. With nothing else to run in the transaction, the pipeline
now holds our own BEGIN and COMMIT on a connection put in autocommit for it: one round trip. The
loader's read, one statement, likewise runs in autocommit: one round trip, not BEGIN, SELECT,
ROLLBACK; libpq's trace counts them in ``tests/integration/test_pg_statements.py``.)
On this 2-core machine a round trip through the driver costs the client ~0.1 ms of CPU;
``bench/bench_pgwrite.py`` measured the client CPU per entry at
batches of 1, 5 and 100 (medians of 40 alternated rounds, quiet machine, 2026-12-03): 1,819 / 469 /
155 us one step at a time, 1,323 / 345 / 137 us pipelined.
A pipeline's errors surface at its sync, outside SQLAlchemy's execute, so :func:`write_batch`
wraps them as SQLAlchemy does (the same exception classes, a broken connection invalidated) for
:mod:`tars_tasks.db.errors` to classify as before.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from config.pricing import TOKEN_CLASSES
from tars_tasks.codes import FailureReason, RequestStatus
from tars_tasks.db.bulk import INT8_DUMPER, arrays_of, unnest_of
from tars_tasks.db.models import ApiCall, Request

_IDLE = psycopg.pq.TransactionStatus.IDLE

#: api_calls columns in insert order.
API_COLUMNS: tuple[str, ...] = (
    "id", "request_id", "attempt", "tier", "provider", "model", "outcome", "http_status", "error", *TOKEN_CLASSES,
    "cost_usd", "latency_ms", "ratelimit_wait_ms", "worker", "started_at", "finished_at",
)
API_UPDATABLE = ("outcome", "http_status", "error", *TOKEN_CLASSES, "cost_usd", "latency_ms",
                 "ratelimit_wait_ms", "finished_at")

#: The finishing UPDATE's values (``served_mode`` NULL keeps the row's mode), besides ``id``.
FINISH_COLUMNS: tuple[str, ...] = (
    "status", "result", "error", "failure_reason", "stop_reason", "tier_used", "model", "worker", "started_at",
    "finished_at", "answered_by", "served_mode",
)

#: What the loader reads of a request, in RequestRow's field order.
LOAD_COLUMNS = ("id", "status", "role", "tenant", "priority", "prompt", "tier_requested", "started_at",
                "submitted_at", "system", "messages", "max_tokens", "temperature", "stop", "response_format",
                "metadata", "cache_digest", "lane")


def _literal(code: str) -> str:
    """One of our own codes (never user text) as an SQL string literal."""
    if "%" in code or "\\" in code:
        raise ValueError(f"not a code: {code!r}")
    return "'" + code.replace("'", "''") + "'"


#: Every statement reaches its rows by their keys, one index probe per id, whatever the plan
#: cache holds: psycopg prepares a statement on its fifth use and Postgres then keeps one generic
#: plan, costed with the tables' sizes and statistics of that moment. Asked with ``id = ANY(ids)``
#: of a table still small (a fresh database; autovacuum off or not yet round) it keeps a seq scan
#: of the whole table, per batch, as the table grows: measured on a fresh bench database, the
#: totals join read every api_calls row for every group commit. A ``LATERAL`` subquery behind
#: ``OFFSET 0`` is not flattened into a join, so each id is one parameterised probe, and a pk
#: probe is an index scan at any size (``tests/integration/test_pg_plans.py``).
_BY_ID = "FROM unnest(%(ids)s::varchar[]) AS q(id) CROSS JOIN LATERAL"

#: Locks the batch's request rows in id order (the ids sorted by Postgres, as ``ORDER BY id`` was).
LOCK_SQL = ("SELECT r.id FROM (SELECT u.id FROM unnest(%(ids)s::varchar[]) AS u(id) ORDER BY u.id) AS q "
            "CROSS JOIN LATERAL (SELECT id FROM requests WHERE id = q.id OFFSET 0 FOR UPDATE) AS r")

_API = ApiCall.__table__
_REQ = Request.__table__


#: The row (its current version's ``ctid``) of the request ``u.id``, by one pk probe per id.
_TID_OF_U = "CROSS JOIN LATERAL (SELECT ctid AS tid FROM requests WHERE id = u.id OFFSET 0) AS x"

#: A group commit's step goes as one statement for all its rows from this many rows on, and as
#: a statement per row (psycopg's pipelined ``executemany``) below: measured under gevent
#: (``bench/bench_pgwrite.py --gevent``), one statement per row costs the client a pass through
#: gevent's poll per row, and one statement of arrays costs the server more for a few rows.
SETS_FROM = 8

#: Row by row: one attempt.
UPSERT_API_ROW_SQL = (
    f"INSERT INTO api_calls ({', '.join(API_COLUMNS)}) VALUES ({', '.join(f'%({c})s' for c in API_COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in API_UPDATABLE)}"
)
#: As a set: all the batch's attempts, a row per attempt id (the ids are distinct).
UPSERT_API_SET_SQL = (
    f"INSERT INTO api_calls ({', '.join(API_COLUMNS)}) SELECT * FROM {unnest_of(_API, API_COLUMNS)} AS u "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in API_UPDATABLE)}"
)

#: A request's totals, recomputed from all its attempts: the columns, and the aggregate over
#: api_calls ``a`` that gives them (one index probe per request, by ``a.request_id``).
TOTAL_COLUMNS: tuple[str, ...] = ("attempts", *TOKEN_CLASSES, "cost_usd")
_TOTALS_SELECT = (
    "SELECT count(a.id) AS attempts, "
    + ", ".join(f"coalesce(sum(a.{c}), 0) AS {c}" for c in TOKEN_CLASSES)
    + ", coalesce(sum(a.cost_usd), 0) AS cost_usd FROM api_calls AS a WHERE a.request_id = "
)
#: Only a request not finished already is finished (a duplicate delivery changes nothing).
_UNFINISHED = (f"(r.status = {_literal(RequestStatus.QUEUED)}"
               f" OR (r.status = {_literal(RequestStatus.FAILED)} AND r.started_at IS NULL"
               f" AND r.failure_reason = {_literal(FailureReason.ENQUEUE_FAILED)}))")
_TOTALS_CHANGED = (f"({', '.join(f'r.{c}' for c in TOTAL_COLUMNS)})"
                   f" IS DISTINCT FROM ({', '.join(f't.{c}' for c in TOTAL_COLUMNS)})")

def _finishing(value) -> str:
    """The finishing UPDATE up to its FROM: each column set to ``value(column)`` (``served_mode``
    NULL keeps the row's mode), and the totals from the request's attempts, in the same row version."""
    return ("UPDATE requests AS r SET " + ", ".join(f"{c} = {value(c)}" for c in FINISH_COLUMNS[:-1])
            + f", served_mode = coalesce({value('served_mode')}, r.served_mode)"
            + f", ({', '.join(TOTAL_COLUMNS)}) = ({_TOTALS_SELECT}r.id)")


#: Row by row: finishes a request not finished already.
FINISH_ROW_SQL = (_finishing(lambda c: "%(served_mode)s::varchar" if c == "served_mode" else f"%({c})s")
                  + f" WHERE r.id = %(id)s AND {_UNFINISHED}")
#: As a set: the same for all the batch's finishes, one per request id (the first of the batch,
#: as row by row). Rows are joined by ``ctid``, a TID scan each: the batch holds their locks, so
#: no version moves meanwhile.
_FINISH_VALUES = ("id", *FINISH_COLUMNS)
FINISH_SET_SQL = (
    _finishing(lambda c: f"v.{c}")
    + f" FROM (SELECT u.*, x.tid FROM {unnest_of(_REQ, _FINISH_VALUES)} AS u({', '.join(_FINISH_VALUES)})"
    + f" {_TID_OF_U}) AS v WHERE r.ctid = v.tid AND {_UNFINISHED}"
)

#: Row by row: a request's totals, written only where they changed (a request the batch finished
#: has them already: a second row version would cost its indexes and its foreign-key check again).
TOTALS_ROW_SQL = (
    "UPDATE requests AS r SET "
    + ", ".join(f"{c} = t.{c}" for c in TOTAL_COLUMNS)
    + f" FROM ({_TOTALS_SELECT}%(id)s) AS t"
    + f" WHERE r.id = %(id)s AND {_TOTALS_CHANGED}"
)
#: As a set: the same for all the batch's requests (the ids are distinct).
TOTALS_SET_SQL = (
    "UPDATE requests AS r SET "
    + ", ".join(f"{c} = t.{c}" for c in TOTAL_COLUMNS)
    + f" FROM (SELECT x.tid, s.* FROM unnest(%(ids)s::varchar[]) AS u(id) {_TID_OF_U}"
    + f" CROSS JOIN LATERAL ({_TOTALS_SELECT}u.id) AS s) AS t"
    + f" WHERE r.ctid = t.tid AND {_TOTALS_CHANGED}"
)

LOAD_SQL = (f"SELECT {', '.join(f'r.{c}' for c in LOAD_COLUMNS)} {_BY_ID} "
            f"(SELECT {', '.join(LOAD_COLUMNS)} FROM requests WHERE id = q.id OFFSET 0) AS r")


def load_requests(conn: Connection, ids: list[str]) -> list[tuple[Any, ...]]:
    """The LOAD_COLUMNS of the requests ``ids`` that exist (any order).

    One statement reads them: on a connection with nothing of a transaction sent yet it runs in
    autocommit, one round trip where psycopg's BEGIN and the ROLLBACK after made three; the
    connection is put back as it was after it."""
    raw = conn.connection.driver_connection
    if raw.autocommit or raw.info.transaction_status != _IDLE:
        return list(conn.exec_driver_sql(LOAD_SQL, {"ids": ids}).all())
    raw.autocommit = True
    try:
        return list(conn.exec_driver_sql(LOAD_SQL, {"ids": ids}).all())
    finally:
        if not _out_of_autocommit(raw):
            conn.invalidate()


def write_batch(conn: Connection, *, ids: list[str], api_rows: list[dict[str, Any]],
                finishes: list[dict[str, Any]], commit: bool = False) -> None:
    """A group commit's steps in one pipeline, in the transaction of ``conn``: lock the requests
    ``ids`` (sorted), upsert the attempts, finish the requests, recompute their totals.

    ``commit=True`` (nothing else is to run in the transaction) makes the whole transaction that
    pipeline: ``BEGIN``, the steps, ``COMMIT``, one round trip. psycopg would begin the transaction
    itself with a sync of its own (it waits for BEGIN's answer before the pipeline goes on), and
    SQLAlchemy's commit is one more: three round trips. So for that one pipeline the connection is
    in autocommit and the BEGIN and COMMIT are ours; after it, it is back as it was (a failed
    pipeline is rolled back first). SQLAlchemy's commit then finds nothing to commit.

    Raises what SQLAlchemy would have raised for the same failure: a ``DBAPIError`` subclass
    (``IntegrityError``, ``DataError``, ``OperationalError``, ...) with the driver's error as
    ``orig``, ``connection_invalidated`` set (and the connection invalidated) if it broke; a value
    the driver cannot encode as a ``StatementError``."""
    raw = conn.connection.driver_connection
    # only a transaction of which nothing was sent yet can be made one pipeline
    whole = commit and not raw.autocommit and raw.info.transaction_status == _IDLE
    try:
        if whole:
            raw.autocommit = True
        with raw.pipeline():
            cur = raw.cursor()
            cur.adapters.register_dumper(int, INT8_DUMPER)  # every int as int8 (tars_tasks.db.bulk.arrays_of)
            if whole:
                cur.execute("BEGIN")
            if ids:
                cur.execute(LOCK_SQL, {"ids": ids})
            if len(api_rows) >= SETS_FROM:
                cur.execute(UPSERT_API_SET_SQL, arrays_of(_API, api_rows, API_COLUMNS, int8_cursor=True))
            elif api_rows:
                cur.executemany(UPSERT_API_ROW_SQL, api_rows)
            if len(finishes) >= SETS_FROM:
                first: dict[str, dict[str, Any]] = {}
                for f in finishes:  # the first finish of a request wins, as row by row
                    first.setdefault(f["id"], f)
                cur.execute(FINISH_SET_SQL, arrays_of(_REQ, list(first.values()), _FINISH_VALUES, int8_cursor=True))
            elif finishes:
                cur.executemany(FINISH_ROW_SQL, finishes)
            if len(ids) >= SETS_FROM:
                cur.execute(TOTALS_SET_SQL, {"ids": ids})
            elif ids:
                cur.executemany(TOTALS_ROW_SQL, [{"id": i} for i in ids])
            if whole:
                cur.execute("COMMIT")
    except psycopg.Error as exc:
        broken = raw.broken or conn.dialect.is_disconnect(exc, raw, None) or (whole and not _out_of_autocommit(raw))
        if broken:
            conn.invalidate(exc)
        raise sa_exc.DBAPIError.instance("group commit", None, exc, psycopg.Error, hide_parameters=True,
                                         connection_invalidated=broken, dialect=conn.dialect) from exc
    except (TypeError, ValueError) as exc:  # a parameter the driver could not adapt or encode
        if whole and not _out_of_autocommit(raw):
            conn.invalidate(exc)
        raise sa_exc.StatementError(str(exc), "group commit", None, exc) from exc
    except BaseException as exc:  # interrupted (a timeout, a kill of the greenlet): never reuse it
        if whole:
            conn.invalidate(exc)
        raise
    if whole and not _out_of_autocommit(raw):
        conn.invalidate()
        raise sa_exc.DBAPIError.instance("group commit", None, psycopg.OperationalError(
            "the group commit's connection could not be put back out of autocommit"), psycopg.Error,
            hide_parameters=True, connection_invalidated=True, dialect=conn.dialect)


def _out_of_autocommit(raw: psycopg.Connection) -> bool:
    """After a statement or a pipeline of our own BEGIN ... COMMIT in autocommit: the connection
    out of autocommit again, any transaction a failure left open rolled back first. False if that
    could not be done (the connection must then be dropped, never reused)."""
    if raw.closed or raw.broken:
        return False
    try:
        if raw.info.transaction_status != _IDLE:
            raw.execute("ROLLBACK")
        raw.autocommit = False
    except psycopg.Error:
        return False
    return raw.info.transaction_status == _IDLE and not raw.autocommit
