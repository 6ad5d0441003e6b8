"""Dialect-aware ``INSERT ... ON CONFLICT`` (Postgres in production, SQLite embedded)."""

from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection


def insert_for(conn: Connection, table: Table):
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"TARS supports PostgreSQL and SQLite, not {conn.dialect.name}")
