"""A producer's staging wakes the dispatchers of its tier (real Redis pub/sub).

The loops here tick once a minute, so anything they move within the test's few seconds was moved
because staging woke them; a broken subscription is made again and wakes resume.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis as redis_lib

from config.catalog import load_catalog
from config.keys import queue_for_tier, stage_wake_channel
from workers.dispatch import PRIORITIES, Dispatcher, DispatchLoop, LimitWindow, StagedMessage, Staging, celery_list

pytestmark = pytest.mark.integration

TIER = "haiku"
#: Longer than the test runs: a move seen within it is the wake's.
TICK_S = 60.0
#: How long a staged entry may take to be moved after its wake (a bound for a hung test, not a timing).
MOVE_BOUND_S = 10.0


def _moved(redis) -> list[str]:
    lists = [celery_list(queue_for_tier(TIER), p) for p in PRIORITIES]
    return [json.loads(raw)["id"] for name in lists for raw in redis.lrange(name, 0, -1)]


def _wait_for(cond, bound_s: float = MOVE_BOUND_S) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def loop(redis, redis_url):
    ns = f"wakes-{uuid.uuid4().hex[:8]}"
    # the listener's own client, named, so a test can cut its connection and no other process's
    listener = redis_lib.Redis.from_url(redis_url, client_name=ns)
    stepped = threading.Event()
    dispatcher = Dispatcher(redis_client=redis, namespace=ns, catalog=load_catalog(),
                            limits=LimitWindow(window_s=60.0, utilisation=1.0))
    lp = DispatchLoop(dispatcher=dispatcher, tiers=[TIER], free_slots=lambda: 100, tick_s=TICK_S,
                      on_result=lambda tier, result: stepped.set())
    lp.start().listen(redis_client=listener, namespace=ns)
    assert stepped.wait(MOVE_BOUND_S), "the loop's first step (nothing staged) did not run"
    lp.ns = ns  # type: ignore[attr-defined]
    yield lp
    lp.stop()
    listener.close()


def _subscribed(redis, ns: str) -> bool:
    return dict(redis.pubsub_numsub(stage_wake_channel(ns))).get(stage_wake_channel(ns).encode(), 0) >= 1


def _stage(redis, ns: str, ids: list[str], tier: str = TIER) -> None:
    Staging(redis_client=redis, namespace=ns).stage(
        [StagedMessage(id=i, tier=tier, priority=5, tenant="t", tokens=5, body=json.dumps({"id": i})) for i in ids])


def test_staged_entries_move_at_once_not_at_the_next_tick(redis, loop):
    assert _wait_for(lambda: _subscribed(redis, loop.ns))
    for round_ in range(3):  # after each move the tier is found empty again: the next wake must still count
        ids = [f"r{round_}-{i}" for i in range(4)]
        _stage(redis, loop.ns, ids)
        assert _wait_for(lambda ids=ids: set(ids) <= set(_moved(redis))), f"round {round_}: not moved"
    assert sorted(_moved(redis)) == sorted(f"r{r}-{i}" for r in range(3) for i in range(4))


def test_another_tiers_staging_moves_nothing_here(redis, loop):
    assert _wait_for(lambda: _subscribed(redis, loop.ns))
    _stage(redis, loop.ns, ["s-1"], tier="sonnet")
    _stage(redis, loop.ns, ["h-1"])
    assert _wait_for(lambda: "h-1" in _moved(redis))
    assert _moved(redis) == ["h-1"]
    assert Staging(redis_client=redis, namespace=loop.ns).staged_count(tier="sonnet") == 1  # no loop steps sonnet


def test_what_is_staged_while_the_subscription_is_down_moves_once_it_is_made_again(redis, loop):
    """Its wake is published to nobody; the listener's new subscription steps the tier."""
    assert _wait_for(lambda: _subscribed(redis, loop.ns))
    ids = [c["id"] for c in redis.client_list(_type="pubsub") if c.get("name") == loop.ns]
    assert ids, "the listener's subscription was not found"
    for client_id in ids:
        redis.client_kill_filter(_id=client_id)
    _stage(redis, loop.ns, ["unheard"])
    assert _wait_for(lambda: "unheard" in _moved(redis), bound_s=30.0)
    assert _wait_for(lambda: _subscribed(redis, loop.ns))
    _stage(redis, loop.ns, ["heard"])
    assert _wait_for(lambda: "heard" in _moved(redis))
