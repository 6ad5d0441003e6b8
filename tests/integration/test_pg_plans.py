"""The writer's and the loader's statements (workers/pgsql.py) reach rows by key under any plan.

psycopg prepares a statement on its fifth use; Postgres then may keep one *generic* plan for it,
costed with the tables' sizes and statistics of that moment and kept until the table is analysed.
On a fresh database (autovacuum off, as on this machine, or not yet round) a plan made while the
tables were small was a seq scan: the former totals join read every api_calls row for every
group commit (4,184 seq scans, 44.6 M rows read in a 35 s bench run of 19,260 requests).

Here each statement is prepared with ``plan_cache_mode = force_generic_plan`` in a database of
its own, freshly migrated and never analysed, once with empty tables and once after 3,000
requests and their attempts were inserted, and its plan must reach ``requests`` and ``api_calls``
rows only by key: their primary keys, ``api_calls.request_id``'s index, or a TID scan (a row found by
key) — no seq scan, no scan of the status index.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import PG_ADMIN_URL, PG_DB, _pg_url
from workers import pgsql

pytestmark = pytest.mark.integration

#: Types to PREPARE a parameter the statement does not cast as (the rest are varchar).
_TYPES = {"attempt": "integer", "http_status": "integer", "input_tokens": "integer",
          "cache_write_tokens": "integer", "cache_write_1h_tokens": "integer", "cache_read_tokens": "integer",
          "output_tokens": "integer", "cost_usd": "numeric", "latency_ms": "numeric",
          "ratelimit_wait_ms": "numeric", "started_at": "timestamptz", "finished_at": "timestamptz"}

STATEMENTS = {"lock": pgsql.LOCK_SQL, "load": pgsql.LOAD_SQL,
              "upsert_api_row": pgsql.UPSERT_API_ROW_SQL, "upsert_api_set": pgsql.UPSERT_API_SET_SQL,
              "finish_row": pgsql.FINISH_ROW_SQL, "finish_set": pgsql.FINISH_SET_SQL,
              "totals_row": pgsql.TOTALS_ROW_SQL, "totals_set": pgsql.TOTALS_SET_SQL}


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
    """The generic plan Postgres keeps for ``sql`` (psycopg's ``%(x)s`` made ``$n``), as text.
    A parameter is PREPAREd as the type the statement casts it to (``%(x)b::integer[]``), else as
    its column's (:data:`_TYPES`)."""
    casts = dict(re.findall(r"%\((\w+)\)[sb]::(\w+(?:\[\])?)", sql))
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)[sb]", sql)))
    for i, n in enumerate(names):
        sql = re.sub(rf"%\({n}\)[sb]", f"${i + 1}", sql)
    conn.execute(f"PREPARE {name}({', '.join(casts.get(n) or _TYPES.get(n, 'varchar') for n in names)}) AS {sql}")
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


#: How a statement may reach rows of requests and api_calls: by key (a TID scan: a row found by key).
_BY_KEY = re.compile(r"(Index (Only )?Scan using (requests_pkey|api_calls_pkey|ix_api_calls_request_id)"
                     r"|Tid Scan) on (requests|api_calls)\b")


def _seq_scans(plans: dict[str, str]) -> dict[str, list[str]]:
    """Per statement, its scans of requests or api_calls not by key (a seq scan; an index on
    status, which reads every queued request; a bitmap scan)."""
    out = {}
    for name, plan in plans.items():
        scans = re.findall(r"((?:[\w ]+ )?Scan(?: using \w+)? on (?:requests|api_calls))\b", plan)
        if found := [s.strip() for s in scans if not _BY_KEY.search(s)]:
            out[name] = found
    return out


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
    assert "Seq Scan on api_calls" in _seq_scans({"former": plan})["former"]


def test_the_check_finds_a_set_update_that_joins_by_id(fresh_url):
    """The obvious set-based finish, ``UPDATE ... FROM unnest(...) WHERE r.id = v.id``, is planned
    as a hash join over the requests found by status: every queued request is read per batch."""
    naive = ("UPDATE requests AS r SET status = v.status FROM unnest(%(ids)b::varchar[], %(status)b::varchar[]) "
             "AS v(id, status) WHERE r.id = v.id AND r.status = 'queued'")
    with psycopg.connect(fresh_url) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = _generic_plan(conn, "naive", naive)
        conn.rollback()
    assert _seq_scans({"naive": plan}) == {"naive": ["Index Scan using ix_requests_status on requests"]}
