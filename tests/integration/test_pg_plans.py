"""The writer's and the loader's statements (workers/pgsql.py) reach rows by key under any plan.

psycopg prepares a statement on its fifth use; Postgres then may keep one *generic* plan for it,
costed with the tables' sizes and statistics of that moment and kept until the table is analysed.
On a fresh database (autovacuum off, as on this machine, or not yet round) a plan made while the
tables were small was a seq scan: the former totals join read every api_calls row for every
group commit (4,184 seq scans, 44.6 M rows read in a 35 s bench run of 19,260 requests).

Here each statement is prepared with ``plan_cache_mode = force_generic_plan`` in a database of
its own, freshly migrated and never analysed, once with empty tables and once after 3,000
requests and their attempts were inserted, and its plan must scan neither ``requests`` nor
``api_calls`` sequentially.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import PG_ADMIN_URL, PG_DB, _pg_url
from workers import pgsql

pytestmark = pytest.mark.integration

#: Parameter types for PREPARE (the rest are varchar).
_TYPES = {"ids": "varchar[]", "attempt": "integer", "http_status": "integer", "input_tokens": "integer",
          "cache_write_tokens": "integer", "cache_write_1h_tokens": "integer", "cache_read_tokens": "integer",
          "output_tokens": "integer", "cost_usd": "numeric", "latency_ms": "numeric",
          "ratelimit_wait_ms": "numeric", "started_at": "timestamptz", "finished_at": "timestamptz"}

STATEMENTS = {"lock": pgsql.LOCK_SQL, "load": pgsql.LOAD_SQL, "upsert_api": pgsql.UPSERT_API_SQL,
              "finish": pgsql.FINISH_SQL, "totals": pgsql.TOTALS_SQL}


@pytest.fixture(scope="module")
def fresh_url() -> Iterator[str]:
    name = f"{PG_DB}_plans"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _pg_url(name)
    import migrations

    migrations.upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _generic_plan(conn: psycopg.Connection, name: str, sql: str) -> str:
    """The generic plan Postgres keeps for ``sql`` (psycopg's ``%(x)s`` made ``$n``), as text."""
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))
    for i, n in enumerate(names):
        sql = sql.replace(f"%({n})s", f"${i + 1}")
    conn.execute(f"PREPARE {name}({', '.join(_TYPES.get(n, 'varchar') for n in names)}) AS {sql}")
    plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN EXECUTE {name}({', '.join('NULL' for _ in names)})"))
    conn.execute(f"DEALLOCATE {name}")
    return plan


def _plans(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        assert conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'api_calls'").fetchone()[0] < 0, \
            "the table must be one never analysed"
        plans = {name: _generic_plan(conn, name, sql) for name, sql in STATEMENTS.items()}
        conn.rollback()
    return plans


def _seq_scans(plans: dict[str, str]) -> dict[str, list[str]]:
    return {name: found for name, plan in plans.items()
            if (found := re.findall(r"Seq Scan on (requests|api_calls)\b", plan))}


def _fill(url: str, n: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO requests (id, tenant, role, tier_requested, tier_queued, priority, prompt, status, "
            "submitted_at, attempts, input_tokens, output_tokens, cost_usd, lane) "
            "SELECT 'r' || g, 't', 'researcher', 'haiku', 'haiku', 5, 'p', 'queued', now(), 0, 0, 0, 0, "
            "'interactive' FROM generate_series(1, %s) AS g", (n,))
        conn.execute(
            "INSERT INTO api_calls (id, request_id, attempt, tier, provider, model, outcome, cost_usd, "
            "ratelimit_wait_ms, started_at) SELECT 'a' || g, 'r' || g, 1, 'haiku', 'sim', 'm', 'ok', 0, 0, now() "
            "FROM generate_series(1, %s) AS g", (n,))


def test_no_statement_scans_a_table_under_a_generic_plan_made_on_empty_or_unanalysed_tables(fresh_url):
    assert _seq_scans(_plans(fresh_url)) == {}
    _fill(fresh_url, 3000)
    assert _seq_scans(_plans(fresh_url)) == {}


def test_the_check_finds_the_seq_scan_of_the_former_totals_join(fresh_url):
    """The check itself can fail: the statement this replaced scans api_calls under the same conditions."""
    former = ("UPDATE requests AS r SET attempts = t.n FROM (SELECT q.id, count(a.id) AS n "
              "FROM unnest(%(ids)s::varchar[]) AS q(id) LEFT JOIN api_calls AS a ON a.request_id = q.id "
              "GROUP BY q.id) AS t WHERE r.id = t.id")
    with psycopg.connect(fresh_url) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = _generic_plan(conn, "former", former)
        conn.rollback()
    assert "Seq Scan on api_calls" in plan
