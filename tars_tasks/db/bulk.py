"""Many rows of one table in one ``INSERT``, as constant SQL on Postgres.

SQLAlchemy's ``executemany`` of an ``INSERT ... RETURNING`` on Postgres renders one ``VALUES``
row per row ("insertmanyvalues"): a new SQL text for every batch size, which psycopg then parses
afresh (its query cache is keyed by the text) and Postgres plans afresh. At C = 2,000 that was
more than half of the producer's py-spy samples in the submit path (2026-12-07: psycopg's
``_split_query`` alone a fifth). Here a Postgres insert is one text per set of columns,
``INSERT ... SELECT * FROM unnest(<one array per column>)``, binary parameters: parsed once,
prepared by psycopg after a few uses, and the rows' values bound as a few arrays. Any other
database (SQLite, embedded) gets SQLAlchemy's statement, as before.

The same binding (:func:`unnest_of`, :func:`arrays_of`) serves the group commit's statements of
arrays (:mod:`workers.pgsql`). Values are converted as the table's SQLAlchemy types would bind
them: JSON as ``json.dumps`` text (None stays NULL: the columns are ``none_as_null``), text as it
is (codes, str enums, dump as their text), ints as int8 (an int array's type must not follow its
values: each mix would be a prepared statement of its own), and each array made of one Python type
(psycopg refuses ``[Decimal, int]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any

from psycopg.types.numeric import Int8, Int8Dumper
from sqlalchemy import JSON, Connection, DateTime, Float, Integer, Numeric, String, Table, Text

from tars_tasks.db.upsert import insert_for

#: Register on a cursor for ``int`` to dump every int as int8 (see :func:`arrays_of`).
INT8_DUMPER = Int8Dumper


def _pg_type(col) -> str:
    t = col.type
    if isinstance(t, JSON):
        return "json"
    if isinstance(t, DateTime):
        return "timestamptz" if t.timezone else "timestamp"
    if isinstance(t, Integer):
        return "bigint" if t.__class__.__name__ == "BigInteger" else "integer"
    if isinstance(t, Float):
        return "double precision"
    if isinstance(t, Numeric):
        return "numeric"
    if isinstance(t, Text):
        return "text"
    if isinstance(t, String):
        return "varchar"
    raise TypeError(f"no array binding for column {col.name} of type {t!r}")


def _converter(pg_type: str):
    """How a value is bound into an array of ``pg_type`` (None: as it is)."""
    if pg_type == "json":
        return lambda v: None if v is None else json.dumps(v)
    if pg_type in ("integer", "bigint"):  # int8 always: an int array's type must not follow its values
        return lambda v: v if v is None else Int8(v)
    if pg_type == "double precision":
        return lambda v: v if v is None else float(v)
    if pg_type == "numeric":
        return lambda v: v if v is None or type(v) is Decimal else Decimal(str(v))
    return None


@lru_cache(maxsize=64)
def _binding(table: Table, columns: tuple[str, ...]) -> tuple[str, tuple, tuple]:
    types = [_pg_type(table.c[c]) for c in columns]
    arrays = ", ".join(f"%({c})b::{t}[]" for c, t in zip(columns, types, strict=True))
    converters = tuple(_converter(t) for t in types)
    # with a cursor that dumps every int as int8 an int column passes as it is (no Int8 per value)
    raw_ints = tuple(None if t in ("integer", "bigint") else conv for t, conv in zip(types, converters, strict=True))
    return f"unnest({arrays})", converters, raw_ints


def unnest_of(table: Table, columns: tuple[str, ...]) -> str:
    """``unnest(...)`` of one binary array parameter per column of ``table``, each named as its
    column and cast to its column's type (the parameters: :func:`arrays_of`)."""
    return _binding(table, columns)[0]


def arrays_of(table: Table, rows: Sequence[dict[str, Any]], columns: tuple[str, ...], *,
              int8_cursor: bool = False) -> dict[str, list[Any]]:
    """The parameters of :func:`unnest_of`: one array per column of ``rows``, bound as the column's
    type. ``int8_cursor``: the statement runs on a cursor with :data:`INT8_DUMPER` registered for
    ``int``, so ints are left as they are (wrapping each in ``Int8`` cost ~1.5 us an api_calls row)."""
    converters = _binding(table, columns)[2 if int8_cursor else 1]
    return {c: [r[c] for r in rows] if conv is None else [conv(r[c]) for r in rows]
            for c, conv in zip(columns, converters, strict=True)}


def insert_rows(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *,
                on_conflict_do_nothing: Sequence[str] | None = None, returning: str | None = None) -> list[Any]:
    """Insert ``rows`` (every row with the same keys: column names of ``table``) into ``table`` in
    the transaction of ``conn``; rows that would break the unique index on
    ``on_conflict_do_nothing`` are skipped. Returns the ``returning`` column of the rows inserted
    (an empty list without ``returning``). SQLAlchemy's exceptions either way."""
    if not rows:
        return []
    columns = tuple(rows[0])
    if conn.dialect.name != "postgresql":
        stmt = insert_for(conn, table)
        if on_conflict_do_nothing is not None:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(on_conflict_do_nothing))
        if returning is None:
            conn.execute(stmt, list(rows))
            return []
        return [r[0] for r in conn.execute(stmt.returning(table.c[returning]), list(rows))]
    sql = _insert_sql(table, columns, None if on_conflict_do_nothing is None else tuple(on_conflict_do_nothing),
                      returning)
    result = conn.exec_driver_sql(sql, arrays_of(table, rows, columns))
    return [r[0] for r in result] if returning is not None else []


@lru_cache(maxsize=64)
def _insert_sql(table: Table, columns: tuple[str, ...], conflict: tuple[str, ...] | None,
                returning: str | None) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    sql = f'INSERT INTO "{table.name}" ({names}) SELECT * FROM {unnest_of(table, columns)}'
    if conflict is not None:
        sql += f" ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    if returning is not None:
        sql += f' RETURNING "{returning}"'
    return sql
