"""The writer's and the loader's statements as plain Postgres SQL (psycopg 3), one statement per step.

SQLAlchemy compiled and bound every row of every batch (an ``executemany`` of the finishing
UPDATE, the attempt upsert): about a fifth of a worker's CPU in issue 13's profile. Here each step
of a batch is **one** statement whose parameters are arrays, one per column (``unnest``), with a
constant text, so psycopg prepares it once per connection and the server plans it once.

The statements run through ``Connection.exec_driver_sql`` on the caller's SQLAlchemy connection:
the same transaction as before (the ``on_finished`` hook still gets that connection), the same
pool, pre-ping and invalidation of a connection a Postgres restart broke, the same SQLAlchemy
exceptions for :mod:`tars_tasks.db.errors` to classify. Only SQL compilation and per-row binding
are gone. The schema stays Alembic's (the column types below are checked against the models in
``tests/integration/test_pg_statements.py``).

Arrays must be of one Python type (psycopg refuses ``[Decimal, float]``), so a column that mixes
types is converted here the way Postgres would have cast each value before (a float as its 15
significant digits, ``float8 -> numeric``; a float into an integer column rounded half to even).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection

from config.pricing import TOKEN_CLASSES
from tars_tasks.codes import FailureReason, RequestStatus

#: api_calls columns in insert order, with the Postgres array type of their parameter.
API_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "varchar"), ("request_id", "varchar"), ("attempt", "int4"), ("tier", "varchar"),
    ("provider", "varchar"), ("model", "varchar"), ("outcome", "varchar"), ("http_status", "int4"),
    ("error", "text"), *((c, "int4") for c in TOKEN_CLASSES), ("cost_usd", "numeric"),
    ("latency_ms", "numeric"), ("ratelimit_wait_ms", "numeric"), ("worker", "varchar"),
    ("started_at", "timestamptz"), ("finished_at", "timestamptz"),
)
API_UPDATABLE = ("outcome", "http_status", "error", *TOKEN_CLASSES, "cost_usd", "latency_ms",
                 "ratelimit_wait_ms", "finished_at")

#: The finishing UPDATE's values, with their array types (``served_mode`` NULL keeps the row's mode).
FINISH_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "varchar"), ("status", "varchar"), ("result", "text"), ("error", "text"),
    ("failure_reason", "varchar"), ("stop_reason", "varchar"), ("tier_used", "varchar"), ("model", "varchar"),
    ("worker", "varchar"), ("started_at", "timestamptz"), ("finished_at", "timestamptz"),
    ("answered_by", "varchar"), ("served_mode", "varchar"),
)

#: What the loader reads of a request, in RequestRow's field order.
LOAD_COLUMNS = ("id", "status", "role", "tenant", "priority", "prompt", "tier_requested", "started_at",
                "submitted_at", "system", "messages", "max_tokens", "temperature", "stop", "response_format",
                "metadata", "cache_digest", "lane")


def _unnest(columns: Sequence[tuple[str, str]]) -> str:
    args = ", ".join(f"%({c})s::{t}[]" for c, t in columns)
    return f"unnest({args}) AS v({', '.join(c for c, _ in columns)})"


LOCK_SQL = "SELECT id FROM requests WHERE id = ANY(%(ids)s::varchar[]) ORDER BY id FOR UPDATE"

UPSERT_API_SQL = (
    f"INSERT INTO api_calls ({', '.join(c for c, _ in API_COLUMNS)}) "
    f"SELECT * FROM {_unnest(API_COLUMNS)} "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in API_UPDATABLE)}"
)

FINISH_SQL = (
    "UPDATE requests AS r SET "
    + ", ".join(f"{c} = v.{c}" for c, _ in FINISH_COLUMNS[1:-1])
    + ", served_mode = coalesce(v.served_mode, r.served_mode)"
    + f" FROM {_unnest(FINISH_COLUMNS)}"
    + " WHERE r.id = v.id AND (r.status = %(queued)s OR (r.status = %(failed)s AND r.started_at IS NULL"
    + " AND r.failure_reason = %(enqueue_failed)s))"
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


def _as_decimal(v: Any) -> Decimal:
    if isinstance(v, float):
        return Decimal(f"{v:.15g}")  # what Postgres' float8 -> numeric cast keeps
    return v if isinstance(v, Decimal) else Decimal(v)


def _as_int(v: Any) -> int:
    return round(v) if isinstance(v, float) else int(v)  # float8 -> int4 rounds half to even, like round()


def _array(values: list[Any], pg_type: str) -> list[Any]:
    """``values`` as one array parameter: of one Python type, as psycopg requires."""
    if pg_type in ("varchar", "text", "timestamptz"):
        return values
    types = {type(v) for v in values}
    types.discard(type(None))
    if len(types) <= 1:
        return values
    convert = _as_decimal if pg_type == "numeric" else _as_int
    return [None if v is None else convert(v) for v in values]


def _arrays(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> dict[str, list[Any]]:
    rows = list(rows)
    return {c: _array([r[c] for r in rows], t) for c, t in columns}


def lock_requests(conn: Connection, ids: list[str]) -> None:
    """``FOR UPDATE`` the request rows ``ids`` (sorted by the caller: a fixed lock order)."""
    conn.exec_driver_sql(LOCK_SQL, {"ids": ids})


def upsert_attempts(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    """Insert api_calls rows (ids unique within the call); an existing attempt takes the new values."""
    conn.exec_driver_sql(UPSERT_API_SQL, _arrays(rows, API_COLUMNS))


def finish_requests(conn: Connection, finishes: list[dict[str, Any]]) -> None:
    """Finish each request once. ``finishes`` (FINISH_COLUMNS keys) in batch order: the first
    finish of an id is the one that can apply (as the row-by-row UPDATE did, whose later rows found
    the request no longer queued); ``UPDATE ... FROM`` with an id twice would pick either."""
    first: dict[str, dict[str, Any]] = {}
    for f in finishes:
        first.setdefault(f["id"], f)
    params: dict[str, Any] = _arrays(first.values(), FINISH_COLUMNS)
    params.update(queued=str(RequestStatus.QUEUED), failed=str(RequestStatus.FAILED),
                  enqueue_failed=str(FailureReason.ENQUEUE_FAILED))
    conn.exec_driver_sql(FINISH_SQL, params)


def recompute_totals(conn: Connection, ids: list[str]) -> None:
    """Set attempts, tokens of every class and cost of the requests ``ids`` to the sums of their api_calls."""
    conn.exec_driver_sql(TOTALS_SQL, {"ids": ids})


def load_requests(conn: Connection, ids: list[str]) -> list[tuple[Any, ...]]:
    """The LOAD_COLUMNS of the requests ``ids`` that exist (any order)."""
    return list(conn.exec_driver_sql(LOAD_SQL, {"ids": ids}).all())
