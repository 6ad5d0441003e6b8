"""A bench's own Postgres database: dropped (its sessions ended), created and migrated afresh."""

from __future__ import annotations

import psycopg

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def fresh_db(name: str, *, admin_url: str = PG_ADMIN) -> str:
    """Drop and recreate database ``name`` on the local Postgres, migrate it to head; return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    import migrations

    migrations.upgrade(url)
    return url
