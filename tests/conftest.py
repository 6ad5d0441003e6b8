"""Shared fixtures: a real Postgres database, a real Redis database, real worker processes.

Isolation: each test run uses its own Postgres database (``TARS_TEST_PG_DB``, default
``tars_test``) and Redis database number (``TARS_TEST_REDIS_DB``, default 1), so parallel
runs on one machine can be kept apart by setting those two variables.

Under pytest-xdist (``scripts/test`` runs ``-n``), worker ``gwN`` uses the database
``<TARS_TEST_PG_DB>_gwN`` and the Redis database ``TARS_TEST_REDIS_DB + N`` — so a run with
``-n 3`` needs three consecutive free Redis database numbers from ``TARS_TEST_REDIS_DB`` on.
``TARS_TEST_REDIS_DB`` may also be a comma-separated list, one number per xdist worker.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis as redis_lib

from tars_tasks import supervisor
from tests.helpers import ROOT, WorkerProcess, empty_tables, make_settings

PG_ADMIN_URL = os.environ.get("TARS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("TARS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: The xdist worker this process is ("gw0", "gw1", ...), or None outside xdist.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_XDIST_INDEX = int(XDIST_WORKER[2:]) if XDIST_WORKER and XDIST_WORKER[2:].isdigit() else 0


def _redis_db() -> int:
    spec = os.environ.get("TARS_TEST_REDIS_DB", "1")
    if "," in spec:
        numbers = [int(n) for n in spec.split(",") if n.strip()]
        if _XDIST_INDEX >= len(numbers):
            raise RuntimeError(f"TARS_TEST_REDIS_DB={spec!r} names {len(numbers)} databases; "
                               f"xdist worker {XDIST_WORKER} needs one more")
        return numbers[_XDIST_INDEX]
    return int(spec) + _XDIST_INDEX


PG_DB = os.environ.get("TARS_TEST_PG_DB", "tars_test") + (f"_{XDIST_WORKER}" if XDIST_WORKER else "")
REDIS_DB = _redis_db()

# Nothing from the developer's shell may leak into tests.
for _k in [k for k in os.environ if k.startswith("TARS_") and not k.startswith("TARS_TEST_")]:
    del os.environ[_k]


def _pg_url(db: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{db}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A freshly created and migrated Postgres database for this test session."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (PG_DB,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}"')
        conn.execute(f'CREATE DATABASE "{PG_DB}"')
    url = _pg_url(PG_DB)
    import migrations

    migrations.upgrade(url)
    yield url


@pytest.fixture
def db(pg_url: str):
    """The test database's engine, emptied before the test."""

    from tars_tasks.db.engine import get_engine

    engine = get_engine(pg_url)
    empty_tables(engine)
    return engine


@pytest.fixture(scope="session")
def redis_url() -> str:
    return f"{REDIS_BASE}/{REDIS_DB}"


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    """A real Redis database, flushed before and after the test."""
    r = redis_lib.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture
def fleet_env(pg_url: str, redis_url: str, redis, db) -> dict[str, str]:
    """Environment for producers and workers of one test's fleet (fresh Redis and tables)."""
    return {
        "TARS_BROKER_URL": redis_url,
        "TARS_DATABASE_URL": pg_url,
        "TARS_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
        "TARS_SIM_LATENCY": "uniform:20:60",
        "TARS_SIM_FAILURE_RATE": "0",
        "TARS_TASK_EVENTS": "false",
        "TARS_VISIBILITY_TIMEOUT_S": "60",
        "TARS_UNACKED_RESTORE_INTERVAL_S": "1",
    }


@pytest.fixture
def client(fleet_env):
    from tars_tasks.client import TarsClient

    c = TarsClient(settings=make_settings(fleet_env))
    yield c
    c.close()


@pytest.fixture
def start_worker(fleet_env, tmp_path) -> Iterator:
    """Start real ``tars worker`` processes: ``start_worker(tiers=["haiku"], concurrency=50)``."""
    from workers.start import worker_argv

    started: list[WorkerProcess] = []

    def _start(*, tiers=("haiku", "sonnet", "opus"), concurrency: int = 100, env: dict | None = None,
               pool: str = "gevent", wait: bool = True, events: bool = False) -> WorkerProcess:
        name = f"w{len(started)}-{'+'.join(tiers)}@test"
        full_env = {**os.environ, **fleet_env, **(env or {})}
        argv = worker_argv(tiers=list(tiers), concurrency=concurrency, pool=pool, name=name,
                           loglevel="INFO", events=events)
        argv[0] = sys.executable
        log_path = tmp_path / f"worker-{len(started)}.log"
        proc = supervisor.start(argv, cwd=ROOT, env=full_env, log_path=log_path)
        wp = WorkerProcess(proc=proc, log_path=log_path, name=name)
        started.append(wp)
        if wait:
            wp.wait_ready()
        return wp

    yield _start
    # The test is over: its workers are killed at once, no warm shutdown (that took 3-4 s per
    # worker, nothing asserts on it here, and the tests of shutdown stop their workers themselves).
    # Nothing outlives the kill: the whole process group goes, the kernel closes the sockets, so
    # Postgres rolls back what a killed worker held, and the next test flushes Redis and the tables.
    supervisor.stop([wp.proc for wp in started], grace_s=0)


