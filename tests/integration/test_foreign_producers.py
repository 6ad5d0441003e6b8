"""What a producer that has only Celery (or only a socket) meets: clear outcomes, never a hang."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
from sqlalchemy import text

from tests.helpers import make_settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dispatch", [False, True], ids=["published", "staged"])
def test_a_plain_celery_message_without_priority_runs_at_normal_priority(fleet_env, start_worker, db, dispatch):
    from celery import Celery

    from tars_tasks.client import TarsClient

    # A backlog before any worker: TARS high and low requests, and plain-Celery messages that say
    # nothing about priority (a stock app with stock transport options), interleaved.
    stock = Celery("someone-else", broker=fleet_env["TARS_BROKER_URL"])
    plain = []
    with TarsClient(settings=make_settings(fleet_env, dispatch_enabled=dispatch)) as client:
        for i in range(15):
            client.submit(role="researcher", prompt=f"low {i}", priority="low")
            rid = str(uuid.uuid4())
            stock.send_task("tars.run_request", kwargs={"role": "researcher", "prompt": f"plain {i}"}, task_id=rid,
                            queue="tars.haiku")
            plain.append(rid)
            client.submit(role="researcher", prompt=f"high {i}", priority="high")
    with db.connect() as conn:  # the TARS requests, read before a worker adopts any plain one
        ids = conn.execute(text("SELECT id FROM requests WHERE role = 'researcher'")).scalars().all()
    assert len(ids) == 30
    start_worker(tiers=["haiku"], concurrency=1, env={"TARS_SIM_LATENCY": "fixed:5"})
    from tests.faults.harness import wait_terminal

    assert wait_terminal(db, sorted({*ids, *plain}), timeout=120)
    with db.connect() as conn:
        order = conn.execute(text("SELECT priority FROM requests ORDER BY started_at")).scalars().all()
    assert len(order) == 45
    if not dispatch:
        # high first, then the plain ones at normal priority (5), then low
        assert order[:15] == [9] * 15 and order[15:30] == [5] * 15 and order[30:] == [0] * 15
    else:
        # Plain-Celery messages never go through staging: they sit in the Celery list and a worker
        # takes them as they come (a full worker dispatches nothing). The staged TARS requests still
        # run in priority order among themselves.
        tars = [p for p in order if p != 5]
        assert tars == [9] * 15 + [0] * 15


class _SilentServer:
    """Accepts TCP connections and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.timeout(60)
def test_a_hung_redis_at_submit_is_broker_unavailable_within_the_client_timeout(fleet_env, db):
    from tars_tasks.client import TarsClient
    from tars_tasks.errors import BrokerUnavailable

    hung = _SilentServer()
    try:
        url = f"redis://127.0.0.1:{hung.port}/0"
        settings = make_settings(fleet_env, broker_url=url, redis_url=url, client_timeout_s=1.0)
        with TarsClient(settings=settings) as client, pytest.raises(BrokerUnavailable):
            client.submit(role="researcher", prompt="into the void")
    finally:
        hung.close()
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar() == 0
