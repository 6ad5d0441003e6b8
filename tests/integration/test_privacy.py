"""Prompts stay in Postgres: not in task messages, not in Celery events (what Flower shows and
keeps in its persistent file)."""

from __future__ import annotations

import base64
import json
import threading

import pytest

from tests.helpers import make_settings

pytestmark = pytest.mark.integration

SECRET = "the launch code is 0000-TOP-SECRET"


@pytest.mark.parametrize("dispatch", [True, False], ids=["staged", "published"])
def test_a_task_message_carries_the_request_id_and_routing_fields_but_not_the_prompt(fleet_env, redis, dispatch):
    from config.keys import stage_queue_key
    from tars_tasks.client import TarsClient

    with TarsClient(settings=make_settings(fleet_env, dispatch_enabled=dispatch)) as client:
        handle = client.submit(role="researcher", prompt=SECRET, tenant="acme")
    if dispatch:  # a staged entry is "tokens|id|message": the message is what kombu would push
        entries = redis.lrange(stage_queue_key(fleet_env["TARS_NAMESPACE"], "haiku", 5, "acme"), 0, -1)
        assert len(entries) == 1 and SECRET not in entries[0].decode()
        raw = [entries[0].split(b"|", 2)[2]]
        assert redis.lrange("tars.haiku", 0, -1) == []
    else:
        raw = redis.lrange("tars.haiku", 0, -1)
    assert len(raw) == 1
    envelope = json.loads(raw[0])
    body = json.loads(base64.b64decode(envelope["body"]))
    args, kwargs, _embed = body
    assert args == [] and kwargs["request_id"] == handle.id and kwargs["tier"] == "haiku"
    assert SECRET not in raw[0].decode() and SECRET not in json.dumps(body)
    assert SECRET not in json.dumps(envelope["headers"])  # argsrepr / kwargsrepr too


def test_celery_events_of_a_request_never_carry_its_prompt(fleet_env, start_worker, client):
    from tars_tasks.celery_app import make_app

    app = make_app(make_settings(fleet_env))
    seen: list[dict] = []
    ready = threading.Event()
    receivers: list = []

    def capture() -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": seen.append})
            receivers.append(recv)
            ready.set()
            try:
                recv.capture(limit=None, timeout=None, wakeup=True)
            except Exception:  # the connection goes when the test ends
                pass

    t = threading.Thread(target=capture, daemon=True)
    t.start()
    assert ready.wait(10)
    start_worker(tiers=["haiku"], concurrency=5, env={"TARS_TASK_EVENTS": "true"}, events=True)
    handle = client.submit(role="researcher", prompt=SECRET)
    assert handle.wait(timeout=60).ok

    def task_events() -> list[dict]:
        return [e for e in seen if e.get("type", "").startswith("task-") and e.get("uuid") == handle.id]

    from tests.faults.harness import wait_until

    wait_until(lambda: {"task-received", "task-succeeded"} <= {e["type"] for e in task_events()}, timeout=30,
               what="the request's task events")
    receivers[0].should_stop = True
    assert SECRET not in json.dumps(task_events(), default=str)
    received = next(e for e in task_events() if e["type"] == "task-received")
    assert handle.id in received["kwargs"]  # what an operator sees: the request id
