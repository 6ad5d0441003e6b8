"""The writer's and the loader's statements as plain Postgres SQL (psycopg 3), compiled by nobody.

SQLAlchemy compiled and bound every row of every batch (an ``executemany`` of the finishing
UPDATE, the attempt upsert): about a fifth of a worker's CPU in issue 13's profile. Here the SQL
is constant text: the per-row steps (attempt upsert, finish) are psycopg ``executemany`` calls,
which pipeline the rows in one round trip and prepare the statement once per connection; the
per-batch steps (lock, totals, the loader's read) are one statement with an array of ids.
``bench/bench_pgwrite.py`` measured the alternatives (client CPU per entry, batches of 5 and
100): SQLAlchemy 1,534 / 277 us, one ``unnest`` statement per step 921 / 223 us, ``executemany``
797 / 158 us; an ``unnest`` also needs each array of one Python type (psycopg refuses
``[Decimal, float]``), which row-by-row binding does not.

The statements run through ``Connection.exec_driver_sql`` on the caller's SQLAlchemy connection:
the same transaction as before (the ``on_finished`` hook still gets that connection), the same
pool, pre-ping and invalidation of a connection a Postgres restart broke, the same SQLAlchemy
exceptions for :mod:`tars_tasks.db.errors` to classify. Only SQL compilation and SQLAlchemy's
per-row parameter handling are gone. The schema stays Alembic's
(``tests/integration/test_pg_statements.py`` checks the rows against the ORM statements').
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection

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


LOCK_SQL = "SELECT id FROM requests WHERE id = ANY(%(ids)s::varchar[]) ORDER BY id FOR UPDATE"

UPSERT_API_SQL = (
    f"INSERT INTO api_calls ({', '.join(API_COLUMNS)}) VALUES ({', '.join(f'%({c})s' for c in API_COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in API_UPDATABLE)}"
)

FINISH_SQL = (
    "UPDATE requests SET "
    + ", ".join(f"{c} = %({c})s" for c in FINISH_COLUMNS[:-1])
    + ", served_mode = coalesce(%(served_mode)s::varchar, served_mode)"
    + f" WHERE id = %(id)s AND (status = {_literal(RequestStatus.QUEUED)}"
    + f" OR (status = {_literal(RequestStatus.FAILED)} AND started_at IS NULL"
    + f" AND failure_reason = {_literal(FailureReason.ENQUEUE_FAILED)}))"
)

TOTALS_SQL = (
    "UPDATE requests AS r SET attempts = t.n, "
    + ", ".join(f"{c} = t.{c}" for c in TOKEN_CLASSES)
    + ", cost_usd = t.cost_usd FROM ("
    + "SELECT q.id, count(a.id) AS n, "
    + ", ".join(f"coalesce(sum(a.{c}), 0) AS {c}" for c in TOKEN_CLASSES)
    + ", coalesce(sum(a.cost_usd), 0) AS cost_usd"
    + " FROM unnest(%(ids)s::varchar[]) AS q(id) LEFT JOIN api_calls AS a ON a.request_id = q.id GROUP BY q.id"
    + ") AS t WHERE r.id = t.id"
)

LOAD_SQL = f"SELECT {', '.join(LOAD_COLUMNS)} FROM requests WHERE id = ANY(%(ids)s::varchar[])"


def lock_requests(conn: Connection, ids: list[str]) -> None:
    """``FOR UPDATE`` the request rows ``ids`` (sorted by the caller: a fixed lock order)."""
    conn.exec_driver_sql(LOCK_SQL, {"ids": ids})


def upsert_attempts(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Insert api_calls rows (ids unique within the call); an existing attempt takes the new values."""
    conn.exec_driver_sql(UPSERT_API_SQL, list(rows))


def finish_requests(conn: Connection, finishes: list[dict[str, Any]]) -> None:
    """Finish each request once, row by row in batch order (the id and FINISH_COLUMNS keys): a
    request finished twice in the batch keeps the first verdict, the second finds it finished."""
    conn.exec_driver_sql(FINISH_SQL, finishes)


def recompute_totals(conn: Connection, ids: list[str]) -> None:
    """Set attempts, tokens of every class and cost of the requests ``ids`` to the sums of their api_calls."""
    conn.exec_driver_sql(TOTALS_SQL, {"ids": ids})


def load_requests(conn: Connection, ids: list[str]) -> list[tuple[Any, ...]]:
    """The LOAD_COLUMNS of the requests ``ids`` that exist (any order)."""
    return list(conn.exec_driver_sql(LOAD_SQL, {"ids": ids}).all())
