"""A staged message is an ordinary Celery message: rendered without sending, it is byte for byte
what a real publish pushes (but for kombu's per-publish delivery tag), and once dispatched a real
TARS worker runs it to a finished request row."""

from __future__ import annotations

import json

import pytest

from config.catalog import load_catalog
from config.keys import queue_for_tier
from tars_tasks.render import capture_lpush
from tests.helpers import make_settings
from workers.dispatch import PRIORITIES, Dispatcher, DispatchLoop, LimitWindow, StagedMessage, Staging, celery_list

pytestmark = pytest.mark.integration


def _publish(app, producer, *, request_id: str, priority: int, tenant: str = "acme", prompt: str = "hello") -> None:
    from tars_tasks.publish import publish_request

    publish_request(app, producer=producer, request_id=request_id, tier="haiku", tenant=tenant, priority=priority,
                    reply_to=None)


@pytest.mark.parametrize("events", [False, True])
def test_a_rendered_message_is_what_kombu_would_have_pushed_to_the_list_dispatch_would_choose(
        fleet_env, redis, events):
    from tars_tasks.celery_app import make_app

    app = make_app(make_settings(fleet_env, task_events=events))
    for priority in PRIORITIES:
        rid = f"00000000-0000-0000-0000-00000000000{priority}"
        with app.producer_or_acquire() as producer, capture_lpush(producer) as rendered:
            _publish(app, producer, request_id=rid, priority=priority)
        assert redis.keys("tars.haiku*") == []  # nothing was sent
        assert len(rendered.other) == (1 if events else 0)  # the task-sent event, kept apart
        with app.producer_or_acquire() as producer:
            _publish(app, producer, request_id=rid, priority=priority)
        [real_key] = [k.decode() for k in redis.keys("tars.haiku*")]
        real = json.loads(redis.rpop(real_key))
        [msg] = rendered.messages
        assert msg.list_key == real_key == celery_list(queue_for_tier("haiku"), priority)
        ours = json.loads(msg.payload)
        assert ours["properties"].pop("delivery_tag") != real["properties"].pop("delivery_tag")
        assert ours == real


def test_a_staged_and_dispatched_message_is_run_by_a_real_worker(fleet_env, redis, start_worker, db):
    from sqlalchemy import select

    from tars_tasks.celery_app import make_app
    from tars_tasks.coordinator import Coordinator
    from tars_tasks.db.models import Request

    settings = make_settings(fleet_env)
    app = make_app(settings)
    catalog = load_catalog()
    coord = Coordinator(settings=settings, catalog=catalog, celery_app=app, engine=db)
    planned = coord.plan([{"role": "researcher", "prompt": f"staged {i}", "tenant": t, "priority": p}
                          for i, (t, p) in enumerate([("a", 9), ("b", 0), ("a", 5), ("b", 9), ("c", 2)] * 4)])
    created, _ = coord._record(planned, run_id=None)
    assert len(created) == len(planned)
    messages = []
    with app.producer_or_acquire() as producer, capture_lpush(producer) as rendered:
        for p in planned:
            _publish(app, producer, request_id=p.id, priority=p.spec.priority, tenant=p.spec.tenant,
                     prompt=p.spec.prompt)
    for p, msg in zip(planned, rendered.messages, strict=True):
        messages.append(StagedMessage(id=p.id, tier="haiku", priority=p.spec.priority, tenant=p.spec.tenant,
                                      tokens=500, body=msg.payload))
    staging = Staging(redis_client=redis, namespace=settings.namespace)
    staging.stage(messages)

    start_worker(tiers=["haiku"], concurrency=5)
    dispatcher = Dispatcher(redis_client=redis, namespace=settings.namespace, catalog=catalog,
                            limits=LimitWindow(window_s=settings.ratelimit_window_s, utilisation=1.0))
    loop = DispatchLoop(dispatcher=dispatcher, tiers=["haiku"], free_slots=lambda: 5).start()
    try:
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with db.connect() as conn:
                statuses = list(conn.execute(select(Request.__table__.c.status)).scalars())
            if statuses and all(s == "succeeded" for s in statuses):
                break
            time.sleep(0.2)
    finally:
        loop.stop()
    assert statuses == ["succeeded"] * len(planned)
    assert staging.staged_count(tier="haiku") == 0
