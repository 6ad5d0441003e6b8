"""GUIDE §5 case 16: a frozen or half-open Postgres/Redis connection is detected in bounded time.

"Frozen" is :meth:`tests.tcp_proxy.TcpProxy.freeze`: the proxy keeps every socket open and its
kernel keeps ACKing, but nothing is forwarded and new connections are accepted and left
unanswered — what a stopped server, a dead NAT entry or a partition behind a proxy look like.
The frozen connections stay frozen after :meth:`~tests.tcp_proxy.TcpProxy.restore`; only new
ones work again, so a client that does not notice the silence never recovers.

Every test asserts what happened (an error was returned, the connection was replaced, every
request finished) and waits with generous bounds that still catch an endless wait; the bounds
under test are small settings (1-3 s).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
import redis as redis_lib
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from tests.helpers import ROOT, make_settings, waiting_messages
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

#: The small bounds the tests run with (seconds).
DB_BOUNDS = {"TARS_DB_CONNECT_TIMEOUT_S": "2", "TARS_DB_STATEMENT_TIMEOUT_S": "1", "TARS_DB_IO_TIMEOUT_S": "3",
             "TARS_DB_IDLE_IN_TRANSACTION_TIMEOUT_S": "2"}
REDIS_BOUNDS = {"TARS_REDIS_SOCKET_CONNECT_TIMEOUT_S": "2", "TARS_REDIS_SOCKET_TIMEOUT_S": "2",
                "TARS_REDIS_HEALTH_CHECK_INTERVAL_S": "2"}


def _wait_until(predicate, *, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s (last value {last!r})")


class _Call:
    """Run ``fn`` in a thread so a test can bound its wait and still see an endless one."""

    def __init__(self, fn) -> None:
        self.result = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run():
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def wait(self, timeout: float) -> _Call:
        assert self.done.wait(timeout), f"still waiting after {timeout}s: the frozen peer was never detected"
        return self


def _via(url: str, proxy: TcpProxy, port: int) -> str:
    return url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")


@pytest.fixture
def pg_proxy():
    proxy = TcpProxy(target_host="127.0.0.1", target_port=5432)
    yield proxy
    proxy.close()


@pytest.fixture
def redis_proxy():
    proxy = TcpProxy(target_host="127.0.0.1", target_port=6379)
    yield proxy
    proxy.close()


def _db_settings(fleet_env, **env):
    return make_settings({**fleet_env, **DB_BOUNDS, **env})


def _finished(db) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM requests WHERE status <> 'queued'")).scalar()


# --- Postgres -----------------------------------------------------------------------------------


def test_a_statement_on_a_frozen_postgres_fails_within_the_bound_and_the_pool_replaces_the_connection(
    fleet_env, pg_proxy, db
):
    from tars_tasks.db.engine import get_engine

    url = _via(fleet_env["TARS_DATABASE_URL"], pg_proxy, 5432)
    engine = get_engine(url, settings=_db_settings(fleet_env))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    accepted_before = pg_proxy.accepted

    pg_proxy.freeze()

    def query():
        with engine.connect() as conn:
            return conn.execute(text("SELECT 2")).scalar()

    call = _Call(query).wait(60)
    assert isinstance(call.error, OperationalError), call.error
    assert "no answer from Postgres within" in str(call.error) or "timeout" in str(call.error).lower()

    pg_proxy.restore()
    with engine.connect() as conn:  # a new connection: the frozen one was closed, not handed out again
        assert conn.execute(text("SELECT 3")).scalar() == 3
    assert pg_proxy.accepted > accepted_before


def test_a_commit_on_a_frozen_postgres_fails_within_the_bound_and_nothing_is_half_written(fleet_env, pg_proxy, db):
    from tars_tasks.db.engine import get_engine

    engine = get_engine(_via(fleet_env["TARS_DATABASE_URL"], pg_proxy, 5432), settings=_db_settings(fleet_env))
    run_id = str(uuid.uuid4())

    def write():
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO runs (id, name, config, started_at) VALUES (:i, 'frozen', '{}', now())"),
                         {"i": run_id})
            pg_proxy.freeze()  # the INSERT went through; the COMMIT never gets its answer

    call = _Call(write).wait(60)
    assert isinstance(call.error, OperationalError), call.error
    pg_proxy.restore()
    with db.connect() as conn:  # the server never saw the COMMIT: the row is not there
        assert conn.execute(text("SELECT count(*) FROM runs WHERE id = :i"), {"i": run_id}).scalar() == 0


@pytest.mark.parametrize("end_abandoned", [True, False])
def test_the_server_process_of_a_connection_frozen_mid_pipeline_is_ended_by_the_next_connection(
    fleet_env, pg_proxy, db, end_abandoned
):
    """Frozen in the middle of a pipelined executemany, the server process waits for the rest in
    state 'active' (no statement or idle timeout applies) holding its locks, until someone ends it."""
    from tars_tasks.db.engine import get_engine

    settings = _db_settings(fleet_env, TARS_DB_END_ABANDONED_SESSIONS=str(end_abandoned).lower())
    engine = get_engine(_via(fleet_env["TARS_DATABASE_URL"], pg_proxy, 5432), settings=settings)
    backend: list[int] = []

    def write():
        with engine.begin() as conn:
            backend.append(conn.connection.dbapi_connection.backend[0])
            conn.exec_driver_sql("INSERT INTO runs (id, name, config, started_at) VALUES (%s, 'p', '{}', now())",
                                 [(str(uuid.uuid4()),) for _ in range(200_000)])

    def server_state():
        with db.connect() as conn:
            return conn.execute(text("SELECT state FROM pg_stat_activity WHERE pid = :p"),
                                {"p": backend[0]}).scalar() if backend else None

    call = _Call(write)
    _wait_until(lambda: server_state() == "active", timeout=30, interval=0.01, what="the executemany under way")
    pg_proxy.freeze()
    call.wait(60)
    assert isinstance(call.error, OperationalError), call.error
    time.sleep(3)  # longer than the statement and idle-in-transaction timeouts (1 s, 2 s)
    assert server_state() == "active", "the server ended the session itself: the premise does not hold"

    pg_proxy.restore()
    with engine.connect() as conn:  # the engine's next new connection
        conn.execute(text("SELECT 1"))
    if end_abandoned:
        _wait_until(lambda: server_state() is None, timeout=10, what="the abandoned server process ended")
        assert engine.abandoned_backends.terminated == 1
    else:
        assert server_state() == "active" and engine.abandoned_backends.terminated == 0
        with db.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": backend[0]})
    with db.connect() as conn:  # nothing of the cut-off batch was committed
        assert conn.execute(text("SELECT count(*) FROM runs WHERE name = 'p'")).scalar() == 0


def test_a_slow_statement_is_cancelled_by_the_server_and_the_connection_lives_on(fleet_env, db):
    from tars_tasks.db.engine import get_engine

    engine = get_engine(fleet_env["TARS_DATABASE_URL"], settings=_db_settings(fleet_env))
    with engine.connect() as conn:
        with pytest.raises(OperationalError, match="statement timeout"):
            conn.execute(text("SELECT pg_sleep(5)"))
        conn.rollback()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "1s"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == pid  # same pooled connection


def test_the_client_bound_is_on_silence_so_a_slow_but_live_server_is_never_cut_off(fleet_env, db):
    from tars_tasks.db.engine import get_engine

    engine = get_engine(fleet_env["TARS_DATABASE_URL"],
                        settings=make_settings(fleet_env, db_statement_timeout_s=0, db_io_timeout_s=3))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_sleep(2), 1")).all() == [("", 1)]  # 2 s of silence < 3 s
        # one pipelined executemany (one psycopg wait) that takes longer than the bound, answering all along
        conn.execute(text("CREATE TEMP TABLE t (i int)"))
        rows = [{"i": i} for i in range(3000)]
        conn.execute(text("INSERT INTO t (i) SELECT :i FROM pg_sleep(0.0015)"), rows)
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 3000


def test_postgres_and_redis_sockets_carry_the_keepalive_and_user_timeout_settings(fleet_env, redis_url, db):
    from tars_tasks.db.engine import get_engine
    from tars_tasks.redis_client import get_redis

    settings = make_settings({**fleet_env, "TARS_TCP_KEEPALIVE_IDLE_S": "17", "TARS_TCP_KEEPALIVE_INTERVAL_S": "4",
                              "TARS_TCP_KEEPALIVE_COUNT": "6", "TARS_TCP_USER_TIMEOUT_S": "21"})
    want = {socket.TCP_KEEPIDLE: 17, socket.TCP_KEEPINTVL: 4, socket.TCP_KEEPCNT: 6, socket.TCP_USER_TIMEOUT: 21000}

    def opts(sock: socket.socket) -> dict[int, int]:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        return {k: sock.getsockopt(socket.IPPROTO_TCP, k) for k in want}

    with get_engine(fleet_env["TARS_DATABASE_URL"], settings=settings).connect() as conn:
        fd = conn.connection.dbapi_connection.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as s:
            assert opts(s) == want
    client = get_redis(redis_url, settings=settings)
    client.ping()
    conn = client.connection_pool.get_connection()
    try:
        assert opts(conn._sock) == want
    finally:
        client.connection_pool.release(conn)


def test_settings_refuse_a_client_bound_shorter_than_the_server_statement_timeout():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"db_io_timeout_s \(30\) must exceed db_statement_timeout_s"):
        make_settings({}, db_statement_timeout_s=30, db_io_timeout_s=30)
    assert make_settings({}, db_statement_timeout_s=0, db_io_timeout_s=5).db_io_timeout_s == 5


def test_a_producer_submitting_to_a_frozen_postgres_gets_database_unavailable_and_nothing_is_queued(
    fleet_env, pg_proxy, redis, db
):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import DatabaseUnavailable

    settings = _db_settings(fleet_env, TARS_DATABASE_URL=_via(fleet_env["TARS_DATABASE_URL"], pg_proxy, 5432))
    with TarsClient(settings=settings) as client:
        warm = client.submit(role="researcher", prompt="before the freeze")
        queued = waiting_messages(redis, tiers=["haiku"])
        pg_proxy.freeze()
        call = _Call(lambda: client.submit(role="researcher", prompt="during the freeze")).wait(60)
        assert isinstance(call.error, DatabaseUnavailable), repr(call.error)
        assert waiting_messages(redis, tiers=["haiku"]) == queued
        pg_proxy.restore()
        after = client.submit(role="researcher", prompt="after the freeze")  # a new connection, same client
    with db.connect() as conn:
        prompts = sorted(conn.execute(text("SELECT prompt FROM requests")).scalars())
    assert prompts == ["after the freeze", "before the freeze"]
    assert warm.id != after.id


def test_workers_whose_postgres_froze_mid_run_detect_it_and_finish_every_request(
    fleet_env, start_worker, client, pg_proxy, db
):
    worker_db = _via(fleet_env["TARS_DATABASE_URL"], pg_proxy, 5432)
    worker = start_worker(tiers=["haiku"], concurrency=20,
                          env={"TARS_DATABASE_URL": worker_db, "TARS_SIM_LATENCY": "uniform:200:400", **DB_BOUNDS})
    handles = client.submit_many([{"role": "researcher", "prompt": f"job {i}"} for i in range(60)])
    _wait_until(lambda: _finished(db) >= 5, timeout=60, what="first requests finished")

    accepted_before = pg_proxy.accepted
    pg_proxy.freeze()  # the writer's commit, the in-flight attempt rows, the redelivery checks: all silent
    # the statement, COMMIT or pre-ping in progress is cut off (db_io_timeout_s); a new connection
    # to the frozen server times out (db_connect_timeout_s): either way the writer sees an error
    bounded = re.compile(r"no answer from Postgres within 3s|ConnectionTimeout\) connection timeout expired")
    _wait_until(lambda: bounded.search(worker.log()), timeout=90, what="the worker saw a bounded Postgres error")
    pg_proxy.restore()

    results = client.wait_many([h.id for h in handles], timeout=180)
    assert [r.status for r in results] == ["succeeded"] * 60
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 60
        assert conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'in_flight'")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM api_calls WHERE outcome = 'ok'")).scalar() >= 60
    assert pg_proxy.accepted > accepted_before, "the worker never opened a new connection"
    log = worker.log()
    assert "[parameters:" not in log  # a failed statement's row values stay out of logs (hide_parameters)
    assert "job 1" not in log


# --- Redis --------------------------------------------------------------------------------------


def test_the_fleet_state_client_times_out_on_a_frozen_redis_and_reconnects_after(fleet_env, redis_proxy, redis_url):
    from tars_tasks.redis_client import get_redis

    client = get_redis(_via(redis_url, redis_proxy, 6379), settings=make_settings({**fleet_env, **REDIS_BOUNDS}))
    assert client.ping()
    redis_proxy.freeze()
    call = _Call(client.ping).wait(30)
    assert isinstance(call.error, redis_lib.TimeoutError), repr(call.error)
    redis_proxy.restore()
    assert client.ping()


@pytest.mark.parametrize("admission", ["on", "off"])
def test_a_producer_submitting_to_a_frozen_broker_gets_an_error_within_the_bound(
    fleet_env, redis_proxy, redis_url, redis, db, admission
):
    """Submit in its own process (the bounds come from its environment, as in production)."""
    code = """
import json, sys, time
from tars_tasks.client import TarsClient
c = TarsClient()
c.submit(role="researcher", prompt="warm")      # subscribed, pooled connections open
sys.stdout.write("warm\\n"); sys.stdout.flush()
sys.stdin.readline()
time.sleep(0.3)                                  # past the admission sample interval
try:
    c.submit(role="researcher", prompt="frozen")
    print(json.dumps({"error": None}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "tars": type(exc).__module__ == "tars_tasks.errors"}))
"""
    env = {**fleet_env, **REDIS_BOUNDS, "TARS_BROKER_URL": _via(redis_url, redis_proxy, 6379),
           "TARS_MAX_QUEUE_DEPTH": "20000" if admission == "on" else "0"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "warm", proc.stderr.read()
        redis_proxy.freeze()
        proc.stdin.write("\n")
        proc.stdin.flush()
        # 2 s bounds; 25 s is generous for them and still catches the 30 s the old hard-coded timeout took
        out, err = proc.communicate(timeout=25)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["error"] is not None, "submit claimed success through a frozen broker"
    # admission on: the reservation meets the freeze first; off: the publish itself does
    assert outcome == {"error": "BrokerUnavailable", "tars": True}
    with db.connect() as conn:
        rows = dict(conn.execute(text("SELECT prompt, status FROM requests")).all())
    assert rows.get("frozen") in (None, "failed")  # never left 'queued' without a message


def test_the_completion_listener_drops_a_frozen_subscription_and_hears_notices_again(
    fleet_env, redis_proxy, redis_url, redis, db
):
    from tars_tasks.client import TarsClient

    settings = make_settings({**fleet_env, **REDIS_BOUNDS, "TARS_REDIS_URL": _via(redis_url, redis_proxy, 6379)})
    with TarsClient(settings=settings) as client:
        listener = client.listener
        first = listener.event_for("before")
        _wait_until(lambda: redis.publish(listener.channel, json.dumps([["before", "succeeded"]])) >= 1 and
                    first.wait(0.5), timeout=30, what="a notice before the freeze")

        redis_proxy.freeze()
        time.sleep(1)
        redis_proxy.restore()  # only new connections work: the subscription must be made again

        after = listener.event_for("after")

        def heard():
            redis.publish(listener.channel, json.dumps([["after", "succeeded"]]))
            return after.wait(0.5)

        _wait_until(heard, timeout=60, what="a notice after the freeze (the listener resubscribed)")
        assert redis_proxy.accepted >= 2


def test_a_worker_whose_broker_froze_takes_new_work_and_answers_pings_again(
    fleet_env, start_worker, client, redis_proxy, redis_url, db
):
    from tars_tasks.celery_app import make_app

    worker = start_worker(tiers=["haiku"], concurrency=10,
                          env={"TARS_BROKER_URL": _via(redis_url, redis_proxy, 6379), "TARS_REDIS_URL": redis_url,
                               "TARS_SIM_LATENCY": "fixed:20", **REDIS_BOUNDS})
    before = client.submit_many([{"role": "researcher", "prompt": f"before {i}"} for i in range(20)])
    assert {r.status for r in client.wait_many([h.id for h in before], timeout=60)} == {"succeeded"}

    redis_proxy.freeze()  # the worker's BRPOP, its remote-control subscription, its ack connections
    _wait_until(lambda: "BRPOP got no reply" in worker.log(), timeout=90, what="the BRPOP connection dropped")
    _wait_until(lambda: "pub/sub connection missed" in worker.log(), timeout=90,
                what="the remote-control subscription dropped")
    redis_proxy.restore()

    after = client.submit_many([{"role": "researcher", "prompt": f"after {i}"} for i in range(20)])
    assert {r.status for r in client.wait_many([h.id for h in after], timeout=120)} == {"succeeded"}
    app = make_app(make_settings(fleet_env))
    replies = _wait_until(lambda: app.control.ping(destination=[worker.name], timeout=2), timeout=60,
                          what="the worker answers a ping (tars fleet healthcheck worker)")
    assert [next(iter(r)) for r in replies] == [worker.name]
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests WHERE status = 'succeeded'")).scalar() == 40


def test_a_psycopg_connection_with_no_bound_would_wait_forever_on_a_frozen_peer(pg_proxy, pg_url):
    """The premise of BoundedConnection: keepalives and tcp_user_timeout do not catch a frozen peer
    on loopback (the kernel ACKs), so without a client-side bound a query never returns."""
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{pg_proxy.port}")
    conn = psycopg.connect(url, connect_timeout=2, keepalives=1, keepalives_idle=1, keepalives_interval=1,
                           keepalives_count=1, tcp_user_timeout=1000)
    conn.execute("SELECT 1")
    pg_proxy.freeze()
    call = _Call(lambda: conn.execute("SELECT 1"))
    assert not call.done.wait(6), "the kernel-level timeouts caught the frozen peer after all"
    pg_proxy.close()  # unblocks the thread (the socket closes) so it does not outlive the test
    call.wait(30)
