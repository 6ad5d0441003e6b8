"""Migration 0003 (model requests, token classes) on Postgres and on the embedded SQLite: rows
written at 0002 survive the upgrade (their token classes 0, their prompt kept), new rows use the
new columns, and the downgrade returns to 0002 without losing a request."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import create_engine, text

import migrations
from tests.conftest import PG_ADMIN_URL, PG_DB, _pg_url

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'embedded.db'}"
        return
    name = f"{PG_DB}_migrate"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _pg_url(name)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _engine(url: str):
    from tars_tasks.db.engine import normalise_url

    return create_engine(normalise_url(url))


def test_0003_upgrades_rows_of_0002_and_downgrades_without_losing_a_request(database_url):
    migrations.upgrade(database_url, "0002")
    old, call = str(uuid.uuid4()), str(uuid.uuid4())
    engine = _engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO requests (id, tenant, role, tier_requested, priority, prompt, status, attempts, "
                          "input_tokens, output_tokens, cost_usd, submitted_at) VALUES (:i, 'default', 'researcher', "
                          "'haiku', 5, 'an old prompt', 'succeeded', 1, 10, 20, 0.00011, :t)"), {"i": old, "t": NOW})
        conn.execute(text("INSERT INTO api_calls (id, request_id, attempt, tier, provider, model, outcome, "
                          "input_tokens, output_tokens, cost_usd, ratelimit_wait_ms, started_at) VALUES (:c, :i, 1, "
                          "'haiku', 'simulated', 'm', 'ok', 10, 20, 0.00011, 0, :t)"), {"c": call, "i": old, "t": NOW})
    engine.dispose()
    migrations.upgrade(database_url, "0003")
    assert migrations.current(database_url) == "0003"
    engine = _engine(database_url)
    new = str(uuid.uuid4())
    with engine.begin() as conn:
        row = conn.execute(text("SELECT prompt, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, "
                                "system, messages, stop_reason FROM requests WHERE id = :i"), {"i": old}).one()
        assert tuple(row) == ("an old prompt", 0, 0, 0, None, None, None)
        assert conn.execute(text("SELECT cache_read_tokens FROM api_calls WHERE id = :c"), {"c": call}).scalar() == 0
        conn.execute(text("INSERT INTO requests (id, tenant, role, tier_requested, priority, prompt, messages, "
                          "system, status, attempts, input_tokens, output_tokens, cost_usd, submitted_at) VALUES (:i, "
                          "'default', 'researcher', 'haiku', 5, NULL, :m, 'sys', 'queued', 0, 0, 0, 0, :t)"),
                     {"i": new, "m": '[{"role": "user", "content": "hi"}]', "t": NOW})
    engine.dispose()
    migrations.downgrade(database_url, "0002")
    engine = _engine(database_url)
    with engine.connect() as conn:
        prompts = dict(conn.execute(text("SELECT id, prompt FROM requests")).all())
        columns = conn.execute(text("SELECT * FROM requests WHERE id = :i"), {"i": old}).keys()
    engine.dispose()
    assert prompts == {old: "an old prompt", new: ""}
    assert "system" not in columns and "cache_read_tokens" not in columns
    migrations.upgrade(database_url)  # and up again
    assert migrations.current(database_url) == migrations.head()
    if database_url.startswith("sqlite"):
        os.remove(database_url.removeprefix("sqlite:///"))
