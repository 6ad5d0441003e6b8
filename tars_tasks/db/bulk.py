"""Many rows of one table in one ``INSERT``, as constant SQL on Postgres.

SQLAlchemy's ``executemany`` of an ``INSERT ... RETURNING`` on Postgres renders one ``VALUES``
row per row ("insertmanyvalues"): a new SQL text for every batch size, which psycopg then parses
afresh (its query cache is keyed by the text) and Postgres plans afresh. At C = 2,000 that was
more than half of the producer's CPU in the submit path (py-spy, 2026-12-07: psycopg's
``_split_query`` alone a fifth). Here a Postgres insert is one text per set of columns,
``INSERT ... SELECT * FROM unnest(<one array per column>)``, binary parameters: parsed once,
prepared by psycopg after a few uses, and the rows' values bound as a few arrays. Any other
database (SQLite, embedded) gets SQLAlchemy's statement, as before.

Values are converted as the table's SQLAlchemy types would bind them: JSON as ``json.dumps``
text (None stays NULL: the columns are ``none_as_null``), codes (str enums) as their text, and
each array made of one Python type (psycopg refuses ``[Decimal, int]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any

from psycopg.types.numeric import Int8
from sqlalchemy import JSON, Connection, DateTime, Float, Integer, Numeric, String, Table, Text

from tars_tasks.db.upsert import insert_for


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
    if pg_type == "json":
        return lambda v: None if v is None else json.dumps(v)
    if pg_type in ("varchar", "text"):
        return lambda v: v if v is None or type(v) is str else str(v)
    if pg_type in ("integer", "bigint"):  # int8 always: an int array's type must not follow its values
        return lambda v: v if v is None else Int8(v)
    if pg_type == "double precision":
        return lambda v: v if v is None else float(v)
    if pg_type == "numeric":
        return lambda v: v if v is None or type(v) is Decimal else Decimal(str(v))
    return lambda v: v


@lru_cache(maxsize=64)
def _statement(table: Table, columns: tuple[str, ...], conflict: tuple[str, ...] | None,
               returning: str | None) -> tuple[str, tuple]:
    cols = [table.c[c] for c in columns]
    types = [_pg_type(c) for c in cols]
    arrays = ", ".join(f"%(c{i})b::{t}[]" for i, t in enumerate(types))
    names = ", ".join(f'"{c.name}"' for c in cols)
    sql = f'INSERT INTO "{table.name}" ({names}) SELECT * FROM unnest({arrays})'
    if conflict is not None:
        sql += f" ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    if returning is not None:
        sql += f' RETURNING "{returning}"'
    return sql, tuple(_converter(t) for t in types)


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
    sql, converters = _statement(table, columns,
                                 None if on_conflict_do_nothing is None else tuple(on_conflict_do_nothing), returning)
    params = {f"c{i}": [conv(r[c]) for r in rows] for i, (c, conv) in enumerate(zip(columns, converters, strict=True))}
    result = conn.exec_driver_sql(sql, params)
    return [r[0] for r in result] if returning is not None else []

