"""The writer's and loader's held connection (tars_tasks/db/held.py), on real Postgres."""

from __future__ import annotations

import pytest
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc

from tars_tasks.db.errors import is_transient
from tars_tasks.db.held import HeldConnection


@pytest.fixture
def checkouts(db):
    """Check-outs of the engine's pool, as the pool reports them (each one pre-pinged)."""
    seen: list[int] = []

    def count(dbapi_conn, record, proxy):
        seen.append(1)

    event.listen(db.pool, "checkout", count)
    yield seen
    event.remove(db.pool, "checkout", count)


def _backend_pid(conn) -> int:
    return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def test_uses_that_follow_closely_share_one_checkout_and_a_pause_gets_a_fresh_one(db, checkouts):
    held = HeldConnection(db, idle_s=60.0)
    pids = []
    for _ in range(5):
        with held.begin() as conn:
            pids.append(_backend_pid(conn))
        with held.connect() as conn:
            pids.append(_backend_pid(conn))
    assert len(checkouts) == 1 and len(set(pids)) == 1
    held.idle_s = 0.0  # every use now comes "after a pause"
    with held.begin() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert len(checkouts) == 2
    held.release()


def test_a_read_leaves_no_transaction_open_between_uses(db):
    held = HeldConnection(db, idle_s=60.0)
    with held.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        raw = conn.connection.dbapi_connection
    assert raw.info.transaction_status.name == "IDLE"
    held.release()


def test_a_connection_broken_while_held_fails_one_use_and_the_next_is_fresh(db, checkouts):
    held = HeldConnection(db, idle_s=60.0)
    with held.begin() as conn:
        pid = _backend_pid(conn)
    held_checkouts = len(checkouts)
    with db.connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        admin.commit()
    with pytest.raises(sa_exc.DBAPIError) as err, held.begin() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert is_transient(err.value)  # what the writer and the loader retry
    with held.begin() as conn:
        assert _backend_pid(conn) != pid
    assert held_checkouts == 1 and len(checkouts) == 3  # the admin's, then the fresh one
    held.release()


def test_an_error_in_a_use_rolls_back_and_gives_the_connection_back(db, checkouts):
    held = HeldConnection(db, idle_s=60.0)
    with pytest.raises(sa_exc.DBAPIError), held.begin() as conn:
        conn.exec_driver_sql("INSERT INTO runs (id, name, config, started_at) VALUES ('r1', 'x', '{}', now())")
        conn.exec_driver_sql("SELECT 1/0")
    with held.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM runs WHERE id = 'r1'").scalar() == 0
    assert len(checkouts) == 2
    held.release()


def test_many_commits_that_follow_closely_check_out_of_the_pool_once_where_each_did_before(db, checkouts):
    """The point of it: the pool pings a connection at every check-out (``pool_pre_ping``), and a
    busy writer's commits each paid that round trip."""
    for _ in range(20):
        with db.begin() as conn:  # the writer's way before
            conn.exec_driver_sql("SELECT 2")
    before = len(checkouts)
    held = HeldConnection(db, idle_s=60.0)
    for _ in range(20):
        with held.begin() as conn:
            conn.exec_driver_sql("SELECT 2")
    held.release()
    assert before == 20 and len(checkouts) - before == 1
