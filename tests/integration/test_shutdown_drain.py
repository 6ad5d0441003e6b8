"""A worker told to stop stops fetching at its first empty poll (``tars_tasks.broker.halfopen``).

Celery's gevent consumer checks for a shutdown only between its ``drain_events(timeout=2.0)``
calls, and kombu polls again inside such a call after each empty BRPOP (1 s) until the 2 s are
over, then the consumer runs one more such call: a warm shutdown began up to 3 s after SIGTERM
and every stopped worker took ~5 s. Real Redis, the transport the workers use; the test counts
polls, not seconds."""

from __future__ import annotations

import uuid

import pytest
from celery.worker import state
from kombu import Connection, Exchange, Queue

from tars_tasks.broker import transport

pytestmark = pytest.mark.integration


@pytest.fixture
def stopping(monkeypatch):
    def _set(flag: str) -> None:
        monkeypatch.setattr(state, flag, 0)  # EX_OK: the value a warm (or cold) shutdown sets
    return _set


def _consuming(redis_url: str, got: list):
    transport.install()
    name = f"tars.test-drain-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    conn = Connection(redis_url, transport_options={"polling_interval": 0.2})
    consumer = conn.Consumer([queue], callbacks=[lambda body, message: (got.append(body), message.ack())])
    consumer.consume()
    polls = []
    poller = conn.transport.cycle
    real_get = poller.get
    poller.get = lambda *a, **kw: (polls.append(1), real_get(*a, **kw))[1]
    return conn, consumer, queue, polls


@pytest.mark.parametrize("flag", [None, "should_stop", "should_terminate"])
def test_a_stopping_worker_returns_from_drain_events_at_its_first_empty_poll(redis_url, stopping, flag):
    got: list = []
    conn, consumer, _queue, polls = _consuming(redis_url, got)
    try:
        if flag is not None:
            stopping(flag)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=1.0)  # several empty BRPOPs of 0.2 s fit in it
    finally:
        consumer.cancel()
        conn.release()
    if flag is None:
        assert len(polls) >= 2  # a running worker polls until its timeout, as kombu does
    else:
        assert len(polls) == 1
    assert got == []


def test_a_message_waiting_is_still_delivered_to_a_stopping_worker(redis_url, stopping):
    got: list = []
    conn, consumer, queue, _polls = _consuming(redis_url, got)
    try:
        conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key)
        stopping("should_stop")
        conn.drain_events(timeout=1.0)
    finally:
        consumer.cancel()
        conn.release()
    assert got == [{"n": 1}]
