"""The writer's and the loader's statements as plain Postgres SQL (psycopg 3), compiled by nobody.

SQLAlchemy compiled and bound every row of every batch (an ``executemany`` of the finishing
UPDATE, the attempt upsert): about a fifth of a worker's CPU in issue 13's profile. Here the SQL
is constant text: the per-row steps (attempt upsert, finish, totals) are psycopg ``executemany``
calls, which pipeline the rows in one round trip and prepare the statement once per connection;
the lock and the loader's read are one statement with an array of ids, probed id by id (see
``_BY_ID`` below: why no statement may leave the plan a choice of scanning a whole table).
``bench/bench_pgwrite.py`` measured the alternatives (client CPU per entry, batches of 5 and
100): SQLAlchemy 1,534 / 277 us, one ``unnest`` statement per step 921 / 223 us, ``executemany``
797 / 158 us; an ``unnest`` also needs each array of one Python type (psycopg refuses
``[Decimal, float]``), which row-by-row binding does not.

The statements run on the caller's SQLAlchemy connection (the loader's through
``Connection.exec_driver_sql``, the writer's on its driver connection, :func:`write_batch`): the
same transaction as before (the ``on_finished`` hook still gets that connection), the same pool,
pre-ping and invalidation of a connection a Postgres restart broke, the same SQLAlchemy exceptions
for :mod:`tars_tasks.db.errors` to classify. Only SQL compilation and SQLAlchemy's
per-row parameter handling are gone. The schema stays Alembic's
(``tests/integration/test_pg_statements.py`` checks the rows against the ORM statements').

A group commit's four steps go out in **one psycopg pipeline** (:func:`write_batch`): sent
together, their results read at one sync, then the COMMIT — two round trips where one per step
and a sync per ``executemany`` made five. On this 2-core machine a round trip through the driver
costs the client ~0.1 ms of CPU; ``bench/bench_pgwrite.py`` measured the client CPU per entry at
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

UPSERT_API_SQL = (
    f"INSERT INTO api_calls ({', '.join(API_COLUMNS)}) VALUES ({', '.join(f'%({c})s' for c in API_COLUMNS)}) "
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

#: Finishes a request not finished already, its totals in the same row version.
FINISH_SQL = (
    "UPDATE requests AS r SET "
    + ", ".join(f"{c} = %({c})s" for c in FINISH_COLUMNS[:-1])
    + ", served_mode = coalesce(%(served_mode)s::varchar, r.served_mode)"
    + f", ({', '.join(TOTAL_COLUMNS)}) = ({_TOTALS_SELECT}r.id)"
    + f" WHERE r.id = %(id)s AND (r.status = {_literal(RequestStatus.QUEUED)}"
    + f" OR (r.status = {_literal(RequestStatus.FAILED)} AND r.started_at IS NULL"
    + f" AND r.failure_reason = {_literal(FailureReason.ENQUEUE_FAILED)}))"
)

#: A request's totals, written only where they changed (a request the batch finished has them
#: already: a second row version would cost its indexes and its foreign-key check again).
TOTALS_SQL = (
    "UPDATE requests AS r SET "
    + ", ".join(f"{c} = t.{c}" for c in TOTAL_COLUMNS)
    + f" FROM ({_TOTALS_SELECT}%(id)s) AS t"
    + f" WHERE r.id = %(id)s AND ({', '.join(f'r.{c}' for c in TOTAL_COLUMNS)})"
    + f" IS DISTINCT FROM ({', '.join(f't.{c}' for c in TOTAL_COLUMNS)})"
)

LOAD_SQL = (f"SELECT {', '.join(f'r.{c}' for c in LOAD_COLUMNS)} {_BY_ID} "
            f"(SELECT {', '.join(LOAD_COLUMNS)} FROM requests WHERE id = q.id OFFSET 0) AS r")


def load_requests(conn: Connection, ids: list[str]) -> list[tuple[Any, ...]]:
    """The LOAD_COLUMNS of the requests ``ids`` that exist (any order)."""
    return list(conn.exec_driver_sql(LOAD_SQL, {"ids": ids}).all())


def write_batch(conn: Connection, *, ids: list[str], api_rows: list[dict[str, Any]],
                finishes: list[dict[str, Any]]) -> None:
    """A group commit's steps in one pipeline, in the transaction of ``conn``: lock the requests
    ``ids`` (sorted), upsert the attempts, finish the requests, recompute their totals.

    Raises what SQLAlchemy would have raised for the same failure: a ``DBAPIError`` subclass
    (``IntegrityError``, ``DataError``, ``OperationalError``, ...) with the driver's error as
    ``orig``, ``connection_invalidated`` set (and the connection invalidated) if it broke; a value
    the driver cannot encode as a ``StatementError``."""
    raw = conn.connection.driver_connection
    try:
        with raw.pipeline():
            cur = raw.cursor()
            if ids:
                cur.execute(LOCK_SQL, {"ids": ids})
            if api_rows:
                cur.executemany(UPSERT_API_SQL, api_rows)
            if finishes:
                cur.executemany(FINISH_SQL, finishes)
            if ids:
                cur.executemany(TOTALS_SQL, [{"id": i} for i in ids])
    except psycopg.Error as exc:
        broken = raw.broken or conn.dialect.is_disconnect(exc, raw, None)
        if broken:
            conn.invalidate(exc)
        raise sa_exc.DBAPIError.instance("group commit", None, exc, psycopg.Error, hide_parameters=True,
                                         connection_invalidated=broken, dialect=conn.dialect) from exc
    except (TypeError, ValueError) as exc:  # a parameter the driver could not adapt or encode
        raise sa_exc.StatementError(str(exc), "group commit", None, exc) from exc
